"""Find and stream state dicts: safetensors (single or sharded) and PyTorch .pt/.bin.

No math here. Tensors are read one at a time, with plain reads into fresh memory, so a run
never holds more than the tensors its caller keeps; a reader's handles and parsed headers
are let go by ``release`` (opened again on the next read). A ``torch.save`` file is
memory-mapped once to be checked, then read at its tensors' byte offsets (``file_offset``)
and unmapped. PyTorch files are only ever loaded with ``weights_only=True``: a pickle that
would run code is refused, never executed.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
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


# safetensors dtype names -> torch dtypes (the file's bytes are little-endian, as is torch here)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Header:
    """A safetensors file's header: name -> (dtype, shape, byte offset of its data)."""

    def __init__(self, file: Path) -> None:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            doc = json.loads(fh.read(n))
        self.entries: dict[str, tuple[str, tuple[int, ...], int]] = {
            k: (v["dtype"], tuple(v["shape"]), 8 + n + int(v["data_offsets"][0]))
            for k, v in doc.items() if k != "__metadata__"}


def _pread(file: Path, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    """``count`` elements of ``dtype`` at byte ``offset`` of ``file``, read into fresh memory
    (no mapping of the file stays resident)."""
    out = torch.empty(count, dtype=dtype)
    if count:
        with open(file, "rb", buffering=0) as fh:
            fh.seek(offset)
            view = out.view(torch.uint8).numpy().data.cast("B")
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise OSError(f"file ends {len(view) - got} bytes early")
                got += n
    return out


def extremes(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty floating tensor in one pass, with no temporary of the
    tensor's size (``torch.aminmax``): both are NaN where any element is. The load-time
    checks use it instead of ``isfinite(t).all()`` and ``t.abs().max()``, whose bool and
    float temporaries (up to a parameter's size each) were ~20x slower and, freed between
    long-lived small allocations, fragmented glibc's heap: +2 checkpoints of anonymous
    memory after opening 30 optimizer state files (bench/scale.py, README)."""
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating tensor (``extremes``: one pass, no large temporary)."""
    if t.numel() == 0:
        return True
    lo, hi = extremes(t)
    return math.isfinite(lo) and math.isfinite(hi)


def drop_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the resident pages of a tensor that lies in a read-only private
    file mapping (``torch.load(mmap=True)``), as after reading it once: they count as the
    process's memory until then. Never call it on memory the process wrote."""
    n = t.numel() * t.element_size()
    if n:
        drop_range(t.data_ptr(), t.data_ptr() + n)


def drop_range(start: int, stop: int) -> None:
    """``drop_pages`` for the bytes start..stop of such a mapping: every page they touch,
    those shared with neighbours too (the mapping is read-only file data: a dropped page is
    read again from the file if needed). The kernel maps pages around each one a read
    touches (fault-around), so callers pad the range or drop a whole file's span."""
    if _LIBC is None or stop <= start:
        return
    a = start // mmap.PAGESIZE * mmap.PAGESIZE
    b = -(-stop // mmap.PAGESIZE) * mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # MADV_DONTNEED


try:
    _LIBC: Any = ctypes.CDLL(None)
    _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError, TypeError):  # no libc madvise: pages stay until unmapped
    _LIBC = None


class StateDictReader:
    """Read-only, lazy view of one checkpoint's tensors (name -> tensor).

    ``get`` returns floating tensors as float32 (bf16/fp16 checkpoints are computed in fp32;
    float64 is kept) unless asked for the file's own dtype, and refuses NaN or Inf, naming
    the tensor. Tensors are read from the file into fresh memory each time (a tensor or a
    flat slice of it, ``get_flat``): safetensors at the header's offsets, a ``torch.save``
    file at those its tensors were found at (``file_offset``; a file where they cannot be
    found keeps its mapped tensors). Nothing of the file stays resident.
    """

    def __init__(self, path: Path, shards: dict[str, Path] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None,
                 at: dict[str, tuple[Path, int]] | None = None) -> None:
        """
        Args:
            tensors: a ``torch.save`` file's tensors by name; with ``at`` (name -> file and
                byte offset of its data) they are meta tensors (shape and dtype only) and
                the data is read from the file on every call.
        """
        self.path = path
        self._shards = shards or {}
        self._tensors = tensors
        self._at = at or {}
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, _Header] = {}

    def names(self) -> list[str]:
        if self._tensors is not None:
            return sorted(self._tensors)
        return sorted(self._shards)

    def held(self) -> int:
        """Open file handles and parsed headers this reader holds (0 after ``release``; a
        ``.pt`` file's tensors, loaded whole, are held for the reader's life)."""
        return len(self._handles) + len(self._headers)

    def release(self) -> None:
        """Close the reader's file handles and forget the headers read: nothing of the
        file stays open. Each is opened or read again when next needed."""
        self._handles.clear()
        self._headers.clear()

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

    def torch_dtype(self, name: str) -> torch.dtype | None:
        """The tensor's dtype as stored (None where the format does not say)."""
        if self._tensors is not None:
            return self._tensors[name].dtype
        entry = self._entry(name)
        return _ST_DTYPES.get(entry[0]) if entry is not None else None

    def _entry(self, name: str) -> tuple[str, tuple[int, ...], int] | None:
        file = self._shards[name]
        if file not in self._headers:
            try:
                self._headers[file] = _Header(file)
            except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
                return None  # read through safetensors itself, which says what is wrong
        return self._headers[file].entries.get(name)

    def _read(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        """The tensor as stored (or flat elements start..stop of it)."""
        if name in self._at and self._tensors is not None:
            file, offset = self._at[name]
            meta = self._tensors[name]
            n = meta.numel()
            a, b = (0, n) if start is None else (start, min(n, n if stop is None else stop))
            t = _pread(file, meta.dtype, offset + a * meta.element_size(), max(b - a, 0))
            return t.reshape(meta.shape) if start is None else t
        if self._tensors is not None:
            t = self._tensors[name]
            return t if start is None else t.reshape(-1)[start:stop]
        where = self._shards[name]
        entry = self._entry(name)
        try:
            if entry is None or entry[0] not in _ST_DTYPES:
                t = self._handle(where).get_tensor(name)
                return t if start is None else t.reshape(-1)[start:stop]
            dtype = _ST_DTYPES[entry[0]]
            n = math.prod(entry[1])
            a, b = (0, n) if start is None else (start, min(n, n if stop is None else stop))
            size = torch.empty((), dtype=dtype).element_size()
            t = _pread(where, dtype, entry[2] + a * size, max(b - a, 0))
            return t.reshape(entry[1]) if start is None else t
        except Exception as e:
            raise CheckpointError(f"{where}: cannot read tensor '{name}': {e}",
                                  "the file is truncated or corrupted; re-save it") from e

    def get_flat(self, name: str, start: int, stop: int, *,
                 native: bool = False) -> torch.Tensor:
        """Flat elements start..stop of a tensor (as ``get``)."""
        return self._checked(name, self._read(name, start, stop), True, native)

    def get(self, name: str, *, check_finite: bool = True,
            native: bool = False) -> torch.Tensor:
        """A tensor; ``native``: floating tensors in the file's own dtype."""
        return self._checked(name, self._read(name, None, None), check_finite, native)

    def _checked(self, name: str, t: torch.Tensor, check_finite: bool,
                 native: bool) -> torch.Tensor:
        where = self.path if self._tensors is not None else self._shards[name]
        if t.is_complex() or (t.is_floating_point() and t.dtype not in _TORCH_DTYPES):
            raise CheckpointError(f"{where}: tensor '{name}' has dtype "
                                  f"{str(t.dtype).removeprefix('torch.')}; acctattr reads "
                                  "float16, bfloat16, float32 and float64 weights",
                                  "save the checkpoint in one of those dtypes")
        if not native and t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        if check_finite and t.is_floating_point() and not all_finite(t):
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
        tensors = _tensor_dict(load_torch_file(file), file)
        found = _in_place(file, tensors)
        if found is None:
            return StateDictReader(file, tensors=tensors)
        return StateDictReader(file, tensors=found[0], at=found[1])
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
        metas: dict[str, torch.Tensor] = {}
        at: dict[str, tuple[Path, int]] = {}
        in_place = True
        for f in sorted(set(shards.values())):
            part = _tensor_dict(load_torch_file(f), f)
            found = _in_place(f, part) if in_place else None
            in_place = found is not None
            tensors.update(part)
            if found is not None:
                metas.update(found[0])
                at.update(found[1])
        if in_place:
            return StateDictReader(index, tensors=metas, at=at)
        return StateDictReader(index, tensors=tensors)
    return StateDictReader(index, shards=shards)


def load_torch_file(file: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped where the format allows)."""
    return load_torch_file_mapped(file)[0]


def load_torch_file_mapped(file: Path) -> tuple[Any, bool]:
    """``load_torch_file``, and whether the file was memory-mapped (its tensors then lie in a
    read-only private mapping: ``drop_pages`` may give their pages back)."""
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


def _torch_load(file: Path) -> tuple[Any, bool]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(file, map_location="cpu", weights_only=True), False


def load_torch_meta(file: Path) -> Any:
    """A ``torch.save`` file's structure with every tensor on the meta device (no data
    read), each storage knowing its byte offset in the file (``file_offset``); None where
    torch cannot load it so (a legacy, non-zip file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="meta", weights_only=True)
    except Exception:
        return None


def file_offset(file: Path, meta: Any, like: torch.Tensor) -> int | None:
    """The byte offset in ``file`` of the data of ``meta`` (a tensor of ``load_torch_meta``)
    where it is contiguous and has the dtype and shape of ``like`` (the same tensor loaded
    with its data); None otherwise. The offset is trusted only where the first and last
    elements read there are, bit for bit, ``like``'s (a byte-swapped file is not)."""
    if not isinstance(meta, torch.Tensor) or not meta.is_meta or meta.dtype != like.dtype \
            or meta.shape != like.shape or not meta.is_contiguous() or not like.is_contiguous():
        return None
    base = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
    if not isinstance(base, int) or base < 0:
        return None
    offset = base + int(meta.storage_offset()) * meta.element_size()
    n = like.numel()
    if n:
        flat = like.reshape(-1)
        k = min(n, 8)
        try:
            head = _pread(file, like.dtype, offset, k)
            tail = _pread(file, like.dtype, offset + (n - k) * like.element_size(), k)
        except OSError:
            return None
        if not (_same_bits(head, flat[:k]) and _same_bits(tail, flat[n - k:])):
            return None
    return offset


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def read_at(file: Path, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    """``count`` elements of ``dtype`` at byte ``offset`` of ``file``, read into fresh
    memory (nothing of the file stays open or mapped)."""
    return _pread(file, dtype, offset, count)


def _weights(obj: Any) -> Any:
    """The part of a loaded .pt object that holds the weights: Lightning .ckpt files keep
    them under "state_dict", dcp_to_torch output and many training scripts under "model";
    the rest of such a file (optimizer, loops) is not weights."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not all(
                isinstance(v, torch.Tensor) for v in obj.values()):
            return obj[key]
    return obj


def _in_place(file: Path, tensors: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Path, int]]] | None:
    """For a .pt file's weights (``tensors``, loaded with their data): the same as meta
    tensors and where each one's data lies in the file, so that they are read there on use
    and nothing of the file stays mapped; None where any one's place cannot be found."""
    meta = _weights(load_torch_meta(file))
    if not isinstance(meta, dict):
        return None
    metas: dict[str, torch.Tensor] = {}
    at: dict[str, tuple[Path, int]] = {}
    for name, t in tensors.items():
        offset = file_offset(file, meta.get(name), t)
        if offset is None:
            return None
        metas[name], at[name] = meta[name], (file, offset)
    return metas, at


def _tensor_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a loaded .pt object."""
    obj = _weights(obj)
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

    def held(self) -> int:
        return self.inner.held()

    def release(self) -> None:
        self.inner.release()

    def names(self) -> list[str]:
        n = len(self.prefix)
        return sorted(k[n:] for k in self.inner.names() if k.startswith(self.prefix))

    def __contains__(self, name: str) -> bool:
        return (self.prefix + name) in self.inner

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self.prefix + name)

    def dtype(self, name: str) -> str:
        return self.inner.dtype(self.prefix + name)

    def torch_dtype(self, name: str) -> torch.dtype | None:
        return self.inner.torch_dtype(self.prefix + name)

    def get(self, name: str, *, check_finite: bool = True,
            native: bool = False) -> torch.Tensor:
        return self.inner.get(self.prefix + name, check_finite=check_finite, native=native)

    def get_flat(self, name: str, start: int, stop: int, *,
                 native: bool = False) -> torch.Tensor:
        return self.inner.get_flat(self.prefix + name, start, stop, native=native)


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
