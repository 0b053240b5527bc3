"""A PEFT LoRA stage in the middle of a run (acctattr/estimators with an adapter stage).

init -> 'sft' (full fine-tune) -> 'lora' (PEFT LoRA adapter) -> 'polish' (full fine-tune of
the merged model), all by transformers.Trainer, with each stage's data so that unrolled
can run. The adapter stage trains none of the base weights: no estimator may ask for its
optimizer state or data, the earlier stage's perturbation passes through it unchanged, and
its own effect (its merged delta carried through 'polish') is measured. Retraining truth
comes from the same Trainer calls with the stage left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from formats_runs import N_EVAL, _args, _ce, _Tokens, tiny_gpt2, token_data
from safetensors.torch import save_file

from acctattr import pipeline


def _train(root: Path, skip: str | None):
    """Train the three stages (leaving out ``skip``) under root; returns the final model."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    model = tiny_gpt2()
    if skip != "sft":
        Trainer(model=model, args=_args(root / "sft", 8, 1e-2, weight_decay=0.1,
                                        warmup_steps=2, lr_scheduler_type="linear",
                                        logging_steps=1),
                train_dataset=_Tokens(1)).train()
    if skip != "lora":
        torch.manual_seed(5)  # the adapter's initialisation
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                          fan_in_fan_out=True, lora_dropout=0.0)
        peft_model = get_peft_model(model, lora)
        Trainer(model=peft_model, args=_args(root / "lora", 6, 5e-2, logging_steps=1),
                train_dataset=_Tokens(2)).train()
        model = peft_model.merge_and_unload()
        model.requires_grad_(True)  # PEFT froze the base weights; the next stage trains them
    if skip != "polish":
        Trainer(model=model, args=_args(root / "polish", 8, 5e-3, weight_decay=0.1,
                                        logging_steps=1),
                train_dataset=_Tokens(4)).train()
    return model.eval()


@pytest.fixture(scope="module")
def lora_middle(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-middle")
    tiny_gpt2().save_pretrained(root / "init")
    _train(root, None)
    for seed, name in ((1, "sft"), (2, "lora"), (4, "polish")):
        x, y = token_data(seed, 32)
        save_file({"input_ids": x, "label": y}, root / f"{name}.safetensors")
    x, y = token_data(3, N_EVAL)
    save_file({"input_ids": x, "label": y}, root / "eval.safetensors")
    doc = {"version": 1, "model": {"hf": "init"},
           "stages": [{"name": "sft", "start": "init", "end": "sft/checkpoint-8",
                       "optimizer": {"type": "adamw"}, "data": "sft.safetensors"},
                      {"name": "lora", "end": {"adapter": "lora/checkpoint-6"},
                       "data": "lora.safetensors"},
                      {"name": "polish", "end": "polish/checkpoint-8",
                       "optimizer": {"type": "adamw"}, "data": "polish.safetensors"}],
           "eval": {"data": "eval.safetensors", "inputs": ["input_ids"], "target": "label",
                    "batch_size": 16}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    def loss(model) -> torch.Tensor:
        with torch.no_grad():
            return _ce(model(input_ids=x).logits, y)

    final = loss(_train(root / "replay-none", None))
    truth = {name: final - loss(_train(root / f"replay-{name}", name))
             for name in ("sft", "lora", "polish")}
    return root / "manifest.yaml", final, truth


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("estimator", ["naive", "frozen", "unrolled", "auto"])
def test_every_estimator_runs_a_run_with_a_lora_stage_in_the_middle(lora_middle, estimator):
    """Every estimator runs without asking for the adapter stage's optimizer state; the
    final value is the retrained pipeline's and the last stage's effect is exact, and every
    stage's sign and ordering of examples is right. unrolled's simulation of this short
    'polish' stage (with Adam's first moment, the default) reproduces the recorded run, so
    auto keeps it."""
    manifest, final, truth = lora_middle
    result = pipeline.run(manifest, estimator, per_example=True)
    assert result.final_value == pytest.approx(float(final.mean()), abs=1e-5)
    assert result.examples is not None
    if estimator in ("unrolled", "auto"):
        assert not result.warnings, result.warnings
    if estimator == "auto":
        assert result.estimator == "unrolled", result.estimator_note
    for s in result.stages:
        est = torch.tensor([e.effects[s.name] for e in result.examples], dtype=torch.float64)
        ref = truth[s.name]
        if s.name == "polish":  # the last stage: direct, exact
            assert torch.allclose(est, ref, atol=1e-5)
        assert (s.effect > 0) == (float(ref.mean()) > 0), (s.name, s.effect,
                                                           float(ref.mean()))
        assert _pearson(est, ref) > 0.9, (s.name, _pearson(est, ref))


@pytest.mark.parametrize("estimator", ["unrolled", "auto"])
def test_without_adam_momentum_the_reproduction_check_catches_this_run(lora_middle,
                                                                        estimator):
    """Without Adam's first moment in the flow (``adam_momentum`` off) the simulation of
    'polish' lowers the loss 2.4x as far as the recorded run did and re-learns the
    adapter's effect away (sign wrong): unrolled says so, and auto takes frozen."""
    from acctattr.options import UnrolledConfig

    manifest, _, truth = lora_middle
    result = pipeline.run(manifest, estimator, per_example=True,
                          config=UnrolledConfig(adam_momentum=False))
    note = " ".join([result.estimator_note or "", *result.warnings])
    assert "'polish'" in note and "simulated run" in note, note
    if estimator == "auto":
        assert result.estimator == "frozen"


def test_the_adapter_stage_passes_earlier_perturbations_through_unchanged(lora_middle):
    """Frozen and unrolled carry sft's Delta through the adapter stage untouched (no decay,
    momentum or re-learning acts on a base weight its optimizer did not hold): with the
    adapter stage the last one after sft, v_sft equals Delta_sft exactly."""
    manifest, _, _ = lora_middle
    loaded = pipeline.check(manifest)
    loaded.runs = loaded.runs[:2]  # sft, lora
    naive = pipeline.estimator(loaded, "naive").embed(0)
    for name in ("frozen", "unrolled"):
        v = pipeline.estimator(loaded, name).embed(0)
        assert all(torch.equal(v[n], naive[n]) for n in naive), name
