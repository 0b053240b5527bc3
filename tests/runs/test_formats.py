"""Checkpoints written by the real tools: HF Trainer folders, PEFT LoRA, Lightning, DCP; init."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from acctattr import pipeline
from acctattr.cli import app
from acctattr.errors import AcctattrError, ManifestError

pytest.importorskip("transformers")
pytest.importorskip("peft")
from formats_runs import (  # noqa: E402
    write_hf_run,
    write_lightning_run,
    write_short_trainer_run,
)

runner = CliRunner()


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory):
    return write_hf_run(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def lightning_run(tmp_path_factory):
    pytest.importorskip("lightning")
    return write_lightning_run(tmp_path_factory.mktemp("lightning"))


def _per_example(result, stage):
    return torch.tensor([e.effects[stage] for e in result.examples], dtype=torch.float64)


# ---------------------------------------------------------------- Hugging Face Trainer

def test_trainer_folder_gives_steps_lrs_and_state(hf_run):
    """A Trainer checkpoint-N end supplies steps, the exact per-step lrs and optimizer.pt."""
    loaded = pipeline.check(hf_run["manifest"])
    sft = loaded.runs[0]
    assert sft.steps == 6
    assert sft.lrs == pytest.approx(hf_run["sft_lrs"], abs=1e-12)
    # optimizer.pt mapped by the HF decay / no-decay rule, hyperparameters per group
    assert [g.weight_decay for g in sft.state.groups] == [0.1, 0.0]
    assert sft.state.params() == set(loaded.info.trainable)
    assert sft.state.step == 6
    assert loaded.warnings == []


def test_sparse_lr_log_is_interpolated_with_a_warning(hf_run, tmp_path):
    """Steps missing from log_history are interpolated and the warning counts them."""
    root = tmp_path / "run"
    shutil.copytree(hf_run["manifest"].parent, root)
    state = root / "sft" / "checkpoint-6" / "trainer_state.json"
    doc = json.loads(state.read_text())
    doc["log_history"] = [h for h in doc["log_history"] if h.get("step") in (2, 4, 6)]
    state.write_text(json.dumps(doc))
    loaded = pipeline.check(root / "manifest.yaml")
    assert len(loaded.runs[0].lrs) == 6
    assert any("3 of 6 learning rates were interpolated" in w for w in loaded.warnings)


def test_lora_direct_effect_equals_model_without_adapter(hf_run):
    """The last stage's LoRA adapter: frozen+direct effect = metric with minus without it."""
    result = pipeline.run(hf_run["manifest"], "frozen", "direct", per_example=True)
    truth = hf_run["with_adapter"] - hf_run["without_adapter"]
    est = _per_example(result, "lora")
    assert truth.abs().max() > 1e-2, "the adapter must change the metric"
    assert (est - truth).abs().max() < 1e-5 * max(1.0, float(truth.abs().max())) * 10
    assert result.final_value == pytest.approx(float(hf_run["with_adapter"].mean()), abs=1e-6)


def test_adapter_stage_leaves_base_weights_to_earlier_stages(hf_run):
    """Frozen dynamics skip base weights an adapter stage did not train: v_sft = Delta_sft."""
    loaded = pipeline.check(hf_run["manifest"])
    naive = pipeline.estimator(loaded, "naive").embed(0)
    frozen = pipeline.estimator(loaded, "frozen").embed(0)
    assert all(torch.equal(naive[n], frozen[n]) for n in naive)


def test_hf_run_from_cli_json(hf_run):
    """`acctattr run` on Trainer + adapter folders exits 0 with JSON naming both stages."""
    res = runner.invoke(app, ["run", str(hf_run["manifest"]), "--format", "json", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert sorted(s["name"] for s in doc["stages"]) == ["lora", "sft"]


def test_missing_transformers_is_exit_2(hf_run, monkeypatch):
    """Without transformers, model.hf fails with exit 2 and says what to install."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    res = runner.invoke(app, ["check", str(hf_run["manifest"])])
    assert res.exit_code == 2
    assert "acctattr[hf]" in res.stderr


@pytest.mark.parametrize("key,value", [("use_dora", True), ("modules_to_save", ["score"]),
                                       ("bias", "all")])
def test_unsupported_adapters_are_refused(hf_run, tmp_path, key, value):
    """DoRA, modules_to_save and trained biases are refused, with the merge-and-save fix."""
    root = tmp_path / "run"
    shutil.copytree(hf_run["manifest"].parent, root)
    cfg = root / "lora" / "checkpoint-4" / "adapter_config.json"
    doc = json.loads(cfg.read_text())
    doc[key] = value
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as err:
        pipeline.check(root / "manifest.yaml")
    assert key in str(err.value) and "merge_and_unload" in str(err.value)


def test_continuing_an_adapter_stage_is_refused(hf_run, tmp_path):
    """A stage cannot continue an adapter stage's optimizer (it held the adapter's matrices)."""
    doc = yaml.safe_load(hf_run["manifest"].read_text())
    doc["stages"].append({"name": "after", "end": "sft/checkpoint-6",
                          "optimizer": {"type": "adamw", "continues": True}})
    path = hf_run["manifest"].parent / "continues.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as err:
        pipeline.check(path)
    assert "stage 'after': optimizer.continues" in str(err.value)


# ---------------------------------------------------------------- Lightning, DCP, bf16

def test_lightning_ckpt_prefix_and_optimizer_states(lightning_run):
    """Lightning .ckpt: 'model.' prefix matched to the model, optimizer_states[0] mapped."""
    loaded = pipeline.check(lightning_run)
    ckpt = torch.load(lightning_run.parent / "a.ckpt", weights_only=True)
    a = loaded.runs[0]
    assert a.end.get("0.weight").equal(ckpt["state_dict"]["model.0.weight"])
    assert a.state.groups[0].momentum == 0.9 and a.state.groups[0].weight_decay == 1e-2
    buf = ckpt["optimizer_states"][0]["state"][0]["momentum_buffer"]
    assert a.state.tensor("0.weight", "momentum_buffer").equal(buf)
    result = pipeline.run(lightning_run, "frozen", "direct")
    assert all(torch.isfinite(torch.tensor(s.effect)) for s in result.stages)


def test_bf16_checkpoints_are_computed_in_fp32(lightning_run, tmp_path):
    """bf16 weights read back as float32 and give effects close to the fp32 run's."""
    root = tmp_path / "run"
    shutil.copytree(lightning_run.parent, root)
    for name in ("a", "b"):
        sd = torch.load(root / f"{name}.ckpt", weights_only=True)["state_dict"]
        save_file({k: v.bfloat16() for k, v in sd.items()}, root / f"{name}.safetensors")
    doc = yaml.safe_load((root / "manifest.yaml").read_text())
    for st in doc["stages"]:
        st["end"] = st["end"].replace(".ckpt", ".safetensors")
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc))
    loaded = pipeline.check(root / "manifest.yaml")
    assert loaded.runs[1].end.get("0.weight").dtype == torch.float32
    got = pipeline.run(root / "manifest.yaml", "naive", "direct")
    ref = pipeline.run(lightning_run, "naive", "direct")
    for s in ref.stages:
        other = next(t for t in got.stages if t.name == s.name)
        assert other.effect == pytest.approx(s.effect, abs=0.05 * abs(s.effect) + 2e-3)


def test_dcp_folder_is_refused_with_the_conversion_command(lightning_run, tmp_path):
    """A torch.distributed.checkpoint folder: exit 2 naming the dcp_to_torch command."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "run"
    shutil.copytree(lightning_run.parent, root)
    sd = torch.load(root / "b.ckpt", weights_only=True)["state_dict"]
    dcp.save({k[len("model."):]: v for k, v in sd.items()}, checkpoint_id=str(root / "b_dcp"))
    doc = yaml.safe_load((root / "manifest.yaml").read_text())
    doc["stages"][1]["end"] = "b_dcp"
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["check", str(root / "manifest.yaml")])
    assert res.exit_code == 2
    assert "python -m torch.distributed.checkpoint.format_utils dcp_to_torch" in res.stderr


# ---------------------------------------------------------------- init

def test_init_placeholders_are_listed_by_check(hf_run, tmp_path):
    """init on plain weights leaves TODO(acctattr) values; check lists exactly those keys."""
    (tmp_path / "ft").mkdir()
    shutil.copy(hf_run["manifest"].parent / "sft" / "checkpoint-6" / "model.safetensors",
                tmp_path / "ft")
    out = tmp_path / "m.yaml"
    res = runner.invoke(app, ["init", str(tmp_path / "ft"), "--output", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["check", str(out)])
    assert res.exit_code == 2
    problems = sorted(line.split(": still")[0].strip(" -")
                      for line in res.stderr.splitlines() if "TODO(acctattr)" in line)
    assert problems == sorted([
        "eval.data", "eval.inputs", "eval.target", "model.factory",
        "stage 'ft': start", "stage 'ft': optimizer.type",
        "stage 'ft': optimizer.steps", "stage 'ft': optimizer.lr"])


def test_init_then_filled_equals_hand_written(hf_run, tmp_path):
    """init on Trainer + adapter folders, placeholders filled: same JSON as hand-written."""
    run = hf_run["manifest"].parent
    out = run / "drafted.yaml"
    res = runner.invoke(app, ["init", "--start", str(run / "init"),
                              str(run / "sft" / "checkpoint-6"), str(run / "lora" / "checkpoint-4"),
                              "--output", str(out)])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(out.read_text())
    assert doc["stages"][0]["optimizer"]["type"] == "adamw"
    assert doc["stages"][0]["optimizer"]["steps"] == 6
    assert doc["stages"][1]["end"] == {"adapter": "lora/checkpoint-4"}
    assert doc["model"] == {"hf": "sft/checkpoint-6"}  # the final checkpoint with a config
    doc["eval"] = yaml.safe_load(hf_run["manifest"].read_text())["eval"]
    out.write_text(yaml.safe_dump(doc))
    a = runner.invoke(app, ["run", str(out), "--format", "json", "-q"])
    b = runner.invoke(app, ["run", str(hf_run["manifest"]), "--format", "json", "-q"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    stage_names = {"sft": "checkpoint-6", "lora": "checkpoint-4"}
    assert [s["name"] for s in doc["stages"]] == ["sft", "lora"], stage_names
    assert a.stdout == b.stdout


def test_init_lightning(lightning_run, tmp_path):
    """init reads a Lightning .ckpt's optimizer type, steps, constant lr and state."""
    out = tmp_path / "m.yaml"
    root = lightning_run.parent
    res = runner.invoke(app, ["init", "--start", str(root / "init.safetensors"),
                              str(root / "a.ckpt"), str(root / "b.ckpt"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    opt = yaml.safe_load(out.read_text())["stages"][0]["optimizer"]
    assert opt["type"] == "sgd" and opt["steps"] == 5 and opt["lr"] == 0.1
    assert "momentum=0.9" in out.read_text()


def test_placeholder_detection_is_torch_free():
    """manifest.find_placeholders names keys the way other manifest problems do."""
    from acctattr.runs.manifest import find_placeholders

    raw = {"model": {"factory": "TODO(acctattr): x"},
           "stages": [{"name": "a", "optimizer": {"steps": "TODO(acctattr): y"}}]}
    assert [w for w, _ in find_placeholders(raw)] == ["model.factory",
                                                      "stage 'a': optimizer.steps"]
    with pytest.raises(AcctattrError):
        from pathlib import Path

        from acctattr.runs.manifest import parse_manifest

        parse_manifest(raw, Path("/tmp/m.yaml"))


def test_auto_takes_frozen_where_unrolled_does_not_reproduce_a_stage(tmp_path, monkeypatch):
    """A Trainer run whose second stage is 8 noisy AdamW steps. Without Adam's first moment
    in the flow (``adam_momentum`` off) unrolled's simulated run of it lowers the training
    loss ~15x more than the recorded run did (its estimate of s1 is then wrong:
    bench/trainer_short.py), so auto takes frozen and says why; an explicit unrolled runs
    and warns. JSON carries the reason. With the first moment (the default) the
    simulation reproduces the stage and auto keeps unrolled."""
    from dataclasses import replace

    import acctattr.cli as cli
    from acctattr.options import UnrolledConfig

    manifest = write_short_trainer_run(tmp_path)
    assert pipeline.run(manifest).estimator == "unrolled"
    without = UnrolledConfig(adam_momentum=False)
    auto = pipeline.run(manifest, config=without)
    assert auto.estimator == "frozen"
    assert auto.estimator_note is not None
    assert "stage 's2'" in auto.estimator_note and "reproduce" in auto.estimator_note
    explicit = pipeline.run(manifest, "unrolled", config=without)
    assert explicit.estimator == "unrolled"
    assert any("stage 's2'" in w and "--estimator frozen" in w for w in explicit.warnings)
    made = cli.unrolled_config
    monkeypatch.setattr(cli, "unrolled_config",
                        lambda *a, **k: replace(made(*a, **k), adam_momentum=False))
    out = runner.invoke(app, ["run", str(manifest), "--format", "json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert "reproduce" in json.dumps(doc)
