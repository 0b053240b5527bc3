"""Model, eval data, metrics and the two evaluations of a stage embedding (acctattr/behavior.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from acctattr import pipeline
from acctattr.evaluation.data import EvalData
from acctattr.evaluation.evaluator import Evaluator
from acctattr.evaluation.metrics import resolve_metric
from acctattr.runs.manifest import EvalSpec, Ref

N, D_IN, D_OUT = 23, 5, 4  # 23 examples in batches of 7: the last batch is ragged


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_OUT)).double()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def direction(params: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "eval.safetensors"
    save_file({"x": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
               "y": torch.randint(0, D_OUT, (N,), generator=g),
               "y_real": torch.randn(N, D_OUT, generator=g, dtype=torch.float64),
               "grp": torch.arange(N) % 3}, path)
    return path


def evaluator(model, params, eval_file, metric, target="y", group=None) -> Evaluator:
    spec = EvalSpec(inputs=("x",), target=target, metric=metric, data=eval_file, group=group,
                    batch_size=7)
    return Evaluator(model, params, {}, EvalData(spec), resolve_metric(metric, None, "m"))


def central_difference(model, params, v, spec, metric, h: float = 1e-6) -> torch.Tensor:
    """(f(params + h v) - f(params - h v)) / 2h per example, through the Evaluator."""
    plus = Evaluator(model, shifted(params, v, h), {}, EvalData(spec), metric).values()[0]
    minus = Evaluator(model, shifted(params, v, -h), {}, EvalData(spec), metric).values()[0]
    return (plus - minus) / (2 * h)


def shifted(params, v, h):
    return {n: p + h * v[n] for n, p in params.items()}


@pytest.mark.parametrize("metric", ["cross_entropy", "margin", "logprob", "mse"])
def test_jvp_equals_central_finite_differences(eval_file, metric):
    """Evaluator.linear equals float64 central finite differences of f_i along v, per example."""
    model = mlp()
    params = params_of(model)
    v = direction(params)
    target = "y_real" if metric == "mse" else "y"
    ev = evaluator(model, params, eval_file, metric, target)
    jvp = ev.linear(v)
    assert jvp.shape == (N,) and jvp.dtype == torch.float64
    h = 1e-6
    plus, _ = evaluator(model, shifted(params, v, h), eval_file, metric, target).values()
    minus, _ = evaluator(model, shifted(params, v, -h), eval_file, metric, target).values()
    fd = (plus - minus) / (2 * h)
    assert fd.abs().max() > 1e-2, "the direction must move the metric"
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-8)
    assert float(jvp.mean()) == pytest.approx(float(fd.mean()), rel=1e-6, abs=1e-9)


def test_gradient_noise_is_the_per_example_gradient_variance():
    """Curvature.gradient_and_noise: with one example per group the noise is exactly the
    unbiased per-example variance of the loss gradient; with fewer groups the mean is still
    the full gradient and the noise an estimate of the same variance."""
    from torch.func import grad

    from acctattr.evaluation.curvature import Curvature

    model, g = mlp(), torch.Generator().manual_seed(5)
    params = params_of(model)
    sample = {"x": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
              "y": torch.randint(0, D_OUT, (N,), generator=g)}
    curv = Curvature(model, {}, resolve_metric("cross_entropy", None, "train.loss"), sample,
                     ("x",), "y", chunk=10)  # three memory chunks
    per_example = [grad(lambda p, i=i: F.cross_entropy(
        torch.func.functional_call(model, p, (sample["x"][i:i + 1],)), sample["y"][i:i + 1]))(
        params) for i in range(N)]
    full = curv.gradient(params)
    mean, noise = curv.gradient_and_noise(params, N)
    for n in params:
        stacked = torch.stack([e[n] for e in per_example])
        torch.testing.assert_close(mean[n], full[n])
        torch.testing.assert_close(noise[n], stacked.var(0))
    mean4, noise4 = curv.gradient_and_noise(params, 4)
    for n in params:
        torch.testing.assert_close(mean4[n], full[n])
        assert noise4[n].shape == params[n].shape and bool((noise4[n] >= 0).all())
    ratio = sum(float(noise4[n].sum()) for n in params) / sum(float(noise[n].sum())
                                                               for n in params)
    assert 0.3 < ratio < 3.0, ratio
    # one example: every batch is the whole data, so there is no batch noise
    one = Curvature(model, {}, resolve_metric("cross_entropy", None, "train.loss"),
                    {k: v[:1] for k, v in sample.items()}, ("x",), "y")
    g1, noise1 = one.gradient_and_noise(params, 8)
    for n in params:
        torch.testing.assert_close(g1[n], per_example[0][n])
        assert not bool(noise1[n].any())


def _noise_sample(n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"x": torch.randn(n, D_IN, generator=g, dtype=torch.float64),
            "y": torch.randint(0, D_OUT, (n,), generator=g)}


def _noise_by_hand(model, params, sample, parts):
    """gradient_and_noise's mean and variance from each tensor_split group's own gradient."""
    groups = list(zip(*(torch.tensor_split(v, parts) for v in sample.values()), strict=True))
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    rows = [dict(zip(leaves, torch.autograd.grad(F.cross_entropy(torch.func.functional_call(
        model, leaves, (x,)), y), list(leaves.values())), strict=True)) for x, y in groups]
    m = torch.tensor([len(y) for _, y in groups], dtype=torch.float64)
    mean = {n: sum(mk * r[n] for mk, r in zip(m, rows, strict=True)) / m.sum() for n in params}
    var = {n: sum(mk * (r[n] - mean[n]) ** 2 for mk, r in zip(m, rows, strict=True))
           / (parts - 1) for n in params}
    return mean, var


@pytest.mark.parametrize("parts", [4, 8, N])
def test_gradient_noise_batched_backward_matches_the_loop(parts):
    """The vectorised path of gradient_and_noise (one pass over all groups) agrees with a
    backward pass per group to 1e-10 relative in float64, equal and unequal groups alike."""
    from acctattr.evaluation.curvature import Curvature

    model, sample = mlp(), _noise_sample()
    params = params_of(model)
    loss = resolve_metric("cross_entropy", None, "train.loss")
    fast = Curvature(model, {}, loss, sample, ("x",), "y", chunk=10)
    slow = Curvature(model, {}, loss, sample, ("x",), "y", chunk=10)
    slow._batched = False
    mean, noise = fast.gradient_and_noise(params, parts)
    assert fast._batched, "the vectorised pass must work on a plain MLP"
    mean_ref, noise_ref = slow.gradient_and_noise(params, parts)
    hand_mean, hand_noise = _noise_by_hand(model, params, sample, parts)
    for n in params:
        torch.testing.assert_close(mean[n], mean_ref[n], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(noise[n], noise_ref[n], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(mean[n], hand_mean[n], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(noise[n], hand_noise[n], rtol=1e-10, atol=1e-14)
    assert sum(float(v.sum()) for v in noise.values()) > 0


class _NoBatchTanh(torch.autograd.Function):
    """tanh as an old-style autograd.Function (forward takes ctx, no setup_context):
    plain autograd runs it, torch.func transforms (vmap, grad) refuse it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        return grad_out * (1 - y * y)


class _NoBatchMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D_IN, 8).double(), nn.Linear(8, D_OUT).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_NoBatchTanh.apply(self.fc1(x)))


def test_gradient_noise_falls_back_to_the_loop_when_batching_fails(monkeypatch):
    """A model torch.func cannot vectorise gets the per-group loop, with the same result
    as by hand, and the vectorised pass is not tried again on later calls."""
    from acctattr.evaluation.curvature import Curvature

    model, sample = _NoBatchMlp(), _noise_sample()
    params = params_of(model)
    with pytest.raises(RuntimeError):  # the vectorised pass does fail on this model
        torch.func.vmap(lambda x: model(x).sum())(sample["x"])
    curv = Curvature(model, {}, resolve_metric("cross_entropy", None, "train.loss"), sample,
                     ("x",), "y")
    mean, noise = curv.gradient_and_noise(params, 4)
    assert not curv._batched
    hand_mean, hand_noise = _noise_by_hand(model, params, sample, 4)
    for n in params:
        torch.testing.assert_close(mean[n], hand_mean[n], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(noise[n], hand_noise[n], rtol=1e-10, atol=1e-14)

    def no_retry(*args, **kwargs):
        raise AssertionError("the vectorised pass was tried again")

    monkeypatch.setattr(curv, "group_gradients", no_retry)
    again, _ = curv.gradient_and_noise(params, 4)
    for n in params:
        torch.testing.assert_close(again[n], mean[n], rtol=0, atol=0)


def test_direct_is_the_difference_of_two_forward_passes(eval_file):
    """Evaluator.direct(v) equals f_i(theta) - f_i(theta - v) computed by hand."""
    model = mlp()
    params = params_of(model)
    v = direction(params, seed=4)
    ev = evaluator(model, params, eval_file, "cross_entropy")
    base, _ = ev.values()
    got = ev.direct(v, base)

    from safetensors.torch import load_file

    data = load_file(eval_file)
    by_hand = mlp()
    f_theta = F.cross_entropy(by_hand(data["x"]), data["y"], reduction="none")
    by_hand.load_state_dict({n: p - v[n] for n, p in params.items()})
    f_minus = F.cross_entropy(by_hand(data["x"]), data["y"], reduction="none")
    torch.testing.assert_close(base, f_theta.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, (f_theta - f_minus).detach(), rtol=1e-10, atol=1e-12)
    assert got.abs().max() > 1e-2


def test_values_take_the_probes_first_batch_and_compute_the_rest(eval_file, monkeypatch):
    """After probe(), values() runs the model on every batch but the first (the probe's
    result, kept): the same bits and group ids as without the probe; function data keeps
    nothing."""
    model = mlp()
    params = params_of(model)
    plain, plain_groups = evaluator(model, params, eval_file, "cross_entropy",
                                    group="grp").values()
    ev = evaluator(model, params, eval_file, "cross_entropy", group="grp")
    ev.probe()
    calls = []
    real = Evaluator._metric
    monkeypatch.setattr(Evaluator, "_metric",
                        lambda self, p, b: calls.append(len(b["x"])) or real(self, p, b))
    base, groups = ev.values()
    assert calls == [7, 7, 2]  # batches 1..3 of 7, 7, 7, 2
    assert torch.equal(base, plain) and groups is not None and plain_groups is not None
    assert torch.equal(groups, plain_groups)
    calls.clear()
    ev.values()  # a second call takes it again (theta_T does not change)
    assert calls == [7, 7, 2]


def test_linear_and_values_come_from_the_same_jvp_passes(eval_file, monkeypatch):
    """linear_and_values(v) is linear(v) with values() (and the group ids) taken from the
    JVPs' primal output: the same bits, and no metric call beyond the JVPs' own."""
    model = mlp()
    params = params_of(model)
    v = direction(params, seed=5)
    ev = evaluator(model, params, eval_file, "cross_entropy", group="grp")
    want_effect, (want_base, want_groups) = ev.linear(v), ev.values()
    calls = []
    real = Evaluator._metric
    monkeypatch.setattr(Evaluator, "_metric",
                        lambda self, p, b: calls.append(len(b["x"])) or real(self, p, b))
    effect, (base, groups) = ev.linear_and_values(v)
    assert calls == [7, 7, 7, 2]  # one traced call per batch: the JVP's
    assert torch.equal(effect, want_effect) and torch.equal(base, want_base)
    assert groups is not None and want_groups is not None and torch.equal(groups, want_groups)
    _, (_, none) = evaluator(model, params, eval_file, "cross_entropy").linear_and_values(v)
    assert none is None


def test_a_linear_first_stage_gives_the_values_without_a_pass_of_their_own(monkeypatch):
    """frozen (linear before the last stage) takes f_i(theta_T) from its first stage's JVPs:
    Evaluator.values is never called, and the JSON is the one it gave with values computed
    on their own; unrolled (direct throughout) computes them once."""
    manifest = Path(__file__).resolve().parents[2] / "sample_runs" / "digits" / "manifest.yaml"
    from acctattr.output.report import to_json

    calls = []
    real = Evaluator.values
    with monkeypatch.context() as m:  # the values by a pass of their own, as before
        m.setattr(Evaluator, "linear_and_values", lambda self, v: (self.linear(v), real(self)))
        want = to_json(pipeline.run(manifest, "frozen", per_example=True))
    monkeypatch.setattr(Evaluator, "values", lambda self: calls.append(1) or real(self))
    got = to_json(pipeline.run(manifest, "frozen", per_example=True))
    assert calls == [] and got == want
    pipeline.run(manifest, "naive", evaluate="direct")
    assert calls == [1]


def test_group_ids_are_returned_in_example_order(eval_file):
    """values() returns each example's group id alongside its metric value."""
    model = mlp()
    _, groups = evaluator(model, params_of(model), eval_file, "cross_entropy",
                          group="grp").values()
    assert groups is not None and groups.tolist() == [i % 3 for i in range(N)]
    _, none = evaluator(model, params_of(model), eval_file, "cross_entropy").values()
    assert none is None


def test_file_outputs_fill_n_rows_as_concatenation_would(eval_file):
    """A file's per-batch outputs are copied into [N] tensors (no per-batch result kept):
    the same values, dtypes and order as concatenating the batches (23 rows, batches of 7)."""
    model = mlp()
    params = params_of(model)
    ev = evaluator(model, params, eval_file, "cross_entropy", group="grp")
    base, groups = ev.values()
    one = lambda b: (ev._metric(params, b).double(), b["grp"].long())  # noqa: E731
    by_batch = [one(ev._floats(b)) for b in ev.data.batches()]
    assert len(by_batch) == 4 and by_batch[-1][0].shape == (2,)
    assert torch.equal(base, torch.cat([b[0] for b in by_batch]))
    assert groups is not None and groups.dtype == torch.long
    assert torch.equal(groups, torch.cat([b[1] for b in by_batch]))


@pytest.mark.parametrize("rows", [3, 9])
def test_file_outputs_whose_rows_do_not_add_up_are_concatenated(eval_file, rows):
    """Outputs with other than one row per example (fewer, or more than N in all) come back
    concatenated in order, as before, never padded with unset memory."""
    model = mlp()
    ev = evaluator(model, params_of(model), eval_file, "cross_entropy")
    k = [0]

    def fn(batch):
        k[0] += 1
        return (torch.full((rows,), float(k[0]), dtype=torch.float64),)

    (got,) = ev._each(fn)
    want = torch.cat([torch.full((rows,), float(i), dtype=torch.float64)
                      for i in range(1, 5)])
    assert torch.equal(got, want)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.la = nn.Linear(3, 2)
        self.lb = nn.Linear(5, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.la(a) - 2 * self.lb(b)


def test_several_inputs_are_passed_by_name(tmp_path):
    """With several eval.inputs the model is called as model(**named), in any listed order."""
    torch.manual_seed(0)
    model = TwoInputs().double()
    g = torch.Generator().manual_seed(5)
    data = {"b": torch.randn(9, 5, generator=g, dtype=torch.float64),
            "a": torch.randn(9, 3, generator=g, dtype=torch.float64),
            "y": torch.randint(0, 2, (9,), generator=g)}
    save_file(data, tmp_path / "eval.safetensors")
    spec = EvalSpec(inputs=("b", "a"), target="y", metric="logprob",
                    data=tmp_path / "eval.safetensors", batch_size=4)
    params = params_of(model)
    ev = Evaluator(model, params, {}, EvalData(spec), resolve_metric("logprob", None, "m"))
    vals, _ = ev.values()
    want = -F.cross_entropy(model(a=data["a"], b=data["b"]), data["y"], reduction="none")
    torch.testing.assert_close(vals, want.detach())
    v = direction(params)
    fd = central_difference(model, params, v, spec, ev.metric)
    torch.testing.assert_close(ev.linear(v), fd, rtol=1e-6, atol=1e-8)


USER_METRIC = '''
import torch


def closeness(out, y):
    """Minus the squared error of the first output against the target's first column."""
    return -(out[:, 0] - y[:, 0].to(out.dtype)) ** 2


closeness.higher_is_better = True


def plain(out, y):
    return out[:, 0]
'''


def test_user_metric_from_file(tmp_path, eval_file):
    """A FILE.py:FUNC metric is imported, takes its direction from higher_is_better, and is used."""
    (tmp_path / "metrics.py").write_text(USER_METRIC)
    ref = Ref("metrics.py:closeness", tmp_path / "metrics.py", None, "closeness")
    metric = resolve_metric(ref, None, "eval.metric")
    assert metric.name == "metrics.py:closeness" and metric.higher_is_better is True
    assert resolve_metric(ref, False, "eval.metric").higher_is_better is False
    plain = Ref("metrics.py:plain", tmp_path / "metrics.py", None, "plain")
    assert resolve_metric(plain, None, "eval.metric").higher_is_better is False

    model = mlp()
    params = params_of(model)
    spec = EvalSpec(inputs=("x",), target="y_real", metric=ref, data=eval_file, batch_size=7)
    ev = Evaluator(model, params, {}, EvalData(spec), metric)
    from safetensors.torch import load_file

    data = load_file(eval_file)
    want = -(model(data["x"])[:, 0] - data["y_real"][:, 0]) ** 2
    torch.testing.assert_close(ev.values()[0], want.detach())
    v = direction(params)
    fd = central_difference(model, params, v, spec, ev.metric)
    torch.testing.assert_close(ev.linear(v), fd, rtol=1e-6, atol=1e-8)


USER_DATA = '''
import torch


def batches():
    g = torch.Generator().manual_seed(3)
    for i in range(3):
        yield {"x": torch.randn(4, 5, generator=g, dtype=torch.float64),
               "y": torch.randint(0, 4, (4,), generator=g),
               "grp": torch.full((4,), 10 + i)}
'''


def test_eval_data_from_a_generator_function(tmp_path):
    """eval.data FILE.py:FUNC yields dict batches; values, JVPs and groups come from them."""
    (tmp_path / "data.py").write_text(USER_DATA)
    spec = EvalSpec(inputs=("x",), target="y", metric="cross_entropy", group="grp",
                    data_fn=Ref("data.py:batches", tmp_path / "data.py", None, "batches"))
    model = mlp()
    params = params_of(model)
    ev = Evaluator(model, params, {}, EvalData(spec),
                   resolve_metric("cross_entropy", None, "m"))
    vals, groups = ev.values()
    assert groups is not None and groups.tolist() == [10] * 4 + [11] * 4 + [12] * 4
    g = torch.Generator().manual_seed(3)
    want = []
    for _ in range(3):
        x = torch.randn(4, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (4,), generator=g)
        want.append(F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(vals, torch.cat(want).detach())
    assert ev.linear(direction(params)).shape == (12,)  # the generator can be iterated again


BN_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
'''


def test_buffers_come_from_the_final_checkpoint_in_eval_mode(tmp_path):
    """BatchNorm running statistics are taken from theta_T and the model runs in eval mode."""
    (tmp_path / "model.py").write_text(BN_MODEL)
    ns: dict = {}
    exec(BN_MODEL, ns)
    model = ns["build"]()
    (tmp_path / "init").mkdir()
    save_file({k: v.clone() for k, v in model.state_dict().items()},
              tmp_path / "init" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(5):  # shifts weights and running statistics far from their init
        x = 3 + 2 * torch.randn(16, 3, generator=g, dtype=torch.float64)
        loss = F.cross_entropy(model(x), torch.randint(0, 2, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    (tmp_path / "end").mkdir()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(final, tmp_path / "end" / "model.safetensors")
    ex = torch.randn(10, 3, generator=g, dtype=torch.float64)
    ey = torch.randint(0, 2, (10,), generator=g)
    save_file({"x": ex, "y": ey}, tmp_path / "eval.safetensors")
    doc = {"version": 1, "model": {"factory": "model.py:build"},
           "stages": [{"name": "only", "start": "init", "end": "end",
                       "optimizer": {"type": "sgd", "steps": 5, "lr": 0.1}}],
           "eval": {"data": "eval.safetensors", "inputs": ["x"], "target": "y",
                    "batch_size": 4}}
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(doc))

    loaded = pipeline.check(tmp_path / "manifest.yaml")
    vals, _ = loaded.evaluator.values()
    assert not loaded.evaluator.model.training

    model.eval()
    want = F.cross_entropy(model(ex), ey, reduction="none").detach()
    torch.testing.assert_close(vals, want)
    # the two mistakes this guards against give different numbers
    fresh = ns["build"]()
    fresh.load_state_dict({k: v for k, v in final.items() if "running" not in k}, strict=False)
    fresh.eval()
    assert not torch.allclose(F.cross_entropy(fresh(ex), ey, reduction="none"), want)
    model.train()
    assert not torch.allclose(F.cross_entropy(model(ex), ey, reduction="none"), want)


def test_curvature_expand_is_value_gradient_and_hvp_at_once():
    """Curvature.expand's loss, gradient and product equal value(), gradient() and hvp()
    at the same point, over several memory chunks."""
    from acctattr.evaluation.curvature import Curvature

    model, sample = mlp(), _noise_sample()
    params = params_of(model)
    curv = Curvature(model, {}, resolve_metric("cross_entropy", None, "train.loss"), sample,
                     ("x",), "y", chunk=10)
    value, gradient, product = curv.expand(params)
    assert value == pytest.approx(curv.value(params), rel=1e-12)
    v = direction(params, seed=6)
    reference_product = curv.hvp(params)(v)
    got_product = product(v)
    for n, g in curv.gradient(params).items():
        torch.testing.assert_close(gradient[n], g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got_product[n], reference_product[n], rtol=1e-12, atol=0)
    assert any(bool(t.abs().max() > 1e-3) for t in got_product.values())
