"""Optimizer state -> named tensors and per-group hyperparameters (acctattr/optim_state.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from acctattr.errors import CheckpointError
from acctattr.evaluation.model import model_info
from acctattr.runs.manifest import LrSpec, OptimizerSpec
from acctattr.runs.optim_state import load_optimizer_state


def build() -> nn.Module:
    """Linear -> LayerNorm -> Linear: biases and the LayerNorm weight share shape (5,)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean() + sum(p.sum() for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()


def spec(typ: str, state: Path | None, **kw) -> OptimizerSpec:
    return OptimizerSpec(type=typ, steps=3, lr=LrSpec(value=0.01), state=state, **kw)


def load(model: nn.Module, sp: OptimizerSpec):
    info = model_info(model)
    return load_optimizer_state(sp, "ft", info.trainable, set(info.no_decay))


def expected_by_name(model: nn.Module, opt: torch.optim.Optimizer, key: str):
    return {n: opt.state[p][key] for n, p in model.named_parameters() if p in opt.state}


def test_one_group_maps_ids_in_parameter_order(tmp_path):
    """One param group: state id i is the i-th trainable parameter of named_parameters()."""
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    st = load(model, spec("sgd", tmp_path / "optimizer.pt"))
    want = expected_by_name(model, opt, "momentum_buffer")
    assert sorted(st.params()) == sorted(want)
    for name, t in want.items():
        assert torch.equal(st.tensor(name, "momentum_buffer"), t)
    (g,) = st.groups
    assert g.names == tuple(n for n, _ in model.named_parameters())
    assert (g.momentum, g.weight_decay, g.dampening, g.nesterov) == (0.9, 0.01, 0.0, False)


def test_two_groups_follow_the_hugging_face_decay_rule(tmp_path):
    """Two groups map as HF decay (weights) / no-decay (biases, norm parameters), values exact."""
    model = build()
    decay = [p for n, p in model.named_parameters() if n in ("0.weight", "2.weight")]
    no_decay = [p for n, p in model.named_parameters() if n not in ("0.weight", "2.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.01, betas=(0.8, 0.95), eps=1e-7)
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    st = load(model, spec("adamw", tmp_path / "optimizer.pt"))
    assert [g.names for g in st.groups] == [("0.weight", "2.weight"),
                                           ("0.bias", "1.weight", "1.bias", "2.bias")]
    for key in ("exp_avg", "exp_avg_sq"):
        for name, t in expected_by_name(model, opt, key).items():
            # 0.bias, 1.weight, 1.bias all have shape (5,): only the right mapping matches
            assert torch.equal(st.tensor(name, key), t), (name, key)
    assert st.step == 3
    assert [g.weight_decay for g in st.groups] == [0.1, 0.0]
    assert all((g.beta1, g.beta2, g.eps) == (0.8, 0.95, 1e-7) for g in st.groups)


def test_manifest_hyperparameters_override_the_state_file(tmp_path):
    """A hyperparameter stated in the manifest wins over every group's state-file value."""
    model = build()
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight],
                              "weight_decay": 0.1},
                             {"params": [model[0].bias, model[1].weight, model[1].bias,
                                         model[2].bias], "weight_decay": 0.0}], lr=0.01)
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    st = load(model, spec("adamw", tmp_path / "optimizer.pt", weight_decay=0.3,
                          betas=(0.5, 0.6)))
    assert [g.weight_decay for g in st.groups] == [0.3, 0.3]
    assert [(g.beta1, g.beta2) for g in st.groups] == [(0.5, 0.6), (0.5, 0.6)]
    assert [g.eps for g in st.groups] == [1e-8, 1e-8]  # not stated: from the file


def test_param_names_override_maps_three_groups(tmp_path):
    """optimizer.param_names maps any grouping, here three groups in a custom order."""
    model = build()
    named = dict(model.named_parameters())
    groups = [["2.weight", "0.weight"], ["1.bias", "1.weight"], ["2.bias", "0.bias"]]
    opt = torch.optim.SGD([{"params": [named[n] for n in g], "weight_decay": wd}
                           for g, wd in zip(groups, (0.1, 0.0, 0.02), strict=True)],
                          lr=0.1, momentum=0.9)
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    st = load(model, spec("sgd", tmp_path / "optimizer.pt",
                          param_names=tuple(tuple(g) for g in groups)))
    assert [list(g.names) for g in st.groups] == groups
    assert [g.weight_decay for g in st.groups] == [0.1, 0.0, 0.02]
    for name, t in expected_by_name(model, opt, "momentum_buffer").items():
        assert torch.equal(st.tensor(name, "momentum_buffer"), t), name
    assert st.group_of()["1.weight"] == 1


def test_three_groups_without_param_names_are_refused(tmp_path):
    """Three groups cannot be guessed: the error asks for optimizer.param_names."""
    model = build()
    ps = list(model.parameters())
    opt = torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:4]}, {"params": ps[4:]}], lr=0.1,
                          momentum=0.9)
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError) as info:
        load(model, spec("sgd", tmp_path / "optimizer.pt"))
    assert "3 param groups" in str(info.value) and "optimizer.param_names" in str(info.value)


def test_shape_mismatch_names_param_names_as_the_fix(tmp_path):
    """State in an order that does not fit the model is a shape error pointing at param_names."""
    model = build()
    opt = torch.optim.SGD(list(model.parameters())[::-1], lr=0.1, momentum=0.9)
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError) as info:
        load(model, spec("sgd", tmp_path / "optimizer.pt"))
    text = str(info.value)
    assert "stage 'ft'" in text and "optimizer.pt" in text and "shape" in text
    assert "optimizer.param_names" in text


def test_wrong_count_in_one_group(tmp_path):
    """A one-group state with fewer tensors than trainable parameters is refused."""
    model = build()
    opt = torch.optim.SGD(list(model.parameters())[:4], lr=0.1, momentum=0.9)
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="4 tensors but the model has 6"):
        load(model, spec("sgd", tmp_path / "optimizer.pt"))


@pytest.mark.parametrize(("written_by", "declared"), [("sgd", "adamw"), ("adam", "sgd")])
def test_state_of_another_optimizer_type_is_refused(tmp_path, written_by, declared):
    """A state file written by SGD is refused for an Adam manifest stage, and vice versa."""
    model = build()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if written_by == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    train_steps(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError) as info:
        load(model, spec(declared, tmp_path / "optimizer.pt"))
    assert f"optimizer.type is {declared}" in str(info.value)


def test_safetensors_state_file(tmp_path):
    """A safetensors state file with '<param>.<state>' keys maps by parameter name."""
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    train_steps(model, opt)
    tensors = {}
    for name, p in model.named_parameters():
        tensors[f"{name}.exp_avg"] = opt.state[p]["exp_avg"]
        tensors[f"{name}.exp_avg_sq"] = opt.state[p]["exp_avg_sq"]
    tensors["0.weight.step"] = torch.tensor(3.0)
    save_file(tensors, tmp_path / "optimizer.safetensors")
    st = load(model, spec("adamw", tmp_path / "optimizer.safetensors", weight_decay=0.05))
    for key in ("exp_avg", "exp_avg_sq"):
        for name, t in expected_by_name(model, opt, key).items():
            assert torch.equal(st.tensor(name, key), t)
    assert st.step == 3
    assert [g.weight_decay for g in st.groups] == [0.05]


def test_safetensors_state_with_unknown_key_is_refused(tmp_path):
    """A key that is not <trainable parameter>.<state name> is refused, naming the key."""
    model = build()
    save_file({"0.weight.momentum": torch.zeros(5, 4)}, tmp_path / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="'0.weight.momentum'"):
        load(model, spec("sgd", tmp_path / "optimizer.safetensors"))


def test_no_state_file_uses_manifest_and_torch_defaults():
    """Without a state file, one group holds every trainable parameter with manifest values."""
    model = build()
    st = load(model, spec("adamw", None, eps=1e-6))
    (g,) = st.groups
    assert g.names == tuple(n for n, _ in model.named_parameters())
    assert (g.weight_decay, g.beta1, g.beta2, g.eps) == (0.01, 0.9, 0.999, 1e-6)
    assert st.params() == set() and st.step is None


@pytest.mark.parametrize("bad,key", [(float("nan"), "exp_avg"), (float("inf"), "exp_avg_sq"),
                                     (-float("inf"), "exp_avg"), (float("nan"), "exp_avg_sq")])
def test_nan_or_inf_anywhere_in_a_moment_is_refused_by_name(tmp_path, bad, key):
    """One NaN, +Inf or -Inf anywhere in a torch.save state tensor (the load-time check's
    single min/max pass): refused, naming the state and the parameter."""
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train_steps(model, opt)
    sd = opt.state_dict()
    sd["state"][4][key].view(-1)[7] = bad  # the second Linear's weight, (3, 5)
    torch.save(sd, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError) as info:
        load(model, spec("adamw", tmp_path / "opt.pt"))
    text = str(info.value)
    assert f"state '{key}' of '2.weight'" in text and "NaN or Inf" in text, text


def test_moment_range_checks_still_see_the_extremes(tmp_path):
    """A negative second moment and a first moment beyond 1e15 are still refused, with the
    value found (min and max|x| from one pass)."""
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    train_steps(model, opt)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_sq"][1, 2] = -0.25
    torch.save(sd, tmp_path / "neg.pt")
    with pytest.raises(CheckpointError, match=r"negative values \(down to -0.25\)"):
        load(model, spec("adamw", tmp_path / "neg.pt"))
    sd["state"][0]["exp_avg_sq"][1, 2] = 0.0
    sd["state"][3]["exp_avg"][0] = -3e16  # the largest |x| is negative
    torch.save(sd, tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"reaches 3e\+16, beyond 1e\+15"):
        load(model, spec("adamw", tmp_path / "big.pt"))
