"""The lm sample run's stages on a tiny Llama under a cosine schedule (sample_runs/lm/
make_run.py's ``build_run(folder, arch="llama")``, as ``make_run.py --arch llama`` writes
it): an architecture and a schedule acctattr was not tuned on (RoPE, RMSNorm, SwiGLU,
untied input and output embeddings, attention dropout; Trainer's AdamW with its decay
groups, warmup, clipping and accumulation kept), against retraining.

The README's figures ("Fidelity", lm-llama) come from ``bench/fidelity.py --runs
--lm-variants lm-llama``; these are looser versions of them."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from acctattr import pipeline
from acctattr.loading import _stage_lrs
from acctattr.runs import formats
from acctattr.runs.schedules import interpolate_logged_lrs, schedule_lrs

MAKE_RUN = Path(__file__).resolve().parents[2] / "sample_runs" / "lm" / "make_run.py"


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _make_run():
    spec = importlib.util.spec_from_file_location("acctattr_test_llama_make_run", MAKE_RUN)
    assert spec is not None and spec.loader is not None
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    return mr


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(make_run module, the Llama run's manifest, its eval tensors)."""
    from transformers.utils import logging

    mr = _make_run()
    folder = tmp_path_factory.mktemp("lm-llama")
    verbosity = logging.get_verbosity()  # Trainer sets it process-wide (to errors only)
    try:
        manifest = mr.build_run(folder, arch="llama")
    finally:
        logging.set_verbosity(verbosity)
    return mr, manifest, mr.make_data()[1]


def test_the_llama_run_states_the_cosine_schedule_trainer_ran(llama):
    """The manifest's lr (``{schedule: cosine, base, warmup, min}``) gives, step for step,
    the learning rates Trainer logged in trainer_state.json (what acctattr reads when a
    Trainer folder's manifest gives no lr), and they are not the linear schedule's; the
    model is a Llama with untied embeddings; the decay / no-decay groups acctattr maps
    are the sizes Trainer's optimizer.pt holds."""
    mr, manifest, _ = llama
    loaded = pipeline.check(manifest)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(loaded.info.trainable)
    assert not loaded.model.config.tie_word_embeddings
    assert loaded.model.config.attention_dropout == 0.1
    for stage, run in zip(loaded.manifest.stages, loaded.runs, strict=True):
        steps, _, _, peak, warmup = mr.STAGES[stage.name]
        spec = stage.optimizer.lr
        assert (spec.schedule, spec.base, spec.warmup, spec.min) == ("cosine", peak, warmup,
                                                                      0.0)
        stated = list(_stage_lrs(stage, []))
        ts = formats.read_trainer_state(manifest.parent / f"{stage.name}/checkpoint-{steps}")
        logged, guessed = interpolate_logged_lrs(ts.lr_points, ts.global_step - steps, steps)
        assert guessed == 0 and len(stated) == steps
        assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
                   for a, b in zip(stated, logged, strict=True)), stage.name
        linear = schedule_lrs("linear", steps, peak, warmup)
        assert max(abs(a - b) for a, b in zip(stated, linear, strict=True)) > 0.1 * peak
        groups = torch.load(manifest.parent / f"{stage.name}/checkpoint-{steps}/optimizer.pt",
                            weights_only=True)["param_groups"]
        assert [len(g.names) for g in run.state.groups] == [len(g["params"]) for g in groups]
        assert [g.weight_decay for g in run.state.groups] == [g["weight_decay"] for g in groups]
        assert run.max_grad_norm == 1.0


def test_auto_tracks_retraining_on_the_llama_run(llama):
    """auto keeps unrolled. pretrain: >= 0.9 per example against retraining, sign right,
    mean within 25% (README: 0.999, -4%). sft: its truth moves between Trainer seeds (the
    first two seeds' per-example effects correlate 0.74; the first seed's is the outlier of
    five, README "Fidelity"), so it is held against the mean of the first two seeds' truth:
    >= 0.85 (0.912 when written; README: 0.952 against five seeds' mean) and the sign
    right. poison, the last stage, is exact: θ_T and the sft checkpoint, evaluated by
    transformers itself."""
    mr, manifest, ev = llama
    result = pipeline.run(manifest, per_example=True)
    assert result.estimator == "unrolled", result.estimator_note
    assert result.examples is not None
    est = {s.name: torch.tensor([e.effects[s.name] for e in result.examples],
                                dtype=torch.float64) for s in result.stages}
    means = {s.name: s.effect for s in result.stages}

    def loss(folder) -> torch.Tensor:
        return mr.per_example_loss(folder, ev, "llama")

    final = loss(manifest.parent / "poison/checkpoint-32")
    assert torch.allclose(est["poison"], final - loss(manifest.parent / "sft/checkpoint-64"),
                          atol=1e-4)
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    truth: dict[tuple[str, int], torch.Tensor] = {}
    tmp = manifest.parent / "replays"
    try:
        for seed, skips in ((0, ("pretrain", "sft")), (1, ("sft",))):
            full = loss(mr.replay(None, str(tmp / f"full-{seed}"), seed=seed, arch="llama"))
            if seed == 0:  # replay reproduces the run acctattr read
                assert torch.allclose(full, final, atol=1e-6)
            for skip in skips:
                cf = loss(mr.replay(skip, str(tmp / f"no-{skip}-{seed}"), seed=seed,
                                    arch="llama"))
                truth[skip, seed] = full - cf
    finally:
        logging.set_verbosity(verbosity)
    ref = truth["pretrain", 0]
    assert _pearson(est["pretrain"], ref) >= 0.9, _pearson(est["pretrain"], ref)
    assert means["pretrain"] < 0 and float(ref.mean()) < 0
    assert abs(means["pretrain"] / float(ref.mean()) - 1) < 0.25, means["pretrain"]
    two = (truth["sft", 0] + truth["sft", 1]) / 2
    assert _pearson(est["sft"], two) >= 0.85, _pearson(est["sft"], two)
    assert (means["sft"] > 0) == (float(two.mean()) > 0) == (float(truth["sft", 0].mean()) > 0)
