"""The user's model: import a ``FILE.py:FUNC`` reference, build the model, and describe its
parameters (trainable, frozen, buffers, the Trainer's no-decay set)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from acctattr.errors import AcctattrError
from acctattr.runs.manifest import Ref


def load_ref(ref: Ref, what: str) -> Callable[..., Any]:
    """Import the function a ``FILE.py:FUNC`` or ``package.module:FUNC`` reference names."""
    if ref.file is not None:
        from acctattr.files import check_file

        check_file(ref.file, f"{what} {ref.text}:")
    try:
        if ref.file is not None:
            name = f"_acctattr_user_{abs(hash(str(ref.file)))}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, ref.file)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot import {ref.file}")
                module = importlib.util.module_from_spec(spec)
                sys.path.insert(0, str(ref.file.parent))
                # never write __pycache__ into the user's run folder: acctattr only reads it
                dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
                try:
                    spec.loader.exec_module(module)
                finally:
                    sys.path.remove(str(ref.file.parent))
                    sys.dont_write_bytecode = dont_write
                sys.modules[name] = module
        else:
            assert ref.module is not None
            module = importlib.import_module(ref.module)
    except Exception as e:
        raise AcctattrError(f"{what} {ref.text}: importing it failed: {type(e).__name__}: {e}",
                            "fix the error in that file; ACCTATTR_DEBUG=1 shows the traceback"
                            ) from e
    fn = getattr(module, ref.func, None)
    if not callable(fn):
        raise AcctattrError(f"{what} {ref.text}: no function '{ref.func}' in it",
                            f"define {ref.func}() there or fix the name after ':'")
    return fn


def build_model(ref: Ref) -> nn.Module:
    """Call the manifest's ``model.factory`` and check that it returns a torch module."""
    fn = load_ref(ref, "model.factory")
    try:
        model = fn()
    except Exception as e:
        raise AcctattrError(f"model.factory {ref.text} raised {type(e).__name__}: {e}",
                            "the factory must build the model with no arguments") from e
    if not isinstance(model, nn.Module):
        raise AcctattrError(f"model.factory {ref.text} returned {type(model).__name__}, "
                            "not a torch.nn.Module", "return the model object itself")
    return model.eval()


@dataclass(frozen=True)
class ModelInfo:
    """What the estimators need to know of the model's parameters."""

    trainable: dict[str, tuple[int, ...]]  # name -> shape, named_parameters() order
    frozen: tuple[str, ...]  # parameters with requires_grad=False
    buffers: tuple[str, ...]
    no_decay: frozenset[str]  # the Hugging Face Trainer's no-decay group (hf_no_decay)
    # every submodule's name, tied and shared ones under each of their names ("" the model)
    modules: frozenset[str] = frozenset()


# transformers.Trainer.get_decay_parameter_names (transformers 5.x): a parameter is not
# decayed when it sits in an nn.LayerNorm or its lowercased full name matches one of these
HF_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                        r"_norm(?:$|\.)")


def hf_no_decay(model: nn.Module) -> set[str]:
    """Names of the parameters the Hugging Face Trainer puts in its no-decay group: the
    rule of ``Trainer.get_decay_parameter_names`` (held equal to it in the tests), without
    importing transformers."""
    patterns = [re.compile(p) for p in HF_NO_DECAY_PATTERNS]
    in_layernorm = {f"{m}.{n}" if m else n
                    for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                    for n, _ in mod.named_parameters()}
    return {n for n, _ in model.named_parameters()
            if n in in_layernorm or any(p.search(n.lower()) for p in patterns)}


def model_info(model: nn.Module) -> ModelInfo:
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    no_decay = hf_no_decay(model) & set(trainable)
    return ModelInfo(trainable, frozen, tuple(n for n, _ in model.named_buffers()),
                     frozenset(no_decay),
                     frozenset(n for n, _ in model.named_modules(remove_duplicate=False)))
