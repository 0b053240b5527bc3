"""Hostile input (issue 13): every input is checked before use, gates fail closed.

Each case breaks one thing in a copy of a tiny real staged run (tests/staged.py, trained with
torch.optim) and asserts exit 2 (or 1 for a gate), a message naming what is wrong, and no
traceback. A small seeded fuzzer damages paths and file contents. Most cases run in-process
(typer's CliRunner); those about signals, FIFOs and the console entry point run a
subprocess with a 60 s timeout as a hang guard (never a timing assertion).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reportkit import cli
from safetensors.torch import load_file, save_file
from staged import StageCfg, write_run

STAGES = [
    StageCfg("a", "sgd", 6, 0.05, {"momentum": 0.9}, (0.01, 0.0)),
    StageCfg("b", "sgd", 5, 0.03, {"momentum": 0.9}, (0.01, 0.0), continues=True),
    StageCfg("c", "adamw", 4, 0.01, {}, (0.1, 0.0)),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("hostile") / "run", STAGES, with_data=True).parent


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid three-stage run with stage data (unrolled can run)."""
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    return dst



def no_traceback(result: Any) -> None:
    out = result.stdout + result.stderr
    assert "Traceback" not in out and "internal error" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)


def refused(result: Any, *needles: str) -> str:
    """Exit 2, no traceback, nothing on stdout, every needle on stderr."""
    err = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}\nstderr:\n{err}\n{result.exception!r}"
    no_traceback(result)
    assert result.stdout == ""
    for n in needles:
        assert n in err, f"{n!r} not in stderr:\n{err}"
    return err


def manifest(run_dir: Path) -> Path:
    return run_dir / "manifest.yaml"


def edit(run_dir: Path, fn) -> Path:
    path = manifest(run_dir)
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def edit_eval(run_dir: Path, fn) -> None:
    path = run_dir / "data" / "eval.safetensors"
    data = load_file(path)
    fn(data)
    save_file(data, path)


# ---------------------------------------------------------------- gates fail closed


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_eval_input_is_refused_up_front(run_dir, value):
    """One NaN or Inf anywhere in the eval inputs: exit 2 from check and run, naming the
    file, the tensor and the example (never `final nan` and a passing gate)."""
    def poison(d):
        d["x"][23, 4] = value
    edit_eval(run_dir, poison)
    for args in (("check",), ("run", "-q", "--fail-on-harm", "0", "--confidence", "0.5")):
        refused(cli(args[0], manifest(run_dir), *args[1:]), "eval.safetensors",
                "tensor 'x'", "NaN or Inf", "example 23")


def test_ignore_index_label_alone_is_refused(run_dir):
    """A -100 label on a one-label example leaves nothing counted: refused, never loss 0."""
    def ignore(d):
        d["y"][5] = -100
    edit_eval(run_dir, ignore)
    refused(cli("check", manifest(run_dir)), "eval.target 'y'", "-100", "first example 5")


def test_negative_label_other_than_ignore_index_is_refused(run_dir):
    """Class ids are >= 0 or -100; -3 is refused with the example."""
    def neg(d):
        d["y"][7] = -3
    edit_eval(run_dir, neg)
    refused(cli("check", manifest(run_dir)), "negative class id -3", "example 7")


def test_sequence_labels_exclude_ignore_index_from_the_mean():
    """Per-token cross-entropy is averaged over counted tokens only; an example with no
    counted token is NaN (refused earlier), never 0."""
    import torch.nn.functional as F

    from acctattr.evaluation.metrics import BUILTIN

    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, -100], [-100] * 4])
    ce = BUILTIN["cross_entropy"][0](out, y)
    assert ce[0].item() == pytest.approx(F.cross_entropy(out[0, [0, 2, 3]], y[0, [0, 2, 3]]).item())
    assert ce[1].item() == pytest.approx(F.cross_entropy(out[1, 2:3], y[1, 2:3]).item())
    assert torch.isnan(ce[2])
    lp = BUILTIN["logprob"][0](out, y)
    assert lp[0].item() == pytest.approx(-ce[0].item())


def test_sequence_eval_data_with_an_uncounted_example_is_refused():
    """check_values refuses a sequence example whose every label is -100."""
    from acctattr.errors import DataError
    from acctattr.evaluation.data import check_values

    batch = {"x": torch.zeros(3, 4), "y": torch.tensor([[1, -100], [-100, -100], [0, 0]])}
    with pytest.raises(DataError, match="1 example\\(s\\) have every label -100"):
        check_values(batch, ("x", "y"), "y", True, "eval.data f")
    check_values({"x": batch["x"], "y": batch["y"][[0, 2]]}, ("x", "y"), "y", True, "f")


METRIC_INF = """import torch


def inf_for_some(out, y):
    v = torch.nn.functional.cross_entropy(out, y.long(), reduction="none")
    return torch.where(y == 0, torch.full_like(v, float("inf")), v)
"""


def test_metric_yielding_inf_trips_the_gate_and_says_why(run_dir):
    """A user metric that yields Inf: effects undefined, --fail-on-harm trips (exit 1) even
    at confidence 0.5, and the JSON gate object records the reason."""
    (run_dir / "metric.py").write_text(METRIC_INF)
    path = edit(run_dir, lambda d: d["eval"].__setitem__("metric", "metric.py:inf_for_some"))
    r = cli("run", path, "-q", "-f", "json", "--estimator", "frozen", "--fail-on-harm", "100",
            "--confidence", "0.5")
    assert r.exit_code == 1, r.stderr
    no_traceback(r)
    doc = json.loads(r.stdout)
    assert doc["final_value"] is None
    assert all(s["verdict"] == "undefined" for s in doc["stages"])
    gate = doc["gate"]
    assert gate["tripped"] and all(c["tripped"] for c in gate["checks"])
    assert "the effect is NaN" in gate["worst"]["reason"]
    assert "fail closed" in r.stderr and "NaN or infinite" in r.stderr


@pytest.mark.parametrize("attr,needle", [
    ('higher_is_better = "false"', "higher_is_better must be True or False, got 'false'"),
    ("value_range = 5", "value_range must be (low, high)"),
    ('value_range = ("a", "b")', "value_range must be (low, high)"),
    ('value_range = (float("nan"), 1.0)', "value_range must be (low, high)"),
    ("value_range = (1.0, 0.0)", "low <= high"),
    ("batch_keys = None", "batch_keys must be a tuple of tensor names, got None"),
])
def test_user_metric_attributes_of_the_wrong_kind_are_refused(run_dir, attr, needle):
    """A user metric's higher_is_better "false" (read as True: every verdict flipped, exit 0),
    a value_range that is not two ordered numbers or a batch_keys of None (internal errors,
    exit 3, from check or run): exit 2 from check and run naming the metric."""
    (run_dir / "metric.py").write_text(
        "import torch.nn.functional as F\n\n\ndef ce(out, y):\n"
        "    return F.cross_entropy(out, y, reduction='none')\n\n\n"
        f"ce.{attr}\n")
    path = edit(run_dir, lambda d: d["eval"].__setitem__("metric", "metric.py:ce"))
    for cmd in ("check", "run"):
        refused(cli(cmd, path, *(["-q"] if cmd == "run" else [])), "eval.metric metric.py:ce",
                needle)


def test_a_metric_without_a_derivative_is_refused_under_linear(run_dir):
    """A user metric returning bools (0/1 errors) under --evaluate linear: its JVP is 0, so
    every stage but the last (evaluated direct) was 'neutral' with effect 0, exit 0; now exit
    2 saying to use --evaluate direct, which still works."""
    (run_dir / "metric.py").write_text(
        "def wrong(out, y):\n    return out.argmax(1) != y\n")
    path = edit(run_dir, lambda d: d["eval"].__setitem__("metric", "metric.py:wrong"))
    refused(cli("run", path, "-q", "--estimator", "naive", "--evaluate", "linear"),
            "eval.metric metric.py:wrong returns torch.bool values", "--evaluate direct")
    r = cli("run", path, "-q", "-f", "json", "--estimator", "naive", "--evaluate", "direct")
    assert r.exit_code == 0, r.stderr
    assert any(s["effect"] != 0 for s in json.loads(r.stdout)["stages"][:-1])


def test_a_complex_metric_is_refused(run_dir):
    """A user metric returning complex values: the imaginary part was dropped with a torch
    UserWarning and exit 0; now exit 2 from check naming the metric and dtype."""
    (run_dir / "metric.py").write_text(
        "import torch\nimport torch.nn.functional as F\n\n\ndef ce(out, y):\n"
        "    return F.cross_entropy(out, y, reduction='none').to(torch.complex64)\n")
    path = edit(run_dir, lambda d: d["eval"].__setitem__("metric", "metric.py:ce"))
    refused(cli("check", path), "eval.metric metric.py:ce returned torch.complex64 values")


def test_mse_never_broadcasts_one_output_against_every_target(run_dir):
    """mse on a model with one output ([B, 1]) and a target [B]: out - y broadcast to
    [B, B], every example against every target, and a plausible final value came out
    (exit 0); now the target is matched to its own output. A target that fits the outputs
    in no way is exit 2 naming both shapes."""
    (run_dir / "model.py").write_text(
        "import torch\n\n\nclass One(torch.nn.Linear):\n"
        "    def forward(self, x):\n        return super().forward(x)[:, :1]\n\n\n"
        "def build():\n    return One(6, 3).double()\n")
    edit_eval(run_dir, lambda d: d.update(y=d["y"].double()))
    path = edit(run_dir, lambda d: d["eval"].update(metric="mse"))
    r = cli("run", path, "-q", "-f", "json", "--estimator", "naive")
    assert r.exit_code == 0, r.stderr
    ev = load_file(run_dir / "data" / "eval.safetensors")
    sd = load_file(run_dir / "ckpt" / "c" / "model.safetensors")
    out = ev["x"] @ sd["weight"][:1].T + sd["bias"][:1]
    truth = float(((out[:, 0] - ev["y"]) ** 2).mean())
    assert json.loads(r.stdout)["final_value"] == pytest.approx(truth, rel=1e-9)
    edit_eval(run_dir, lambda d: d.update(y=d["y"][:, None].repeat(1, 2)))
    refused(cli("check", path), "eval.metric mse failed", "does not match the model outputs'")


def test_undefined_standard_error_trips_a_confident_gate(run_dir):
    """One eval example: the standard error is undefined; a gate at confidence 0.95 trips
    (fail closed) and says why; at 0.5 (the point estimate) it does not need it."""
    edit_eval(run_dir, lambda d: d.update({k: v[:1].clone() for k, v in d.items()}))
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "frozen",
            "--fail-on-harm", "1000", "--confidence", "0.95")
    assert r.exit_code == 1, r.stderr
    no_traceback(r)
    assert "standard error is undefined" in json.loads(r.stdout)["gate"]["worst"]["reason"]
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "frozen",
            "--fail-on-harm", "1000", "--confidence", "0.5")
    assert r.exit_code == 0, r.stderr


def test_training_labels_out_of_range_under_unrolled(run_dir):
    """A class id beyond the model's outputs in a stage's training data: exit 2 naming the
    stage and file (the same fault in eval data is caught the same way)."""
    def bad(d):
        d.pop("train")
    path = edit(run_dir, bad)
    data = load_file(run_dir / "data" / "b.safetensors")
    data["y"][0] = 99
    save_file(data, run_dir / "data" / "b.safetensors")
    r = cli("run", path, "-q", "--estimator", "unrolled")
    refused(r, "stage 'b'", "b.safetensors", "training loss failed")


def test_nan_in_training_data_under_unrolled(run_dir):
    """NaN in a stage's training data is refused like NaN in eval data, by `check` too (it
    reads the sample unrolled would)."""
    data = load_file(run_dir / "data" / "c.safetensors")
    data["x"][2, 0] = float("nan")
    save_file(data, run_dir / "data" / "c.safetensors")
    for args in (("run", manifest(run_dir), "-q", "--estimator", "unrolled"),
                 ("check", manifest(run_dir))):
        refused(cli(*args), "stage 'c'", "c.safetensors", "tensor 'x'", "NaN or Inf")


def test_check_runs_the_training_loss_on_a_stages_largest_label(run_dir):
    """A class id beyond the model's outputs in the last row of a stage's data: `check`
    probes the training loss on the first rows and on each integer tensor's largest-value
    row, so it refuses what `run` would, naming the stage and file."""
    data = load_file(run_dir / "data" / "c.safetensors")
    data["y"][-1] = 1000
    save_file(data, run_dir / "data" / "c.safetensors")
    for args in (("run", manifest(run_dir), "-q", "--estimator", "unrolled"),
                 ("check", manifest(run_dir))):
        refused(cli(*args), "stage 'c'", "c.safetensors", "training loss failed")


@pytest.mark.parametrize("damage,needle", [
    (lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:50]), "not a readable safetensors file"),
    (lambda p: save_file({"x": load_file(p)["x"]}, p), "has no tensor named 'y'"),
    (lambda p: save_file({"x": load_file(p)["x"], "y": load_file(p)["y"][:3].clone()}, p),
     "different numbers of examples"),
])
def test_check_reads_the_headers_of_later_stages_data(run_dir, damage, needle):
    """A later stage's data that is unreadable, lacks the target or has tensors of different
    lengths: `check` said ok and the default run (auto tries unrolled) then refused it; now
    check lists it, naming the stage and file. The first stage's data, which no estimator
    reads, is left alone."""
    later = run_dir / "data" / "c.safetensors"
    pristine = later.read_bytes()
    damage(later)
    refused(cli("check", manifest(run_dir)), "stage 'c': data", "c.safetensors", needle)
    later.write_bytes(pristine)
    damage(run_dir / "data" / "a.safetensors")
    r = cli("check", manifest(run_dir))
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("body,needle", [
    ("(out.argmax(1) != y).float()", "do not depend differentiably on the weights"),
    ("(-out.gather(1, y[:, None]).squeeze(1)).detach()", "do not depend differentiably"),
    ("-out.gather(1, y[:, None]).squeeze(1).long()", "returned torch.int64 values"),
    ("-out.gather(1, y[:, None]).squeeze(1).to(torch.complex128)",
     "returned torch.complex128 values"),
    ("-out.gather(1, y[:, None]).squeeze(1) * float('nan')", "are NaN or Inf"),
])
def test_training_loss_unrolled_cannot_differentiate(run_dir, body, needle):
    """A user train.loss that is detached, integer, complex or NaN on a stage's sample was
    an internal error deep in torch (exit 3: no grad_fn, complex grad, eigh failing to
    converge); now exit 2 naming the stage, the loss and the data."""
    (run_dir / "loss.py").write_text(
        f"import torch\n\n\ndef minus_target_logit(out, y):\n    return {body}\n")
    refused(cli("run", manifest(run_dir), "-q", "--estimator", "unrolled"),
            "train.loss loss.py:minus_target_logit", "b.safetensors", needle)


# ---------------------------------------------------------------- every input checked


# a test that blocks fails after 60 s (conftest.hang_guard)
pytestmark = pytest.mark.usefixtures("hang_guard")


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _loop(path: Path) -> None:
    """``path`` becomes one end of a two-link symlink loop."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    other = path.with_name(path.name + ".loop")
    os.symlink(other, path)
    os.symlink(path, other)


# (what is replaced, the manifest key named in the message)
TARGETS = [
    ("ckpt/b/model.safetensors", "b"),
    ("ckpt/b/optimizer.pt", "optimizer.state"),
    ("data/eval.safetensors", "eval.data"),
    ("data/c.safetensors", "data"),
    ("model.py", "model.factory"),
]


@pytest.mark.parametrize("rel,key", TARGETS)
def test_fifo_where_a_file_is_expected(run_dir, rel, key):
    """A FIFO is never opened (it would block forever): exit 2 naming it."""
    _fifo(run_dir / rel)
    refused(cli("check", manifest(run_dir)), rel.split("/")[-1], "FIFO", key)


def test_fifo_as_the_manifest(tmp_path):
    _fifo(tmp_path / "manifest.yaml")
    refused(cli("check", tmp_path / "manifest.yaml"), "manifest.yaml", "FIFO")


@pytest.mark.parametrize("key", ["start", "end", "state", "eval", "factory"])
def test_character_device_where_a_file_is_expected(run_dir, key):
    """/dev/zero (endless) or /dev/null named by the manifest: exit 2, never read."""
    def point(d):
        if key == "start":
            d["stages"][0]["start"] = "/dev/zero"
        elif key == "end":
            d["stages"][1]["end"] = "/dev/null"
        elif key == "state":
            d["stages"][0]["optimizer"]["state"] = "/dev/zero"
        elif key == "eval":
            d["eval"]["data"] = "/dev/zero"
        else:
            d["model"]["factory"] = "/dev/null/x.py:build"
    refused(cli("check", edit(run_dir, point)))
    if key != "factory":
        assert "character device" in cli("check", manifest(run_dir)).stderr


@pytest.mark.parametrize("rel", ["ckpt/init", "ckpt/b", "ckpt/a/optimizer.pt",
                                 "data/eval.safetensors", "data/b.safetensors", "model.py",
                                 "ckpt/c/model.safetensors"])
def test_symlink_loop_in_any_path(run_dir, rel):
    """A symlink loop wherever the manifest points (or inside a checkpoint folder)."""
    _loop(run_dir / rel)
    err = refused(cli("check", manifest(run_dir)))
    assert "symlink loop" in err or "not found" in err or "no model weights" in err, err


def test_symlink_loop_as_the_manifest(tmp_path):
    _loop(tmp_path / "m.yaml")
    refused(cli("check", tmp_path / "m.yaml"), "symlink loop")


@pytest.mark.parametrize("path", ["ckpt/a\x00b", "x" * 300, "a/" * 3000 + "f"])
def test_paths_the_os_rejects(run_dir, path):
    """An embedded NUL, a name or a path too long: exit 2 naming the key."""
    def point(d):
        d["stages"][1]["end"] = path
    refused(cli("check", edit(run_dir, point)), "stage 'b': end")


@pytest.mark.parametrize("arg", ["y" * 300 + ".yaml", "d/" * 3000 + "m.yaml"])
def test_manifest_argument_the_os_rejects(arg):
    """(A NUL byte cannot reach argv: execve ends an argument there.)"""
    refused(cli("check", arg))
    refused(cli("run", arg, "-q"))


def _resave(path: Path, fn) -> None:
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float8_e4m3fn])
def test_non_float_checkpoint_is_refused(run_dir, dtype):
    """Integer, bool and fp8 weights are refused naming the tensor and dtype."""
    _resave(run_dir / "ckpt/b/model.safetensors",
            lambda sd: sd.update(weight=sd["weight"].to(dtype)))
    err = refused(cli("check", manifest(run_dir)), "model.safetensors", "weight")
    assert "not floating point" in err or "dtype" in err


@pytest.mark.parametrize("fn,needle", [
    (lambda sd: sd.pop("bias"), "missing 1 parameter(s): bias"),
    (lambda sd: sd.clear(), "missing 2 parameter(s)"),
    (lambda sd: sd.update(bias=sd["bias"].long()), "not floating point: bias I64"),
])
def test_final_checkpoint_that_fails_its_check_is_never_read(run_dir, fn, needle):
    """The last stage's end missing a tensor, empty, or holding an integer parameter was read
    as theta_T anyway after its check failed: KeyError / RuntimeError, exit 3. Now exit 2
    from check and run with the one problem, naming the stage, key and file."""
    _resave(run_dir / "ckpt/c/model.safetensors", fn)
    for cmd in ("check", "run"):
        refused(cli(cmd, manifest(run_dir)), "stage 'c': end", "ckpt/c/model.safetensors",
                needle)


def test_complex_checkpoint_is_refused(run_dir):
    path = run_dir / "ckpt/b/model.pt"
    sd = load_file(run_dir / "ckpt/b/model.safetensors")
    sd["weight"] = sd["weight"].to(torch.complex128)
    (run_dir / "ckpt/b/model.safetensors").unlink()
    torch.save(sd, path)
    refused(cli("check", manifest(run_dir)), "model.pt", "weight", "complex")


def test_sparse_checkpoint_tensor_is_refused(run_dir):
    """A tensor that is not dense and strided (sparse) is refused, not an internal error."""
    sd = load_file(run_dir / "ckpt/b/model.safetensors")
    sd["weight"] = sd["weight"].to_sparse()
    (run_dir / "ckpt/b/model.safetensors").unlink()
    torch.save(sd, run_dir / "ckpt/b/model.pt")
    refused(cli("check", manifest(run_dir)), "model.pt", "weight", "sparse")


def _edit_state(run_dir: Path, stage: str, fn) -> None:
    path = run_dir / "ckpt" / stage / "optimizer.pt"
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _set_state(key: str, value, pid: int = 0):
    def fn(sd):
        sd["state"][pid][key] = value
    return fn


STATE_CASES = [
    ("a", lambda sd: sd.update(state=[1, 2]), "'state' is not a mapping"),
    ("a", lambda sd: sd["state"].update({0: "nope"}), "'state' is not a mapping"),
    ("a", lambda sd: sd["param_groups"][0].update(params=["w", "b"]), "integer parameter ids"),
    ("a", lambda sd: sd["param_groups"][0].update(params=3), "integer parameter ids"),
    ("a", lambda sd: sd.update(param_groups={"x": 1}), "'param_groups' is malformed"),
    ("c", _set_state("step", torch.tensor(float("nan"))), "step"),
    ("c", _set_state("step", torch.tensor(0.0)), "whole number from 1"),
    ("c", _set_state("step", torch.tensor(-4.0)), "whole number from 1"),
    ("c", _set_state("step", torch.tensor(1e20)), "whole number from 1"),
    ("c", _set_state("step", torch.tensor(2.5)), "whole number from 1"),
    ("c", lambda sd: sd["state"][0].update(exp_avg_sq=-sd["state"][0]["exp_avg_sq"] - 1),
     "negative values"),
    ("c", lambda sd: sd["state"][0].update(exp_avg=sd["state"][0]["exp_avg"] * 0 + 3e37),
     "beyond"),
    ("a", lambda sd: sd["state"][0].update(
        momentum_buffer=sd["state"][0]["momentum_buffer"] * 0 + 1e37), "beyond"),
    ("a", lambda sd: sd["state"][0].update(
        momentum_buffer=sd["state"][0]["momentum_buffer"].long()), "not floating point"),
    ("a", lambda sd: sd["state"][0].update(
        momentum_buffer=sd["state"][0]["momentum_buffer"].to_sparse()), "sparse"),
    # flags that are not booleans: bool("false") is True (nesterov or maximize silently on),
    # and a two-element tensor was an internal error
    ("a", lambda sd: sd["param_groups"][0].update(nesterov="false"),
     "param_groups[0].nesterov is 'false', expected true or false"),
    ("a", lambda sd: sd["param_groups"][0].update(nesterov=torch.tensor([1, 0])),
     "param_groups[0].nesterov is tensor([1, 0]), expected true or false"),
    ("c", lambda sd: sd["param_groups"][1].update(maximize="False"),
     "param_groups[1].maximize is 'False', expected true or false"),
    ("c", lambda sd: sd["param_groups"][0].update(amsgrad="no"),
     "param_groups[0].amsgrad is 'no', expected true or false"),
    # an Adam moment missing for a stepped parameter: check passed, run refused (exit 2)
    ("c", lambda sd: sd["state"][0].pop("exp_avg_sq"), "has exp_avg but no exp_avg_sq"),
    ("c", lambda sd: sd["state"][0].pop("exp_avg"), "has exp_avg_sq but no exp_avg"),
    ("c", lambda sd: sd["param_groups"][0].update(amsgrad=True), "but no max_exp_avg_sq"),
    # a step that is no number was skipped: the step count silently became the manifest's
    ("c", _set_state("step", "12"), "state 'step' of 'weight' is '12', not a number"),
    ("c", _set_state("step", True), "state 'step' of 'weight' is True, not a number"),
]


@pytest.mark.parametrize("stage,fn,needle", STATE_CASES)
def test_malformed_optimizer_state(run_dir, stage, fn, needle):
    """Wrong structure types, a NaN / non-positive / absurd Adam step, a negative second
    moment, an absurd or integer momentum buffer, a flag that is not a boolean, an Adam
    moment missing: exit 2 from check naming the stage and file."""
    _edit_state(run_dir, stage, fn)
    refused(cli("check", manifest(run_dir)), f"stage '{stage}'", "optimizer.pt", needle)


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(b""),
                                    lambda p: p.write_bytes(p.read_bytes()[:100])])
def test_unreadable_optimizer_state_names_the_stage_and_key(run_dir, damage):
    """An empty or truncated optimizer.pt was reported by its path alone; the message now
    names the stage and key as every other optimizer-state problem does."""
    damage(run_dir / "ckpt" / "b" / "optimizer.pt")
    refused(cli("check", manifest(run_dir)), "stage 'b': optimizer.state",
            "optimizer.pt: not a readable PyTorch file")


def test_group_tensor_of_the_wrong_rank(run_dir):
    edit_eval(run_dir, lambda d: d.update(group=d["group"][:, None].repeat(1, 2)))
    refused(cli("check", manifest(run_dir)), "eval.group", "one group id per example")


def test_safetensors_header_beyond_the_file(run_dir):
    """The 8-byte header length is compared with the file size before anything is read."""
    import struct

    path = run_dir / "data" / "eval.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    refused(cli("check", manifest(run_dir)), "eval.safetensors", "beyond the file")


# ---------------------------------------------------------------- resource bounds


def _write(run_dir: Path, text: str) -> Path:
    path = manifest(run_dir)
    path.write_text(text)
    return path


BILLION_LAUGHS = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, c in zip([None, *"abcdefgh"], "abcdefghi", strict=True))


@pytest.mark.parametrize("text,needle", [
    (BILLION_LAUGHS, "billion laughs"),
    ("a: &x [1, *x]\n", "recursive alias"),
    ("a: &x {b: *x}\n", "recursive alias"),
    ("version: 1\nversion: 1\n", "duplicate key 'version'"),
    ("[" * 5000 + "]" * 5000, "not valid YAML"),
])
def test_hostile_yaml_is_refused_fast(tmp_path, text, needle):
    """Alias bombs, recursive aliases, duplicate keys and deep nesting: exit 2, at once."""
    path = tmp_path / "m.yaml"
    path.write_text(text)
    refused(cli("check", path), needle)


def test_duplicate_key_in_a_stage_names_the_key_and_line(run_dir):
    """The last duplicate would silently win; refused naming the key and both lines."""
    text = manifest(run_dir).read_text()
    text = text.replace("    type: sgd\n", "    type: sgd\n    type: adamw\n", 1)
    refused(cli("check", _write(run_dir, text)), "duplicate key 'type'", "line")


def test_oversized_manifest_is_refused_before_reading(run_dir):
    path = manifest(run_dir)
    with path.open("a") as fh:
        fh.write("# padding\n" * 1_000_000)
    refused(cli("check", path), "bytes, more than")


def test_huge_step_count_is_checked_without_expanding_it(run_dir):
    """steps: 1e8 with a cosine schedule: `check` accepts it (the schedule is lazy) and the
    learning rates are computed on demand, slices included."""
    from acctattr.runs.manifest import LrSpec
    from acctattr.runs.schedules import lrs_from_spec, schedule_lrs

    def huge(d):
        d["stages"][2]["optimizer"].update(steps=10**8, lr={"schedule": "cosine", "base": 0.1,
                                                           "warmup": 10})
    r = cli("check", edit(run_dir, huge))
    assert r.exit_code == 0, r.stderr
    lrs = lrs_from_spec(LrSpec(schedule="cosine", base=0.1, warmup=10), 10**8)
    assert len(lrs) == 10**8 and lrs[5] == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and len(lrs[10**7:10**7 + 3]) == 3
    small = schedule_lrs("cosine", 50, 0.1, 10)
    lazy = lrs_from_spec(LrSpec(schedule="cosine", base=0.1, warmup=10), 50)
    assert list(lazy) == small and sum(lazy[7:31]) == sum(small[7:31])
    assert list(lazy[3:40:4]) == small[3:40:4] and lazy[-3] == small[-3]


@pytest.mark.parametrize("value", ["!!binary aGVsbG8=", "[1, 2]", "{a: 1}", "2001-01-01",
                                   "null", "-7", ".nan", "true", "!!set {a}"])
def test_wrong_types_anywhere_in_the_manifest(run_dir, value):
    """A value of the wrong YAML type in each of several keys: exit 2, never a traceback."""
    text = manifest(run_dir).read_text()
    for old in ("steps: 6", "target: y", "batch_size: 16", "continues: false",
                "factory: model.py:build"):
        key = old.split(":")[0]
        broken = text.replace(old, f"{key}: {value}", 1)
        r = cli("check", _write(run_dir, broken))
        assert r.exit_code == 2, (old, value, r.stderr, r.exception)
        no_traceback(r)


# ---------------------------------------------------------------- output


@pytest.mark.parametrize("value,needle", [
    ("!!int abc", "cannot read 'abc' as int"),
    ("0x_", "cannot read '0x_' as int"),
    ("!!float abc", "cannot read 'abc' as float"),
    ("!!bool maybe", "cannot read 'maybe' as bool"),
    ("!!timestamp 2001-13-45", "month must be in 1..12"),
    ("1" + "0" * 5000, "Exceeds the limit (4300 digits)"),
])
def test_scalar_yaml_cannot_build_is_refused(run_dir, value, needle):
    """A scalar PyYAML's constructor raises a plain ValueError or KeyError on (an explicit tag
    it cannot build, a hex int with no digits, an int of more than 4300 digits) was an
    internal error (exit 3); now exit 2 naming the value and its line."""
    text = manifest(run_dir).read_text().replace("steps: 6", f"steps: {value}", 1)
    refused(cli("check", _write(run_dir, text)), needle, "line")


def test_a_boolean_version_is_refused(run_dir):
    """version: true was accepted (True == 1 in Python); a boolean is no version."""
    text = manifest(run_dir).read_text().replace("version: 1", "version: true", 1)
    refused(cli("check", _write(run_dir, text)), "version: only version 1 is supported")


def test_integer_beyond_float_range_is_refused(run_dir):
    """lr: 1 followed by 400 zeros (a YAML int float() cannot convert) was an internal
    OverflowError (exit 3); now exit 2 naming the stage and key."""
    text = manifest(run_dir).read_text()
    assert "lr: 0.05" in text
    text = text.replace("lr: 0.05", "lr: 1" + "0" * 400, 1)
    refused(cli("check", _write(run_dir, text)), "stage 'a'", "optimizer.lr",
            "beyond the float range")


@pytest.mark.parametrize("stage,end,needle", [
    (1, "ckpt/a", "is also the end of stage 'a'"),
    (2, "./ckpt/../ckpt/a", "is also the end of stage 'a'"),
    (0, "ckpt/init", "is also this stage's start"),
])
def test_a_stage_ending_where_another_checkpoint_is_used_is_refused(run_dir, stage, end, needle):
    """A copy-pasted end (another stage's end, or the stage's own start) was accepted: the
    stage got an effect of 0 or another stage's change, every later start shifted, exit 0;
    now exit 2 from check and run, naming the stage and key."""
    def fn(d):
        d["stages"][stage]["end"] = end
    path = edit(run_dir, fn)
    name = "abc"[stage]
    for cmd in ("check", "run"):
        refused(cli(cmd, path), f"stage '{name}': end", needle)


def test_one_optimizer_state_for_two_stages_is_refused(run_dir):
    """Stage b naming stage a's optimizer.pt (copied from the stage above) was accepted: the
    momentum b carried on was read as unchanged by b (exit 0)."""
    def fn(d):
        d["stages"][1]["optimizer"]["state"] = d["stages"][0]["optimizer"]["state"]
    path = edit(run_dir, fn)
    refused(cli("check", path), "stage 'b': optimizer.state",
            "is also the optimizer.state of stage 'a'")


EVIL = "ev\x1b[2J\x1b]0;owned\x07il[bold]\u202e"


def test_stage_names_are_escaped_in_table_and_markdown(run_dir):
    """Terminal escapes, rich markup and bidi overrides in a stage name are shown as text,
    never written raw (JSON escapes them by itself)."""
    path = edit(run_dir, lambda d: d["stages"][1].update(name=EVIL))
    for fmt in ("table", "markdown"):
        r = cli("run", path, "-q", "-f", fmt, "--estimator", "frozen")
        assert r.exit_code == 0, r.stderr
        for raw in ("\x1b", "\x07", "\u202e"):
            assert raw not in r.stdout and raw not in r.stderr
        assert "ev\\x1b[2J\\x1b]0;owned\\x07il[bold]\\u202e" in r.stdout
    r = cli("run", path, "-q", "-f", "json", "--estimator", "frozen")
    assert EVIL in [s["name"] for s in json.loads(r.stdout)["stages"]]


def test_escapes_in_error_messages_are_escaped(run_dir):
    """A hostile path named in an error reaches stderr escaped."""
    path = edit(run_dir, lambda d: d["stages"][1].update(end="ckpt/\x1b[31mred"))
    err = refused(cli("check", path), "\\x1b[31mred")
    assert "\x1b" not in err


def test_output_symlink_is_written_through(run_dir, tmp_path):
    """--output naming a symlink replaces the link's target (as editors do); the link
    stays a link."""
    target = tmp_path / "real" / "result.json"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "naive",
            "--output", link)
    assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and json.loads(target.read_text())["schema"]
    assert not list(target.parent.glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["fifo", "folder", "loop", "proc", "dangling-into-nowhere",
                                  "long-name"])
def test_unwritable_output_is_refused_before_computing(run_dir, tmp_path, kind):
    """--output that is a FIFO, a folder, a symlink loop, in a folder nobody can write
    (/proc), or a symlink into a missing folder: exit 2 before any computing (the eval data
    is broken too, and the message is about --output)."""
    out = tmp_path / "out.json"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "folder":
        out.mkdir()
    elif kind == "loop":
        _loop(out)
    elif kind == "proc":
        out = Path("/proc/acctattr-out.json")
    elif kind == "long-name":
        out = tmp_path / ("o" * 300 + ".json")
    else:
        out.symlink_to(tmp_path / "nowhere" / "x.json")
    (run_dir / "data" / "eval.safetensors").write_bytes(b"garbage")
    for cmd in (("run", manifest(run_dir), "-q"), ("validate", manifest(run_dir), "-q")):
        refused(cli(*cmd, "--output", out), "--output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_folder_is_refused_before_computing(run_dir, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        refused(cli("run", manifest(run_dir), "-q", "--output", folder / "r.json"),
                "--output", "cannot write")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("cmd,option,rel", [
    ("run", "--output", "manifest.yaml"),
    ("run", "--output", "data/eval.safetensors"),
    ("run", "--output", "model.py"),
    ("run", "--output", "ckpt/b/model.safetensors"),
    ("run", "--output", "ckpt/b/result.json"),
    ("run", "--plot", "ckpt/b/effects.png"),
    ("run", "--output", "link-to-manifest.json"),
    ("validate", "--output", "data/c.safetensors"),
])
def test_output_over_an_input_is_refused(run_dir, cmd, option, rel):
    """--output or --plot naming the manifest, a file it names, a symlink to one, or a
    place inside a checkpoint folder: exit 2 before computing, every input unchanged (they
    were replaced by the result)."""
    (run_dir / "link-to-manifest.json").symlink_to(run_dir / "manifest.yaml")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused(cli(cmd, manifest(run_dir), "-q", option, run_dir / rel), option, "inputs")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("cmd,rel", [
    ("ablate", "ckpt/c/model.safetensors"),
    ("ablate", "data/eval.safetensors"),
    ("ablate", "ckpt/c/ablated"),
    ("embed", "ckpt/c/embeddings"),
])
def test_ablate_and_embed_never_write_into_inputs_outside_the_run_folder(run_dir, tmp_path,
                                                                        cmd, rel):
    """A manifest elsewhere naming the run's files by absolute path: `ablate -o` the final
    checkpoint replaced it with the ablated model (exit 0), and ablate or embed wrote into a
    checkpoint folder; now exit 2 before computing, every input unchanged."""
    def absolute(d):
        for st in d["stages"]:
            for key in ("start", "end", "data"):
                if key in st:
                    st[key] = str(run_dir / st[key])
            st["optimizer"]["state"] = str(run_dir / st["optimizer"]["state"])
        d["eval"]["data"] = str(run_dir / d["eval"]["data"])
        d["model"]["factory"] = f"{run_dir / 'model.py'}:build"
        d["train"]["loss"] = f"{run_dir / 'loss.py'}:minus_target_logit"
    edit(run_dir, absolute)
    elsewhere = tmp_path / "elsewhere" / "manifest.yaml"
    elsewhere.parent.mkdir()
    manifest(run_dir).rename(elsewhere)
    assert cli("check", elsewhere).exit_code == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    extra = ["--stage", "c"] if cmd == "ablate" else []
    refused(cli(cmd, elsewhere, "-q", "--estimator", "naive", *extra, "-o", run_dir / rel),
            "--output", "one of the inputs")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (run_dir / rel).exists() or (run_dir / rel).is_file()


@pytest.mark.parametrize("cmd,other", [("run", "--plot"), ("validate", "--workdir")])
def test_output_and_another_path_option_naming_one_path(run_dir, tmp_path, cmd, other):
    """`run -o r.svg --plot r.svg` wrote the result, then the plot over it (exit 0, the result
    lost); `validate -o w --workdir w` retrained into w and then could not write the result
    (a folder). Both are exit 2 before computing."""
    same = tmp_path / "same.svg"
    refused(cli(cmd, manifest(run_dir), "-q", "-o", same, other, same), "--output",
            other, "same")
    assert not same.exists()


@pytest.mark.parametrize("cmd,name", [("run", "embeddings.json"), ("run", "new.json"),
                                      ("ablate", "a.safetensors")])
def test_output_into_the_embeddings_read_is_refused(run_dir, tmp_path, cmd, name):
    """`run --embeddings DIR -o DIR/embeddings.json` replaced the index it had just read
    (exit 0, the embeddings unusable afterwards); now an output over or inside the
    --embeddings folder is exit 2 before computing, the folder unchanged."""
    emb = tmp_path / "emb"
    r = cli("embed", manifest(run_dir), "-q", "--estimator", "naive", "-o", emb)
    assert r.exit_code == 0, r.stderr
    before = {p.name: p.read_bytes() for p in emb.iterdir()}
    extra = ["--stage", "c"] if cmd == "ablate" else ["-f", "json"]
    refused(cli(cmd, manifest(run_dir), "-q", "--estimator", "naive", "--embeddings", emb,
                *extra, "-o", emb / name), "--output", "one of the inputs")
    assert {p.name: p.read_bytes() for p in emb.iterdir()} == before


def test_diff_output_over_an_input_is_refused(run_dir, tmp_path):
    """diff -o naming one of the two results it compares: exit 2, the result unchanged."""
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "naive")
    old = tmp_path / "old.json"
    old.write_text(r.stdout)
    refused(cli("diff", old, old, "-o", old), "--output", "inputs")
    assert old.read_text() == r.stdout


def test_result_beside_the_manifest_is_still_written(run_dir):
    """A new result file in the run's own folder (not a checkpoint folder) is allowed."""
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "naive",
            "-o", run_dir / "result.json")
    assert r.exit_code == 0, r.stderr
    assert json.loads((run_dir / "result.json").read_text())["schema"]


def _start(args: list[str], **env: str):
    import signal
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "acctattr", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("signame,code,word", [("SIGTERM", 143, "terminated"),
                                               ("SIGINT", 130, "interrupted")])
def test_signal_mid_write_removes_the_temporary_file(run_dir, tmp_path, signame, code, word):
    """SIGTERM or SIGINT halfway through writing --output: exit 143 / 130 with one line,
    no traceback, the old file untouched and no temporary file left."""
    import signal
    import time

    out = tmp_path / "out.json"
    out.write_text("old\n")
    proc = _start(["run", str(manifest(run_dir)), "-q", "-f", "json", "--estimator", "naive",
                   "--output", str(out)], ACCTATTR_TEST_SLOW_WRITE="30")
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.json.*.tmp")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary file within 60 s"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip() == word and "Traceback" not in err
    assert out.read_text() == "old\n" and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("delay", [0.5, 1.5])
@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_in_the_first_moments(run_dir, delay, signame, code):
    """A signal while acctattr is still importing or starting: exit 130 / 143 with one
    line, no traceback. (A run that already wrote its whole result and is shutting down
    may die of the signal instead: Python restores the default handlers at exit.)"""
    import signal
    import time

    proc = _start(["run", str(manifest(run_dir)), "-f", "json", "--estimator", "unrolled"])
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.skip("finished before the signal")
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=60)
    if proc.returncode < 0 and out.endswith("}\n"):
        pytest.skip("the signal came after the result, while Python shut down")
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] in ("interrupted", "terminated")


def test_a_signal_during_an_import_is_seen_as_one(tmp_path, monkeypatch):
    """The signal handler knows when it interrupted an import: there it exits at once
    instead of raising into a C++ extension's initialisation (torch's), which aborted the
    process with SIGABRT ("terminate called ...") in a full test run."""
    import sys

    from acctattr import signals

    (tmp_path / "acctattr_probe.py").write_text(
        "import sys\nfrom acctattr import signals\n"
        "INSIDE = signals._importing(sys._getframe())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import acctattr_probe

    assert acctattr_probe.INSIDE is True
    assert signals._importing(sys._getframe()) is False


# ---------------------------------------------------------------- the fuzzer

# Seeded: the same damage on every run and machine. Each case damages one file of a fresh
# copy of the run (or one path in its manifest) and runs `check` (and, for stage data, the
# unrolled estimator that reads it). A damaged file may by chance still be valid (a flipped
# bit inside a weight), so exit 0 is allowed; exit 3, a traceback or a hang never is.
FUZZ_SEED = 13
FUZZ_FILES = ["ckpt/init/model.safetensors", "ckpt/b/model.safetensors",
              "ckpt/c/optimizer.pt", "ckpt/a/optimizer.pt", "data/eval.safetensors",
              "manifest.yaml", "model.py"]


def _damage(rng, data: bytes) -> bytes:
    how = rng.choice(["truncate", "flip", "zero", "random", "splice", "header", "empty"])
    n = len(data)
    if how == "truncate":
        return data[:rng.randrange(n)]
    if how == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if how == "zero":
        i = rng.randrange(n)
        return data[:i] + bytes(min(64, n - i)) + data[i + 64:]
    if how == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))
    if how == "splice":
        i, j = sorted(rng.randrange(n) for _ in range(2))
        return data[:i] + data[j:] + data[i:j]
    if how == "header":  # a plausible safetensors header length with garbage after it
        import struct

        return struct.pack("<Q", rng.choice([0, 1, 7, n, n - 8, 2**63, 2**64 - 1])) + data[8:]
    return b""


def _fuzz_cases(n: int) -> list[tuple[str, int]]:
    import random

    rng = random.Random(FUZZ_SEED)
    return [(rng.choice(FUZZ_FILES), rng.randrange(2**32)) for _ in range(n)]


@pytest.mark.parametrize("rel,seed", _fuzz_cases(120))
def test_fuzz_file_contents(run_dir, rel, seed):
    """Truncated, bit-flipped, spliced, zeroed or random bytes in a checkpoint, optimizer
    state, eval data, the manifest or the model factory: exit 0 or 2, never a traceback."""
    import random

    rng = random.Random(seed)
    path = run_dir / rel
    path.write_bytes(_damage(rng, path.read_bytes()))
    r = cli("check", manifest(run_dir))
    assert r.exit_code in (0, 2), f"{rel} seed {seed}: exit {r.exit_code}\n{r.stderr}"
    no_traceback(r)


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_stage_data_under_unrolled(run_dir, seed):
    """Damaged stage training data, read only by the unrolled estimator: 0 or 2."""
    import random

    rng = random.Random(FUZZ_SEED * 100 + seed)
    path = run_dir / "data" / "b.safetensors"
    path.write_bytes(_damage(rng, path.read_bytes()))
    r = cli("run", manifest(run_dir), "-q", "--estimator", "unrolled", "-f", "json")
    assert r.exit_code in (0, 2), f"seed {seed}: exit {r.exit_code}\n{r.stderr}"
    no_traceback(r)


def _hostile_path(rng, run_dir: Path) -> str:
    kind = rng.choice(["missing", "fifo", "loop", "nul", "long-name", "long-path", "dev",
                       "folder", "file", "empty", "dots", "unicode", "self", "root"])
    if kind == "fifo":
        p = run_dir / f"fifo{rng.randrange(1000)}"
        os.mkfifo(p)
        return p.name
    if kind == "loop":
        p = run_dir / f"loop{rng.randrange(1000)}"
        _loop(p)
        return p.name
    return {"missing": "no/such/file", "nul": "ckpt/\x00a", "long-name": "n" * 512,
            "long-path": "p/" * 2500, "dev": rng.choice(["/dev/zero", "/dev/null",
                                                          "/dev/urandom"]),
            "folder": "ckpt", "file": "model.py", "empty": "", "dots": "../../../../..",
            "unicode": "ckpt/\u202eb\u00e9\U0001f600", "self": "manifest.yaml",
            "root": "/"}[kind]


PATH_KEYS = [("stages", 0, "start"), ("stages", 1, "end"), ("stages", 0, "optimizer.state"),
             ("stages", 2, "data"), ("eval", None, "data"), ("model", None, "factory")]


@pytest.mark.parametrize("case", range(60))
def test_fuzz_paths_in_the_manifest(run_dir, case):
    """A hostile path (FIFO, device, symlink loop, NUL, too long, a folder for a file, ...)
    in a random path key of the manifest: exit 0 or 2, never a traceback or a hang."""
    import random

    rng = random.Random(FUZZ_SEED * 1000 + case)
    top, index, key = rng.choice(PATH_KEYS)
    value = _hostile_path(rng, run_dir)
    if key == "factory" and rng.random() < 0.7:
        value = f"{value}.py:build"

    def put(d):
        node = d[top] if index is None else d[top][index]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    r = cli("check", edit(run_dir, put))
    assert r.exit_code in (0, 2), f"{key}={value!r}: exit {r.exit_code}\n{r.stderr}"
    no_traceback(r)


@pytest.mark.parametrize("kind", ["fifo", "proc"])
def test_unusable_workdir_is_refused_before_computing(run_dir, tmp_path, kind):
    """validate --workdir that is a FIFO or cannot be written: exit 2 before retraining."""
    work = tmp_path / "w"
    if kind == "fifo":
        os.mkfifo(work)
    else:
        work = Path("/proc/acctattr-work")
    refused(cli("validate", manifest(run_dir), "-q", "--workdir", work), "--workdir")


@pytest.mark.parametrize("rel", ["ckpt/b", "ckpt/b/work", "data/eval.safetensors"])
def test_workdir_in_an_input_is_refused_before_computing(run_dir, rel):
    """validate --workdir a checkpoint folder (or inside one): replay's without-K folders
    were written into the user's checkpoint folder; now exit 2 before retraining."""
    final = run_dir / "ckpt/c/model.safetensors"
    (run_dir / "replay.py").write_text(
        "import shutil\n\n\ndef replay(skip, out_dir):  # the final checkpoint, as is\n"
        f"    return shutil.copy({str(final)!r}, out_dir)\n")
    edit(run_dir, lambda d: d.update(replay="replay.py:replay"))
    refused(cli("validate", manifest(run_dir), "-q", "--estimator", "naive",
                "--workdir", run_dir / rel), "--workdir", "one of the inputs")
    assert not list(run_dir.rglob("without-*"))


def test_init_with_a_symlink_loop_or_fifo(tmp_path):
    """acctattr init refuses a checkpoint path that is a symlink loop or a FIFO."""
    _loop(tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo")
    refused(cli("init", tmp_path / "loop"), "symlink loop")
    refused(cli("init", tmp_path / "fifo"))


@pytest.mark.parametrize("args", [["ckpt/a", "ckpt/a"], ["ckpt/a", "./ckpt/a/"],
                                  ["ckpt/init", "ckpt/a", "--start", "ckpt/init"]])
def test_init_refuses_a_checkpoint_named_twice(run_dir, monkeypatch, args):
    """The same checkpoint as two stages' ends (or as --start and an end) was drafted as
    stages 'a' and 'a-2', a manifest check then refuses; now init says so, exit 2."""
    monkeypatch.chdir(run_dir)
    refused(cli("init", *args), "acctattr init:", "is named twice")


def test_init_drafts_valid_yaml_for_a_folder_name_with_a_newline(run_dir, tmp_path):
    """A checkpoint folder whose name holds a newline: the optional data: comment was
    inserted inside the quoted name, and the draft was not valid YAML."""
    odd = run_dir / "ckpt" / "b\nnew"
    shutil.copytree(run_dir / "ckpt" / "b", odd)
    out = tmp_path / "draft.yaml"
    r = cli("init", run_dir / "ckpt" / "a", odd, "--start", run_dir / "ckpt" / "init",
            "-o", out)
    assert r.exit_code == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    assert [s["name"] for s in doc["stages"]] == ["a", "b\nnew"]
    assert "# data:" in out.read_text().split("b\n")[-1]  # the comment is still drafted


def test_stdout_closed_early_is_not_an_internal_error(run_dir):
    """`acctattr run ... | true`: the reader is gone before the result is written; exit 2
    with one line, no traceback (not exit 3)."""
    proc = _start(["run", str(manifest(run_dir)), "-q", "-f", "json", "--estimator", "naive"])
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 2, err
    assert "broken pipe" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("stdout,needle", [
    ("closed", "stdout is closed"),
    ("full", "cannot write the result to stdout (No space left on device)"),
])
@pytest.mark.parametrize("cmd", ["run", "check"])
def test_stdout_closed_or_full_is_not_an_internal_error(run_dir, cmd, stdout, needle):
    """`acctattr run ... >&-` (no stdout at all) and `> /dev/full` (every write fails) were
    internal errors (exit 3: 'NoneType' has no attribute 'isatty', OSError ENOSPC); now
    exit 2 with one line saying why, no traceback."""
    import subprocess

    args = [cmd, str(manifest(run_dir))] + (["-q", "--estimator", "naive"] if cmd == "run"
                                            else [])
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "acctattr", *args], timeout=60,
                              stdout=full if stdout == "full" else None,
                              stderr=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr


def test_stderr_closed_keeps_warnings_out_of_the_result(run_dir):
    """`acctattr run -f json --progress 2>&-`: with stderr closed, warnings and progress
    lines were printed to stdout ahead of the JSON (print(file=None) and rich both fall back
    to stdout), so the result did not parse; now stdout is the JSON alone, exit 0."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "acctattr", "run", str(manifest(run_dir)),
                           "--progress", "-f", "json", "--estimator", "naive",
                           "--evaluate", "linear"],
                          stdout=subprocess.PIPE, text=True, timeout=60,
                          preexec_fn=lambda: os.close(2))
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["schema"] == "acctattr.effects/1", proc.stdout[:300]


def test_diff_gate_fails_closed_on_an_undefined_effect(run_dir, tmp_path):
    """diff --fail-on-growth trips (exit 1, reason in JSON) when a stage in both results
    has a null effect; without the gate the diff still exits 0."""
    r = cli("run", manifest(run_dir), "-q", "-f", "json", "--estimator", "naive")
    good = tmp_path / "good.json"
    good.write_text(r.stdout)
    doc = json.loads(r.stdout)
    doc["stages"][0]["effect"] = None
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    for old, new in ((good, broken), (broken, good)):
        g = cli("diff", old, new, "--fail-on-growth", "1000", "-f", "json")
        assert g.exit_code == 1, g.stderr
        no_traceback(g)
        assert "fail closed" in g.stderr
        assert "undefined effect" in json.loads(g.stdout)["gate"]["reason"]
    assert cli("diff", good, broken).exit_code == 0
