"""A PEFT LoRA stage's end checkpoint: the previous weights plus the merged adapter delta.

For a LoRA module with matrices A [r, in] and B [out, r] the merged delta of its base weight
is (PEFT's ``get_delta_weight``)

    delta W = scaling * B @ A            scaling = alpha / r  (alpha / sqrt(r) with rslora)

transposed when ``fan_in_fan_out`` (GPT-2's Conv1D keeps weights as [in, out]); an embedding
adapter (``lora_embedding_A`` [r, num], ``lora_embedding_B`` [dim, r]) merges as
scaling * (B @ A).T. r is read from A's shape, alpha from ``alpha_pattern`` where a pattern
names the module, else ``lora_alpha``. Every other parameter equals the previous stage's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from acctattr.errors import CheckpointError
from acctattr.runs.checkpoints import StateDictReader, open_checkpoint
from acctattr.runs.formats import FormatError, LoraConfig, adapter_weights, read_lora_config

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>embedding_)?"
                  r"(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: a key matches a module path ending in it (a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraMergedReader(StateDictReader):
    """The weights after a LoRA stage: ``base`` (the stage's start) plus merged deltas."""

    def __init__(self, base: StateDictReader, folder: Path, stage: str,
                 model_names: set[str]) -> None:
        super().__init__(folder)
        self.base = base
        self.stage = stage
        try:
            self.config: LoraConfig = read_lora_config(folder)
            weights = adapter_weights(folder)
        except FormatError as e:
            raise CheckpointError(f"stage '{stage}': end adapter: {e}") from e
        self.adapter = open_checkpoint(weights)
        self._pairs = self._match(weights, model_names)

    def held(self) -> int:
        return self.base.held() + self.adapter.held()

    def release(self) -> None:
        self.base.release()
        self.adapter.release()

    def _match(self, weights: Path, model_names: set[str]) -> dict[str, tuple[str, str, bool]]:
        """Model parameter name -> (A key, B key, embedding?) for every adapted module."""
        found: dict[str, dict[str, str]] = {}
        embedding: dict[str, bool] = {}
        for key in self.adapter.names():
            m = _KEY.match(key)
            if m is None:
                raise CheckpointError(
                    f"stage '{self.stage}': adapter {weights}: tensor '{key}' is not a LoRA "
                    "matrix (lora_A / lora_B); the adapter trained more than LoRA matrices",
                    "merge it with peft's merge_and_unload(), save the merged model and name "
                    "that folder as the stage's end")
            param = f"{m['module']}.weight"
            if param not in model_names:
                raise CheckpointError(
                    f"stage '{self.stage}': adapter {weights}: '{key}' adapts '{param}', which "
                    "the model has no parameter named",
                    "the adapter must have been trained on the model the manifest builds")
            found.setdefault(param, {})[m["ab"]] = key
            embedding[param] = bool(m["kind"])
        out = {}
        for param, ab in sorted(found.items()):
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"stage '{self.stage}': adapter {weights}: '{param}' "
                                      f"has lora_{''.join(ab)} but not both A and B")
            out[param] = (ab["A"], ab["B"], embedding[param])
        if not out:
            raise CheckpointError(f"stage '{self.stage}': adapter {weights} holds no LoRA "
                                  "matrices")
        return out

    @property
    def adapted(self) -> list[str]:
        """Names of the base parameters the adapter changes."""
        return list(self._pairs)

    def delta(self, name: str) -> torch.Tensor:
        """The merged delta of one adapted parameter, float64, shaped like the parameter."""
        a_key, b_key, is_embedding = self._pairs[name]
        a, b = self.adapter.get(a_key), self.adapter.get(b_key)
        for key, t in ((a_key, a), (b_key, b)):
            if not t.is_floating_point():
                raise CheckpointError(f"stage '{self.stage}': adapter {self.adapter.path}: "
                                      f"'{key}' is {t.dtype}, not floating point")
        a, b = a.double(), b.double()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise CheckpointError(
                f"stage '{self.stage}': adapter {self.adapter.path}: '{a_key}' {tuple(a.shape)} "
                f"and '{b_key}' {tuple(b.shape)} are not a linear LoRA pair of rank >= 1 "
                "(convolution adapters are not supported)",
                "merge it with peft's merge_and_unload() and name the merged model as the end")
        module = name[: -len(".weight")]
        r = a.shape[0]
        alpha = float(_pattern_value(self.config.alpha_pattern, module, self.config.alpha))
        scaling = alpha / math.sqrt(r) if self.config.use_rslora else alpha / r
        delta = scaling * (b @ a)
        if is_embedding or self.config.fan_in_fan_out:
            delta = delta.T
        shape = self.base.shape(name)
        if tuple(delta.shape) != shape:
            raise CheckpointError(
                f"stage '{self.stage}': adapter {self.adapter.path}: merged delta of '{name}' "
                f"has shape {tuple(delta.shape)} but the parameter has {shape}",
                "check fan_in_fan_out in adapter_config.json")
        return delta

    # ---------------------------------------------------------------- reader API
    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> str:
        return self.base.dtype(name)

    def torch_dtype(self, name: str) -> torch.dtype | None:
        return self.base.torch_dtype(name)

    def get_flat(self, name: str, start: int, stop: int, *,
                 native: bool = False) -> torch.Tensor:
        return self.get(name, native=native).reshape(-1)[start:stop]

    def get(self, name: str, *, check_finite: bool = True,
            native: bool = False) -> torch.Tensor:
        w = self.base.get(name, check_finite=check_finite, native=native)
        if name not in self._pairs:
            return w
        merged = (w.double() + self.delta(name)).to(w.dtype)
        if check_finite and not bool(torch.isfinite(merged).all()):
            raise CheckpointError(
                f"stage '{self.stage}': adapter {self.adapter.path}: merging it gives NaN or "
                f"Inf values in '{name}' ({w.dtype})",
                "the adapter's lora_A / lora_B are too large to merge: check the file")
        return merged
