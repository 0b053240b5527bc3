"""Finding and reading checkpoints (acctattr/checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from acctattr.errors import CheckpointError
from acctattr.runs.checkpoints import open_checkpoint
from acctattr.runs.formats import FormatError, read_trainer_state


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g),
            "head.weight": torch.randn(2, 4, generator=g)}


def assert_reads(reader, expected: dict[str, torch.Tensor]) -> None:
    assert reader.names() == sorted(expected)
    for name, t in expected.items():
        assert name in reader
        assert reader.shape(name) == tuple(t.shape)
        got = reader.get(name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, t.float(), rtol=0, atol=0)


def test_folder_with_model_safetensors(tmp_path):
    """A folder holding model.safetensors is read tensor by tensor."""
    sd = state()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert_reads(open_checkpoint(tmp_path), sd)


def test_single_safetensors_file(tmp_path):
    """A path to one .safetensors file is read directly."""
    sd = state(1)
    save_file(sd, tmp_path / "weights.safetensors")
    assert_reads(open_checkpoint(tmp_path / "weights.safetensors"), sd)


def test_sharded_safetensors_with_index(tmp_path):
    """Sharded safetensors are read through model.safetensors.index.json's weight_map."""
    sd = state(2)
    names = sorted(sd)
    save_file({n: sd[n] for n in names[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: sd[n] for n in names[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors"
                  for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_reads(open_checkpoint(tmp_path), sd)


def test_shard_index_naming_a_missing_shard(tmp_path):
    """An index whose shard file is missing is a CheckpointError naming the shard."""
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        open_checkpoint(tmp_path)


def test_pt_state_dict(tmp_path):
    """A torch.save'd state dict (.pt) is read with weights_only."""
    sd = state(3)
    torch.save(sd, tmp_path / "model.pt")
    assert_reads(open_checkpoint(tmp_path / "model.pt"), sd)
    assert_reads(open_checkpoint(tmp_path), sd)


def test_lightning_style_checkpoint(tmp_path):
    """A Lightning-style {"state_dict": ..., "epoch": ...} file yields the inner state dict."""
    sd = state(4)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 120}, tmp_path / "last.ckpt")
    assert_reads(open_checkpoint(tmp_path / "last.ckpt"), sd)


def test_bf16_checkpoint_is_returned_as_float32(tmp_path):
    """bf16 tensors are returned as float32 with the same values."""
    sd = {k: v.to(torch.bfloat16) for k, v in state(5).items()}
    save_file(sd, tmp_path / "model.safetensors")
    reader = open_checkpoint(tmp_path)
    for name, t in sd.items():
        got = reader.get(name)
        assert got.dtype == torch.float32
        assert torch.equal(got, t.float())


def test_float64_is_kept(tmp_path):
    """float64 tensors keep their precision."""
    save_file({"w": torch.randn(3, dtype=torch.float64)}, tmp_path / "model.safetensors")
    assert open_checkpoint(tmp_path).get("w").dtype == torch.float64


def _touch_marker(path: str) -> None:
    Path(path).write_text("payload ran")


class Payload:
    """Unpickling this calls _touch_marker: code execution hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    """A .pt holding a non-tensor object is refused (CheckpointError); its payload never runs."""
    marker = tmp_path / "marker"
    file = tmp_path / "model.pt"
    torch.save({"fc.weight": torch.zeros(2), "evil": Payload(marker)}, file)
    with pytest.raises(CheckpointError, match="refused to load"):
        open_checkpoint(file)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(file, weights_only=False)
    assert marker.read_text() == "payload ran"


def test_nan_tensor_is_named(tmp_path):
    """A tensor with NaN values is a CheckpointError naming the tensor and the file."""
    sd = state(6)
    sd["fc.bias"][1] = float("nan")
    save_file(sd, tmp_path / "model.safetensors")
    reader = open_checkpoint(tmp_path)
    reader.get("fc.weight")  # the finite ones read fine
    with pytest.raises(CheckpointError) as info:
        reader.get("fc.bias")
    assert "'fc.bias'" in str(info.value) and "model.safetensors" in str(info.value)
    assert "1 NaN or Inf" in str(info.value)


def test_inf_in_pt_file_is_named(tmp_path):
    """Inf values in a .pt state dict are refused the same way."""
    torch.save({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="'w'"):
        open_checkpoint(tmp_path / "model.pt").get("w")


def test_empty_folder(tmp_path):
    """A folder without weights is a CheckpointError listing what was looked for."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    assert "no model weights" in str(info.value) and "model.safetensors" in str(info.value)


def test_folder_with_two_unnamed_safetensors_is_ambiguous(tmp_path):
    """Two arbitrary *.safetensors files and no index is refused rather than guessed."""
    save_file(state(), tmp_path / "a.safetensors")
    save_file(state(), tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="no model weights"):
        open_checkpoint(tmp_path)


def test_missing_path(tmp_path):
    """A path that does not exist is a CheckpointError naming it."""
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nope")


def test_truncated_safetensors(tmp_path):
    """A truncated safetensors file is a CheckpointError, not a crash."""
    save_file(state(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        open_checkpoint(tmp_path)


def test_pt_that_is_not_a_state_dict(tmp_path):
    """A .pt holding a list of tensors is refused with a hint to save a state dict."""
    torch.save([torch.zeros(2)], tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        open_checkpoint(tmp_path / "model.pt")


def test_trainer_state_learning_rates(tmp_path):
    """trainer_state.json (the one reader, formats.read_trainer_state) yields its logged
    (step, learning_rate) points and global_step; without a transformers_version the lr
    logged at step N is the lr of 0-indexed step N (the older convention)."""
    doc = {"global_step": 30, "log_history": [
        {"step": 10, "learning_rate": 0.1, "loss": 1.0}, {"step": 20, "loss": 0.5},
        {"step": 20, "learning_rate": 0.05}, {"eval_loss": 0.3, "step": 30}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(doc))
    ts = read_trainer_state(tmp_path / "trainer_state.json")
    assert ts.lr_points == ((10, 0.1), (20, 0.05)) and ts.global_step == 30
    (tmp_path / "empty.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 1}]}))
    with pytest.raises(FormatError, match="no integer global_step"):
        read_trainer_state(tmp_path / "empty.json")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finiteness_check_finds_one_bad_value_in_a_large_tensor(dtype):
    """all_finite / extremes (one aminmax pass): a single NaN, +Inf or -Inf anywhere in a
    tensor larger than a vector register block is found; finite values give exact min/max."""
    from acctattr.runs.checkpoints import all_finite, extremes

    t = torch.linspace(-3, 5, 10_001).to(dtype)
    assert all_finite(t) and extremes(t) == (-3.0, 5.0)
    assert all_finite(torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 4_999, 10_000):
            u = t.clone()
            u[where] = bad
            assert not all_finite(u), (dtype, bad, where)
            assert not all_finite(u[::3] if where % 3 == 0 else u[1::1])  # strided views too
