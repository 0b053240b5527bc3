"""What a manifest parses into: frozen dataclasses, one per section (SPEC section 3).

No parsing here (manifest.py) and no torch: every module that reads a run imports these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LrSpec:
    """One stage's learning rate: exactly one of the fields below is set."""

    value: float | None = None  # a constant number
    values: tuple[float, ...] | None = None  # one value per optimizer step
    schedule: str | None = None  # constant | linear | cosine
    base: float = 0.0
    warmup: int = 0
    min: float = 0.0
    trainer_state: Path | None = None  # Hugging Face trainer_state.json


@dataclass(frozen=True)
class OptimizerSpec:
    """How a stage's optimizer ran. ``None`` hyperparameters come from the state file."""

    type: str
    steps: int
    lr: LrSpec
    momentum: float | None = None
    dampening: float | None = None
    nesterov: bool | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    state: Path | None = None
    continues: bool = False
    # parameter names per optimizer param group, in the state file's id order
    param_names: tuple[tuple[str, ...], ...] | None = None
    # gradient-norm clipping (torch.nn.utils.clip_grad_norm_, Trainer's max_grad_norm);
    # None: no clipping
    max_grad_norm: float | None = None
    # examples per optimizer step: per-device batch × accumulation × processes
    batch_size: int | None = None
    # a Trainer stage without a state file (save_only_model): the Trainer's decay /
    # no-decay param groups, the first with this weight decay (training_args.bin's), the
    # second with none
    trainer_decay: float | None = None


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path


@dataclass(frozen=True)
class Stage:
    name: str
    start: Path  # resolved: the previous stage's end when not given
    end: Path
    optimizer: OptimizerSpec
    data: Path | None = None
    checkpoints: tuple[CheckpointRef, ...] = ()
    # the stage trained a PEFT LoRA adapter (``end: {adapter: DIR}``); ``end`` is that folder
    # and the stage left every base weight it did not adapt untouched
    adapter: bool = False
    # JSONL ``data``: the tokenizer folder and length it is tokenised with (default: eval's)
    tokenizer: Path | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Ref:
    """A ``FILE.py:FUNC`` (file resolved against the manifest) or ``package.module:FUNC``."""

    text: str
    file: Path | None
    module: str | None
    func: str


@dataclass(frozen=True)
class EvalSpec:
    inputs: tuple[str, ...]
    target: str
    metric: str | Ref  # a builtin name or a user function
    data: Path | None = None
    data_fn: Ref | None = None
    group: str | None = None
    batch_size: int = 256
    higher_is_better: bool | None = None  # overrides the metric's own direction
    # JSONL ``data``: the run's tokenizer folder and the length examples are truncated to
    tokenizer: Path | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    factory: Ref | None  # None when the model is a Hugging Face folder (``hf``)
    stages: tuple[Stage, ...]
    eval: EvalSpec
    train_loss: str | Ref = "cross_entropy"
    replay: Ref | None = None
    hf: Path | None = None  # model: {hf: DIR}: built from DIR/config.json
    hf_class: str | None = None  # model.class: the transformers class to build
    # every behaviour (name, eval section) in manifest order: ``evals:`` or the one
    # ``eval:`` (named "eval"); ``eval`` above is the first
    evals: tuple[tuple[str, EvalSpec], ...] = ()

    @property
    def behaviours(self) -> tuple[tuple[str, EvalSpec], ...]:
        return self.evals or (("eval", self.eval),)

    @property
    def root(self) -> Path:
        return self.path.parent

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)
