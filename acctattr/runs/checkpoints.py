"""Find and stream state dicts: safetensors (single or sharded) and PyTorch .pt/.bin.

No math here. Tensors are read one at a time from memory-mapped files, so a run never holds
more than the tensors its caller keeps. PyTorch files are only ever loaded with
``weights_only=True``: a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from acctattr.errors import CheckpointError
from acctattr.files import check_any, check_file, is_file, read_bytes_limited

# The dtypes a parameter may have (safetensors' names); integer, bool, complex and fp8
# tensors are no trained weights acctattr can difference and propagate.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                 torch.float64: "F64"}
_INDEX_LIMIT = 64 << 20  # a shard index is a small JSON map of names to files
_FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "model.pt", "model.bin", "pytorch_model.bin.index.json")


class StateDictReader:
    """Read-only, lazy view of one checkpoint's tensors (name -> tensor).

    ``get`` returns floating tensors as float32 (bf16/fp16 checkpoints are computed in fp32;
    float64 is kept) and refuses NaN or Inf, naming the tensor.
    """

    def __init__(self, path: Path, shards: dict[str, Path] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self._shards = shards or {}
        self._tensors = tensors
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        if self._tensors is not None:
            return sorted(self._tensors)
        return sorted(self._shards)

    def __contains__(self, name: str) -> bool:
        return name in (self._tensors if self._tensors is not None else self._shards)

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open_checked(file)
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[name].shape)
        file = self._shards[name]
        try:
            return tuple(self._handle(file).get_slice(name).get_shape())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read the header entry of tensor '{name}': {e}",
                                  "the file is truncated or corrupted; re-save it") from e

    def dtype(self, name: str) -> str:
        """The stored dtype of ``name`` as safetensors names it (F32, BF16, I64, ...),
        read from the header without loading the tensor."""
        if self._tensors is not None:
            t = self._tensors[name]
            return _TORCH_DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))
        file = self._shards[name]
        try:
            return str(self._handle(file).get_slice(name).get_dtype())
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read the header entry of tensor '{name}': {e}",
                                  "the file is truncated or corrupted; re-save it") from e

    def get(self, name: str, *, check_finite: bool = True) -> torch.Tensor:
        if self._tensors is not None:
            t = self._tensors[name]
            where = self.path
        else:
            where = self._shards[name]
            try:
                t = self._handle(where).get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{where}: cannot read tensor '{name}': {e}",
                                      "the file is truncated or corrupted; re-save it") from e
        if t.is_complex() or (t.is_floating_point() and t.dtype not in _TORCH_DTYPES):
            raise CheckpointError(f"{where}: tensor '{name}' has dtype "
                                  f"{str(t.dtype).removeprefix('torch.')}; acctattr reads "
                                  "float16, bfloat16, float32 and float64 weights",
                                  "save the checkpoint in one of those dtypes")
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor '{name}' has {bad} NaN or Inf values",
                                  "training diverged before this checkpoint was written; "
                                  "point the manifest at an earlier, finite checkpoint")
        return t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)


def safe_open_checked(file: Path) -> Any:
    """Open a safetensors file, turning header problems into a clear error.

    The file must be a regular file (never a FIFO or device), and the 8-byte header length
    at its start must fit inside it, before safetensors reads anything.
    """
    check_file(file, "", CheckpointError)
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"header length {n} is beyond the file's {size} bytes")
        return safe_open(str(file), framework="pt")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})",
                              "the file is truncated or corrupted; re-save it with "
                              "safetensors.torch.save_file") from e


def resolve_checkpoint_file(path: Path) -> Path:
    """The file (or shard index) a checkpoint path stands for."""
    from acctattr.files import path_problem

    problem = path_problem(path)
    if problem == "not found":
        raise CheckpointError(f"{path}: checkpoint not found")
    check_any(path, "checkpoint", CheckpointError)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / ".metadata").is_file():
            from acctattr.runs.formats import DCP_HINT

            raise CheckpointError(
                f"{path}: a torch.distributed.checkpoint folder (it has .metadata); acctattr "
                "does not read it in place",
                DCP_HINT.format(src=path, dst=f"{path.as_posix().rstrip('/')}.pt"))
        for name in _FOLDER_FILES:
            if is_file(path / name):
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        from acctattr.runs.formats import describe_folder

        raise CheckpointError(
            f"{path}: no model weights found in this folder ({describe_folder(path)})",
            f"expected one of {', '.join(_FOLDER_FILES)} (or a single *.safetensors file); "
            "acctattr init drafts a manifest from such a folder")
    raise CheckpointError(f"{path}: checkpoint not found")


def open_checkpoint(path: Path) -> StateDictReader:
    """Open a checkpoint folder or file for lazy, read-only tensor access."""
    file = resolve_checkpoint_file(path)
    if file.name.endswith(".index.json"):
        return _open_index(file)
    if file.suffix == ".safetensors":
        handle = safe_open_checked(file)
        reader = StateDictReader(file, shards={k: file for k in handle.keys()})
        reader._handles[file] = handle
        return reader
    if file.suffix in (".pt", ".bin", ".pth", ".ckpt"):
        return StateDictReader(file, tensors=_tensor_dict(load_torch_file(file), file))
    raise CheckpointError(f"{file}: unknown checkpoint format '{file.suffix}'",
                          "use .safetensors, a sharded safetensors index, or a .pt/.bin state dict")


def _open_index(index: Path) -> StateDictReader:
    try:
        raw = read_bytes_limited(index, _INDEX_LIMIT, "shard index", CheckpointError)
        weight_map = json.loads(raw)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})",
                              "it must hold a 'weight_map' of tensor name -> shard file") from e
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        f = index.parent / str(shard)
        if not is_file(f):
            raise CheckpointError(f"{index}: shard {shard} (for tensor '{name}') not found")
        shards[name] = f
    if index.name.startswith("pytorch_model"):
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(set(shards.values())):
            tensors.update(_tensor_dict(load_torch_file(f), f))
        return StateDictReader(index, tensors=tensors)
    return StateDictReader(index, shards=shards)


def load_torch_file(file: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped where the format allows)."""
    check_file(file, "", CheckpointError)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes are noise to a user
            warnings.simplefilter("ignore")
            return _torch_load(file)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused to load: the pickle holds objects that are not plain tensors "
            "and loading them could run code",
            "re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as "
            "safetensors") from e
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable PyTorch file ({type(e).__name__}: {e})",
                              "the file is truncated or corrupted; re-save it") from e


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def _tensor_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a loaded .pt object."""
    # Lightning .ckpt files keep the weights under "state_dict", dcp_to_torch output and many
    # training scripts under "model"; the rest of such a file (optimizer, loops) is not weights.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not all(
                isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{file}: expected a state dict (tensor name -> tensor)",
                              "save it with torch.save(model.state_dict(), path)")
    for k, v in obj.items():
        check_dense(v, f"{file}: tensor '{k}'")
    return obj


def check_dense(t: torch.Tensor, where: str) -> None:
    """Refuse a tensor that is not a plain dense (strided) one: sparse, quantized, nested
    or meta tensors hold no values acctattr can difference."""
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.is_meta:
        kind = "quantized" if t.is_quantized else "nested" if t.is_nested else \
            "meta (no data)" if t.is_meta else str(t.layout).removeprefix("torch.")
        raise CheckpointError(f"{where} is a {kind} tensor, not a dense one",
                              "save dense tensors (tensor.to_dense(), dequantize())")


class RenamedReader(StateDictReader):
    """A view of another reader with a name prefix removed (``model.`` in Lightning files)."""

    def __init__(self, inner: StateDictReader, prefix: str) -> None:
        super().__init__(inner.path)
        self.inner = inner
        self.prefix = prefix

    def names(self) -> list[str]:
        n = len(self.prefix)
        return sorted(k[n:] for k in self.inner.names() if k.startswith(self.prefix))

    def __contains__(self, name: str) -> bool:
        return (self.prefix + name) in self.inner

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self.prefix + name)

    def dtype(self, name: str) -> str:
        return self.inner.dtype(self.prefix + name)

    def get(self, name: str, *, check_finite: bool = True) -> torch.Tensor:
        return self.inner.get(self.prefix + name, check_finite=check_finite)


def align_names(reader: StateDictReader, expected: list[str]) -> StateDictReader:
    """The reader itself when it holds every expected name; else a view without the one
    prefix (such as ``model.`` of a LightningModule attribute, or ``module.`` of DDP) under
    which it does. Matching is by the model's own parameter names, never by guessing."""
    if not expected or all(n in reader for n in expected):
        return reader
    first = expected[0]
    prefixes = sorted({k[: -len(first)] for k in reader.names()
                       if k.endswith("." + first)}, key=len)
    for prefix in prefixes:
        if all((prefix + n) in reader for n in expected):
            return RenamedReader(reader, prefix)
    return reader
