"""The baseline a user would otherwise reach for: Captum's TracInCP, summed over each stage's
training examples, as a per-example stage effect.

TracInCP scores a training example z on a test example x as sum_c lr_c grad l(z, theta_c) .
grad l(x, theta_c) over saved checkpoints c: how much training on z lowered x's loss. A
stage's effect on x (final value minus the value had the stage never run, lower is better)
is then minus the sum of its training examples' scores, with the checkpoints saved during
that stage (its intermediate ones and its end) and the learning rate each was saved at, as
Captum's checkpoints_load_func returns it. Nothing is rescaled: this is the number a user
gets from the library as documented.

An adapter stage trains adapter weights the model's own parameters do not hold: TracInCP
on the merged model is not defined for it, and it is left out (None).

    python bench/tracin.py sample_runs/digits/manifest.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from acctattr import pipeline
from acctattr.evaluation.data import load_stage_sample
from acctattr.evaluation.evaluator import forward
from acctattr.evaluation.metrics import resolve_metric


class _Outputs(nn.Module):
    """The manifest's model as Captum calls it: positional inputs in, the tensor the metric
    reads (logits for Hugging Face models) out."""

    def __init__(self, model: nn.Module, inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        return forward(self.model, state, self.inputs, dict(zip(self.inputs, xs, strict=True)))


def stage_effects(manifest: Path, batch_size: int = 64) -> dict[str, torch.Tensor | None]:
    """Per stage, the per-example effect TracInCP assigns it (None for adapter stages)."""
    from captum.influence import TracInCP

    loaded = pipeline.check(manifest)
    spec = loaded.manifest.eval
    names = (*spec.inputs, spec.target)
    loss = resolve_metric(loaded.manifest.train_loss, None, "train.loss")
    metric = resolve_metric(spec.metric, spec.higher_is_better, "eval.metric")
    sign = -1.0 if metric.higher_is_better else 1.0  # TracIn scores a loss's decrease
    model = _Outputs(loaded.model, spec.inputs).eval()
    test = {n: torch.cat([b[n] for b in loaded.evaluator.data.batches()]) for n in names}
    test_inputs = tuple(test[n] for n in spec.inputs)

    def train_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss.fn(out, y) * (-1.0 if loss.higher_is_better else 1.0)

    def test_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sign * metric.fn(out, y)

    train_loss.reduction = test_loss.reduction = "none"  # type: ignore[attr-defined]

    effects: dict[str, torch.Tensor | None] = {}
    for run in loaded.runs:
        if run.adapter or run.data is None:
            effects[run.name] = None
            continue
        sample = load_stage_sample(run.data, names, 10**9, run.name)
        dataset = torch.utils.data.TensorDataset(*(sample[n] for n in names))
        saved = [*run.checkpoints, (run.steps, run.end)]
        readers = {str(i): (reader, run.lrs[min(step, run.steps) - 1])
                   for i, (step, reader) in enumerate(saved)}

        def load(m: nn.Module, key: str, readers=readers) -> float:
            reader, lr = readers[key]
            own = m.model.state_dict()  # type: ignore[union-attr]
            m.model.load_state_dict(  # type: ignore[union-attr]
                {n: reader.get(n).to(own[n].dtype) for n in own if n in reader},
                strict=False)
            return float(lr)

        tracin = TracInCP(model, dataset, list(readers), checkpoints_load_func=load,
                          loss_fn=train_loss, test_loss_fn=test_loss, batch_size=batch_size,
                          sample_wise_grads_per_batch=False)
        scores = tracin.influence((*test_inputs, test[spec.target]))
        # a stage lowered a loss by sum(scores): its effect (final minus without) is minus that
        effects[run.name] = -sign * scores.sum(dim=1).double()
    return effects


def main(argv: list[str] | None = None) -> int:
    import json

    manifest = Path((argv or sys.argv[1:])[0])
    truth = json.loads((manifest.parent / "truth.json").read_text())["stages"]
    for name, eff in stage_effects(manifest).items():
        if eff is None:
            print(f"{name:<18} TracInCP n/a (adapter stage)")
            continue
        t = torch.tensor(truth[name]["examples"], dtype=torch.float64)
        r = float(torch.corrcoef(torch.stack([eff, t]))[0, 1])
        print(f"{name:<18} TracInCP pearson {r:+.3f}  mean {float(eff.mean()):+.4g}  "
              f"truth {float(t.mean()):+.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
