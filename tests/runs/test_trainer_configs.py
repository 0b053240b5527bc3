"""What acctattr reads from a Hugging Face Trainer folder equals what the Trainer did, on
Trainer configurations beyond the defaults: other optimizers, clipping and gradient
accumulation from training_args.bin, a resumed run, schedules logged sparsely.

Each tiny run (a two-layer GPT-2 LM from tests/lm_runs.py, 20 steps on generated text, a
second on a CPU) is trained once per session by the ``trainer_run`` fixture; the truth is
what the Trainer's optimizer held at every step (a callback) and what transformers' own
functions give.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_runs import save_tokenizer, sentences, tiny_lm, write_jsonl  # noqa: E402
from reportkit import cli  # noqa: E402
from test_hostile import refused  # noqa: E402

transformers = pytest.importorskip("transformers")

STEPS = 20


class Run:
    """A trained tiny run: its folder and the lr the optimizer held at each step."""

    def __init__(self, root: Path, lrs: list[float], groups: list[dict] | None = None) -> None:
        self.root = root
        self.lrs = lrs
        # the Trainer's optimizer param groups: parameter names and hyperparameters
        self.groups = groups or []

    @property
    def end(self) -> Path:
        from acctattr.runs import formats

        return formats.trainer_checkpoints(self.root / "stage")[-1][1]

    def manifest(self, optimizer: str = "{type: adamw}", stages: str | None = None) -> Path:
        """A hand-written manifest naming the run's last checkpoint as the one stage's end."""
        stages = stages or f"""  - name: only
    start: init
    end: {self.end.relative_to(self.root)}
    optimizer: {optimizer}
"""
        path = self.root / "manifest.yaml"
        path.write_text(f"""version: 1
model: {{hf: init}}
stages:
{stages}eval:
  data: eval.jsonl
  tokenizer: tokenizer
  max_length: 32
  metric: next_token_loss
""")
        return path


def _trainer(root: Path, n: int, callbacks: list, optimizer=None, **kw):
    from transformers import (
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )

    tok = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "init"),
                                                             local_files_only=True)
    args = dict(max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=4,
                learning_rate=1e-2, weight_decay=0.1, save_strategy="steps", logging_steps=1,
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    args.update(kw)
    return Trainer(model=model, args=TrainingArguments(str(root / "stage"), **args),
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                   train_dataset=[{"input_ids": tok(t)["input_ids"]}
                                  for t in sentences(1, n)],
                   processing_class=tok, callbacks=callbacks,
                   optimizers=(optimizer(model) if optimizer else None, None))


def train(root: Path, n: int = 40, resume_at: int | None = None, optimizer=None,
          model: Callable[[], Any] = tiny_lm, **kw) -> Run:
    """Train the tiny LM with TrainingArguments ``kw``; with ``resume_at``, stop there (a
    checkpoint every ``resume_at`` steps, the rest deleted) and resume with a new Trainer
    (resume_from_checkpoint), as a run that was interrupted; ``optimizer(model)`` builds the
    optimizer the Trainer is given instead of its own; ``model()`` the model (tiny_lm)."""
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: list[float] = []
            self.groups: list[dict] = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None,
                                  **_):
            self.lrs.append(optimizer.param_groups[0]["lr"])
            names = {id(p): n for n, p in model.named_parameters()}
            self.groups = [{**{k: v for k, v in g.items() if k != "params"},
                            "names": [names[id(p)] for p in g["params"]]}
                           for g in optimizer.param_groups]

    root.mkdir(parents=True, exist_ok=True)
    save_tokenizer(root / "tokenizer")
    model().save_pretrained(root / "init")
    PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    write_jsonl(root / "eval.jsonl", [{"text": t} for t in sentences(4, 8)])
    rec = Record()
    if resume_at is None:
        _trainer(root, n, [rec], optimizer, **kw).train()
        return Run(root, rec.lrs, rec.groups)
    _trainer(root, n, [rec], save_steps=resume_at, **kw).train()
    for folder in (root / "stage").glob("checkpoint-*"):
        if int(folder.name.split("-")[1]) > resume_at:
            shutil.rmtree(folder)
    again = Record()
    _trainer(root, n, [again], save_steps=resume_at, **kw).train(
        resume_from_checkpoint=str(root / "stage" / f"checkpoint-{resume_at}"))
    return Run(root, rec.lrs[:resume_at] + again.lrs, again.groups)


@pytest.fixture(scope="session")
def trainer_run(tmp_path_factory) -> Callable[..., Run]:
    """``trainer_run(name, **kw)``: the run ``train`` makes with ``kw``, trained once per
    session under that name (tests copy it before changing anything)."""
    runs: dict[str, Run] = {}

    def get(name: str, **kw) -> Run:
        if name not in runs:
            runs[name] = train(tmp_path_factory.mktemp(name), **kw)
        return runs[name]

    return get


# ---------------------------------------------------------------- what was already right


def _llama(tie: bool):
    import torch
    from lm_runs import SPECIAL, WORDS
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(SPECIAL) + len(WORDS), tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=2, eos_token_id=2))


@pytest.mark.parametrize("name,kw", [
    ("fused-betas", dict(optim="adamw_torch_fused", adam_beta1=0.8, adam_beta2=0.95,
                         adam_epsilon=1e-6, weight_decay=0.05)),
    ("torch-wd0", dict(optim="adamw_torch", weight_decay=0.0)),
    ("warmup-fraction", dict(lr_scheduler_type="cosine", warmup_steps=0.15, logging_steps=6)),
    ("constant-warmup", dict(lr_scheduler_type="constant_with_warmup", warmup_steps=4,
                             logging_steps=6)),
    ("epochs", dict(max_steps=-1, num_train_epochs=2, save_strategy="epoch")),
    ("llama-tied", dict(model=lambda: _llama(True))),
    ("llama-untied", dict(model=lambda: _llama(False), weight_decay=0.1)),
])
def test_trainer_folder_reads_equal_what_the_trainer_did(trainer_run, name, kw):
    """Configurations acctattr already read right (the audit's passing cases, kept): the
    lr of every step, each param group's parameters (the Trainer's decay rule, a tied
    embedding once) and its weight decay, betas, eps, read from a hand-written manifest,
    equal the Trainer's optimizer at its last step."""
    from acctattr import pipeline

    run = trainer_run(name, **kw)
    loaded = pipeline.check(run.manifest())
    got = loaded.runs[0]
    assert list(got.lrs) == pytest.approx(run.lrs, rel=1e-12, abs=1e-15)
    assert len(got.state.groups) == len(run.groups) == 2
    for ours, theirs in zip(got.state.groups, run.groups, strict=True):
        assert list(ours.names) == theirs["names"]
        assert (ours.weight_decay, (ours.beta1, ours.beta2), ours.eps, ours.amsgrad) == (
            theirs["weight_decay"], tuple(theirs["betas"]), theirs["eps"], theirs["amsgrad"])
    assert not loaded.warnings


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("optim,holds", [("rmsprop", "square_avg"), ("adagrad", "sum"),
                                         ("adafactor", "exp_avg_sq_row")])
def test_optimizer_acctattr_does_not_model_is_refused(trainer_run, optim, holds):
    """A Trainer run with optim rmsprop, adagrad or adafactor is refused (exit 2, naming
    the stage, optimizer.pt and the state it holds), not read as AdamW's state with its
    own state dropped (rmsprop and adagrad were accepted as adamw before)."""
    run = trainer_run(optim, optim=optim)
    refused(cli("check", run.manifest()), "stage 'only'", str(run.end / "optimizer.pt"),
            f"state '{holds}'", "not written by SGD, Adam or AdamW")


def test_init_does_not_draft_rmsprop_as_sgd(trainer_run, tmp_path):
    """`acctattr init` on an RMSprop run drafts the optimizer type as a TODO naming what
    the state holds (RMSprop's param_groups have a momentum: it was drafted as sgd)."""
    import yaml

    run = trainer_run("rmsprop", optim="rmsprop")
    out = tmp_path / "drafted.yaml"
    res = cli("init", "--start", run.root / "init", run.root / "stage", "--output", out)
    assert res.exit_code == 0, res.output
    typ = yaml.safe_load(out.read_text())["stages"][0]["optimizer"]["type"]
    assert typ.startswith("TODO(acctattr)") and "square_avg" in typ and "RMSprop" in typ


def test_param_groups_at_different_learning_rates_are_refused(trainer_run):
    """A Trainer given an AdamW with its own decay / no-decay groups, the no-decay one at a
    tenth of the lr: one lr per step would misstate every update of one group; refused
    naming optimizer.pt and both lrs (it was accepted, the logged lr, group 0's, applied to
    every parameter)."""
    import torch

    from acctattr.evaluation.model import hf_no_decay

    def optimizer(model):
        skip = hf_no_decay(model)
        decay = [p for n, p in model.named_parameters() if n not in skip]
        rest = [p for n, p in model.named_parameters() if n in skip]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                  {"params": rest, "weight_decay": 0.0, "lr": 1e-3}], lr=1e-2)

    run = trainer_run("two-lrs", optimizer=optimizer)
    refused(cli("check", run.manifest()), "stage 'only'", str(run.end / "optimizer.pt"),
            "different learning rates (initial_lr 0.01, 0.001)")


def test_adam_declared_for_a_trainer_adamw_state_is_refused(trainer_run):
    """optimizer.type adam for a Trainer's AdamW state (decoupled_weight_decay true in its
    param_groups) is refused: Adam would apply the weight decay through the gradient."""
    run = trainer_run("adamw", lr_scheduler_type="linear", warmup_steps=3)
    refused(cli("check", run.manifest("{type: adam}")), "stage 'only'",
            "written by AdamW (decoupled_weight_decay true)", "optimizer.type is adam")


# ---------------------------------------------------------------- clipping, accumulation


@pytest.mark.parametrize("clip,want", [(0.0, None), (0.5, 0.5), (2.0, 2.0)])
def test_hand_written_manifest_takes_the_runs_max_grad_norm(trainer_run, clip, want):
    """A manifest that names a Trainer folder and no max_grad_norm clips as the run did
    (training_args.bin's max_grad_norm; 0: none), not at Trainer's default 1.0."""
    from acctattr import pipeline

    run = trainer_run(f"clip{clip}", max_grad_norm=clip)
    assert pipeline.check(run.manifest()).runs[0].max_grad_norm == want


def test_hand_written_manifest_takes_the_runs_gradient_accumulation(trainer_run):
    """gradient_accumulation_steps 3 over 40 examples in batches of 4 (10 batches an epoch:
    the last accumulation of each is partial): the stage has the 12 optimizer steps the
    Trainer took, the lrs it used, and 4 × 3 examples per step (was 4)."""
    from acctattr import pipeline

    run = trainer_run("accum", gradient_accumulation_steps=3, max_steps=-1,
                      num_train_epochs=3, save_strategy="epoch")
    loaded = pipeline.check(run.manifest())
    assert loaded.runs[0].batch_size == 12
    assert list(loaded.runs[0].lrs) == pytest.approx(run.lrs, rel=1e-12) and len(run.lrs) == 12
    explicit = pipeline.check(run.manifest("{type: adamw, grad_accumulation: 2}"))
    assert explicit.runs[0].batch_size == 8  # the manifest's word wins


def test_unreadable_training_args_keep_trainers_defaults(trainer_run, tmp_path):
    """Where training_args.bin cannot be read, Trainer's defaults stand (max_grad_norm 1.0,
    no accumulation), as the README says; a max_grad_norm that is not a number is refused
    naming the file."""
    from acctattr import pipeline

    run = Run(tmp_path / "run", [])
    shutil.copytree(trainer_run("clip0.5", max_grad_norm=0.5).root, run.root)
    args = run.end / "training_args.bin"
    args.write_bytes(b"not a pickle")
    got = pipeline.check(run.manifest()).runs[0]
    assert (got.max_grad_norm, got.batch_size) == (1.0, 4)
    import pickle

    args.write_bytes(pickle.dumps({"max_grad_norm": "0.5"}, protocol=4))
    refused(cli("check", run.manifest()), "stage 'only'", str(args), "max_grad_norm '0.5'")


# ---------------------------------------------------------------- resumed runs

# a run interrupted at step 10 and resumed to 20, as two stages of a hand-written manifest
RESUMED_STAGES = """  - name: a
    start: init
    end: stage/checkpoint-10
    optimizer: {type: adamw}
  - name: b
    end: stage/checkpoint-20
    optimizer: {type: adamw}
"""


def test_resumed_trainer_stage_continues_its_optimizer(trainer_run):
    """A run interrupted at step 10 and resumed (resume_from_checkpoint) to 20, as two
    stages of a hand-written manifest: the second continues the first's optimizer (Adam's
    step count goes on from 10; it was taken as fresh), with the 10 lrs the Trainer used."""
    from acctattr import pipeline

    run = trainer_run("resumed", resume_at=10, lr_scheduler_type="cosine", warmup_steps=3)
    stages = RESUMED_STAGES
    a, b = pipeline.check(run.manifest(stages=stages)).runs
    assert (a.fresh, a.step0, len(a.lrs)) == (True, 0, 10)
    assert (b.fresh, b.step0, len(b.lrs)) == (False, 10, 10)
    assert list(a.lrs) + list(b.lrs) == pytest.approx(run.lrs, rel=1e-12, abs=1e-15)
    said = pipeline.check(run.manifest(stages=stages.replace(
        "end: stage/checkpoint-20\n    optimizer: {type: adamw}",
        "end: stage/checkpoint-20\n    optimizer: {type: adamw, continues: false}")))
    assert said.runs[1].fresh  # the manifest's word wins


# ---------------------------------------------------------------- schedules logged sparsely


@pytest.mark.parametrize("schedule,kwargs", [
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-4}),
    ("polynomial", None),
    ("inverse_sqrt", None),
    ("cosine_with_min_lr", {"min_lr": 1e-3}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 6}),
    ("cosine", {"num_cycles": 1.5}),
])
def test_sparsely_logged_schedules_are_transformers_own(trainer_run, schedule, kwargs):
    """Logged every 6th step, a stage's lrs under get_scheduler's other schedules (with
    their lr_scheduler_kwargs, read from training_args.bin) are the lrs the Trainer used
    at every step (they were interpolated between the logged ones, with a warning)."""
    from acctattr import pipeline

    run = trainer_run(f"{schedule}-{kwargs}", lr_scheduler_type=schedule, warmup_steps=3,
                      logging_steps=6, lr_scheduler_kwargs=kwargs or {})
    loaded = pipeline.check(run.manifest())
    assert list(loaded.runs[0].lrs) == pytest.approx(run.lrs, rel=1e-12, abs=1e-15)
    assert len(run.lrs) == STEPS and not loaded.warnings


def test_resumed_sparsely_logged_schedule_goes_on_from_the_start(trainer_run):
    """A polynomial schedule logged every 7th step, resumed at step 10: each stage's lrs
    are the Trainer's, the second stage's from global step 10 on."""
    from acctattr import pipeline

    run = trainer_run("resumed-poly", resume_at=10, lr_scheduler_type="polynomial",
                      warmup_steps=3, logging_steps=7, lr_scheduler_kwargs={"power": 3.0})
    stages = RESUMED_STAGES
    loaded = pipeline.check(run.manifest(stages=stages))
    a, b = loaded.runs
    assert list(a.lrs) + list(b.lrs) == pytest.approx(run.lrs, rel=1e-12, abs=1e-15)
    assert not loaded.warnings


def test_lr_scheduler_kwargs_are_read_only_when_flat(tmp_path):
    """training_args.bin's lr_scheduler_kwargs is read where it is a flat dict of plain
    values (one item or several); a nested one is left unread (no schedule from it)."""
    import pickle

    from acctattr.runs import formats

    def scan(kwargs) -> dict:
        doc = {"lr_scheduler_kwargs": kwargs, "learning_rate": 1e-3}
        (tmp_path / "training_args.bin").write_bytes(pickle.dumps(doc, protocol=2))
        return formats.training_args(tmp_path)

    assert scan({"num_cycles": 3})["lr_scheduler_kwargs"] == {"num_cycles": 3}
    several = {"power": 2.0, "lr_end": 1e-7, "flag": True, "decay_type": "cosine", "x": None}
    assert scan(several)["lr_scheduler_kwargs"] == several
    assert scan({})["lr_scheduler_kwargs"] == {}
    nested = scan({"a": {"b": 1}})
    assert "lr_scheduler_kwargs" not in nested and nested["learning_rate"] == 1e-3


def _two_dirs(run: Run, dst: Path) -> Path:
    """The resumed run with its two checkpoints in two output_dirs (resume_from_checkpoint
    into a new one): a/checkpoint-10 and b/checkpoint-20."""
    shutil.copytree(run.root, dst)
    (dst / "a").mkdir()
    (dst / "b").mkdir()
    (dst / "stage" / "checkpoint-10").rename(dst / "a" / "checkpoint-10")
    (dst / "stage" / "checkpoint-20").rename(dst / "b" / "checkpoint-20")
    return dst


def test_resumed_run_that_logged_nothing(trainer_run, tmp_path):
    """A run resumed at step 10 that logged nothing by then (logging_steps 50): its two
    checkpoints in one output_dir are one run (the second stage takes 10 steps and goes on
    from the first's optimizer; it took all 20 steps, fresh, lrs replayed from step 0); in
    two output_dirs nothing tells a resumed run from a new one of 20 steps: refused (exit
    2, naming both trainer_state.json and the keys to set), and accepted once they are set;
    `acctattr init` drafts both as TODOs."""
    import yaml

    from acctattr import pipeline

    run = trainer_run("resumed-nolog", resume_at=10, lr_scheduler_type="cosine",
                      warmup_steps=3, logging_steps=50)
    stages = """  - name: a
    start: init
    end: {a}/checkpoint-10
    optimizer: {{type: adamw}}
  - name: b
    end: {b}/checkpoint-20
    optimizer: {{type: adamw{extra}}}
"""
    loaded = pipeline.check(run.manifest(stages=stages.format(a="stage", b="stage", extra="")))
    a, b = loaded.runs
    assert (len(b.lrs), b.fresh, b.step0) == (10, False, 10)
    assert list(a.lrs) + list(b.lrs) == pytest.approx(run.lrs, rel=1e-12, abs=1e-15)

    two = Run(_two_dirs(run, tmp_path / "two"), run.lrs)
    refused(cli("check", two.manifest(stages=stages.format(a="a", b="b", extra=""))),
            "stage 'b': optimizer.steps", str(two.root / "b" / "checkpoint-20"),
            str(two.root / "a" / "checkpoint-10" / "trainer_state.json"),
            "cannot tell whether this run resumed", "optimizer.steps and optimizer.continues")
    told = pipeline.check(two.manifest(stages=stages.format(
        a="a", b="b", extra=", steps: 10, continues: true")))
    assert (len(told.runs[1].lrs), told.runs[1].fresh) == (10, False)
    assert list(told.runs[1].lrs) == pytest.approx(run.lrs[10:], rel=1e-12, abs=1e-15)
    out = tmp_path / "drafted.yaml"
    res = cli("init", "--start", two.root / "init", two.root / "a", two.root / "b",
              "--output", out)
    assert res.exit_code == 0, res.output
    opt = yaml.safe_load(out.read_text())["stages"][1]["optimizer"]
    assert opt["steps"].startswith("TODO(acctattr)") and "cannot tell" in opt["steps"]
    assert opt["continues"].startswith("TODO(acctattr)")


def test_first_stage_that_resumed_its_start_is_refused(trainer_run):
    """A manifest whose first stage is the resumed half of a run (start checkpoint-10):
    its optimizer began from checkpoint-10's state, which a first stage cannot take;
    refused naming the key (it was taken as fresh), accepted with continues: false."""
    from acctattr import pipeline

    run = trainer_run("resumed", resume_at=10, lr_scheduler_type="cosine", warmup_steps=3)
    stages = """  - name: b
    start: stage/checkpoint-10
    end: stage/checkpoint-20
    optimizer: {type: adamw%s}
"""
    refused(cli("check", run.manifest(stages=stages % "")), "stage 'b': optimizer.continues",
            "resumed its start", "set continues: false")
    loaded = pipeline.check(run.manifest(stages=stages % ", continues: false"))
    assert (len(loaded.runs[0].lrs), loaded.runs[0].fresh) == (10, True)


# ---------------------------------------------------------------- no optimizer.pt


def test_trainer_stage_without_optimizer_state_takes_the_runs_hyperparameters(trainer_run,
                                                                               tmp_path):
    """save_only_model: no optimizer.pt. The stage's optimizer is the Trainer's: its decay
    / no-decay groups (weight decay 0.1 on the first, none on biases and norms), betas and
    eps from training_args.bin (before: one group, torch's AdamW defaults, every parameter
    decayed at 0.01, betas (0.9, 0.999), eps 1e-8). Unreadable arguments are refused,
    naming the keys to set; an optim acctattr does not model is refused."""
    from acctattr import pipeline
    from acctattr.evaluation.model import hf_no_decay

    run = trainer_run("no-state", save_only_model=True, weight_decay=0.1, adam_beta2=0.95,
                      adam_epsilon=1e-6)
    assert not (run.end / "optimizer.pt").exists()
    loaded = pipeline.check(run.manifest())
    groups = loaded.runs[0].state.groups
    skip = hf_no_decay(loaded.model)
    assert [set(g.names) for g in groups] == [set(loaded.info.trainable) - skip, skip]
    assert [g.weight_decay for g in groups] == [0.1, 0.0]
    assert {(g.beta1, g.beta2, g.eps) for g in groups} == {(0.9, 0.95, 1e-6)}
    said = pipeline.check(run.manifest("{type: adamw, weight_decay: 0.2, eps: 1e-7}"))
    assert {(g.weight_decay, g.eps) for g in said.runs[0].state.groups} == {(0.2, 1e-7)}

    copy = Run(tmp_path / "run", [])
    shutil.copytree(run.root, copy.root)
    (copy.end / "training_args.bin").write_bytes(b"not a pickle")
    refused(cli("check", copy.manifest()), "stage 'only': optimizer", "has no optimizer.pt",
            "weight_decay", "adam_beta1", "adam_epsilon", "optimizer.betas, optimizer.eps, "
            "optimizer.weight_decay")
    refused(cli("check", run.manifest("{type: sgd}")), "stage 'only': optimizer.type",
            "optim='adamw_torch_fused'", "which is adamw, not sgd")


@pytest.mark.parametrize("only_model", [False, True])
def test_trainer_sgd_with_optim_args(trainer_run, only_model):
    """optim sgd with optim_args "momentum=0.9,nesterov=true": momentum, nesterov and the
    decay / no-decay groups equal the Trainer's SGD, read from optimizer.pt or, saved
    without it, from training_args.bin's optim_args (before: momentum 0, one group decayed
    at torch's default)."""
    from acctattr import pipeline

    run = trainer_run(f"sgd-{only_model}", optim="sgd", save_only_model=only_model,
                      optim_args="momentum=0.9,nesterov=true", weight_decay=0.1)
    assert (run.end / "optimizer.pt").exists() != only_model
    groups = pipeline.check(run.manifest("{type: sgd}")).runs[0].state.groups
    assert [(list(g.names), g.weight_decay, g.momentum, g.dampening, g.nesterov)
            for g in groups] == [(t["names"], t["weight_decay"], t["momentum"], t["dampening"],
                                  t["nesterov"]) for t in run.groups]
    assert groups[0].momentum == 0.9 and groups[0].nesterov


# ---------------------------------------------------------------- which step a logged lr is


def test_logged_lrs_without_a_transformers_version(trainer_run, tmp_path):
    """A Trainer folder without a transformers_version beside trainer_state.json (a model
    that is not a PreTrainedModel saves no config.json): which step each logged lr belongs
    to is settled by scheduler.pt's last lr, else by training_args.bin's schedule, and the
    stage's lrs are the Trainer's (they were shifted a step: the older rule was assumed);
    with neither, refused naming the file and what to add."""
    import json

    from acctattr import pipeline

    run = Run(tmp_path / "run", trainer_run("adamw", lr_scheduler_type="linear",
                                            warmup_steps=3).lrs)
    shutil.copytree(trainer_run("adamw").root, run.root)
    config = run.end / "config.json"
    doc = json.loads(config.read_text())
    del doc["transformers_version"]
    config.write_text(json.dumps(doc))
    assert list(pipeline.check(run.manifest()).runs[0].lrs) == pytest.approx(run.lrs, rel=1e-12)
    (run.end / "scheduler.pt").unlink()
    assert list(pipeline.check(run.manifest()).runs[0].lrs) == pytest.approx(run.lrs, rel=1e-12)
    (run.end / "training_args.bin").write_bytes(b"not a pickle")
    refused(cli("check", run.manifest()), "stage 'only': optimizer.lr",
            str(run.end / "trainer_state.json"), "cannot tell which step each logged "
            "learning_rate belongs to", "transformers_version")
