"""acctattr init on the folders real tools leave behind: Trainer output_dirs, a run root,
PEFT adapters, Lightning checkpoint folders; check names what a weightless folder holds."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from acctattr.cli import app
from acctattr.runs import formats

pytest.importorskip("transformers")
pytest.importorskip("peft")
from formats_runs import (  # noqa: E402
    EVAL_LIGHTNING,
    EVAL_TOKENS,
    write_lightning_root,
    write_trainer_root,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def trainer_root(tmp_path_factory):
    return write_trainer_root(tmp_path_factory.mktemp("trainer") / "run")


@pytest.fixture(scope="module")
def lightning_root(tmp_path_factory):
    pytest.importorskip("lightning")
    return write_lightning_root(tmp_path_factory.mktemp("lightning") / "run")


def _todos(manifest) -> list[str]:
    res = runner.invoke(app, ["check", str(manifest)])
    assert res.exit_code == 2, res.output
    return sorted(line.split(": still")[0].strip(" -")
                  for line in res.stderr.splitlines() if "TODO(acctattr)" in line)


def _draft(args, out) -> dict:
    res = runner.invoke(app, ["init", *map(str, args), "--output", str(out)])
    assert res.exit_code == 0, res.output
    return yaml.safe_load(out.read_text())


def _run_json(manifest) -> str:
    res = runner.invoke(app, ["run", str(manifest), "--format", "json", "-q"])
    assert res.exit_code == 0, res.output
    return res.stdout


def _filled(doc: dict, eval_: dict, path) -> None:
    doc["eval"] = eval_
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_init_trainer_run_root_matches_hand_written(trainer_root):
    """init on a run root of Trainer output_dirs (a resumed stage, a LoRA stage) drafts
    steps, continues, clipping, batch, intermediate checkpoints and model.hf; check then
    lists only the eval TODOs, and once they are filled run gives the hand-written JSON."""
    root = trainer_root["root"]
    out = root / "drafted.yaml"
    doc = _draft([root], out)
    assert _todos(out) == ["eval.data", "eval.inputs", "eval.target"]
    assert "# data: TRAIN.safetensors" in out.read_text()
    hand = trainer_root["hand"]
    assert doc["model"] == hand["model"]
    assert doc["stages"] == hand["stages"]
    _filled(doc, EVAL_TOKENS, out)
    (root / "manifest.yaml").write_text(yaml.safe_dump(hand, sort_keys=False))
    assert _run_json(out) == _run_json(root / "manifest.yaml")


def test_init_trainer_output_dirs_one_by_one(trainer_root, tmp_path):
    """The same run named stage by stage (output_dirs, --start) drafts the same stages."""
    root = trainer_root["root"]
    out = root / "drafted2.yaml"
    doc = _draft(["--start", root / "init", root / "pretrain", root / "sft", root / "lora"],
                 out)
    assert doc["stages"] == trainer_root["hand"]["stages"]
    # a single checkpoint-N folder names its output_dir's stage
    one = _draft(["--start", root / "init", root / "pretrain" / "checkpoint-6"],
                 tmp_path / "one.yaml")
    assert one["stages"][0]["name"] == "pretrain"
    assert one["stages"][0]["optimizer"]["steps"] == 6


def test_init_peft_adapter_folder(trainer_root, tmp_path):
    """A PEFT adapter folder (save_pretrained) is an adapter stage with no optimizer."""
    src = trainer_root["root"] / "lora" / "checkpoint-4"
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / name, adapter)
    doc = _draft(["--start", trainer_root["root"] / "sft" / "checkpoint-10", adapter],
                 tmp_path / "m.yaml")
    assert doc["stages"] == [{"name": "my-adapter", "start": os.path.relpath(
        trainer_root["root"] / "sft" / "checkpoint-10", tmp_path), "end": {
        "adapter": "my-adapter"}}]
    assert doc["model"] == {"hf": os.path.relpath(trainer_root["root"] / "sft" /
                                                  "checkpoint-10", tmp_path)}


def test_init_lightning_folder_matches_hand_written(lightning_root):
    """init on a folder of Lightning runs (lightning_logs/version_0/checkpoints/...) names
    stages after their folders, replays the saved scheduler to the lrs the steps used,
    sees the resumed stage (continues), and agrees with the hand-written manifest; only the
    model factory (a .ckpt holds no architecture) and eval are left to fill."""
    root = lightning_root["root"]
    out = root / "drafted.yaml"
    doc = _draft([root], out)
    assert _todos(out) == ["eval.data", "eval.inputs", "eval.target", "model.factory"]
    hand = lightning_root["hand"]
    assert [s["name"] for s in doc["stages"]] == ["pretrain", "finetune"]
    for got, want in zip(doc["stages"], hand["stages"], strict=True):
        assert got["optimizer"]["lr"] == pytest.approx(want["optimizer"]["lr"], rel=1e-12)
        got["optimizer"]["lr"] = want["optimizer"]["lr"]
    assert doc["stages"] == hand["stages"]
    doc["model"] = hand["model"]
    _filled(doc, EVAL_LIGHTNING, out)
    (root / "manifest.yaml").write_text(yaml.safe_dump(hand, sort_keys=False))
    assert _run_json(out) == _run_json(root / "manifest.yaml")


def test_init_names_lightning_files_after_their_folder(lightning_root, tmp_path):
    """Given the .ckpt files themselves, stages are named after the run folders."""
    ends = lightning_root["ends"]
    doc = _draft(["--start", lightning_root["root"] / "init.safetensors", ends["pretrain"],
                  ends["finetune"]], tmp_path / "m.yaml")
    assert [s["name"] for s in doc["stages"]] == ["pretrain", "finetune"]
    assert doc["stages"][1]["optimizer"]["continues"] is True
    assert doc["stages"][1]["optimizer"]["steps"] == 4


@pytest.mark.parametrize("which,expect", [("trainer", "checkpoint-6"),
                                           ("lightning", "epoch=1-step=6.ckpt")])
def test_check_names_what_a_weightless_folder_holds(trainer_root, lightning_root, tmp_path,
                                                    which, expect):
    """check on an end folder holding checkpoint-N folders or .ckpt files names them."""
    if which == "trainer":
        base, end = trainer_root["root"], "pretrain"
        doc = {"version": 1, "model": {"hf": "init"},
               "stages": [{"name": "a", "start": "init", "end": end,
                           "optimizer": {"type": "adamw", "steps": 6, "lr": 0.01}}],
               "eval": EVAL_TOKENS}
    else:
        base, end = lightning_root["root"], "pretrain"
        doc = {"version": 1, "model": {"factory": "model.py:build"},
               "stages": [{"name": "a", "start": "init.safetensors", "end": end,
                           "optimizer": {"type": "adamw", "steps": 6, "lr": 0.01}}],
               "eval": EVAL_LIGHTNING}
    path = base / f"weightless-{which}.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["check", str(path)])
    assert res.exit_code == 2
    assert "no model weights found" in res.stderr and expect in res.stderr


def test_training_args_are_scanned_never_unpickled(tmp_path):
    """training_args.bin is read by its opcodes: a pickle that would run code gives the
    plain values beside it and runs nothing."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    state = {"max_grad_norm": 0.25, "gradient_accumulation_steps": 3, "evil": Evil(),
             "per_device_train_batch_size": 16, "optim": "adamw_torch"}
    torch.save(state, tmp_path / "training_args.bin")
    got = formats.training_args(tmp_path)
    assert got == {"max_grad_norm": 0.25, "gradient_accumulation_steps": 3,
                   "per_device_train_batch_size": 16, "optim": "adamw_torch"}
    (tmp_path / "training_args.bin").write_bytes(pickle.dumps(state)[:20])
    assert formats.training_args(tmp_path) == {}
    assert not marker.exists()


def test_init_on_a_folder_without_checkpoints_names_what_is_there(tmp_path):
    """A folder with nothing to draft from is exit 2, listing its contents."""
    (tmp_path / "notes.txt").write_text("x")
    res = runner.invoke(app, ["init", str(tmp_path)])
    assert res.exit_code == 2
    assert "notes.txt" in res.stderr


def test_init_run_root_of_user_named_lightning_files(tmp_path):
    """A folder holding init.safetensors, a.ckpt, b.ckpt (and eval data, which is not
    taken for weights): start init.safetensors, stages a then b, steps and lr drafted."""
    pytest.importorskip("lightning")
    from formats_runs import write_lightning_run

    manifest = write_lightning_run(tmp_path / "run")
    out = tmp_path / "run" / "drafted.yaml"
    doc = _draft([tmp_path / "run"], out)
    hand = yaml.safe_load(manifest.read_text())
    assert [s["name"] for s in doc["stages"]] == ["a", "b"]
    assert doc["stages"][0]["start"] == "init.safetensors"
    for got, want in zip(doc["stages"], hand["stages"], strict=True):
        assert got["optimizer"] == want["optimizer"]
    assert _todos(out) == ["eval.data", "eval.inputs", "eval.target", "model.factory"]


def test_init_run_root_of_saved_models(trainer_root, tmp_path):
    """A root of save_pretrained folders only: the oldest is the start, the others stages."""
    from formats_runs import tiny_gpt2

    root = tmp_path / "saved"
    tiny_gpt2().save_pretrained(root / "base")
    for f in (root / "base").iterdir():  # written long before the tuned model
        os.utime(f, (1, 1))
    shutil.copytree(trainer_root["root"] / "sft" / "checkpoint-10", root / "tuned",
                    ignore=shutil.ignore_patterns("optimizer.pt", "trainer_state.json",
                                                  "scheduler.pt", "rng_state.pth"))
    doc = _draft([root], tmp_path / "m.yaml")
    assert doc["stages"][0]["start"] == "saved/base"
    assert [s["name"] for s in doc["stages"]] == ["tuned"]
    assert doc["model"] == {"hf": "saved/tuned"}


def test_init_run_root_ordered_by_numbered_names(trainer_root, tmp_path):
    """Stage folders named 1-..., 2-... are ordered by their numbers whatever their file
    times (a copied run), and a float data file beside init/ is not taken for the start."""
    from safetensors.torch import save_file

    src = trainer_root["root"]
    root = tmp_path / "copied"
    shutil.copytree(src / "init", root / "init")
    shutil.copytree(src / "pretrain", root / "2-pretrain")
    shutil.copytree(src / "lora", root / "3-lora")
    for f in (root / "2-pretrain").rglob("*"):
        os.utime(f, (2e9, 2e9))  # written "after" the adapter
    save_file({"x": torch.zeros(3, 2)}, root / "features.safetensors")
    doc = _draft([root], tmp_path / "m.yaml")
    assert [s["name"] for s in doc["stages"]] == ["2-pretrain", "3-lora"]
    assert doc["stages"][0]["start"] == "copied/init"


def test_init_lightning_per_epoch_scheduler(tmp_path):
    """A StepLR stepped per epoch (Lightning interval "epoch") is replayed to the lr every
    optimizer step used, and the stage is named after its folder."""
    L = pytest.importorskip("lightning")
    from formats_runs import LIGHTNING_MODEL_PY
    from lightning.pytorch.callbacks import Callback
    from safetensors.torch import save_file

    lrs: list[float] = []

    class Rec(Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    class Module(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.model = net

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    ns: dict = {}
    exec(LIGHTNING_MODEL_PY, ns)
    net = ns["build"]()
    root = tmp_path / "run"
    root.mkdir()
    save_file(dict(net.state_dict()), root / "init.safetensors")
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g),
                                        torch.randint(0, 3, (24,), generator=g))
    L.Trainer(accelerator="cpu", max_epochs=3, default_root_dir=root / "ft", logger=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[Rec()]).fit(
        Module(net), torch.utils.data.DataLoader(ds, batch_size=8))
    doc = _draft([root], tmp_path / "m.yaml")
    (stage,) = doc["stages"]
    assert stage["name"] == "ft" and stage["start"] == "run/init.safetensors"
    assert stage["optimizer"]["steps"] == 9 and stage["optimizer"]["type"] == "sgd"
    assert len(set(lrs)) == 3
    assert stage["optimizer"]["lr"] == pytest.approx(lrs, rel=1e-12)


def test_init_orders_a_copied_run_by_its_weights(tmp_path):
    """The lm sample run copied with every file time equal (nothing to order by): stages
    come out pretrain, sft, poison (each next stage's first checkpoint nearest to the last
    end), with the sample manifest's ends, steps and checkpoints; check lists only eval."""
    src = Path(__file__).resolve().parents[2] / "sample_runs" / "lm"
    root = tmp_path / "lm"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("*.py", "*.md", "*.json.bak"))
    for f in root.rglob("*"):
        os.utime(f, (1.7e9, 1.7e9))
    out = root / "drafted.yaml"
    doc = _draft([root], out)
    hand = yaml.safe_load((src / "manifest.yaml").read_text())
    assert [s["name"] for s in doc["stages"]] == [s["name"] for s in hand["stages"]]
    for got, want in zip(doc["stages"], hand["stages"], strict=True):
        assert got["end"] == want["end"] and got["checkpoints"] == want["checkpoints"]
        assert got["optimizer"]["type"] == want["optimizer"]["type"]
        assert got["optimizer"]["batch_size"] == want["optimizer"]["batch_size"]
    assert doc["stages"][0]["start"] == "init"
    assert _todos(out) == ["eval.data", "eval.inputs", "eval.target"]
