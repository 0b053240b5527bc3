"""Staged runs written by the real tools: transformers.Trainer (+ PEFT LoRA) and Lightning.

Everything is built from configs (no downloads) and trained for a few steps on tiny
synthetic data, so a whole run takes seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

VOCAB, SEQ, N_EVAL = 32, 6, 40


def token_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, SEQ), generator=g)  # 0 is the pad token
    return x, (x[:, 0] % 2)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int = 32) -> None:
        self.x, self.y = token_data(seed, n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _args(out: Path, steps: int, lr: float, **kw):
    from transformers import TrainingArguments

    kw.setdefault("save_steps", steps)
    return TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, save_strategy="steps",
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0, **kw)


def tiny_gpt2():
    """A seeded one-layer GPT-2 sequence classifier built from a config (no download)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB,  # type: ignore[call-arg]
                     n_positions=8, num_labels=2, pad_token_id=0, bos_token_id=1,
                     eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     summary_first_dropout=0.0)
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(cfg)


def write_hf_run(root: Path) -> dict:
    """init/ -> 'sft' (full fine-tune, Trainer) -> 'lora' (PEFT LoRA adapter, Trainer).

    Returns the recorded per-step lrs of 'sft' and the eval metric (cross entropy) of the
    model with and without the adapter, computed by PEFT itself (the truth for the LoRA
    stage's direct effect when it is the last stage).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback

    class RecordLr(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    model = tiny_gpt2()
    model.save_pretrained(root / "init")
    rec = RecordLr()
    Trainer(model=model, args=_args(root / "sft", 6, 1e-2, weight_decay=0.1, warmup_steps=2,
                                    lr_scheduler_type="linear", logging_steps=1),
            train_dataset=_Tokens(1), callbacks=[rec]).train()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                      fan_in_fan_out=True, lora_dropout=0.0, use_rslora=True,
                      rank_pattern={"mlp.c_proj": 2}, alpha_pattern={"c_attn": 12})
    peft_model = get_peft_model(model, lora)
    Trainer(model=peft_model, args=_args(root / "lora", 4, 5e-2, logging_steps=2),
            train_dataset=_Tokens(2)).train()
    for f in root.rglob("training_args.bin"):  # acctattr must never unpickle these
        f.write_bytes(b"not a pickle: opening this file is a bug")

    x, y = token_data(3, N_EVAL)
    save_file({"input_ids": x, "label": y, "group": x[:, 1] % 2},
              root / "eval.safetensors")
    peft_model.eval()
    with torch.no_grad():
        with_adapter = _ce(peft_model(input_ids=x).logits, y)
        with peft_model.disable_adapter():
            without = _ce(peft_model(input_ids=x).logits, y)
    doc = {
        "version": 1,
        "model": {"hf": "init"},
        "stages": [
            {"name": "sft", "start": "init", "end": "sft/checkpoint-6",
             "optimizer": {"type": "adamw"}},
            {"name": "lora", "end": {"adapter": "lora/checkpoint-4"}},
        ],
        "eval": {"data": "eval.safetensors", "inputs": ["input_ids"], "target": "label",
                 "group": "group", "batch_size": 16},
    }
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return {"manifest": root / "manifest.yaml", "sft_lrs": rec.lrs,
            "with_adapter": with_adapter, "without_adapter": without}


def write_short_trainer_run(root: Path) -> Path:
    """init/ -> 's1' -> 's2': a tiny GPT-2 fine-tuned by transformers.Trainer in two stages
    of 8 AdamW steps on 32 examples (batch 4), each stage with its data file, so unrolled
    can run. The second stage is short and noise-dominated: its training loss barely falls
    (0.690 -> 0.665), far less than Adam's expected dynamics would lower it (the case
    Reproduction catches; bench/trainer_short.py). Returns the manifest."""
    from transformers import Trainer

    model = tiny_gpt2()
    model.save_pretrained(root / "init")
    Trainer(model=model, args=_args(root / "s1", 8, 1e-2, weight_decay=0.1, warmup_steps=2,
                                    lr_scheduler_type="linear", logging_steps=1),
            train_dataset=_Tokens(1)).train()
    Trainer(model=model, args=_args(root / "s2", 8, 5e-3, logging_steps=1),
            train_dataset=_Tokens(2)).train()
    for seed, name in ((1, "s1"), (2, "s2")):
        x, y = token_data(seed, 32)
        save_file({"input_ids": x, "label": y}, root / f"{name}.safetensors")
    x, y = token_data(3, N_EVAL)
    save_file({"input_ids": x, "label": y, "group": x[:, 1] % 2}, root / "eval.safetensors")
    doc = {"version": 1, "model": {"hf": "init"},
           "stages": [{"name": "s1", "start": "init", "end": "s1/checkpoint-8",
                       "optimizer": {"type": "adamw"}, "data": "s1.safetensors"},
                      {"name": "s2", "end": "s2/checkpoint-8", "optimizer": {"type": "adamw"},
                       "data": "s2.safetensors"}],
           "eval": {"data": "eval.safetensors", "inputs": ["input_ids"], "target": "label",
                    "group": "group", "batch_size": 16}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "manifest.yaml"


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.double(), y, reduction="none")


LIGHTNING_MODEL_PY = """import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
"""


def _lightning_start(root: Path):
    """root/model.py (LIGHTNING_MODEL_PY) and its seeded network saved as
    root/init.safetensors; returns the network."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.py").write_text(LIGHTNING_MODEL_PY)
    ns: dict = {}
    exec(LIGHTNING_MODEL_PY, ns)
    net = ns["build"]()
    save_file(dict(net.state_dict()), root / "init.safetensors")
    return net


def write_lightning_run(root: Path) -> Path:
    """Two stages trained by lightning.Trainer (SGD with momentum), saved as .ckpt files
    whose keys carry the LightningModule's ``model.`` prefix."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, net: torch.nn.Module, lr: float) -> None:
            super().__init__()
            self.model = net
            self.lr = lr

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9,
                                   weight_decay=1e-2)

    net = _lightning_start(root)
    for k, (name, lr) in enumerate((("a", 0.1), ("b", 0.05))):
        g = torch.Generator().manual_seed(10 + k)
        ds = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g),
                                            torch.randint(0, 3, (32,), generator=g))
        trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(Module(net, lr), torch.utils.data.DataLoader(ds, batch_size=8))
        trainer.save_checkpoint(root / f"{name}.ckpt")
    g = torch.Generator().manual_seed(99)
    save_file({"x": torch.randn(24, 4, generator=g), "y": torch.randint(0, 3, (24,), generator=g)},
              root / "eval.safetensors")
    doc = {
        "version": 1,
        "model": {"factory": "model.py:build"},
        "stages": [
            {"name": "a", "start": "init.safetensors", "end": "a.ckpt",
             "optimizer": {"type": "sgd", "steps": 5, "lr": 0.1, "state": "a.ckpt"}},
            {"name": "b", "end": "b.ckpt",
             "optimizer": {"type": "sgd", "steps": 5, "lr": 0.05, "state": "b.ckpt"}},
        ],
        "eval": {"data": "eval.safetensors", "inputs": ["x"], "target": "y"},
    }
    (root / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "manifest.yaml"


# ---------------------------------------------------------------- run folders as users have them

def write_trainer_root(root: Path) -> dict:
    """A run root as a Trainer user leaves it, nothing written by hand:

    init/      the model before training (save_pretrained)
    pretrain/  Trainer output_dir: checkpoint-3, checkpoint-6 (AdamW, grad accumulation 2,
               max_grad_norm 0.5, linear schedule with warmup)
    sft/       resumed from pretrain/checkpoint-6 (resume_from_checkpoint) to step 10:
               checkpoint-8, checkpoint-10
    lora/      a PEFT LoRA adapter trained by a new Trainer: checkpoint-4

    Returns the paths and a hand-written manifest of the same run (without eval)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    model = tiny_gpt2()
    model.save_pretrained(root / "init")
    Trainer(model=model, args=_args(root / "pretrain", 6, 1e-2, save_steps=3, warmup_steps=2,
                                    weight_decay=0.1, lr_scheduler_type="linear",
                                    gradient_accumulation_steps=2, max_grad_norm=0.5,
                                    logging_steps=1),
            train_dataset=_Tokens(1)).train()
    Trainer(model=model, args=_args(root / "sft", 10, 1e-2, save_steps=2, weight_decay=0.1,
                                    lr_scheduler_type="linear", logging_steps=1),
            train_dataset=_Tokens(4)).train(
        resume_from_checkpoint=str(root / "pretrain" / "checkpoint-6"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                      lora_dropout=0.0)
    Trainer(model=get_peft_model(model, lora),
            args=_args(root / "lora", 4, 5e-2, logging_steps=1), train_dataset=_Tokens(2)).train()
    x, y = token_data(3, N_EVAL)
    save_file({"input_ids": x, "label": y, "group": x[:, 1] % 2}, root / "eval.safetensors")
    hand = {
        "version": 1,
        "model": {"hf": "sft/checkpoint-10"},
        "stages": [
            {"name": "pretrain", "start": "init", "end": "pretrain/checkpoint-6",
             "optimizer": {"type": "adamw", "steps": 6,
                           "lr": {"trainer_state": "pretrain/checkpoint-6/trainer_state.json"},
                           "state": "pretrain/checkpoint-6/optimizer.pt",
                           "max_grad_norm": 0.5, "batch_size": 4, "grad_accumulation": 2},
             "checkpoints": [{"step": 3, "path": "pretrain/checkpoint-3"}]},
            {"name": "sft", "end": "sft/checkpoint-10",
             "optimizer": {"type": "adamw", "steps": 4, "continues": True,
                           "lr": {"trainer_state": "sft/checkpoint-10/trainer_state.json"},
                           "state": "sft/checkpoint-10/optimizer.pt",
                           "max_grad_norm": 1.0, "batch_size": 4},
             "checkpoints": [{"step": int(c.name.split("-")[1]) - 6,
                              "path": f"sft/{c.name}"} for c in sorted(
                                  (root / "sft").glob("checkpoint-*"))
                             if c.name != "checkpoint-10"]},
            {"name": "lora", "end": {"adapter": "lora/checkpoint-4"}},
        ],
        "eval": EVAL_TOKENS,
    }
    return {"root": root, "hand": hand}


EVAL_TOKENS = {"data": "eval.safetensors", "inputs": ["input_ids"], "target": "label",
               "group": "group", "batch_size": 16}
EVAL_LIGHTNING = {"data": "eval.safetensors", "inputs": ["x"], "target": "y"}


def write_lightning_root(root: Path) -> dict:
    """A Lightning run folder as Lightning leaves it (a logger, ModelCheckpoint every 3
    steps, Adam with a per-step CosineAnnealingLR):

    model.py, init.safetensors
    pretrain/lightning_logs/version_0/checkpoints/epoch=0-step=3.ckpt, epoch=1-step=6.ckpt
    finetune/lightning_logs/version_0/checkpoints/epoch=..-step=8.ckpt, ..-step=10.ckpt
              (resumed from pretrain's step-6 checkpoint with ckpt_path=)

    Returns the paths, the lrs each stage's steps used (recorded by a callback) and a
    hand-written manifest."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    lrs: list[float] = []

    class RecordLr(Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    class Module(L.LightningModule):
        def __init__(self, net: torch.nn.Module, batch_size: int = 8) -> None:
            super().__init__()
            self.model = net
            self.save_hyperparameters(ignore=["net"])

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=1e-2)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-3)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    net = _lightning_start(root)
    g = torch.Generator().manual_seed(10)
    ds = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g),
                                        torch.randint(0, 3, (24,), generator=g))
    ckpt_paths = {}
    for name, steps, resume in (("pretrain", 6, None), ("finetune", 10, "pretrain")):
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=root / name,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[RecordLr(), ModelCheckpoint(every_n_train_steps=3 if
                                                                   name == "pretrain" else 2,
                                                                   save_top_k=-1)])
        trainer.fit(Module(net), torch.utils.data.DataLoader(ds, batch_size=8),
                    ckpt_path=ckpt_paths.get(resume))
        ckpt_paths[name] = max((root / name).rglob("*.ckpt"),
                               key=lambda p: torch.load(p, weights_only=True)["global_step"])
    g = torch.Generator().manual_seed(99)
    save_file({"x": torch.randn(24, 4, generator=g), "y": torch.randint(0, 3, (24,), generator=g)},
              root / "eval.safetensors")
    rel = {k: v.relative_to(root).as_posix() for k, v in ckpt_paths.items()}
    inner = {k: sorted(p.relative_to(root).as_posix() for p in (root / k).rglob("*.ckpt")
                       if p != ckpt_paths[k]) for k in ckpt_paths}
    hand = {
        "version": 1,
        "model": {"factory": "model.py:build"},
        "stages": [
            {"name": "pretrain", "start": "init.safetensors", "end": rel["pretrain"],
             "optimizer": {"type": "adamw", "steps": 6, "lr": lrs[:6],
                           "state": rel["pretrain"], "batch_size": 8},
             "checkpoints": [{"step": 3, "path": inner["pretrain"][0]}]},
            {"name": "finetune", "end": rel["finetune"],
             "optimizer": {"type": "adamw", "steps": 4, "lr": lrs[6:], "continues": True,
                           "state": rel["finetune"], "batch_size": 8},
             "checkpoints": [{"step": 2, "path": inner["finetune"][0]}]},
        ],
        "eval": EVAL_LIGHTNING,
    }
    return {"root": root, "lrs": lrs, "hand": hand, "ends": ckpt_paths, "inner": inner}
