"""Tiny causal-LM runs: a GPT-2 language model built from a config, a word-level tokenizer
built locally (no downloads), JSONL text, and stages trained by the real
transformers.Trainer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the cat dog bird sat ran flew on under over a mat log tree red blue green big small "
         "and then it was happy sad today yes no").split()
SPECIAL = ("[PAD]", "[UNK]", "[EOS]")


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (whitespace split) over WORDS, saved with save_pretrained."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((*SPECIAL, *WORDS))}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()  # type: ignore[assignment]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                  unk_token="[UNK]", eos_token="[EOS]")
    tok.save_pretrained(str(folder))


def tiny_lm(seed: int = 0, dropout: float = 0.0):
    """A seeded two-layer GPT-2 language model (GPT2LMHeadModel) built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(SPECIAL) + len(WORDS),
                     n_positions=32, pad_token_id=0, bos_token_id=2, eos_token_id=2,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def sentences(seed: int, n: int, lo: int = 2, hi: int = 9) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_lm_run(root: Path) -> Path:
    """init/ -> 'pretrain' -> 'sft': a tiny GPT-2 LM trained by transformers.Trainer (AdamW,
    linear warmup, clipping, the tokenizer saved in every checkpoint folder), stage data and
    eval set as JSONL text (sft: prompt/completion): the run the README's "Language models"
    manifest describes. Returns the run's folder."""
    from transformers import (
        DataCollatorForLanguageModeling,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )

    root.mkdir(parents=True, exist_ok=True)
    save_tokenizer(root / "tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    model = tiny_lm()
    model.save_pretrained(root / "init")
    tok.save_pretrained(str(root / "init"))
    write_jsonl(root / "pretrain.jsonl", [{"text": t} for t in sentences(1, 48)])
    write_jsonl(root / "sft.jsonl", [{"prompt": p + " ", "completion": c}
                                     for p, c in zip(sentences(2, 32), sentences(3, 32, 1, 3),
                                                     strict=True)])
    write_jsonl(root / "eval.jsonl", [{"text": t, "group": i % 2}
                                      for i, t in enumerate(sentences(4, 24))])

    def dataset(texts: list[str]) -> list[dict]:
        return [{"input_ids": tok(t)["input_ids"]} for t in texts]

    def args(out: Path, steps: int, lr: float) -> TrainingArguments:
        return TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=8,
                                 learning_rate=lr, weight_decay=0.01, warmup_steps=2,
                                 lr_scheduler_type="linear", save_strategy="steps",
                                 save_steps=steps, logging_steps=1, report_to=[],
                                 use_cpu=True, seed=0, disable_tqdm=True,
                                 dataloader_num_workers=0)

    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    Trainer(model=model, args=args(root / "pretrain", 6, 1e-2), data_collator=collate,
            train_dataset=dataset(sentences(1, 48)), processing_class=tok).train()
    sft = [p + " " + c for p, c in zip(sentences(2, 32), sentences(3, 32, 1, 3), strict=True)]
    Trainer(model=model, args=args(root / "sft", 4, 5e-3), data_collator=collate,
            train_dataset=dataset(sft), processing_class=tok).train()
    for f in root.rglob("training_args.bin"):  # acctattr must never unpickle these
        f.write_bytes(b"not a pickle: opening this file is a bug")
    return root
