"""bf16/fp16 checkpoints are evaluated in their own dtype (Delta and v_k in float32 or
better); a stage whose start and end differ in dtype is refused where rounding would
swamp its update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from acctattr import pipeline
from acctattr.cli import app

MODEL = "import torch\n\n\ndef build():\n    return torch.nn.Linear(16, 4)\n"


def _write(root: Path, dtypes: tuple[torch.dtype, ...], step: float = 0.05) -> Path:
    """Two SGD stages of a Linear(16, 4): checkpoints init, a, b saved in ``dtypes``."""
    root.mkdir()
    (root / "model.py").write_text(MODEL)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 16, generator=g) * 0.3, torch.zeros(4)
    for name, dtype in zip(("init", "a", "b"), dtypes, strict=True):
        if name != "init":
            w = w + step * torch.randn(4, 16, generator=g)
            b = b + step * torch.randn(4, generator=g)
        save_file({"weight": w.to(dtype), "bias": b.to(dtype)}, root / f"{name}.safetensors")
    save_file({"x": torch.randn(64, 16, generator=g),
               "y": torch.randint(0, 4, (64,), generator=g)}, root / "eval.safetensors")
    doc = {"version": 1, "model": {"factory": "model.py:build"},
           "stages": [{"name": "a", "start": "init.safetensors", "end": "a.safetensors",
                       "optimizer": {"type": "sgd", "steps": 5, "lr": 0.1}},
                      {"name": "b", "end": "b.safetensors",
                       "optimizer": {"type": "sgd", "steps": 5, "lr": 0.1}}],
           "eval": {"data": "eval.safetensors", "inputs": ["x"], "target": "y",
                    "metric": "cross_entropy", "batch_size": 64}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "manifest.yaml"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_checkpoints_are_evaluated_in_their_own_dtype(tmp_path, dtype):
    manifest = _write(tmp_path / "run", (dtype,) * 3)
    loaded = pipeline.check(manifest)
    assert all(p.dtype == dtype for p in loaded.evaluator.params.values())
    assert all(p.dtype == dtype for p in loaded.model.parameters())
    est = pipeline.estimator(loaded, "naive")
    v = est.embed(1)
    assert all(t.dtype == torch.float32 for t in v.values())  # Delta in float32
    result = pipeline.run(manifest, "naive", "direct")
    # by hand: the model in the checkpoint's dtype, theta_T - Delta rounded once from
    # float32, the metric on float32 logits
    from safetensors.torch import load_file

    root = manifest.parent
    x, y = (load_file(root / "eval.safetensors")[k] for k in ("x", "y"))
    ck = {n: load_file(root / f"{n}.safetensors") for n in ("init", "a", "b")}
    final = ck["b"]

    def f(sd: dict[str, torch.Tensor]) -> torch.Tensor:
        out = F.linear(x.to(dtype), sd["weight"], sd["bias"]).float()
        return F.cross_entropy(out, y, reduction="none").double()

    for k, (s, e) in enumerate((("init", "a"), ("a", "b"))):
        shifted = {n: (final[n].float() - (ck[e][n].float() - ck[s][n].float())).to(dtype)
                   for n in final}
        want = float((f(final) - f(shifted)).mean())
        got = next(st.effect for st in result.stages if st.position == k + 1)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_a_stage_from_fp32_to_bf16_with_a_tiny_update_is_refused(tmp_path):
    """init in float32, a and b in bfloat16, updates far below bf16's rounding: exit 2,
    naming the stage, both files and a tensor."""
    manifest = _write(tmp_path / "run", (torch.float32, torch.bfloat16, torch.bfloat16),
                      step=1e-5)
    res = CliRunner().invoke(app, ["check", str(manifest)])
    assert res.exit_code == 2, res.output
    err = res.stderr
    assert "stage 'a'" in err and "init.safetensors" in err and "a.safetensors" in err
    assert "'weight'" in err and "bfloat16" in err and "float32" in err


def test_a_stage_from_fp32_to_bf16_with_a_large_update_runs(tmp_path):
    """The same change of dtype under an update far above bf16's rounding is fine."""
    manifest = _write(tmp_path / "run", (torch.float32, torch.bfloat16, torch.bfloat16),
                      step=0.5)
    result = pipeline.run(manifest, "frozen")
    assert all(torch.isfinite(torch.tensor(s.effect)) for s in result.stages)
