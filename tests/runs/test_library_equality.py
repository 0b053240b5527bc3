"""Where acctattr keeps its own version of what a training library does, it equals the
library on real objects: HF learning-rate schedules, the Trainer's decay / no-decay split,
PEFT's merged LoRA delta, and trainer_state.json as transformers reads it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from acctattr.evaluation.model import hf_no_decay
from acctattr.runs import formats
from acctattr.runs.checkpoints import open_checkpoint
from acctattr.runs.schedules import schedule_lrs

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------- schedules

def _hf_lrs(name: str, steps: int, base: float, warmup: int, **kw) -> list[float]:
    """The lr each optimizer step used under transformers.get_scheduler."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup,
                                       num_training_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("hf_name,ours,min_rate", [
    ("linear", "linear", None), ("cosine", "cosine", None),
    ("constant_with_warmup", "constant", None), ("constant", "constant", None),
    ("cosine_with_min_lr", "cosine", 0.1),
])
@pytest.mark.parametrize("steps,warmup", [(1, 0), (7, 0), (40, 5), (40, 39), (100, 10)])
def test_schedules_equal_transformers(hf_name, ours, min_rate, steps, warmup):
    """schedule_lrs gives the lr of every step that get_scheduler gives (1e-12 relative)."""
    base = 3e-4
    if hf_name == "constant":
        warmup = 0
    kw = {"scheduler_specific_kwargs": {"min_lr_rate": min_rate}} if min_rate else {}
    want = _hf_lrs(hf_name, steps, base, warmup, **kw)
    got = schedule_lrs(ours, steps, base, warmup, base * min_rate if min_rate else 0.0)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


# ---------------------------------------------------------------- decay / no-decay

class _RMSNorm(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


def _models():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    yield "gpt2", GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
                                             n_positions=8))
    yield "llama", LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                num_key_value_heads=1, vocab_size=32))
    yield "bert", BertForSequenceClassification(BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        vocab_size=32, max_position_embeddings=8))
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                              torch.nn.GroupNorm(2, 8), torch.nn.LayerNorm(8), _RMSNorm(8),
                              torch.nn.Linear(8, 2, bias=False))
    net.add_module("final_norm", _RMSNorm(2))
    net.add_module("norm", _RMSNorm(2))
    yield "custom", net


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda x: x if isinstance(x, str)
                         else "")
def test_no_decay_equals_trainer(name, model):
    """hf_no_decay is exactly what Trainer.get_decay_parameter_names leaves out."""
    params = {n for n, _ in model.named_parameters()}
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model)) & params
    assert hf_no_decay(model) == params - decay
    assert params - decay, "the model must have no-decay parameters"


# ---------------------------------------------------------------- PEFT merged delta

def test_lora_merged_weights_equal_merge_and_unload(tmp_path):
    """start + LoraMergedReader's delta equals PEFT's merge_and_unload() for GPT-2 Conv1D
    (fan_in_fan_out), rslora, rank_pattern and alpha_pattern, and an embedding adapter."""
    peft = pytest.importorskip("peft")
    from formats_runs import tiny_gpt2

    from acctattr.runs.lora import LoraMergedReader

    model = tiny_gpt2()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in base_sd.items() if k != "lm_head.weight"},
              tmp_path / "base.safetensors")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"],
                          fan_in_fan_out=True, use_rslora=True, lora_dropout=0.0,
                          rank_pattern={"mlp.c_proj": 2}, alpha_pattern={"c_attn": 12})
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # B starts at zero: give every matrix a real value
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload().state_dict()
    names = {n for n, _ in tiny_gpt2().named_parameters()}
    reader = LoraMergedReader(open_checkpoint(tmp_path / "base.safetensors"),
                              tmp_path / "adapter", "lora", names)
    assert len(reader.adapted) == 4  # c_attn, attn.c_proj, mlp.c_proj, wte
    for n in reader.names():
        want = merged[n]
        got = reader.get(n)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), n
        if n in reader.adapted:
            assert not torch.allclose(want, base_sd[n]), n


# ---------------------------------------------------------------- trainer_state.json

def test_trainer_state_read_as_transformers_reads_it(tmp_path):
    """formats.read_trainer_state gives the global_step and log_history that
    transformers.TrainerState.load_from_json reads from a real Trainer's file."""
    from formats_runs import _args, _Tokens, tiny_gpt2

    transformers.Trainer(model=tiny_gpt2(), args=_args(tmp_path / "out", 5, 1e-2,
                                                       logging_steps=2),
                         train_dataset=_Tokens(1)).train()
    file = tmp_path / "out" / "checkpoint-5" / formats.TRAINER_STATE
    theirs = transformers.TrainerState.load_from_json(str(file))
    ours = formats.read_trainer_state(file)
    assert ours.global_step == theirs.global_step == 5
    assert list(ours.log_history) == theirs.log_history
    assert [s for s, _ in ours.lr_points] == [h["step"] - 1 for h in theirs.log_history
                                              if "learning_rate" in h]
    assert formats.trainer_batch_size(file.parent) == theirs.train_batch_size == 4
    assert json.loads(file.read_text())["global_step"] == 5
