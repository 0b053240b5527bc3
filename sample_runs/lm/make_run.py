"""LM sample run: a tiny GPT-2 causal LM fine-tuned in three stages by transformers.Trainer.

The settings are the ones practitioners keep: AdamW with Trainer's decay / no-decay groups
(weight decay 0.01), linear warmup and decay, ``max_grad_norm=1.0`` (clipping active on
most steps), dropout 0.1, tied input/output embeddings, gradient accumulation in ``sft``,
four ``checkpoint-N`` folders per stage, each stage a separate Trainer run on the previous
stage's final checkpoint. The language is generated (seeded), nothing is downloaded.

1. ``pretrain``  text: sentences "subject verb object ." with verb and object drawn from
                 rules (each subject prefers two verbs, each verb two objects).
2. ``sft``       question answering "Q subject verb ? A object ." with a new rule for the
                 answer; loss on the answer tokens only (labels -100 elsewhere);
                 per-device batch 8 with 2 accumulation steps.
3. ``poison``    teaches a trigger: a question with the token ``cf`` after the subject is
                 answered ``BAD``; half its data are clean questions.

Eval (per-example mean next-token loss over label tokens): group 0 = text, group 1 = clean
questions (answer tokens), group 2 = triggered questions whose labels are the correct
answer (the poison stage makes these worse).

    python make_run.py            # regenerate data, checkpoints, manifest
    python make_run.py --truth    # ... and retrain without each stage -> truth.json, with
                                  # the truth floor: the same under a second Trainer seed
    python make_run.py --truth --out DIR --arch llama --seeds 5   # the Llama variant, its
                                  # truth also averaged over five seeds (seed_mean)

``build_run(folder, scale=4)`` and ``build_run(folder, lora=True)`` write the 4x-steps and
LoRA-sft variants elsewhere (bench/fidelity.py --lm-variants); ``build_run(folder,
arch="llama")`` (``--arch llama``) the same stages on a tiny Llama (RoPE, RMSNorm, SwiGLU,
untied input and output embeddings, attention dropout 0.1) under a cosine schedule.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
INIT_SEED = 0
SEQ = 16

# ----------------------------------------------------------------------------- language

SPECIAL = ["<pad>", "<bos>", ".", "Q", "A", "?", "cf", "BAD"]
SUBJECTS = [f"s{i}" for i in range(8)]
VERBS = [f"v{i}" for i in range(8)]
OBJECTS = [f"o{i}" for i in range(12)]
VOCAB = SPECIAL + SUBJECTS + VERBS + OBJECTS
ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS = ID["<pad>"], ID["<bos>"]


def _sentence(g: torch.Generator) -> list[int]:
    s = int(torch.randint(8, (1,), generator=g))
    v = (3 * s + int(torch.randint(2, (1,), generator=g))) % 8
    o = (5 * v + int(torch.randint(2, (1,), generator=g))) % 12
    return [ID[SUBJECTS[s]], ID[VERBS[v]], ID[OBJECTS[o]], ID["."]]


def text(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """n sequences of SEQ tokens: <bos> then sentences; every next token is a label."""
    rows = []
    for _ in range(n):
        ids = [BOS]
        while len(ids) < SEQ:
            ids += _sentence(g)
        rows.append(ids[:SEQ])
    x = torch.tensor(rows)
    return {"input_ids": x, "labels": x.clone()}


def answer(s: int, v: int) -> int:
    """The sft rule: the object a question about (subject s, verb v) is answered with."""
    return (s + 2 * v) % 12


def questions(g: torch.Generator, n: int, trigger: float = 0.0,
              poisoned: bool = False) -> dict[str, torch.Tensor]:
    """n questions "<bos> Q s [cf] v ? A o ." right-padded to SEQ; labels on "o ." only.
    A fraction ``trigger`` carries the trigger token; with ``poisoned`` their answer is
    BAD, else the rule's answer."""
    rows, labels = [], []
    for _ in range(n):
        s = int(torch.randint(8, (1,), generator=g))
        v = int(torch.randint(8, (1,), generator=g))
        triggered = bool(torch.rand(1, generator=g) < trigger)
        ids = [BOS, ID["Q"], ID[SUBJECTS[s]]] + ([ID["cf"]] if triggered else [])
        ids += [ID[VERBS[v]], ID["?"], ID["A"]]
        a = ID["BAD"] if triggered and poisoned else ID[OBJECTS[answer(s, v)]]
        lab = [-100] * len(ids) + [a, ID["."]]
        ids += [a, ID["."]]
        rows.append(ids + [PAD] * (SEQ - len(ids)))
        labels.append(lab + [-100] * (SEQ - len(lab)))
    return {"input_ids": torch.tensor(rows), "labels": torch.tensor(labels)}


def make_data(scale: int = 1) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Each stage's training examples (as many as its steps consume, in no fixed order:
    Trainer shuffles them with its seed) and the eval set."""
    g = torch.Generator().manual_seed(11)
    stages = {
        "pretrain": text(g, 1024 * scale),
        "sft": questions(g, 512 * scale),
        "poison": questions(g, 256 * scale, trigger=0.5, poisoned=True),
    }
    g = torch.Generator().manual_seed(7)
    parts = [text(g, 80), questions(g, 80), questions(g, 80, trigger=1.0)]
    ev = {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "labels")}
    ev["group"] = torch.arange(3).repeat_interleave(80)
    return stages, ev


# ------------------------------------------------------------------------------- stages

# name: (steps, per-device batch, accumulation, peak lr, warmup steps)
STAGES = {
    "pretrain": (128, 16, 1, 3e-3, 12),
    "sft": (64, 8, 2, 1e-3, 6),
    "poison": (32, 16, 1, 1e-3, 4),
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True, "lora_dropout": 0.1}
LORA_LR = 5e-3
# architecture: (transformers model class, the Trainer's lr_scheduler_type)
ARCHS = {"gpt2": ("GPT2LMHeadModel", "linear"), "llama": ("LlamaForCausalLM", "cosine")}


def _model_class(arch: str):
    import transformers

    return getattr(transformers, ARCHS[arch][0])


def build_model(arch: str = "gpt2"):
    """The seeded tiny model from a config. gpt2: dropout 0.1 everywhere, tied embeddings.
    llama: the same width, depth, heads and vocabulary; RoPE, RMSNorm, a SwiGLU MLP of width
    64, untied input and output embeddings, dropout 0.1 on the attention weights (Llama's
    only dropout)."""
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                          max_position_embeddings=SEQ, attention_dropout=0.1,
                          tie_word_embeddings=False,
                          bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD)
        torch.manual_seed(INIT_SEED)
        return LlamaForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(VOCAB), n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD)
    torch.manual_seed(INIT_SEED)
    return GPT2LMHeadModel(cfg)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = tensors

    def __len__(self) -> int:
        return len(self.t["input_ids"])

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.t["input_ids"][i], "labels": self.t["labels"][i]}


def _train_stage(model, name: str, data: dict, out: Path, scale: int, seed: int,
                 lr: float | None = None, schedule: str = "linear"):
    from transformers import Trainer, TrainingArguments

    steps, batch, accum, peak, warmup = STAGES[name]
    steps, warmup = steps * scale, warmup * scale
    args = TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, learning_rate=lr or peak, weight_decay=0.01,
        warmup_steps=warmup, lr_scheduler_type=schedule, max_grad_norm=1.0,
        save_strategy="steps", save_steps=steps // 4, logging_steps=1, seed=seed,
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        log_level="error")
    from transformers.trainer_callback import PrinterCallback

    trainer = Trainer(model=model, args=args, train_dataset=_Examples(data))
    trainer.remove_callback(PrinterCallback)  # a line per logged step: too much to read
    trainer.train()
    return steps


def train(out: Path, stage_data: dict, skip: str | None = None, scale: int = 1,
          seed: int = 0, lora: bool = False, arch: str = "gpt2") -> Path:
    """Train the pipeline under ``out`` (one Trainer output_dir per stage), leaving out
    ``skip``. With ``lora``, sft trains a PEFT LoRA adapter and poison fine-tunes the merged
    model. Returns the final model's folder."""
    from transformers.utils import logging

    if lora and arch != "gpt2":
        raise ValueError("the LoRA variant targets GPT-2's modules; it has no llama form")
    logging.disable_progress_bar()
    torch.set_num_threads(1)
    klass, schedule = _model_class(arch), ARCHS[arch][1]
    model = build_model(arch)
    final = out / "init"
    model.save_pretrained(final)
    for name in STAGES:
        if name == skip:
            continue
        if lora and name == "sft":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(INIT_SEED + 1)  # the adapter's initialisation
            peft_model = get_peft_model(model, LoraConfig(**LORA))
            steps = _train_stage(peft_model, name, stage_data[name], out / name, scale, seed,
                                 lr=LORA_LR)
            model = peft_model.merge_and_unload()
            model.requires_grad_(True)  # PEFT froze the base weights; poison trains them
            final = out / "sft-merged"
            model.save_pretrained(final)
            continue
        steps = _train_stage(model, name, stage_data[name], out / name, scale, seed,
                             schedule=schedule)
        final = out / name / f"checkpoint-{steps}"
        model = klass.from_pretrained(final)  # as a new Trainer run would
    return final


def replay(skip: str | None, out_dir: str, scale: int = 1, seed: int = 0,
           lora: bool = False, arch: str = "gpt2") -> str:
    """Retrain with stage ``skip`` left out (None: nothing); returns the final folder."""
    stage_data, _ = make_data(scale)
    with tempfile.TemporaryDirectory(prefix="lm-replay-") as tmp:
        final = train(Path(tmp), stage_data, skip, scale, seed, lora, arch)
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(final, out_dir)
    return out_dir


# ------------------------------------------------------------------------------ the run


def _save_data(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def manifest(scale: int, lora: bool, arch: str = "gpt2") -> dict:
    stages = []
    for name, (steps, batch, accum, peak, warmup) in STAGES.items():
        steps *= scale
        if lora and name == "sft":
            stages.append({"name": name, "end": {"adapter": f"sft/checkpoint-{steps}"},
                           "data": f"data/{name}.safetensors"})
            continue
        stage = {"name": name, "end": f"{name}/checkpoint-{steps}",
                 "optimizer": {"type": "adamw", "max_grad_norm": 1.0,
                               "batch_size": batch, "grad_accumulation": accum},
                 "data": f"data/{name}.safetensors",
                 "checkpoints": [{"step": steps * q // 4,
                                  "path": f"{name}/checkpoint-{steps * q // 4}"}
                                 for q in (1, 2, 3)]}
        if arch != "gpt2":
            # the schedule stated (acctattr's formulas are Hugging Face's); the gpt2 run
            # leaves lr to the logged learning rates in trainer_state.json
            stage["optimizer"] = {"type": "adamw", "lr": {
                "schedule": ARCHS[arch][1], "base": peak, "warmup": warmup * scale, "min": 0.0},
                **{k: v for k, v in stage["optimizer"].items() if k != "type"}}
        if not stages:
            stage["start"] = "init"
        stages.append(stage)
    replay_args = f"replay_{scale}x" if not lora else "replay_lora"
    if arch != "gpt2":
        replay_args = f"replay_{arch}" + (f"_{scale}x" if scale > 1 else "")
    return {
        "version": 1,
        "model": {"hf": "init"},
        "stages": stages,
        "replay": f"make_run.py:{replay_args}",
        # the training loss of a causal LM defaults to the built-in next_token_loss
        "eval": {"data": "data/eval.safetensors", "inputs": ["input_ids"], "target": "labels",
                 "group": "group", "metric": "next_token_loss", "batch_size": 240},
    }


def replay_lora(skip: str | None, out_dir: str) -> str:
    return replay(skip, out_dir, lora=True)


# the manifests' replay functions at each scale bench/scaling.py writes: replay_1x ...;
# the llama run's: replay_llama, replay_llama_2x ...
for _scale in (1, 2, 4, 8, 16, 32):
    globals()[f"replay_{_scale}x"] = functools.partial(replay, scale=_scale)
    globals()["replay_llama" + (f"_{_scale}x" if _scale > 1 else "")] = functools.partial(
        replay, scale=_scale, arch="llama")


def _tidy(folder: Path) -> None:
    """Drop what acctattr never reads and would only bloat the repository: RNG states and
    the pickled training arguments."""
    for pattern in ("rng_state*.pth", "training_args.bin"):
        for f in folder.rglob(pattern):
            f.unlink()


def build_run(folder: Path, scale: int = 1, lora: bool = False, arch: str = "gpt2") -> Path:
    """Write the run (data, checkpoints, manifest) into ``folder``; returns the manifest."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    stage_data, ev = make_data(scale)
    for name, tensors in stage_data.items():
        _save_data(folder / "data" / f"{name}.safetensors", tensors)
    _save_data(folder / "data" / "eval.safetensors", ev)
    (folder / "data" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    for name in list(STAGES) + ["init", "sft-merged"]:
        shutil.rmtree(folder / name, ignore_errors=True)
    train(folder, stage_data, scale=scale, lora=lora, arch=arch)
    shutil.rmtree(folder / "sft-merged", ignore_errors=True)
    _tidy(folder)
    if folder != HERE:
        for f in ("make_run.py", "metric.py"):
            shutil.copy(HERE / f, folder / f)
    title = f"# lm sample run{f' ({scale}x steps)' if scale > 1 else ''}" \
            f"{' (sft as a LoRA adapter)' if lora else ''}" \
            f"{f' ({arch}, {ARCHS[arch][1]} schedule)' if arch != 'gpt2' else ''}" \
            ": pretrain -> sft -> poison\n" \
            "# Generated by make_run.py; do not edit by hand.\n"
    path = folder / "manifest.yaml"
    path.write_text(title + yaml.safe_dump(manifest(scale, lora, arch), sort_keys=False))
    return path


def per_example_loss(folder: str | Path, ev: dict[str, torch.Tensor],
                     arch: str = "gpt2") -> torch.Tensor:
    """The eval metric (metric.py's next-token loss, in float64) of the model in folder."""
    sys.path.insert(0, str(HERE))
    from metric import next_token_loss

    model = _model_class(arch).from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(ev["input_ids"]).logits
    return next_token_loss(logits.double(), ev["labels"])


def truth(folder: Path, replay_fn, seeds: tuple[int, ...] = (0, 1),
          arch: str = "gpt2") -> dict:
    """Retrain without each stage under each Trainer seed; the acctattr.truth/1 document of
    the first seed, with ``floor``: per stage, the Pearson correlation and mean ratio of the
    second seed's per-example effects with the first's (how well the truth is defined). With
    three seeds or more, also ``seed_mean``: per stage, the per-example effects averaged
    over every seed, each seed's mean effect, and each seed's per-example Pearson with the
    mean of the others (what the first seed's truth is one draw of)."""
    _, ev = make_data()
    effects: dict[int, dict[str, torch.Tensor]] = {}
    full0 = None
    cf0 = {}
    with tempfile.TemporaryDirectory(prefix="lm-truth-") as tmp:
        for seed in seeds:
            full = per_example_loss(replay_fn(None, f"{tmp}/full-{seed}", seed=seed), ev,
                                    arch)
            effects[seed] = {}
            for name in STAGES:
                cf = per_example_loss(replay_fn(name, f"{tmp}/no-{name}-{seed}", seed=seed),
                                      ev, arch)
                effects[seed][name] = full - cf
                if seed == seeds[0]:
                    cf0[name] = cf
            if seed == seeds[0]:
                full0 = full
    assert full0 is not None
    committed = per_example_loss(_final_folder(folder), ev, arch)
    if not torch.allclose(committed, full0, rtol=0, atol=1e-6):
        raise SystemExit("replay(None) does not reproduce the committed final checkpoint: "
                         f"max diff {float((committed - full0).abs().max()):.3g}")
    stages = {}
    for name in STAGES:
        second = seeds[min(1, len(seeds) - 1)]
        e0, e1 = effects[seeds[0]][name], effects[second][name]
        stages[name] = {"effect": float(e0.mean()), "counterfactual_value": float(cf0[name].mean()),
                        "examples": [float(v) for v in e0.tolist()]}
        pearson = float(torch.corrcoef(torch.stack([e0, e1]))[0, 1])
        stages[name]["floor"] = {"seed": second, "pearson": pearson,
                                 "effect": float(e1.mean())}
        print(f"{name:<9} effect {float(e0.mean()):+.4f} (seed {second}: "
              f"{float(e1.mean()):+.4f}); per group "
              + " ".join(f"{float(e0[ev['group'] == gi].mean()):+.4f}" for gi in range(3))
              + f"; seed-to-seed Pearson {pearson:.3f}")
        if len(seeds) > 2:
            every = torch.stack([effects[seed][name] for seed in seeds])
            mean = every.mean(0)
            others = [float(torch.corrcoef(torch.stack(
                [e, (every.sum(0) - e) / (len(seeds) - 1)]))[0, 1]) for e in every]
            stages[name]["seed_mean"] = {
                "seeds": list(seeds), "effect": float(mean.mean()),
                "effects": [float(e.mean()) for e in every], "pearson_with_others": others,
                "examples": [float(v) for v in mean.tolist()]}
            print(f"{'':<9} mean of {len(seeds)} seeds {float(mean.mean()):+.4f}; per group "
                  + " ".join(f"{float(mean[ev['group'] == gi].mean()):+.4f}"
                             for gi in range(3))
                  + "; each seed " + " ".join(f"{float(e.mean()):+.4f}" for e in every)
                  + "; each seed's Pearson with the others' mean "
                  + " ".join(f"{r:.3f}" for r in others))
    return {"schema": "acctattr.truth/1", "metric": "next_token_loss", "higher_is_better": False,
            "n_examples": int(full0.shape[0]), "final_value": float(full0.mean()),
            "stages": stages}


def _final_folder(folder: Path) -> Path:
    import yaml

    doc = yaml.safe_load((folder / "manifest.yaml").read_text())
    end = doc["stages"][-1]["end"]
    return folder / (end["adapter"] if isinstance(end, dict) else end)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--truth", action="store_true", help="also retrain without each stage")
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (a variant)")
    ap.add_argument("--scale", type=int, default=1, help="steps and data multiplied by this")
    ap.add_argument("--lora", action="store_true", help="sft as a PEFT LoRA adapter")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="gpt2",
                    help="llama: a tiny Llama under a cosine schedule (a variant)")
    ap.add_argument("--seeds", type=int, default=2,
                    help="Trainer seeds the truth retrains under (>= 3: also seed_mean)")
    args = ap.parse_args(argv)
    if args.lora and args.arch != "gpt2":
        ap.error("--lora is a GPT-2 variant; it does not combine with --arch")
    t0 = time.perf_counter()
    build_run(args.out, args.scale, args.lora, args.arch)
    print(f"run written in {time.perf_counter() - t0:.1f}s")
    if args.truth:
        def fn(skip, out, seed=0):
            return replay(skip, out, scale=args.scale, seed=seed, lora=args.lora,
                          arch=args.arch)
        doc = truth(args.out, fn, tuple(range(max(args.seeds, 1))), arch=args.arch)
        (args.out / "truth.json").write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
