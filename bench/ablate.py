"""How close the model `acctattr ablate` writes is to the model retrained without the stage.

For each sample run, estimator and stage: the stage's embedding is computed once
(``acctattr embed``), ``acctattr ablate --embeddings`` writes theta_T - v_k as a safetensors
state dict (a Hugging Face folder for lm), and the sample's own model code (model.py's
build(), strict load; for lm from_pretrained and its metric.py) evaluates it on the eval
set. The retrained counterfactual comes from the run's ``truth.json`` (per example
f_i(theta_T^(-k)) = f_i(theta_T) - true effect_i; regenerate it with the run's
``make_run.py``). Printed per stage: the ablated model's measured mean metric, the value ablate
predicted for it, the retrained model's, and the per-example Pearson correlation between
the ablated and the retrained model's metric (and between their effects).

    OMP_NUM_THREADS=1 python bench/ablate.py [--runs digits toxicity lm]
                                             [--estimators unrolled frozen]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from acctattr import ablate, embeddings
from acctattr.options import Runtime

ROOT = Path(__file__).resolve().parents[1] / "sample_runs"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.dont_write_bytecode = True
    spec.loader.exec_module(module)
    return module


def per_example_hf(run: str, folder: Path, eval_spec) -> torch.Tensor:
    """The lm run's metric (metric.py) per eval example for the model in a Hugging Face
    folder, loaded with from_pretrained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    data = load_file(eval_spec.data)
    with torch.no_grad():
        logits = model(**{n: data[n] for n in eval_spec.inputs}).logits
    return _module(ROOT / run / "metric.py").next_token_loss(logits, data[eval_spec.target]
                                                              ).double()


def per_example(run: str, weights: dict[str, torch.Tensor], eval_spec) -> torch.Tensor:
    """The sample's metric (cross-entropy) per eval example for its model at ``weights``."""
    spec = importlib.util.spec_from_file_location(f"_bench_{run}", ROOT / run / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.dont_write_bytecode = True
    spec.loader.exec_module(module)
    model = module.build()
    model.load_state_dict(weights, strict=True)
    model.eval()
    data = load_file(eval_spec.data)
    with torch.no_grad():
        out = model(*(data[n] for n in eval_spec.inputs))
        return torch.nn.functional.cross_entropy(out, data[eval_spec.target],
                                                 reduction="none").double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["digits", "toxicity", "lm"])
    ap.add_argument("--estimators", nargs="+", default=["unrolled", "frozen"])
    args = ap.parse_args(argv)
    from acctattr.runs.manifest import load_manifest

    runtime = Runtime(device="cpu", threads=1)
    print(f"{'run':9} {'stage':18} {'estimator':9} {'ablated':>9} {'predicted':>9} "
          f"{'retrained':>9} {'deployed':>9} {'pearson':>8} {'pearson effects':>15}")
    with tempfile.TemporaryDirectory(prefix="acctattr-bench-") as tmp:
        for run in args.runs:
            manifest = ROOT / run / "manifest.yaml"
            m = load_manifest(manifest)
            truth = json.loads((ROOT / run / "truth.json").read_text())
            hf = m.hf is not None
            if hf:
                base = per_example_hf(run, m.stages[-1].end, m.eval)
            else:
                base = per_example(run, load_file(m.stages[-1].end / "model.safetensors"),
                                   m.eval)
            for est in args.estimators:
                emb = Path(tmp) / f"{run}-{est}"
                embeddings.compute(manifest, emb, est, runtime=runtime)
                for stage in m.stages:
                    out = Path(tmp) / f"{run}-{est}-{stage.name}"
                    if not hf:
                        out = out.with_suffix(".safetensors")
                    a = ablate.ablate(manifest, stage.name, out, estimator=est,
                                      runtime=runtime, embeddings=emb)
                    values = (per_example_hf(run, out, m.eval) if hf
                              else per_example(run, load_file(out), m.eval))
                    true_effect = torch.tensor(truth["stages"][stage.name]["examples"],
                                               dtype=torch.float64)
                    retrained = base - true_effect
                    print(f"{run:9} {stage.name:18} {est:9} {float(values.mean()):9.4f} "
                          f"{a.predictions[0].predicted:9.4f} {float(retrained.mean()):9.4f} "
                          f"{float(base.mean()):9.4f} {pearson(values, retrained):8.3f} "
                          f"{pearson(base - values, true_effect):15.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
