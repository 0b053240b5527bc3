"""Devices and threads (acctattr/devices.py): --device, --threads, --batch-size, and tensors
that follow the model's device. No GPU here: the CUDA cases skip, the plumbing is checked on
the CPU and on torch's ``meta`` device (which refuses to mix with CPU tensors, so a tensor
created without the run's device shows up as an error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reportkit import cli

from acctattr import devices, pipeline
from acctattr.errors import AcctattrError
from acctattr.estimators import make
from acctattr.estimators.unrolled.adam_flow import AdamFlow
from acctattr.estimators.unrolled.flat import FlatRun
from acctattr.options import Runtime, UnrolledConfig

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "sample_runs" / "digits" / "manifest.yaml"
TOXICITY = ROOT / "sample_runs" / "toxicity" / "manifest.yaml"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")



def close(a: dict, b: dict, rel: float) -> None:
    """Two result JSONs equal, floats to ``rel`` relative (of the largest effect)."""
    assert a["n_examples"] == b["n_examples"]
    scale = max(abs(s["effect"]) for s in a["stages"])
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        assert sa["name"] == sb["name"] and sa["verdict"] == sb["verdict"]
        assert abs(sa["effect"] - sb["effect"]) <= rel * scale
        for g in sa["groups"] or {}:
            assert abs(sa["groups"][g] - sb["groups"][g]) <= rel * scale


def test_resolve_names_and_refusals():
    """cpu and auto (no GPU here) are the CPU; unknown names and absent devices are exit-2
    errors that name the option and the fix."""
    assert devices.resolve("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert devices.resolve("auto") == torch.device("cpu")
    for bad in ("tpu", "cpu:1", "cuda:x", "mps:0"):
        with pytest.raises(AcctattrError, match=f"--device {bad}: not a device"):
            devices.resolve(bad)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(AcctattrError, match="no CUDA GPU here") as e:
                devices.resolve(name)
            assert "--device cpu" in (e.value.hint or "")
    if not torch.backends.mps.is_available():
        with pytest.raises(AcctattrError, match="no MPS device"):
            devices.resolve("mps")


@pytest.mark.parametrize("index", ["\u00b2", "\u0663", "1\u00b9"])
def test_non_ascii_digits_in_a_cuda_index_are_refused(monkeypatch, index):
    """cuda:² passed the name check ("²".isdigit() is true) and then failed int() on a
    machine with a GPU (internal error); now it is an unknown device, GPU or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(AcctattrError, match="not a device acctattr knows"):
        devices.resolve(f"cuda:{index}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_is_exit_2():
    """`run --device cuda` on a machine without a GPU exits 2 with one clear line, before
    reading anything."""
    result = cli("run", DIGITS, "--device", "cuda", "-q")
    assert result.exit_code == 2
    assert "error: --device cuda: no CUDA GPU here" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_device_cpu_equals_the_default_and_batch_size_keeps_results():
    """--device cpu prints the same bytes as the default (auto, no GPU here); --threads 1 and
    2 too; another --batch-size gives the same effects (to 1e-6)."""
    args = ["run", DIGITS, "-f", "json", "-q", "--estimator", "frozen", "--per-example"]
    default = cli(*args)
    assert default.exit_code == 0, default.stderr
    for extra in (["--device", "cpu"], ["--threads", "1"], ["--threads", "2"]):
        other = cli(*args, *extra)
        assert other.exit_code == 0, other.stderr
        if not torch.cuda.is_available() or extra[0] == "--threads":
            assert other.stdout == default.stdout, extra
    small = cli(*args, "--batch-size", "7")
    assert small.exit_code == 0, small.stderr
    close(json.loads(default.stdout), json.loads(small.stdout), 1e-6)
    assert cli(*args, "--threads", "0").exit_code == 2
    assert cli(*args, "--batch-size", "0").exit_code == 2


def test_batch_size_is_refused_for_function_data(tmp_path):
    """--batch-size with eval.data a FILE.py:FUNC (which yields its own batches) is exit 2."""
    import shutil

    run = tmp_path / "digits"
    shutil.copytree(DIGITS.parent, run)
    (run / "evalfn.py").write_text(
        "from safetensors.torch import load_file\n\n\n"
        "def batches():\n"
        "    d = load_file('" + str(run / "data" / "eval.safetensors") + "')\n"
        "    yield d\n")
    text = (run / "manifest.yaml").read_text().replace("data: data/eval.safetensors",
                                                       "data: evalfn.py:batches")
    (run / "manifest.yaml").write_text(text)
    ok = cli("run", run / "manifest.yaml", "-q", "--estimator", "naive")
    assert ok.exit_code == 0, ok.stderr
    result = cli("run", run / "manifest.yaml", "-q", "--estimator", "naive", "--batch-size", "8")
    assert result.exit_code == 2
    assert "--batch-size 8: eval.data evalfn.py:batches is a function" in result.stderr


def test_threads_context_restores_and_default_follows_the_environment(monkeypatch):
    """threads(n) sets torch's count for the block only; default_threads is OMP_NUM_THREADS
    when set, else between 1 and the CPUs this process may use."""
    before = torch.get_num_threads()
    with devices.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert devices.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= devices.default_threads() <= devices.usable_cpus()
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert devices.default_threads() == 1  # a machine busy with other work: one thread


def test_single_threaded_runs_at_one_thread():
    """single_threaded runs its function at one intra-op thread and restores the count."""
    seen = []
    devices.single_threaded(lambda: seen.append(torch.get_num_threads()))()
    assert seen == [1]


@pytest.mark.parametrize("manifest", [DIGITS, TOXICITY], ids=["digits", "toxicity"])
def test_estimators_keep_their_tensors_on_the_run_device(manifest):
    """With the run on another device (meta here, which refuses to mix with CPU tensors),
    naive's and frozen's embeddings and unrolled's flat vectors, per-group constants,
    anchors, preconditioner rates and saved second moments are created there."""
    loaded = pipeline.check(manifest)
    meta = torch.device("meta")
    training = pipeline.training(loaded)
    training = type(training)(training.runs, training.trainable, training.dtypes,
                              training.curvature, training.train_loss, meta)
    for name in ("naive", "frozen"):
        est = make(name, training)
        for k in range(len(loaded.runs)):
            assert {v.device for v in est.embed(k).values()} == {meta}, (name, k)
    unrolled = make("unrolled", training, UnrolledConfig())
    flat: FlatRun = unrolled.flat  # type: ignore[attr-defined]
    for j in range(1, len(loaded.runs)):
        vectors = [flat.per_group(j, lambda g: g.weight_decay), flat.coupled_decay(j),
                   flat.rate(j), flat.decay(j, 0, 1), flat.flat(flat.anchor(loaded.runs[j].end))]
        if flat.runs[j].opt_type != "sgd":
            saved = AdamFlow(flat).saved_second_moment(j)
            assert saved is not None
            vectors.append(saved)
        assert {v.device for v in vectors} == {meta}


def test_mps_math_stays_on_the_cpu_and_unrolled_says_why():
    """On MPS (no float64) the estimators' algebra stays on the CPU, and unrolled names the
    reason it cannot run, so auto takes frozen."""
    assert devices.math_device(torch.device("mps")) == torch.device("cpu")
    assert devices.math_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    loaded = pipeline.check(DIGITS)
    training = pipeline.training(loaded)
    training = type(training)(training.runs, training.trainable, training.dtypes,
                              training.curvature, training.train_loss, torch.device("mps"))
    assert any("MPS" in why for why in make("unrolled", training).needs())
    assert make("frozen", training).stages.device == torch.device("cpu")


@GPU
@pytest.mark.parametrize("estimator", ["frozen", "unrolled"])
def test_cuda_matches_the_cpu(estimator):
    """On a GPU the digits run's effects equal the CPU's to 1e-4 (float32 kernels differ)."""
    cpu = pipeline.run(DIGITS, estimator, runtime=Runtime(device="cpu"))
    gpu = pipeline.run(DIGITS, estimator, runtime=Runtime(device="cuda"))
    scale = max(abs(s.effect) for s in cpu.stages)
    for a, b in zip(cpu.stages, gpu.stages, strict=True):
        assert a.name == b.name and abs(a.effect - b.effect) <= 1e-4 * scale


@GPU
def test_cuda_batch_size_and_toxicity_run():
    """The toxicity run (AdamW, LayerNorm, embeddings) runs on the GPU with another batch
    size, and agrees with the CPU to 1e-4."""
    cpu = pipeline.run(TOXICITY, "auto", runtime=Runtime(device="cpu"))
    gpu = pipeline.run(TOXICITY, "auto", runtime=Runtime(device="cuda", batch_size=64))
    assert cpu.estimator == gpu.estimator
    scale = max(abs(s.effect) for s in cpu.stages)
    for a, b in zip(cpu.stages, gpu.stages, strict=True):
        assert abs(a.effect - b.effect) <= 1e-4 * scale
