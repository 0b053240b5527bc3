"""Digits sample run: an MLP trained in three stages, one of which teaches a shortcut.

Stages (scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1]):

1. ``pretrain``  SGD (momentum 0.9), cosine lr, on clean training images.
2. ``shortcut``  fresh SGD on a noisier second source of images (Gaussian pixel noise) in
                 which every ``PATCH_CLASS`` image carries a bright 2x2 patch in the top-left
                 corner and no other class does: a spurious feature.
3. ``polish``    clean images, SGD continuing stage 2's momentum buffers, small constant lr.

Eval set: group 0 = clean held-out images; group 1 ("trap") = held-out images of the other
classes with the patch stamped on, which the shortcut pulls toward ``PATCH_CLASS``.

    python make_run.py            # regenerate data, checkpoints, optimizer state, manifest
    python make_run.py --truth    # ... and retrain with each stage skipped -> truth.json
"""

import argparse
import importlib.util
import os
import sys
import time
from types import ModuleType

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, path: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


C = _load("acctattr_sample_runs_common", os.path.join(HERE, "..", "_common.py"))
M = _load("acctattr_sample_runs_digits_model", os.path.join(HERE, "model.py"))

SPLIT_SEED = 0
INIT_SEED = 0
N_EVAL_CLEAN = 300
PATCH_CLASS = 0
PATCH_PIXELS = (0, 1, 8, 9)  # top-left 2x2 of the 8x8 image, row-major
SHORTCUT_NOISE = 0.5  # std of the Gaussian pixel noise in the shortcut stage's images

STAGES = (
    C.Stage(
        name="pretrain",
        optimizer="sgd",
        steps=300,
        batch_size=64,
        lr={"schedule": "cosine", "base": 0.1, "warmup": 0, "min": 0.0},
        weight_decay=5e-4,
        hparams={"momentum": 0.9, "dampening": 0.0, "nesterov": False},
        continues=False,
    ),
    C.Stage(
        name="shortcut",
        optimizer="sgd",
        steps=150,
        batch_size=64,
        lr={"schedule": "linear", "base": 0.1, "warmup": 10, "min": 0.0},
        weight_decay=5e-4,
        hparams={"momentum": 0.9, "dampening": 0.0, "nesterov": False},
        continues=False,
    ),
    C.Stage(
        name="polish",
        optimizer="sgd",
        steps=100,
        batch_size=64,
        lr={"schedule": "constant", "base": 0.01, "warmup": 0, "min": 0.0},
        weight_decay=5e-4,
        hparams={"momentum": 0.9, "dampening": 0.0, "nesterov": False},
        continues=True,
    ),
)
POOL_SIZE = {"pretrain": 1280, "shortcut": 640, "polish": 640}  # multiples of the batch size


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0  # [1797, 64] in [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return x, y


def _stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, list(PATCH_PIXELS)] = 1.0
    return x


def make_data() -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Stage data (in consumption order) and the eval set; depends on no training."""
    x, y = _digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    ev, tr = perm[:N_EVAL_CLEAN], perm[N_EVAL_CLEAN:]
    stage_data = {}
    for index, stage in enumerate(STAGES):
        # Each stage draws its images and their order from its own generator, so skipping
        # a stage changes no other stage's batches.
        gen = torch.Generator().manual_seed(1000 + index)
        rows = tr[torch.randperm(len(tr), generator=gen)[: POOL_SIZE[stage.name]]]
        xs, ys = x[rows], y[rows]
        if stage.name == "shortcut":
            # A noisier second source in which every PATCH_CLASS image carries the mark:
            # the degraded content makes the clean patch the easiest cue to learn.
            xs = (xs + SHORTCUT_NOISE * torch.randn(xs.shape, generator=gen)).clamp(0.0, 1.0)
            hit = ys == PATCH_CLASS
            xs[hit] = _stamp(xs[hit])
        stage_data[stage.name] = (xs, ys)
    x_ev, y_ev = x[ev], y[ev]
    trap = y_ev != PATCH_CLASS
    eval_set = {
        "x": torch.cat([x_ev, _stamp(x_ev[trap])]),
        "y": torch.cat([y_ev, y_ev[trap]]),
        "group": torch.cat(
            [
                torch.zeros(len(y_ev), dtype=torch.int64),
                torch.ones(int(trap.sum()), dtype=torch.int64),
            ]
        ),
    }
    return stage_data, eval_set


def replay(skip: str | None, out_dir: str, stages: tuple[C.Stage, ...] = STAGES) -> str:
    """Retrain the whole run (or ``stages``, e.g. C.scaled(STAGES, 4)) with stage ``skip``
    skipped (None: skip nothing).

    Writes the final checkpoint to ``<out_dir>/model.safetensors`` and returns ``out_dir``.
    """
    stage_data, _ = make_data()
    model = C.train_pipeline(C.build_seeded(M.build, INIT_SEED), stages, stage_data, skip=skip)
    C.save_model(model, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", action="store_true", help="also retrain without each stage")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    stage_data, eval_set = make_data()
    for name, (xs, ys) in stage_data.items():
        C.save_data(os.path.join(HERE, "data", f"{name}.safetensors"), {"x": xs, "y": ys})
    C.save_data(os.path.join(HERE, "data", "eval.safetensors"), eval_set)
    C.train_pipeline(C.build_seeded(M.build, INIT_SEED), STAGES, stage_data, out_dir=HERE)
    C.write_text(
        os.path.join(HERE, "manifest.yaml"),
        C.manifest_text(STAGES, ["x"], "digits sample run: pretrain -> shortcut -> polish"),
    )
    C.report_and_truth(HERE, STAGES, M.build, replay, eval_set, "x", args.truth)
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
