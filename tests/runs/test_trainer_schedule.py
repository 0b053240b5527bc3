"""A Trainer run that logs its learning rate sparsely: the lrs come from the schedule its
training_args.bin names, checked against the logged ones and scheduler.pt
(loading._stated_lrs, schedules.trainer_schedule), equal to transformers.get_scheduler's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm_runs import save_tokenizer, sentences, tiny_lm, write_jsonl  # noqa: E402

from acctattr import pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_library_equality import _hf_lrs  # noqa: E402

STEPS, WARMUP, LR = 30, 4, 3e-3


def _train(root: Path, logging_steps: int) -> None:
    from transformers import (
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )

    save_tokenizer(root / "tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    model = tiny_lm()
    model.save_pretrained(root / "init")
    texts = sentences(1, 32)
    write_jsonl(root / "train.jsonl", [{"text": t} for t in texts])
    write_jsonl(root / "eval.jsonl", [{"text": t} for t in sentences(4, 8)])
    args = TrainingArguments(str(root / "stage"), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="cosine",
                             save_strategy="steps", save_steps=STEPS,
                             logging_steps=logging_steps, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            train_dataset=[{"input_ids": tok(t)["input_ids"]} for t in texts],
            processing_class=tok).train()
    (root / "manifest.yaml").write_text(f"""version: 1
model: {{hf: init}}
stages:
  - name: only
    start: init
    end: stage/checkpoint-{STEPS}
    optimizer: {{type: adamw}}
    data: train.jsonl
eval:
  data: eval.jsonl
  tokenizer: tokenizer
  max_length: 32
  metric: next_token_loss
""")


def _library_lrs() -> list[float]:
    """The lr each of the STEPS optimizer steps used, from transformers.get_scheduler."""
    return _hf_lrs("cosine", STEPS, LR, WARMUP)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    _train(root, logging_steps=7)
    return root


def test_sparsely_logged_lrs_follow_the_named_schedule(sparse):
    """Logged every 7th step, the stage's 30 lrs are get_scheduler's cosine with its 4 warmup
    steps (interpolating the logged ones would miss the warmup and the curve), with no
    warning."""
    loaded = pipeline.check(sparse / "manifest.yaml")
    got = list(loaded.runs[0].lrs)
    assert got == pytest.approx(_library_lrs(), rel=1e-12, abs=1e-15)
    assert got[0] == 0.0 and got[1] == pytest.approx(LR / WARMUP)
    assert not any("interpolated" in w for w in loaded.warnings)


def test_a_schedule_the_saved_lrs_contradict_is_not_used(sparse, tmp_path):
    """Where scheduler.pt's last lr is not the named schedule's, the logged lrs are
    interpolated as before, with the warning that says so."""
    import shutil

    root = tmp_path / "run"
    shutil.copytree(sparse, root)
    file = root / "stage" / f"checkpoint-{STEPS}" / "scheduler.pt"
    state = torch.load(file, weights_only=True)
    state["_last_lr"] = [LR / 2 for _ in state["_last_lr"]]
    torch.save(state, file)
    loaded = pipeline.check(root / "manifest.yaml")
    assert any("interpolated" in w for w in loaded.warnings)
    assert list(loaded.runs[0].lrs)[0] != 0.0  # the first logged lr, extrapolated back


def test_no_logged_lr_takes_the_named_schedule_checked_by_scheduler_pt(tmp_path):
    """Logging less often than the stage's length: no lr in log_history. The lrs still come
    from training_args.bin's schedule (scheduler.pt's last lr agrees), and a warning says
    where they came from; `acctattr init` drafts the stage's lr from the folder, no TODO."""
    import yaml
    from typer.testing import CliRunner

    from acctattr.cli import app

    _train(tmp_path, logging_steps=STEPS + 10)
    loaded = pipeline.check(tmp_path / "manifest.yaml")
    assert list(loaded.runs[0].lrs) == pytest.approx(_library_lrs(), rel=1e-12, abs=1e-15)
    assert any("logged no learning rate" in w and "cosine" in w for w in loaded.warnings)
    out = tmp_path / "drafted.yaml"
    res = CliRunner().invoke(app, ["init", "--start", str(tmp_path / "init"),
                                   str(tmp_path / "stage"), "--output", str(out)])
    assert res.exit_code == 0, res.output
    lr = yaml.safe_load(out.read_text())["stages"][0]["optimizer"]["lr"]
    assert lr == {"trainer_state": f"stage/checkpoint-{STEPS}/trainer_state.json"}
    assert "training_args.bin's schedule (cosine from 0.003, 4 warmup" in out.read_text()
    (tmp_path / "stage" / f"checkpoint-{STEPS}" / "scheduler.pt").unlink()
    with pytest.raises(Exception, match="log_history has no learning_rate"):
        pipeline.check(tmp_path / "manifest.yaml")  # nothing to check the schedule against
