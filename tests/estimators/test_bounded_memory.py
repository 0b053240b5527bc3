"""naive and frozen hold one embedding and read the files a slice at a time: what they
keep, what they read, and that slicing changes no bit of the result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from staged import StageCfg, write_run

from acctattr import loading, pipeline
from acctattr.estimators import base
from acctattr.runs.checkpoints import drop_pages, load_torch_file_mapped, open_checkpoint

WARM_COS = {"schedule": "cosine", "base": 0.02, "warmup": 5, "min": 0.001}
STAGES = [
    StageCfg("a", "adamw", 20, WARM_COS, {"betas": (0.9, 0.99)}, (0.1, 0.0)),
    StageCfg("b", "adamw", 15, WARM_COS, {}, (0.2, 0.0), continues=True),
    StageCfg("c", "adamw", 10, 0.01, {}, (0.3, 0.05), continues=True),
]
ROOT = Path(__file__).resolve().parents[2]


def _embeddings(manifest: Path, name: str) -> list[dict[str, torch.Tensor]]:
    loaded = pipeline.check(manifest)
    est = pipeline.estimator(loaded, name)
    own = dict(loaded.model.named_parameters())
    out = [est.embed(k) for k in range(len(loaded.runs))]
    for v in out:  # kept in the model's own dtype
        assert all(t.dtype == own[n].dtype for n, t in v.items())
    return out


def test_sliced_embeddings_are_bit_identical_to_whole_tensors(tmp_path, monkeypatch):
    """Built 7 elements at a time (every parameter split, ragged ends) or whole: the same
    bits, for naive and frozen (a continued AdamW chain: delta_b and preconditioners)."""
    manifest = write_run(tmp_path / "run", STAGES)
    for name in ("naive", "frozen"):
        whole = _embeddings(manifest, name)
        monkeypatch.setattr(base, "CHUNK", 7)
        sliced = _embeddings(manifest, name)
        monkeypatch.setattr(base, "CHUNK", 1 << 22)
        for w, s in zip(whole, sliced, strict=True):
            assert w.keys() == s.keys()
            for n in w:
                assert torch.equal(w[n], s[n]), (name, n)


def test_frozen_keeps_no_preconditioner_between_calls(tmp_path):
    manifest = write_run(tmp_path / "run", STAGES)
    loaded = pipeline.check(manifest)
    est = pipeline.estimator(loaded, "frozen")
    est.embed(0)
    held = [v for v in vars(est.stages).values() if isinstance(v, dict)
            and any(isinstance(t, torch.Tensor) for t in v.values())]
    assert held == []


def _open_files(folder: Path) -> list[str]:
    """The files under ``folder`` this process holds open (/proc/self/fd) or memory-mapped
    (/proc/self/maps)."""
    root = str(folder.resolve())
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since listed
            continue
    maps = [parts[5] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(parts := line.split(maxsplit=5)) == 6]
    return sorted({p for p in fds + maps if p.startswith(root)})


LONG = [StageCfg("s0", "adamw", 4, 0.01, {}, (0.1, 0.0)),
        *(StageCfg(f"s{k}", "adamw", 3, 0.01, {}, (0.1, 0.01), continues=k % 2 == 1)
          for k in range(1, 6))]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", ["naive", "frozen"])
def test_no_stage_file_stays_open_between_stages(tmp_path, monkeypatch, name):
    """After check and after each stage's embedding, no checkpoint or optimizer state file
    is held: no open handle, parsed header or state tensor (Stages.held), nothing of the
    files open or mapped by the process, so what is held does not grow with the number of
    stages. While an embedding is built its files are read (held is non-zero then)."""
    manifest = write_run(tmp_path / "run", LONG)
    ckpt = tmp_path / "run" / "ckpt"
    loaded = pipeline.check(manifest)
    est = pipeline.estimator(loaded, name)
    assert est.stages.held() == 0 and _open_files(ckpt) == []
    # optimizer.pt is read in place: offsets only, no views into a mapping of the file
    assert all(r.state.tensors == {} and r.state.at for r in loaded.runs)
    during: list[int] = []
    real = est.stages.delta

    def delta(*args, **kwargs):
        out = real(*args, **kwargs)
        during.append(est.stages.held())
        return out

    monkeypatch.setattr(est.stages, "delta", delta)
    for k in range(len(LONG)):
        est.embed(k)
        assert est.stages.held() == 0, (name, k)
        assert _open_files(ckpt) == [], (name, k)
    assert max(during) > 0


def test_optimizer_state_read_in_place_equals_the_saved_tensors(tmp_path):
    """A torch.save optimizer state is read at its tensors' offsets in the file: whole
    tensors and flat slices are the saved values bit for bit, in fresh memory, float16
    promoted to float32 as before."""
    from acctattr.runs.manifest_spec import LrSpec, OptimizerSpec
    from acctattr.runs.optim_state import load_optimizer_state

    g = torch.Generator().manual_seed(0)
    shapes = {"w": (33, 17), "b": (17,)}
    for dtype in (torch.float32, torch.float64, torch.float16):
        state = {i: {"momentum_buffer": torch.randn(s, generator=g).to(dtype)}
                 for i, s in enumerate(shapes.values())}
        torch.save({"state": state, "param_groups": [{"params": [0, 1], "momentum": 0.9}]},
                   tmp_path / "o.pt")
        spec = OptimizerSpec(type="sgd", steps=1, lr=LrSpec(value=0.1),
                             state=tmp_path / "o.pt")
        st = load_optimizer_state(spec, "s", shapes, set())
        assert st.tensors == {} and st.held() == 0 and set(st.at) == set(shapes)
        want = torch.float64 if dtype == torch.float64 else torch.float32
        for i, n in enumerate(shapes):
            saved = state[i]["momentum_buffer"].to(want)
            a, b = st.tensor(n, "momentum_buffer"), st.tensor(n, "momentum_buffer")
            assert a.dtype == want and torch.equal(a, saved)
            assert a.data_ptr() != b.data_ptr()
            assert torch.equal(st.tensor(n, "momentum_buffer", 3, 11),
                               saved.reshape(-1)[3:11])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("wrap", [None, "state_dict"])
def test_pt_checkpoint_read_in_place_nothing_mapped(tmp_path, wrap):
    """A torch.save checkpoint (plain or Lightning's {"state_dict": ...}) is read at its
    tensors' offsets: the values bit for bit, whole or sliced, nothing of the file left
    open or mapped; a non-contiguous tensor keeps the loaded tensors (the same values)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 7, generator=g, dtype=torch.float64)
    sd = {"w": w, "tied": w, "h": torch.randn(40, generator=g).to(torch.bfloat16),
          "n": torch.arange(5)}
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, folder / "model.pt")
    r = open_checkpoint(folder / "model.pt")
    assert _open_files(folder) == []
    assert r.names() == sorted(sd) and r.shape("w") == (9, 7) and r.dtype("h") == "BF16"
    assert torch.equal(r.get("w"), w) and torch.equal(r.get("tied"), w)
    assert torch.equal(r.get_flat("w", 4, 30), w.reshape(-1)[4:30])
    assert torch.equal(r.get("h", native=True), sd["h"])
    assert torch.equal(r.get("n"), sd["n"])
    assert r.get("w").data_ptr() != r.get("w").data_ptr()
    assert _open_files(folder) == []
    torch.save({"t": w.t()}, folder / "model.pt")  # not contiguous: loaded, as before
    r = open_checkpoint(folder / "model.pt")
    assert torch.equal(r.get("t"), w.t())


def test_reader_slices_equal_the_tensor_and_read_into_fresh_memory(tmp_path):
    t = torch.randn(33, 17, dtype=torch.float64)
    h = torch.randn(40).to(torch.bfloat16)
    save_file({"t": t, "h": h}, tmp_path / "m.safetensors")
    r = open_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(r.get("t"), t)
    assert torch.equal(r.get_flat("t", 5, 400), t.reshape(-1)[5:400])
    assert r.torch_dtype("h") == torch.bfloat16
    assert r.get("h").dtype == torch.float32 and r.get("h", native=True).dtype == torch.bfloat16
    assert torch.equal(r.get("h", native=True), h)
    a, b = r.get("t"), r.get("t")
    assert a.data_ptr() != b.data_ptr()  # nothing shared, nothing cached


def test_optimizer_state_read_on_use_and_pages_given_back_keep_values(tmp_path):
    """A mapped torch.save file: values read after their pages were given back are the
    same (the pages come back from the file), and every read is a fresh copy."""
    x = torch.randn(1 << 16)
    torch.save({"x": x}, tmp_path / "s.pt")
    sd, mapped = load_torch_file_mapped(tmp_path / "s.pt")
    assert mapped
    before = sd["x"].clone()
    drop_pages(sd["x"])
    assert torch.equal(sd["x"], before) and torch.equal(sd["x"], x)


def test_importing_the_cli_and_checking_a_run_never_imports_transformers():
    code = ("import sys\nimport acctattr.cli\nfrom acctattr import pipeline\n"
            "pipeline.check('sample_runs/digits/manifest.yaml')\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, check=False)
    assert p.returncode == 0, p.stderr


def test_the_model_is_built_once_and_holds_theta_t_itself(tmp_path, monkeypatch):
    """One model per run, and theta_T lives in the model's own parameters (one copy)."""
    manifest = write_run(tmp_path / "run", STAGES)
    built = []
    real = loading.build_model

    def counting(ref):
        built.append(ref)
        return real(ref)

    monkeypatch.setattr(loading, "build_model", counting)
    loaded = pipeline.check(manifest)
    assert len(built) == 1
    own = dict(loaded.model.named_parameters())
    for n, t in loaded.evaluator.params.items():
        assert own[n].data_ptr() == t.data_ptr()
    pipeline.run(manifest, "frozen")
    assert len(built) == 2  # one more run, one more model
