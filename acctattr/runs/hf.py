"""Build a Hugging Face transformers model from a local folder's config (``model: {hf: DIR}``).

Only the architecture comes from the folder (``config.json``); the weights always come from
the stage checkpoints. Nothing is downloaded and no remote code runs. transformers is an
optional dependency: ``pip install 'acctattr[hf]'``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from acctattr.errors import AcctattrError


def build_hf_model(folder: Path, cls: str | None = None) -> nn.Module:
    """The model ``folder/config.json`` describes, randomly initialised, in eval mode.

    Args:
        folder: a local folder holding ``config.json`` (a Trainer checkpoint folder will do).
        cls: a transformers class name (``GPT2ForSequenceClassification``,
            ``AutoModelForCausalLM``, ...); default: the config's ``architectures[0]``,
            else ``AutoModel``.
    """
    where = f"model.hf {folder}"
    try:
        import transformers
    except ImportError as e:
        raise AcctattrError(f"{where}: building a Hugging Face model needs transformers, "
                            "which is not installed",
                            "pip install 'acctattr[hf]' (or pip install transformers)") from e
    from acctattr.files import is_file

    if not is_file(folder / "config.json"):
        raise AcctattrError(f"{where}: no config.json in that folder",
                            "point model.hf at a folder saved with save_pretrained() or a "
                            "Trainer checkpoint-N folder")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                         trust_remote_code=False)
    except Exception as e:
        raise AcctattrError(f"{where}: config.json could not be read: {type(e).__name__}: {e}",
                            "the config must name a model type this transformers version "
                            "knows (no remote code is run)") from e
    name = cls or next(iter(getattr(config, "architectures", None) or []), "AutoModel")
    klass = getattr(transformers, name, None)
    if klass is None:
        raise AcctattrError(f"{where}: transformers has no class {name!r}",
                            "set model.class to a transformers model class name")
    try:
        # eager attention: forward-mode AD (the linear evaluation) needs every op's JVP
        if name.startswith("Auto"):
            model = klass.from_config(config, attn_implementation="eager")
        else:
            model = klass._from_config(config, attn_implementation="eager")
    except Exception as e:
        raise AcctattrError(f"{where}: building {name} from config.json failed: "
                            f"{type(e).__name__}: {e}",
                            "set model.class to the class the checkpoints were saved from") from e
    return model.float().eval()
