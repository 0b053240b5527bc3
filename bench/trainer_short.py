"""A case where unrolled loses to frozen: a very short, noise-dominated later stage.

A one-layer GPT-2 classifier (built from a config, no download) is fine-tuned by
transformers.Trainer in two stages of 8 AdamW steps on 32 examples each (batch 4), then
stage s1 is skipped by retraining s2 alone from the initial weights. Prints the per-example
Pearson of frozen and unrolled (both with direct evaluation) against that truth for s1.

    python bench/trainer_short.py        # needs the dev extra (transformers)

In 8 noisy steps the real second stage barely learns (its training loss goes 0.690 ->
0.665), while Adam's expected dynamics, which unrolled simulates, learn much faster: the
simulated re-learning is mostly not there. Use `acctattr validate` on a small copy of a run
like this before trusting unrolled on it, or `--estimator frozen`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from formats_runs import N_EVAL, _args, _Tokens, tiny_gpt2, token_data  # noqa: E402

from acctattr import pipeline  # noqa: E402


def main() -> int:
    from transformers import GPT2ForSequenceClassification, Trainer

    root = Path(tempfile.mkdtemp(prefix="acctattr-trainer-short-"))
    model = tiny_gpt2()
    model.save_pretrained(root / "init")
    Trainer(model=model, args=_args(root / "s1", 8, 1e-2, weight_decay=0.1, warmup_steps=2,
                                    lr_scheduler_type="linear", logging_steps=1),
            train_dataset=_Tokens(1)).train()
    Trainer(model=model, args=_args(root / "s2", 8, 5e-3, logging_steps=1),
            train_dataset=_Tokens(2)).train()
    for seed, name in ((1, "s1"), (2, "s2")):
        x, y = token_data(seed, 32)
        save_file({"input_ids": x, "label": y}, root / f"{name}.safetensors")
    x, y = token_data(3, N_EVAL)
    save_file({"input_ids": x, "label": y, "group": x[:, 1] % 2}, root / "eval.safetensors")
    doc = {"version": 1, "model": {"hf": "init"},
           "stages": [{"name": "s1", "start": "init", "end": "s1/checkpoint-8",
                       "optimizer": {"type": "adamw"}, "data": "s1.safetensors"},
                      {"name": "s2", "end": "s2/checkpoint-8", "optimizer": {"type": "adamw"},
                       "data": "s2.safetensors"}],
           "eval": {"data": "eval.safetensors", "inputs": ["input_ids"], "target": "label",
                    "group": "group", "batch_size": 16}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    torch.manual_seed(0)
    cf = GPT2ForSequenceClassification.from_pretrained(root / "init")
    Trainer(model=cf, args=_args(root / "cf", 8, 5e-3, logging_steps=1),
            train_dataset=_Tokens(2)).train()
    model.eval()
    cf.eval()
    with torch.no_grad():
        def loss(m):
            return torch.nn.functional.cross_entropy(m(input_ids=x).logits.double(), y,
                                                     reduction="none")
        truth = loss(model) - loss(cf)
    for est in ("frozen", "unrolled"):
        r = pipeline.run(root / "manifest.yaml", est, "direct", per_example=True)
        assert r.examples is not None
        e = torch.tensor([ex.effects["s1"] for ex in r.examples], dtype=torch.float64)
        p = float(torch.corrcoef(torch.stack([e, truth]))[0, 1])
        print(f"{est:<9} s1: Pearson {p:.3f}, mean effect {float(e.mean()):+.4f} "
              f"(truth {float(truth.mean()):+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
