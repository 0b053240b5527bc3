"""Hostile input in Hugging Face Trainer runs and PEFT adapter stages (issue 13's contract).

Each case damages one file of a copy of a real Trainer-written run: sample_runs/lm (three
``checkpoint-N`` stages written by transformers.Trainer) or a tiny run whose last stage is a
PEFT LoRA adapter (tests/formats_runs.py's write_hf_run, trained once per session), and
asserts exit 2, a message naming the file and what is wrong, and no traceback. A hang
guard fails a test that blocks (never a timing assertion).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from reportkit import cli
from test_hostile import refused

LM = Path(__file__).resolve().parents[1] / "sample_runs" / "lm"
SFT = "sft/checkpoint-64"


# a test that blocks fails after 60 s (conftest.hang_guard)
pytestmark = pytest.mark.usefixtures("hang_guard")


@pytest.fixture
def lm_dir(tmp_path: Path) -> Path:
    """A fresh copy of sample_runs/lm (never edited in place)."""
    dst = tmp_path / "lm"
    shutil.copytree(LM, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _no_logged_lrs(run: Path) -> None:
    """sft's trainer_state.json logs no learning rate: acctattr turns to training_args.bin's
    schedule (and scheduler.pt)."""
    _edit_json(run / SFT / "trainer_state.json",
               lambda d: [h.pop("learning_rate", None) for h in d["log_history"]])


# ---------------------------------------------------------------- files that block


@pytest.mark.parametrize("name", ["training_args.bin", "scheduler.pt"])
def test_fifo_beside_a_trainer_checkpoint_never_blocks(lm_dir, name):
    """A FIFO as training_args.bin or scheduler.pt (read only when no lr was logged) is
    never opened: the stage is refused for its missing lrs instead of hanging."""
    _no_logged_lrs(lm_dir)
    if name == "scheduler.pt":
        torch.save({"learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 6},
                   lm_dir / SFT / "training_args.bin")
    (lm_dir / SFT / name).unlink(missing_ok=True)
    os.mkfifo(lm_dir / SFT / name)
    refused(cli("check", lm_dir / "manifest.yaml"), "stage 'sft'", "trainer_state.json",
            "no learning_rate")


# ---------------------------------------------------------------- trainer_state.json


def _log_entry(i: int, **change):
    """Change log_history entry i (step i + 1) of sft's trainer_state.json."""
    return lambda d: d["log_history"][i].update(change)


@pytest.mark.parametrize("fn,needle", [
    (_log_entry(3, step=-5), "step -5"),
    (_log_entry(3, step=10**18), "not a whole number from 0 to global_step 64"),
    (_log_entry(3, step="4"), "step '4'"),
    (_log_entry(3, step=4.0), "step 4.0"),
    (_log_entry(3, step=True), "step True"),
    (_log_entry(3, learning_rate=True), "learning_rate True at step 4 is not a number"),
    (_log_entry(3, step=3), "gives step 3 two learning rates"),
])
def test_log_history_a_trainer_never_writes_is_refused(lm_dir, fn, needle):
    """A learning_rate entry at a step outside 0..global_step, at a step that is not a whole
    number, a boolean lr, or two lrs for one step: refused naming the file (they were
    dropped or taken silently, shifting the stage's lrs)."""
    _edit_json(lm_dir / SFT / "trainer_state.json", fn)
    refused(cli("check", lm_dir / "manifest.yaml"), "stage 'sft'",
            f"{SFT}/trainer_state.json", needle)


@pytest.mark.parametrize("text,needle", [
    ("", "not readable JSON"),
    ('{"model_type": "gpt2", "transform', "not readable JSON"),
    ("[]", "expected a JSON object"),
    ('{"transformers_version": "abc"}', "transformers_version 'abc' is not a version"),
    ('{"transformers_version": [4, 51]}', "transformers_version [4, 51] is not a version"),
])
def test_unreadable_config_beside_trainer_state_is_refused(lm_dir, text, needle):
    """A checkpoint folder's config.json decides which step each logged lr belongs to
    (transformers_version); one that cannot be read is refused naming it, not taken as
    the older convention (every lr shifted by a step, a plausible result)."""
    (lm_dir / SFT / "config.json").write_text(text)
    refused(cli("check", lm_dir / "manifest.yaml"), "stage 'sft'", f"{SFT}/config.json",
            needle)


def test_config_with_fewer_layers_than_the_checkpoints_is_refused(lm_dir):
    """init/config.json saying 1 layer while every checkpoint holds 2: the second layer's
    tensors were ignored and a 1-layer model evaluated (exit 0, a plausible table); now
    exit 2 naming the checkpoint and the tensors the model has no module for."""
    _edit_json(lm_dir / "init" / "config.json", lambda d: d.update(n_layer=1))
    refused(cli("run", lm_dir / "manifest.yaml", "-q", "--estimator", "naive"),
            "init/model.safetensors", "tensor(s) of modules the model does not have",
            "transformer.h.1.attn.c_attn.bias")


# ---------------------------------------------------------------- training_args.bin


@pytest.mark.parametrize("args", [
    {"warmup_steps": 0, "warmup_ratio": 1e300},
    {"warmup_steps": 10**30},  # pickled as LONG1: the opcode scan cannot read it
    {},
])
def test_training_args_that_fix_no_schedule_are_not_followed(lm_dir, args):
    """With no lr logged, a training_args.bin whose warmup is beyond the run or unreadable
    fixes no schedule: the stage is refused for its missing lrs (a made-up schedule, every
    lr near 0, passed scheduler.pt's one check at the run's end, where a linear or cosine
    schedule is 0 whatever its warmup)."""
    _no_logged_lrs(lm_dir)
    torch.save({"learning_rate": 1e-3, "lr_scheduler_type": "cosine", **args},
               lm_dir / SFT / "training_args.bin")
    refused(cli("check", lm_dir / "manifest.yaml"), "stage 'sft'", "no learning_rate")


def test_a_hostile_training_args_pickle_is_never_run(lm_dir, tmp_path):
    """training_args.bin is scanned, never unpickled: a pickle that would run a command
    leaves no trace (acctattr check and init read it when no lr was logged)."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _no_logged_lrs(lm_dir)
    torch.save({"learning_rate": Evil(), "lr_scheduler_type": "linear", "warmup_steps": 6},
               lm_dir / SFT / "training_args.bin")
    refused(cli("check", lm_dir / "manifest.yaml"), "stage 'sft'")
    cli("init", lm_dir / "pretrain", lm_dir / "sft", lm_dir / "poison", "--start",
        lm_dir / "init")
    assert not marker.exists()


# ---------------------------------------------------------------- PEFT LoRA adapter stage

ADAPTER = "lora/checkpoint-4"
A_KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B_KEY = A_KEY.replace("lora_A", "lora_B")


@pytest.fixture(scope="session")
def lora_pristine(tmp_path_factory) -> Path:
    """init -> 'sft' (Trainer) -> 'lora' (a PEFT LoRA adapter), trained once per session."""
    pytest.importorskip("peft")
    from formats_runs import write_hf_run

    return write_hf_run(tmp_path_factory.mktemp("hf-lora"))["manifest"].parent


@pytest.fixture
def lora_dir(lora_pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(lora_pristine, dst)
    return dst


@pytest.mark.parametrize("change,needle", [
    ({"lora_alpha": float("nan")}, "lora_alpha is nan, not a finite number"),
    ({"lora_alpha": float("inf"), "alpha_pattern": {}}, "lora_alpha is inf"),
    ({"alpha_pattern": {"c_attn": float("nan")}}, "alpha_pattern['c_attn'] is nan"),
    ({"alpha_pattern": [1]}, "alpha_pattern is list, not an object"),
    ({"rank_pattern": ["x"]}, "rank_pattern is list, not an object"),
    ({"alpha_pattern": {"c_attn(": 3}}, "alpha_pattern key 'c_attn(' is not a regular"),
])
def test_malformed_adapter_config_is_refused(lora_dir, change, needle):
    """adapter_config.json with a non-finite alpha (NaN weights after merging, exit 0 with
    a warning), a pattern that is not an object or a regular expression (internal errors):
    exit 2 naming the file and key."""
    _edit_json(lora_dir / ADAPTER / "adapter_config.json", lambda d: d.update(change))
    refused(cli("check", lora_dir / "manifest.yaml"), "stage 'lora'",
            f"{ADAPTER}/adapter_config.json", needle)


@pytest.mark.parametrize("key", ["use_rslora", "fan_in_fan_out"])
def test_adapter_flag_that_is_not_a_boolean_is_refused(lora_dir, key):
    """use_rslora / fan_in_fan_out "false" (a string) was read as True (bool("false")),
    changing the merged delta: exit 2 naming the key."""
    _edit_json(lora_dir / ADAPTER / "adapter_config.json", lambda d: d.update({key: "false"}))
    refused(cli("check", lora_dir / "manifest.yaml"), "stage 'lora'",
            f"{key} is 'false', not true or false")


def test_lora_alpha_zero_merges_nothing(lora_dir):
    """lora_alpha 0 scales every delta by 0, as in PEFT (it was taken as r: scaling 1),
    so the adapter stage's effect is exactly 0."""
    _edit_json(lora_dir / ADAPTER / "adapter_config.json",
               lambda d: d.update(lora_alpha=0, alpha_pattern={}))
    r = cli("run", lora_dir / "manifest.yaml", "-q", "-f", "json", "--estimator", "frozen")
    assert r.exit_code == 0, r.stderr
    effects = {s["name"]: s["effect"] for s in json.loads(r.stdout)["stages"]}
    assert effects["lora"] == 0.0 and effects["sft"] != 0.0


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update({A_KEY: torch.zeros(0, 16), B_KEY: torch.zeros(48, 0)}),
     "not a linear LoRA pair of rank >= 1"),
    (lambda d: d.update({A_KEY: d[A_KEY].long()}), "is torch.int64, not floating point"),
    (lambda d: d.update({A_KEY: d[A_KEY] * 1e38, B_KEY: d[B_KEY] * 1e38}),
     "merging it gives NaN or Inf values in 'transformer.h.0.attn.c_attn.weight'"),
])
def test_adapter_matrices_that_cannot_merge_are_refused(lora_dir, edit, needle):
    """lora_A / lora_B of rank 0 (a division by zero), of integers, or so large the merged
    weight overflows: exit 2 naming the adapter file (was an internal error, or a run on
    NaN weights)."""
    from safetensors.torch import load_file, save_file

    path = lora_dir / ADAPTER / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    refused(cli("check", lora_dir / "manifest.yaml"), "stage 'lora'",
            f"{ADAPTER}/adapter_model.safetensors", needle)


# ---------------------------------------------------------------- optimizer.pt


def test_optimizer_state_keyed_by_ids_no_group_lists_is_refused(lm_dir):
    """optimizer.pt whose 'state' ids are not the param groups' ids (here strings): its
    moments were dropped and every parameter taken as never stepped (exit 0); now exit 2
    naming the file and the ids."""
    path = lm_dir / SFT / "optimizer.pt"
    sd = torch.load(path, weights_only=True)
    sd["state"] = {str(k): v for k, v in sd["state"].items()}
    torch.save(sd, path)
    refused(cli("check", lm_dir / "manifest.yaml"), "stage 'sft'", "optimizer.pt",
            "parameter id(s) '0', '1'", "that no param group lists")
