"""Stage embeddings as artifacts: compute v_k once (``acctattr embed``), evaluate them on any
eval set or metric later (``acctattr run --embeddings DIR``).

An embedding depends only on the checkpoints, optimizer state, training data, the model and
the stages' part of the manifest (SPEC section 1), never on the eval set. So a folder holds:

- one safetensors file per stage: v_k by parameter name, in the dtype theta_T is evaluated in
  (float32; float64 for a float64 checkpoint). Both evaluations convert v_k to exactly that
  dtype before using it (``linear``: the JVP's tangent; ``direct``: theta_T - v_k), so a run
  from the stored embeddings computes the same bits as one that builds them;
- ``embeddings.json``: the estimator (as asked, as taken, its configuration, auto's reason
  and its warnings), acctattr's version, and the sha256 of every input file the embedding
  read. A run refuses the folder (exit 2, naming the file) when one of them changed, when the
  manifest's stages, model or training loss changed, or when it asks for another estimator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from acctattr import __version__, devices
from acctattr.errors import AcctattrError, CheckpointError, ManifestError
from acctattr.estimators import Estimator, Params, Unsuitable
from acctattr.options import Runtime, UnrolledConfig
from acctattr.results import Progress
from acctattr.runs import formats
from acctattr.runs.checkpoints import resolve_checkpoint_file
from acctattr.runs.manifest import Manifest, Ref

SCHEMA = "acctattr.embeddings/1"
INDEX = "embeddings.json"


# ---------------------------------------------------------------- what an embedding reads

def sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint path is read from (a shard index and its shards)."""
    file = resolve_checkpoint_file(path)
    if not file.name.endswith(".index.json"):
        return [file]
    try:
        shards = json.loads(file.read_text())["weight_map"].values()
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a valid shard index ({e})") from e
    return [file, *sorted({file.parent / str(s) for s in shards})]


def _ref_file(ref: Ref) -> Path | None:
    """The Python file a FILE.py:FUNC or package.module:FUNC reference runs."""
    if ref.file is not None:
        return ref.file
    import importlib.util

    try:
        spec = importlib.util.find_spec(ref.module or "")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def input_files(manifest: Manifest) -> list[tuple[str, Path]]:
    """Every file an embedding is computed from, each (what, path), in manifest order: the
    manifest, the model's code (or config.json), each stage's checkpoints, adapter files,
    optimizer state, learning-rate log and training data, the training loss's code."""
    out: list[tuple[str, Path]] = [("manifest", manifest.path)]
    if manifest.factory is not None:
        f = _ref_file(manifest.factory)
        if f is not None:
            out.append(("model.factory", f))
    if manifest.hf is not None:
        out.append(("model.hf", manifest.hf / "config.json"))
    for stage in manifest.stages:
        where = f"stage '{stage.name}'"
        refs = [("start", stage.start)] + [(f"checkpoints step {c.step}", c.path)
                                           for c in stage.checkpoints]
        if stage.adapter:
            out.append((f"{where}: end adapter", stage.end / "adapter_config.json"))
            out.append((f"{where}: end adapter", formats.adapter_weights(stage.end)))
        else:
            refs.append(("end", stage.end))
        for key, path in refs:
            out += [(f"{where}: {key}", f) for f in _checkpoint_files(path)]
        opt = stage.optimizer
        if opt.state is not None:
            out.append((f"{where}: optimizer.state", opt.state))
        if opt.lr.trainer_state is not None:
            out.append((f"{where}: optimizer.lr", opt.lr.trainer_state))
        if stage.data is not None:
            out.append((f"{where}: data", stage.data))
    if isinstance(manifest.train_loss, Ref):
        f = _ref_file(manifest.train_loss)
        if f is not None:
            out.append(("train.loss", f))
    seen: set[Path] = set()  # a stage's end is the next one's start: hashed once
    unique = []
    for what, path in out:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((what, path))
    return unique


def manifest_digest(manifest: Manifest, tensors: tuple[str, ...]) -> str:
    """sha256 of the part of the manifest an embedding depends on: the model, the stages
    (paths relative to the manifest), the training loss, and the tensor names read from the
    stages' data (``tensors``). Comments, the eval section(s) and ``replay`` do not count:
    the same embeddings serve any eval set."""
    root = manifest.root.resolve()

    def plain(x: Any) -> Any:
        if isinstance(x, Path):
            return os.path.relpath(x.resolve(), root)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    doc = {"model": plain((manifest.factory, manifest.hf, manifest.hf_class)),
           "stages": plain(manifest.stages), "train_loss": plain(manifest.train_loss),
           "stage_tensors": list(tensors)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def stage_tensors(manifest: Manifest, estimator: str) -> tuple[str, ...]:
    """The tensor names ``estimator`` reads from each stage's data: the first behaviour's
    inputs and target for unrolled (which trains on them), none for naive and frozen."""
    if estimator != "unrolled":
        return ()
    return (*manifest.eval.inputs, manifest.eval.target)


def _file_name(k: int, name: str) -> str:
    return f"{k:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}.safetensors"


def _config_doc(name: str, config: UnrolledConfig) -> dict[str, Any] | None:
    """The configuration the embedding depends on (unrolled's knobs; none for the others)."""
    return dataclasses.asdict(config) if name == "unrolled" else None


# ---------------------------------------------------------------- acctattr embed

def compute(path: str | Path, out: Path, estimator: str = "auto",
            config: UnrolledConfig | None = None, runtime: Runtime | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Compute every stage's embedding and write them, with ``embeddings.json``, to ``out``
    (atomically: a temporary folder beside it, then a rename). Returns the index written.

    Args:
        estimator: naive | frozen | unrolled | auto, chosen as ``acctattr run`` chooses.
        config, runtime, progress: as for pipeline.run.
    """
    from acctattr import distributed, pipeline
    from acctattr.estimators import auto_note, candidates
    from acctattr.output.atomic import atomic_folder, check_folder_target, refuse_inside
    from acctattr.runs.manifest import load_manifest

    if distributed.from_env()[1] > 1:
        raise AcctattrError("embed runs in one process: under torchrun every rank would write "
                            "the same folder", "run it without torchrun")
    if estimator not in (*pipeline.ESTIMATORS, "auto"):
        raise AcctattrError(f"unknown estimator {estimator!r}",
                            f"choose one of {', '.join(pipeline.ESTIMATORS)} or auto")
    config = config or UnrolledConfig()
    runtime = runtime or Runtime()
    refuse_inside(out, load_manifest(path).root, "--output")
    check_folder_target(out, "--output", INDEX)
    device = devices.resolve(runtime.device)
    with devices.threads(runtime.threads):
        loaded = pipeline.check(path, device, runtime.batch_size)
        manifest = loaded.manifest
        inputs = [{"what": what, "path": os.path.relpath(p.resolve(), manifest.root.resolve()),
                   "sha256": sha256(p)} for what, p in input_files(manifest)]
        available = pipeline.auto_memory(device) if estimator == "auto" else None
        passed: list[str] = []
        tried = candidates(estimator, pipeline.training(loaded, config), config, available,
                           passed)
        chosen = next(tried)
        names = [r.name for r in loaded.runs]
        dtypes = {n: p.dtype for n, p in loaded.evaluator.params.items()}
        if progress:
            chosen.progress = lambda *a, **kw: progress(*a, **kw, level=1)
        with atomic_folder(out, "--output", INDEX) as tmp:
            while True:
                try:
                    files = [_write_stage(tmp, k, names[k], chosen, dtypes, progress, len(names))
                             for k in range(len(names))]
                    break
                except Unsuitable as e:
                    passed.append(e.reason)
                    chosen = next(tried)
                    if progress:
                        chosen.progress = lambda *a, **kw: progress(*a, **kw, level=1)
            if progress:
                progress("done", len(names), len(names))
            index = {
                "schema": SCHEMA,
                "acctattr_version": __version__,
                "estimator": {"asked": estimator, "name": chosen.name,
                              "config": _config_doc(chosen.name, config),
                              "note": auto_note(chosen, passed) if estimator == "auto" else None,
                              "warnings": list(chosen.warnings())},
                "manifest": {"path": str(Path(path)), "sha256": sha256(manifest.path),
                             "embedding_sha256": manifest_digest(
                                 manifest, stage_tensors(manifest, chosen.name))},
                "inputs": inputs,
                "stages": files,
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def _write_stage(folder: Path, k: int, name: str, estimator: Estimator,
                 dtypes: dict[str, torch.dtype], progress: Progress | None,
                 n_stages: int) -> dict[str, str]:
    """Embed stage k and write v_k (in the evaluation dtype) to its file."""
    if progress:
        progress(f"stage {name}", k, n_stages)
    try:
        v = estimator.embed(k)
    except ManifestError:
        raise
    except AcctattrError as e:
        raise type(e)(f"while estimating stage '{name}': {e.message}", e.hint) from e
    tensors = {n: v[n].detach().to(dtypes[n]).cpu().contiguous() for n in dtypes}
    file = _file_name(k, name)
    save_file(tensors, str(folder / file), metadata={"stage": name, "estimator": estimator.name})
    return {"name": name, "file": file, "sha256": sha256(folder / file)}


# ---------------------------------------------------------------- acctattr run --embeddings

class _Stored(Estimator):
    """Embeddings read from an ``acctattr embed`` folder, one stage at a time."""

    def __init__(self, folder: Path, files: list[Path], shapes: dict[str, tuple[int, ...]],
                 warnings: list[str]) -> None:
        self.folder = folder
        self.files = files
        self.shapes = shapes
        self._warnings = warnings
        self.progress = None

    def embed(self, k: int) -> Params:
        file = self.files[k]
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = set(fh.keys())
                missing = [n for n in self.shapes if n not in keys]
                if missing:
                    raise CheckpointError(f"{file}: no embedding for parameter(s) "
                                          f"{', '.join(missing[:5])}",
                                          "recompute the folder with acctattr embed")
                out = {n: fh.get_tensor(n) for n in self.shapes}
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})",
                                  "recompute the folder with acctattr embed") from e
        for n, t in out.items():
            if tuple(t.shape) != self.shapes[n]:
                raise CheckpointError(f"{file}: '{n}' has shape {tuple(t.shape)}, the model "
                                      f"{self.shapes[n]}", "recompute the folder with "
                                      "acctattr embed")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{file}: '{n}' is not finite floating point "
                                      f"({t.dtype}, NaN or Inf)", "recompute the folder "
                                      "with acctattr embed")
        return out

    def warnings(self) -> list[str]:
        return list(self._warnings)


def read_index(folder: Path) -> dict[str, Any]:
    """``folder/embeddings.json``, checked to be an acctattr embeddings index."""
    index = folder / INDEX
    if not index.is_file():
        raise AcctattrError(f"--embeddings {folder}: no {INDEX} in that folder",
                            "name a folder written by acctattr embed MANIFEST -o DIR")
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AcctattrError(f"{index}: not readable JSON ({e})",
                            "recompute it with acctattr embed") from e
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise AcctattrError(f"{index}: not an {SCHEMA} index (schema "
                            f"{doc.get('schema') if isinstance(doc, dict) else None!r})",
                            "recompute it with this acctattr's embed")
    return doc


def load(folder: Path, manifest: Manifest, shapes: dict[str, tuple[int, ...]],
         stage_names: list[str], asked: str, config: UnrolledConfig
         ) -> tuple[Estimator, str | None]:
    """The stored embeddings as an estimator, and auto's note (None for a named estimator).

    Refuses (AcctattrError, exit 2) a folder whose inputs changed since it was computed, that
    holds another run's stages or another estimator than ``asked`` (or other unrolled knobs),
    naming the file and what differs.
    """
    doc = read_index(folder)
    index = folder / INDEX
    try:
        est = doc["estimator"]
        name, stored_asked = est["name"], est["asked"]
        stages = doc["stages"]
        inputs = doc["inputs"]
        digest = doc["manifest"]["embedding_sha256"]
    except (KeyError, TypeError) as e:
        raise AcctattrError(f"{index}: missing field {e}",
                            "recompute it with acctattr embed") from e
    from acctattr.estimators import ESTIMATORS

    def malformed(key: str, want: str) -> AcctattrError:
        return AcctattrError(f"{index}: {key} is not {want}", "recompute it with acctattr embed")

    if not isinstance(name, str) or name not in ESTIMATORS or not isinstance(stored_asked, str):
        raise malformed("estimator.name", f"one of {', '.join(sorted(ESTIMATORS))}")
    if not isinstance(est.get("config") or {}, dict):
        raise malformed("estimator.config", "an object")
    if not isinstance(stages, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str)
            and isinstance(s.get("file"), str) for s in stages):
        raise malformed("stages", "a list of objects with a name and a file")
    if not isinstance(inputs, list) or not all(
            isinstance(i, dict) and isinstance(i.get("path"), str) for i in inputs):
        raise malformed("inputs", "a list of objects with a path")
    redo = f"recompute them: acctattr embed {manifest.path} -o {folder}"
    if asked not in (stored_asked, name):
        raise AcctattrError(f"{index}: the embeddings were computed by {name}"
                            + (f" (asked: {stored_asked})" if stored_asked != name else "")
                            + f", not {asked}",
                            f"run with --estimator {stored_asked}, or {redo} --estimator "
                            f"{asked}")
    if name == "unrolled":
        now = _config_doc(name, config) or {}
        then = est.get("config") or {}
        differ = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
        if differ:
            shown = "; ".join(f"{k} {then.get(k)!r} there, {now.get(k)!r} asked" for k in differ)
            raise AcctattrError(f"{index}: unrolled's options differ from the ones asked: "
                                f"{shown}", f"ask with the same options, or {redo}")
    if digest != manifest_digest(manifest, stage_tensors(manifest, name)):
        raise AcctattrError(f"{index}: {manifest.path} changed since the embeddings were "
                            "computed: its model, stages or training loss differ",
                            redo)
    if [s.get("name") for s in stages] != stage_names:
        raise AcctattrError(f"{index}: holds stages "
                            f"{', '.join(str(s.get('name')) for s in stages)}, the manifest "
                            f"{', '.join(stage_names)}", redo)
    root = manifest.root.resolve()
    current = {os.path.relpath(p.resolve(), root): what for what, p in input_files(manifest)}
    recorded = {i["path"]: i for i in inputs}
    for rel, what in current.items():
        if rel not in recorded:
            raise AcctattrError(f"{index}: {what} {root / rel} was not an input when the "
                                "embeddings were computed", redo)
    for rel, entry in recorded.items():
        file = root / rel
        if entry.get("what") == "manifest":
            continue  # its embedding part is compared above; its eval sections may change
        if not file.is_file():
            raise AcctattrError(f"{file}: {entry.get('what')} is gone since the embeddings in "
                                f"{folder} were computed", redo)
        if sha256(file) != entry.get("sha256"):
            raise AcctattrError(f"{file}: {entry.get('what')} changed since the embeddings in "
                                f"{folder} were computed (sha256 {entry.get('sha256')}, now "
                                f"{sha256(file)})", redo)
    files = []
    for s in stages:
        file = folder / s["file"]
        if file.resolve().parent != folder.resolve():
            raise AcctattrError(f"{index}: the embedding of stage '{s['name']}' is named "
                                f"{s['file']!r}, not a file of {folder}", redo)
        if not file.is_file() or sha256(file) != s.get("sha256"):
            raise AcctattrError(f"{file}: the embedding of stage '{s.get('name')}' is "
                                f"{'missing' if not file.is_file() else 'altered'}", redo)
        files.append(file)
    cls = type("Stored", (_Stored,), {"name": name, "evaluate": ESTIMATORS[name].evaluate,
                                      "copies": 0.0})
    stored = cls(folder, files, shapes, list(est.get("warnings") or []))
    return stored, (est.get("note") if asked == "auto" else None)
