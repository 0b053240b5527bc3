"""`acctattr ablate` (acctattr/ablate.py): the written model, evaluated with the run's own
model code, measures the counterfactual value `run --evaluate direct` reports; Hugging Face
and PEFT runs give a folder `from_pretrained` loads."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from reportkit import cli
from safetensors.torch import load_file

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"
STAGES = {"digits": ["pretrain", "shortcut", "polish"],
          "toxicity": ["pretrain", "identity_shortcut", "polish"]}
INPUT = {"digits": "x", "toxicity": "tokens"}



def measured(run: str, weights: Path) -> float:
    """Mean cross-entropy on the sample's eval set of the sample's own model (model.py's
    build()) loaded with ``weights`` (strict)."""
    spec = importlib.util.spec_from_file_location(f"_sample_{run}", SAMPLES / run / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.dont_write_bytecode = True
    spec.loader.exec_module(module)
    model = module.build()
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    data = load_file(SAMPLES / run / "data" / "eval.safetensors")
    x = data[INPUT[run]]
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x.float() if x.is_floating_point() else x),
                                               data["y"], reduction="none")
    return math.fsum(ce.double().tolist()) / ce.numel()


def direct(run: str, estimator: str, *extra: str | Path) -> dict[str, dict]:
    got = cli("run", SAMPLES / run / "manifest.yaml", "--estimator", estimator, "--evaluate",
              "direct", "-f", "json", "-q", *extra)
    assert got.exit_code == 0, got.stderr
    return {s["name"]: s for s in json.loads(got.stdout)["stages"]}


def _predicted(stdout: str) -> float:
    line = next(ln for ln in stdout.splitlines() if "cross_entropy" in ln)
    return float(line.split("cross_entropy")[1].split()[0])


@pytest.mark.parametrize("run", ["digits", "toxicity"])
@pytest.mark.parametrize("estimator", ["naive", "frozen", "unrolled"])
def test_ablated_model_measures_the_direct_counterfactual(tmp_path, run, estimator):
    """For every stage, the written state dict evaluated by the sample's model code gives the
    counterfactual value `run --evaluate direct` reports (1e-5 relative), and ablate prints
    it. unrolled goes through stored embeddings (computed once)."""
    extra: list[str | Path] = []
    if estimator == "unrolled":
        emb = tmp_path / "emb"
        made = cli("embed", SAMPLES / run / "manifest.yaml", "-o", emb, "--estimator",
                   "unrolled", "-q")
        assert made.exit_code == 0, made.stderr
        extra = ["--embeddings", emb]
    cf = direct(run, estimator, *extra)
    for stage in STAGES[run]:
        out = tmp_path / f"without-{stage}.safetensors"
        got = cli("ablate", SAMPLES / run / "manifest.yaml", "--stage", stage, "-o", out,
                  "--estimator", estimator, "-q", *extra)
        assert got.exit_code == 0, got.stderr
        want = cf[stage]["counterfactual_value"]
        assert measured(run, out) == pytest.approx(want, rel=1e-5)
        assert _predicted(got.stdout) == pytest.approx(want, rel=1e-5)


def test_scale_damps_the_stage(tmp_path):
    """--scale 0.5 writes theta_T - v_k / 2: halfway between the deployed weights and the
    fully ablated ones."""
    manifest = SAMPLES / "digits" / "manifest.yaml"
    full, half = tmp_path / "full", tmp_path / "half"
    for out, scale in ((full, "1"), (half, "0.5")):
        got = cli("ablate", manifest, "--stage", "shortcut", "-o", out, "--scale", scale,
                  "--estimator", "frozen", "-q")
        assert got.exit_code == 0, got.stderr
    deployed = load_file(SAMPLES / "digits" / "ckpt" / "polish" / "model.safetensors")
    a, b = load_file(full / "model.safetensors"), load_file(half / "model.safetensors")
    for name, t in deployed.items():
        torch.testing.assert_close(b[name], (t + a[name]) / 2, rtol=1e-5, atol=1e-6)
    doc = json.loads((half / "acctattr-ablate.json").read_text())
    assert doc["stage"] == "shortcut" and doc["scale"] == 0.5


def test_ablate_refuses_bad_requests(tmp_path):
    """An unknown stage, a scale <= 0 and an output inside the run's folder are exit 2, and
    nothing is written."""
    manifest = SAMPLES / "digits" / "manifest.yaml"
    bad = cli("ablate", manifest, "--stage", "nope", "-o", tmp_path / "x")
    assert bad.exit_code == 2 and "nope" in bad.stderr and "pretrain" in bad.stderr
    zero = cli("ablate", manifest, "--stage", "polish", "--scale", "0", "-o", tmp_path / "x")
    assert zero.exit_code == 2 and "--scale" in zero.stderr
    inside = cli("ablate", manifest, "--stage", "polish", "-o", manifest.parent / "x")
    assert inside.exit_code == 2 and "run's folder" in inside.stderr
    assert not (manifest.parent / "x").exists() and not (tmp_path / "x").exists()


def test_scale_that_overflows_the_weights_writes_nothing(tmp_path):
    """--scale 1e300 makes theta_T - S * v_k Inf in float32: exit 2 naming the stage and a
    tensor, nothing written (a model of Inf weights was written, exit 0, predicted nan)."""
    manifest = SAMPLES / "digits" / "manifest.yaml"
    got = cli("ablate", manifest, "--stage", "shortcut", "-o", tmp_path / "x", "--scale",
              "1e300", "--estimator", "frozen", "-q")
    assert got.exit_code == 2, got.stderr
    assert "stage 'shortcut'" in got.stderr and "NaN or Inf" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr and not (tmp_path / "x").exists()


def test_hugging_face_and_peft_runs_give_a_from_pretrained_folder(tmp_path):
    """On a Trainer + PEFT LoRA run, ablating the LoRA stage writes an HF folder (config
    copied) that from_pretrained loads and whose eval cross-entropy is PEFT's own model
    without the adapter; ablating the full fine-tune gives run --evaluate direct's value."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).parent))
    from formats_runs import _ce, write_hf_run
    from transformers import GPT2ForSequenceClassification

    run = write_hf_run(tmp_path / "hf")
    manifest = run["manifest"]
    got = cli("run", manifest, "--estimator", "frozen", "--evaluate", "direct", "-f", "json",
              "-q")
    assert got.exit_code == 0, got.stderr
    cf = {s["name"]: s["counterfactual_value"] for s in json.loads(got.stdout)["stages"]}
    data = load_file(manifest.parent / "eval.safetensors")
    for stage in ("lora", "sft"):
        out = tmp_path / f"without-{stage}"
        made = cli("ablate", manifest, "--stage", stage, "-o", out, "--estimator", "frozen",
                   "-q")
        assert made.exit_code == 0, made.stderr
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        model = GPT2ForSequenceClassification.from_pretrained(out).eval()
        with torch.no_grad():
            ce = _ce(model(input_ids=data["input_ids"]).logits, data["label"])
        value = math.fsum(ce.tolist()) / ce.numel()
        assert value == pytest.approx(cf[stage], rel=1e-5)
        if stage == "lora":
            assert value == pytest.approx(float(run["without_adapter"].mean()), rel=1e-5)


def test_lm_run_ablated_folders_load_with_from_pretrained(tmp_path):
    """On the lm sample run (Trainer folders, a tied GPT-2), every stage's ablated folder
    loads with from_pretrained and its eval loss (the run's own metric.py) is the
    counterfactual value `run --evaluate direct` reports (1e-5 relative)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    manifest = SAMPLES / "lm" / "manifest.yaml"
    emb = tmp_path / "emb"
    made = cli("embed", manifest, "-o", emb, "--estimator", "frozen", "-q")
    assert made.exit_code == 0, made.stderr
    cf = direct("lm", "frozen", "--embeddings", emb)
    spec = importlib.util.spec_from_file_location("_lm_metric", SAMPLES / "lm" / "metric.py")
    assert spec is not None and spec.loader is not None
    metric = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metric)
    data = load_file(SAMPLES / "lm" / "data" / "eval.safetensors")
    for stage in ("pretrain", "sft", "poison"):
        out = tmp_path / f"without-{stage}"
        got = cli("ablate", manifest, "--stage", stage, "-o", out, "--estimator", "frozen",
                  "--embeddings", emb, "-q")
        assert got.exit_code == 0, got.stderr
        assert (out / "config.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            loss = metric.next_token_loss(model(input_ids=data["input_ids"]).logits,
                                          data["labels"]).double()
        value = math.fsum(loss.tolist()) / loss.numel()
        assert value == pytest.approx(cf[stage]["counterfactual_value"], rel=1e-5)


def test_bf16_checkpoint_is_written_in_bf16(tmp_path):
    """A final checkpoint stored in bfloat16 is evaluated in bfloat16 and gives an ablated
    state dict in bfloat16: the very weights the prediction was made for (theta_T - v taken
    in float32 and rounded once), so no rounding note; the sample's float32 model code on
    those weights measures the prediction to bf16 precision."""
    import shutil

    from safetensors.torch import save_file

    run = tmp_path / "digits"
    shutil.copytree(SAMPLES / "digits", run, ignore=shutil.ignore_patterns("__pycache__"))
    final = run / "ckpt" / "polish" / "model.safetensors"
    save_file({n: t.to(torch.bfloat16) for n, t in load_file(final).items()}, final)
    out = tmp_path / "without.safetensors"
    got = cli("ablate", run / "manifest.yaml", "--stage", "shortcut", "-o", out,
              "--estimator", "frozen", "-q")
    assert got.exit_code == 0, got.stderr
    assert "written in" not in got.stderr
    written = load_file(out)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    fp32 = {n: t.float() for n, t in written.items()}
    assert measured("digits", _saved(tmp_path, fp32)) == pytest.approx(_predicted(got.stdout),
                                                                       rel=2e-2)


def _saved(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "as-float32.safetensors"
    save_file(tensors, path)
    return path
