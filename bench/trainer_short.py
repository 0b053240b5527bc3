"""A short, noise-dominated Trainer run, and what auto does on it.

A one-layer GPT-2 classifier (built from a config, no download) is fine-tuned by
transformers.Trainer in two stages of 8 AdamW steps on 32 examples each (batch 4)
(tests/formats_runs.py, write_short_trainer_run); then stage s1 is skipped by retraining
s2 alone from the initial weights. Prints, against that truth for s1, the per-example
Pearson of frozen and unrolled (both with direct evaluation) and of auto's choice.

    python bench/trainer_short.py        # needs the dev extra (transformers)

In 8 noisy steps the real second stage barely learns (its training loss goes 0.690 ->
0.665). Without Adam's first moment in unrolled's flow (``adam_momentum`` off, the default
before 2026-12-06) the simulated run learned 15x as much, got s1's sign wrong (Pearson
0.41), failed its reproduction check (estimators.Reproduction), and auto took frozen. With
it (the default) the simulation passes the check and auto keeps
unrolled (README "Fidelity").
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from formats_runs import N_EVAL, _args, _Tokens, token_data, write_short_trainer_run  # noqa: E402

from acctattr import pipeline  # noqa: E402


def main() -> int:
    from transformers import GPT2ForSequenceClassification, Trainer

    root = Path(tempfile.mkdtemp(prefix="acctattr-trainer-short-"))
    manifest = write_short_trainer_run(root)
    model = GPT2ForSequenceClassification.from_pretrained(root / "s2" / "checkpoint-8")
    torch.manual_seed(0)
    cf = GPT2ForSequenceClassification.from_pretrained(root / "init")
    Trainer(model=cf, args=_args(root / "cf", 8, 5e-3, logging_steps=1),
            train_dataset=_Tokens(2)).train()
    model.eval()
    cf.eval()
    x, y = token_data(3, N_EVAL)
    with torch.no_grad():
        def loss(m):
            return torch.nn.functional.cross_entropy(m(input_ids=x).logits.double(), y,
                                                     reduction="none")
        truth = loss(model) - loss(cf)
    for est, how in (("frozen", "direct"), ("unrolled", "direct"), ("auto", None)):
        r = pipeline.run(manifest, est, how, per_example=True)
        assert r.examples is not None
        e = torch.tensor([ex.effects["s1"] for ex in r.examples], dtype=torch.float64)
        p = float(torch.corrcoef(torch.stack([e, truth]))[0, 1])
        label = f"{est} ({r.estimator}/{r.evaluate})"
        print(f"{label:<26} s1: Pearson {p:.3f}, mean effect {float(e.mean()):+.4f} "
              f"(truth {float(truth.mean()):+.4f})")
        if r.estimator_note and est == "auto":
            print(f"  auto: {r.estimator_note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
