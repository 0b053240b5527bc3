"""Bad input is refused with exit 2 and a message naming file, stage and key, never a traceback.

Each test corrupts one thing in a tiny real staged run (tests/staged.py) and runs the CLI
in-process with typer's CliRunner. The manifest parser is also fuzzed with hypothesis: it
may only ever raise ManifestError.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reportkit import cli
from safetensors.torch import load_file, save_file
from staged import StageCfg, write_run

from acctattr.errors import ManifestError
from acctattr.runs.manifest import load_manifest, parse_manifest

STAGES = [
    StageCfg("a", "sgd", 6, 0.05, {"momentum": 0.9}, (0.01, 0.0)),
    StageCfg("b", "sgd", 5, 0.03, {"momentum": 0.9}, (0.01, 0.0), continues=True),
    StageCfg("c", "adamw", 4, 0.01, {}, (0.1, 0.0)),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("pristine") / "run", STAGES).parent


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid three-stage run (sgd, sgd continuing, adamw)."""
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    return dst



def refused(result: Any, *needles: str) -> str:
    """Assert exit 2, no traceback, and every needle in stderr; return stderr."""
    err = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}\nstderr:\n{err}\n{result.exception!r}"
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert "internal error" not in err
    assert result.stdout == ""
    for n in needles:
        assert n in err, f"{n!r} not in stderr:\n{err}"
    return err


def run_and_check(manifest: Path, *needles: str, also_check: bool = True) -> str:
    """`run` (and `check`, unless the problem only shows while computing) both refuse."""
    if also_check:
        refused(cli("check", manifest), *needles)
    return refused(cli("run", manifest, "-q"), *needles)


def edit_manifest(run_dir: Path, fn) -> Path:
    path = run_dir / "manifest.yaml"
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_pristine_run_is_accepted(run_dir):
    """The fixture run itself passes, so every refusal below is caused by its one defect."""
    assert cli("check", run_dir / "manifest.yaml").exit_code == 0
    assert cli("run", run_dir / "manifest.yaml", "-q").exit_code == 0


# ---------------------------------------------------------------- manifest fuzz

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["model.py:build", "ckpt/init", "x", "sgd", "adamw", "cosine", "1e-3",
                     "data/eval.safetensors", "no_such.py:f", "os:system", ":", ".py:"]),
)
_keys = st.one_of(st.sampled_from(sorted(
    {"version", "model", "factory", "stages", "eval", "name", "start", "end", "optimizer",
     "type", "steps", "lr", "schedule", "base", "warmup", "min", "momentum", "betas",
     "state", "continues", "param_names", "data", "inputs", "target", "group", "metric",
     "batch_size", "checkpoints", "step", "path", "train", "loss", "trainer_state"})),
    st.text(max_size=6), st.integers(-3, 3), st.none(), st.booleans())
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)


def _valid_doc() -> dict:
    return {"version": 1, "model": {"factory": "model.py:build"},
            "stages": [{"name": "a", "start": "ckpt/init", "end": "ckpt/a",
                        "optimizer": {"type": "sgd", "steps": 6, "lr": 0.05,
                                      "momentum": 0.9, "state": "ckpt/a/optimizer.pt"}},
                       {"name": "b", "end": "ckpt/b",
                        "optimizer": {"type": "sgd", "steps": 5, "lr": [0.1] * 5,
                                      "continues": True}}],
            "eval": {"data": "data/eval.safetensors", "inputs": ["x"], "target": "y",
                     "metric": "cross_entropy", "batch_size": 16}}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _replace(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


_FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@_FUZZ
@given(raw=_values)
def test_fuzz_arbitrary_documents_only_raise_manifest_error(pristine, raw):
    """Any YAML value as a whole manifest: parse_manifest returns or raises ManifestError."""
    try:
        parse_manifest(raw, pristine / "manifest.yaml")
    except ManifestError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@_FUZZ
@given(data=st.data())
def test_fuzz_one_node_replaced_only_raises_manifest_error(pristine, data):
    """A valid manifest with any one node replaced by any value: only ManifestError."""
    doc = _valid_doc()
    path = data.draw(st.sampled_from(_paths(doc)))
    doc = _replace(doc, path, data.draw(_values))
    try:
        parse_manifest(doc, pristine / "manifest.yaml")
    except ManifestError as e:
        assert e.problems


@_FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(
    lambda b: b.decode("latin-1"))))
def test_fuzz_raw_text_only_raises_manifest_error(tmp_path_factory, text):
    """Arbitrary file contents through load_manifest: only ManifestError."""
    path = tmp_path_factory.getbasetemp() / "fuzz-manifest.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_manifest(path)
    except ManifestError as e:
        assert e.problems


def test_manifest_problems_are_listed_together(run_dir):
    """Several manifest mistakes at once: one exit 2 listing each, with stage and key."""

    def bad(doc):
        doc["stages"][0]["optimizer"]["momentum"] = 1.5
        doc["stages"][1]["optimizer"]["lr"] = -0.1
        doc["stages"][2]["optimizer"]["weight_decay"] = float("nan")
        doc["stages"][2]["optimizer"]["steps"] = 0
        doc["eval"]["batch_size"] = 0
        doc["eval"]["colour"] = "blue"

    err = run_and_check(edit_manifest(run_dir, bad),
                        "6 problems", "stage 'a': optimizer.momentum: must be < 1",
                        "stage 'b': optimizer.lr: must be >= 0",
                        "stage 'c': optimizer.weight_decay: must be finite",
                        "stage 'c': optimizer.steps: must be >= 1",
                        "eval.batch_size: must be >= 1", "unknown key 'colour'")
    assert err.startswith("error: ")


def test_lr_list_length_differs_from_steps(run_dir):
    """A per-step lr list must have one value per step."""
    m = edit_manifest(run_dir, lambda d: d["stages"][1]["optimizer"].update(lr=[0.1] * 3))
    run_and_check(m, "stage 'b': optimizer.lr", "3 values", "steps: 5",
                  "give one learning rate per optimizer step")


def test_infinite_lr_in_list_and_schedule(run_dir):
    """Non-finite numbers anywhere in an lr spec are refused with their position."""

    def bad(doc):
        doc["stages"][1]["optimizer"]["lr"] = [0.1, 0.1, float("inf"), 0.1, 0.1]
        doc["stages"][2]["optimizer"]["lr"] = {"schedule": "cosine", "base": float("-inf")}

    run_and_check(edit_manifest(run_dir, bad), "stage 'b': optimizer.lr[2]: must be finite",
                  "stage 'c': optimizer.lr.base: must be finite")


def test_python_object_tag_is_never_constructed(run_dir, tmp_path):
    """A !!python/object tag is refused by the YAML loader; the object is never built."""
    marker = tmp_path / "pwned"
    path = run_dir / "manifest.yaml"
    text = path.read_text().replace("factory: model.py:build",
                                    f"factory: !!python/object/apply:os.mkdir [{str(marker)!r}]")
    path.write_text(text)
    run_and_check(path, "manifest.yaml", "not valid YAML",
                  "Python object tags such as !!python/object are never loaded")
    assert not marker.exists()
    path.write_text(f"!!python/object/new:os.mkdir [{str(marker)!r}]\n")
    run_and_check(path, "not valid YAML", "!!python/object")
    assert not marker.exists()


def test_continues_on_first_stage(run_dir):
    """The first stage has nothing to continue."""
    m = edit_manifest(run_dir, lambda d: d["stages"][0]["optimizer"].update(continues=True))
    run_and_check(m, "stage 'a': optimizer.continues", "set continues: false")


def test_continues_without_previous_state(run_dir):
    """continues: true after a stage that gave no optimizer.state is refused by check too."""
    m = edit_manifest(run_dir, lambda d: d["stages"][0]["optimizer"].pop("state"))
    run_and_check(m, "stage 'b'", "stage 'a'", "optimizer.state")


def test_continues_across_optimizer_types(run_dir):
    """A stage cannot continue the state of a different optimizer type."""
    m = edit_manifest(run_dir, lambda d: d["stages"][2]["optimizer"].update(continues=True))
    run_and_check(m, "stage 'c': optimizer.continues", "'b' used sgd, not adamw")


# ---------------------------------------------------------------- checkpoints

def _ckpt(run_dir: Path, stage: str) -> Path:
    return run_dir / "ckpt" / stage / "model.safetensors"


def _header(file: Path) -> tuple[int, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw


@pytest.mark.parametrize("damage", ["empty", "short", "truncated", "huge_header_length",
                                    "garbage_json", "offsets_out_of_range", "header_not_dict"])
def test_corrupted_safetensors_checkpoint(run_dir, damage):
    """A damaged checkpoint is named, with the fix (re-save), and never crashes."""
    file = _ckpt(run_dir, "b")
    n, raw = _header(file)
    if damage == "empty":
        new = b""
    elif damage == "short":
        new = raw[:5]
    elif damage == "truncated":
        new = raw[: 8 + n + 10]
    elif damage == "huge_header_length":
        new = struct.pack("<Q", 2**40) + raw[8:]
    elif damage == "garbage_json":
        new = raw[:8] + b"{not json" + b" " * (n - 9) + raw[8 + n:]
    elif damage == "offsets_out_of_range":
        head = raw[8:8 + n].decode().replace('"data_offsets":[0,', '"data_offsets":[100000,')
        head = head.replace('"data_offsets":[0,', '"data_offsets":[100000,')
        enc = head.encode().ljust(n)
        new = raw[:8] + enc + raw[8 + n:]
    else:
        body = b"[1, 2, 3]".ljust(n)
        new = raw[:8] + body + raw[8 + n:]
    file.write_bytes(new)
    err = run_and_check(run_dir / "manifest.yaml", str(file), "re-save")
    assert err.count(str(file)) == 1, "a file shared by two stages is reported once"


def test_corrupted_eval_data(run_dir):
    """Damaged eval data is named as eval.data."""
    file = run_dir / "data" / "eval.safetensors"
    file.write_bytes(file.read_bytes()[:40])
    run_and_check(run_dir / "manifest.yaml", "eval.safetensors", "re-save")


class _Evil:
    """Unpickling this would create a folder and set an environment variable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        code = (f"import os; os.mkdir({str(self.marker)!r}); "
                "os.environ['ACCTATTR_PWNED'] = '1'")
        return (exec, (code,))


@pytest.mark.parametrize("where", ["checkpoint", "optimizer_state"])
def test_pickle_that_would_run_code_is_refused(run_dir, tmp_path, where):
    """A .pt whose pickle runs code is refused (weights_only) and the code never runs."""
    marker = tmp_path / "pwned"
    if where == "checkpoint":
        _ckpt(run_dir, "b").unlink()
        file = run_dir / "ckpt" / "b" / "model.pt"
        payload = {"weight": torch.zeros(3, 6), "bias": _Evil(marker)}
    else:
        file = run_dir / "ckpt" / "b" / "optimizer.pt"
        payload = {"state": {0: {"momentum_buffer": _Evil(marker)}}, "param_groups": []}
    with open(file, "wb") as fh:
        pickle.dump(payload, fh)
    os.environ.pop("ACCTATTR_PWNED", None)
    err = run_and_check(run_dir / "manifest.yaml", str(file), "refused to load",
                        "could run code")
    assert err.startswith("error: ")  # nothing before it (torch's pickle warnings are muted)
    assert not marker.exists() and "ACCTATTR_PWNED" not in os.environ


def test_nan_in_checkpoint_names_the_tensor(run_dir):
    """NaN in a checkpoint: the file and tensor are named (found while computing)."""
    file = _ckpt(run_dir, "b")
    sd = load_file(file)
    sd["weight"][1, 2] = float("nan")
    save_file(sd, file)
    refused(cli("run", run_dir / "manifest.yaml", "-q"), "while estimating stage 'b'", str(file),
            "tensor 'weight'",
            "NaN or Inf", "earlier, finite checkpoint")


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_check_reads_every_checkpoint_for_nan(run_dir, value):
    """`check` finds NaN or Inf in a checkpoint that only an estimator reads (stage b's end,
    stage c's start; theta_T is read by every command), once, naming stage, key and tensor;
    a clean run's check still passes."""
    assert cli("check", run_dir / "manifest.yaml").exit_code == 0
    file = _ckpt(run_dir, "b")
    sd = load_file(file)
    sd["weight"][1, 2] = value
    save_file(sd, file)
    err = refused(cli("check", run_dir / "manifest.yaml"), "1 problem", "stage 'b': end",
                  str(file), "tensor 'weight' has 1 NaN or Inf")
    assert err.count("NaN or Inf") == 1, err


def test_inf_in_optimizer_state_names_the_tensor(run_dir):
    """Inf in an optimizer state tensor: stage, file, state and parameter are named."""
    file = run_dir / "ckpt" / "a" / "optimizer.pt"
    sd = torch.load(file, weights_only=True)
    sd["state"][1]["momentum_buffer"][0] = float("inf")
    torch.save(sd, file)
    run_and_check(run_dir / "manifest.yaml", "stage 'a'", str(file),
                  "state 'momentum_buffer' of 'bias'", "NaN or Inf")


@pytest.mark.parametrize("key,value,needle", [
    ("weight_decay", -0.5, "weight_decay"),
    ("momentum", float("nan"), "momentum"),
    ("dampening", 2.0, "dampening"),
])
def test_bad_hyperparameters_in_optimizer_file(run_dir, key, value, needle):
    """Negative or non-finite hyperparameters in an optimizer.pt's param_groups are refused."""
    file = run_dir / "ckpt" / "a" / "optimizer.pt"
    sd = torch.load(file, weights_only=True)
    sd["param_groups"][0][key] = value
    torch.save(sd, file)
    # the manifest must not override the value from the file
    m = edit_manifest(run_dir, lambda d: None)
    run_and_check(m, "stage 'a'", str(file), f"param_groups[0].{needle}")


def test_bad_betas_in_adam_state_file(run_dir):
    """Adam betas outside [0, 1) or eps <= 0 in a state file are refused."""
    file = run_dir / "ckpt" / "c" / "optimizer.pt"
    sd = torch.load(file, weights_only=True)
    sd["param_groups"][1]["betas"] = (0.9, 1.5)
    sd["param_groups"][0]["eps"] = 0.0
    torch.save(sd, file)
    run_and_check(run_dir / "manifest.yaml", "stage 'c'", "param_groups[1].betas",
                  "param_groups[0].eps")


def test_parameter_shapes_differ_between_stages(run_dir):
    """A checkpoint whose shapes differ from the model is refused, naming the tensor."""
    file = _ckpt(run_dir, "b")
    sd = load_file(file)
    sd["weight"] = torch.zeros(3, 7, dtype=torch.float64)
    save_file(sd, file)
    run_and_check(run_dir / "manifest.yaml", "stage 'b': end", "stage 'c': start",
                  "weight (3, 7) vs model (3, 6)", "same parameter names and shapes")


def test_parameter_names_differ_between_stages(run_dir):
    """A checkpoint with renamed parameters is refused, naming the missing ones."""
    file = _ckpt(run_dir, "a")
    sd = load_file(file)
    sd["linear.weight"] = sd.pop("weight")
    save_file(sd, file)
    run_and_check(run_dir / "manifest.yaml", "stage 'a': end", "missing 1 parameter(s): weight")


def test_optimizer_state_of_another_type(run_dir):
    """An AdamW state file under an sgd stage is refused, naming both types."""
    shutil.copy(run_dir / "ckpt" / "c" / "optimizer.pt", run_dir / "ckpt" / "b" / "optimizer.pt")
    run_and_check(run_dir / "manifest.yaml", "stage 'b'", "written by Adam/AdamW",
                  "optimizer.type is sgd")


def test_optimizer_state_with_wrong_shapes(run_dir):
    """An optimizer state whose tensors do not fit the model says how to map them."""
    file = run_dir / "ckpt" / "a" / "optimizer.pt"
    sd = torch.load(file, weights_only=True)
    sd["state"][0]["momentum_buffer"] = torch.zeros(6, 3)
    torch.save(sd, file)
    run_and_check(run_dir / "manifest.yaml", "stage 'a'", "has shape (6, 3)",
                  "optimizer.param_names")


def test_optimizer_state_not_a_state_dict(run_dir):
    """A plain tensor dict given as optimizer.state is refused with how to save one."""
    torch.save({"weight": torch.zeros(3, 6)}, run_dir / "ckpt" / "a" / "optimizer.pt")
    run_and_check(run_dir / "manifest.yaml", "stage 'a'", "not a torch optimizer state_dict",
                  "torch.save(optimizer.state_dict(), path)")


# ---------------------------------------------------------------- model factory

@pytest.mark.parametrize("body,needles", [
    ("def build():\n    raise ValueError('no config')\n",
     ["model.factory model.py:build raised ValueError: no config"]),
    ("def build():\n    return {'weight': 1}\n",
     ["model.factory model.py:build returned dict", "not a torch.nn.Module"]),
    ("def make():\n    pass\n", ["no function 'build'"]),
    ("import not_a_module_anywhere\n", ["importing it failed", "ModuleNotFoundError"]),
    ("def build(:\n", ["importing it failed", "SyntaxError"]),
    ("import torch\n\ndef build():\n    return torch.nn.Linear(6, 3).requires_grad_(False)\n",
     ["no trainable parameters"]),
])
def test_model_factory_failures(run_dir, body, needles):
    """A factory that fails to import, raises or returns a non-module is exit 2."""
    (run_dir / "model.py").write_text(body)
    run_and_check(run_dir / "manifest.yaml", "model.factory", *needles)


# ---------------------------------------------------------------- eval data

def _rewrite_eval(run_dir: Path, **changes: torch.Tensor | None) -> None:
    file = run_dir / "data" / "eval.safetensors"
    sd = load_file(file)
    for k, v in changes.items():
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    save_file(sd, file)


def test_eval_missing_tensor(run_dir):
    """A missing eval tensor is named with what the file has."""
    _rewrite_eval(run_dir, y=None)
    run_and_check(run_dir / "manifest.yaml", "eval.data", "no tensor named 'y'",
                  "it has: group, x")


def test_eval_float_group(run_dir):
    """Group ids must be integers."""
    _rewrite_eval(run_dir, group=torch.rand(40))
    run_and_check(run_dir / "manifest.yaml", "eval.data", "eval.group tensor 'group'",
                  "must be integers")


def test_eval_float_target_for_classification(run_dir):
    """cross_entropy needs integer class targets; a float target is refused, not truncated."""
    _rewrite_eval(run_dir, y=torch.rand(40))
    run_and_check(run_dir / "manifest.yaml", "eval.data", "eval.target tensor 'y'", "F32",
                  "cross_entropy")


def test_eval_target_out_of_range(run_dir):
    """A class id beyond the model's outputs: eval.metric and eval.data named, exit 2."""
    _rewrite_eval(run_dir, y=torch.full((40,), 7))
    run_and_check(run_dir / "manifest.yaml", "eval.metric cross_entropy failed on eval.data",
                  "out of bounds", "class ids below the number of model outputs")


@pytest.mark.parametrize("x,needle", [
    (torch.zeros(40, 7, dtype=torch.float64), "shapes cannot be multiplied"),
    (torch.zeros(40, 6, dtype=torch.int64), "x [16, 6] int64"),
])
def test_eval_inputs_the_model_cannot_take(run_dir, x, needle):
    """A model forward error on eval inputs is exit 2 naming eval.data, not an internal error."""
    _rewrite_eval(run_dir, x=x)
    run_and_check(run_dir / "manifest.yaml", "eval.data", "model forward failed", needle,
                  "eval.inputs (x)")


def test_eval_lengths_differ(run_dir):
    """Eval tensors with different numbers of rows are refused."""
    _rewrite_eval(run_dir, y=torch.zeros(39, dtype=torch.int64))
    run_and_check(run_dir / "manifest.yaml", "eval.data", "different numbers of examples")


def test_empty_eval_set(run_dir):
    """An eval set with 0 examples is refused."""
    _rewrite_eval(run_dir, x=torch.zeros(0, 6, dtype=torch.float64),
                  y=torch.zeros(0, dtype=torch.int64), group=torch.zeros(0, dtype=torch.int64))
    run_and_check(run_dir / "manifest.yaml", "eval.data", "the eval set is empty")


@pytest.mark.parametrize("body,needles", [
    ("def batches():\n    return []\n", ["the eval set is empty"]),
    ("def batches():\n    raise OSError('bucket gone')\n", ["raised OSError: bucket gone"]),
    ("def batches():\n    yield [1, 2]\n", ["batch 0 is a list"]),
    ("import torch\n\ndef batches():\n    yield {'x': torch.zeros(4, 6, dtype=torch.float64)}\n",
     ["batch 0 has no tensor 'y'"]),
    # an empty batch was an internal error (a reshape of 0 rows in the label checks)
    ("import torch\n\ndef batches():\n    yield {'x': torch.zeros(0, 6, dtype=torch.float64),"
     " 'y': torch.zeros(0, dtype=torch.int64)}\n", ["batch 0 holds no examples"]),
])
def test_eval_data_function_failures(run_dir, body, needles):
    """eval.data as FILE.py:FUNC: failures inside it are exit 2 naming eval.data."""
    (run_dir / "evaldata.py").write_text(body)

    def use_fn(doc):
        doc["eval"]["data"] = "evaldata.py:batches"
        doc["eval"].pop("group")

    run_and_check(edit_manifest(run_dir, use_fn), "eval.data evaldata.py:batches", *needles)


def test_output_folder_missing(run_dir, tmp_path):
    """--output into a folder that does not exist: exit 2 naming --output."""
    refused(cli("run", run_dir / "manifest.yaml", "-q", "--output", tmp_path / "no" / "r.json"),
            "--output", "does not exist")
