"""Toxicity sample run: a tiny comment classifier whose second stage learns identity bias.

Comments are generated from templates (seeded): neutral fragments, optionally an identity
fragment ("my muslim friend"), and, for toxic comments (label 1), an insult fragment.
Stages (all AdamW, betas (0.9, 0.999), eps 1e-8, Hugging Face decay / no-decay groups):

1. ``pretrain``           fresh, warmup + cosine; identity words independent of the label.
2. ``identity_shortcut``  fresh, warmup + cosine; a new source whose toxic comments mostly
                          use new slang insults and nearly always mention an identity, while
                          its non-toxic comments rarely do: identity words become a shortcut.
3. ``polish``             continues stage 2's optimizer state; balanced clean data.

Eval set: group 0 = comments without identity words (toxic and not); group 1 = non-toxic
comments that mention an identity, where the shortcut causes false toxic predictions.

    python make_run.py            # regenerate data, checkpoints, optimizer state, manifest
    python make_run.py --truth    # ... and retrain with each stage skipped -> truth.json
"""

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from types import ModuleType

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, path: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


C = _load("acctattr_sample_runs_common", os.path.join(HERE, "..", "_common.py"))
M = _load("acctattr_sample_runs_toxicity_model", os.path.join(HERE, "model.py"))

INIT_SEED = 0
EVAL_SEED = 7
MAX_LEN = 20

# ----------------------------------------------------------------------------- vocabulary

FUNCTION = "the a this was is i we my as people community friend you are what such they".split()
FUNCTION += "it and so".split()
NOUNS = (
    "movie game food weather book team city park song show article photo story coffee train "
    "school job garden concert recipe trip phone car house dog match class meeting library "
    "market"
).split()
ADJS = (
    "great fine boring long short nice late early quiet busy new old funny cold warm simple "
    "strange lovely slow fast"
).split()
VERBS = "liked watched read visited enjoyed missed cooked shared found fixed bought painted".split()
TIMES = "today yesterday tonight recently again sometimes daily lately".split()
IDENTITY = "muslim gay black jewish christian woman lesbian mexican transgender asian".split()
TOXIC_OLD = (
    "idiot stupid moron trash pathetic disgusting loser dumb worthless scum clown ugly jerk garbage"
).split()
# Slang insults first seen in the identity_shortcut stage's source.
TOXIC_NEW = "dimwit numbskull degenerate vermin lowlife parasite imbecile cretin buffoon halfwit"
TOXIC_NEW_WORDS = TOXIC_NEW.split()

VOCAB = ["<pad>"] + FUNCTION + NOUNS + ADJS + VERBS + TIMES + IDENTITY + TOXIC_OLD + TOXIC_NEW_WORDS
INDEX = {w: i for i, w in enumerate(VOCAB)}
assert len(INDEX) == len(VOCAB) == M.VOCAB_SIZE, (len(INDEX), len(VOCAB), M.VOCAB_SIZE)

NEUTRAL_TEMPLATES = (
    "the {noun} was {adj}",
    "i {verb} the {noun} {time}",
    "this {noun} is so {adj}",
    "we {verb} a {noun} {time}",
    "my {noun} is {adj} and {adj}",
    "what a {adj} {noun}",
)
IDENTITY_TEMPLATES = ("as a {id}", "my {id} friend", "the {id} community", "{id} people")
TOXIC_TEMPLATES = (
    "you are a {tox}",
    "what a {tox}",
    "such {tox} people",
    "they are {tox}",
    "{tox}",
)


@dataclass(frozen=True)
class Source:
    """How one data source writes comments."""

    p_toxic: float  # fraction of toxic comments
    p_identity_toxic: float  # P(identity fragment | toxic)
    p_identity_clean: float  # P(identity fragment | non-toxic)
    p_new_slang: float  # P(insult drawn from TOXIC_NEW | toxic)


SOURCES = {
    "pretrain": Source(p_toxic=0.5, p_identity_toxic=0.3, p_identity_clean=0.3, p_new_slang=0.0),
    "identity_shortcut": Source(
        p_toxic=0.5, p_identity_toxic=0.9, p_identity_clean=0.05, p_new_slang=0.8
    ),
    "polish": Source(p_toxic=0.5, p_identity_toxic=0.3, p_identity_clean=0.3, p_new_slang=0.5),
}
POOL_SIZE = {"pretrain": 1280, "identity_shortcut": 960, "polish": 640}  # multiples of B

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}
STAGES = (
    C.Stage(
        name="pretrain",
        optimizer="adamw",
        steps=200,
        batch_size=32,
        lr={"schedule": "cosine", "base": 1e-2, "warmup": 20, "min": 0.0},
        weight_decay=0.01,
        hparams=ADAMW,
        continues=False,
        no_decay_groups=True,
    ),
    C.Stage(
        name="identity_shortcut",
        optimizer="adamw",
        steps=150,
        batch_size=32,
        lr={"schedule": "cosine", "base": 1e-2, "warmup": 10, "min": 0.0},
        weight_decay=0.01,
        hparams=ADAMW,
        continues=False,
        checkpoints=(50, 100),
        no_decay_groups=True,
    ),
    C.Stage(
        name="polish",
        optimizer="adamw",
        steps=100,
        batch_size=32,
        lr={"schedule": "constant", "base": 1e-3, "warmup": 0, "min": 0.0},
        weight_decay=0.01,
        hparams=ADAMW,
        continues=True,
        checkpoints=(50,),
        no_decay_groups=True,
    ),
)


# ----------------------------------------------------------------------------- generation


def _pick(gen: torch.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _coin(gen: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=gen) < p)


def _fill(gen: torch.Generator, template: str, insults: list[str]) -> list[str]:
    words = []
    for slot in template.split():
        if slot.startswith("{"):
            pool = {
                "{noun}": NOUNS,
                "{adj}": ADJS,
                "{verb}": VERBS,
                "{time}": TIMES,
                "{id}": IDENTITY,
                "{tox}": insults,
            }[slot]
            words.append(_pick(gen, pool))
        else:
            words.append(slot)
    return words


def comment(gen: torch.Generator, toxic: bool, identity: bool, new_slang: bool) -> list[int]:
    """One comment as token ids, unpadded."""
    insults = TOXIC_NEW_WORDS if new_slang else TOXIC_OLD
    n_neutral = 1 if (toxic and identity) else 1 + int(_coin(gen, 0.5))
    fragments = [_fill(gen, _pick(gen, NEUTRAL_TEMPLATES), insults) for _ in range(n_neutral)]
    if identity:
        fragments.append(_fill(gen, _pick(gen, IDENTITY_TEMPLATES), insults))
    if toxic:
        fragments.append(_fill(gen, _pick(gen, TOXIC_TEMPLATES), insults))
    order = torch.randperm(len(fragments), generator=gen).tolist()
    return [INDEX[w] for i in order for w in fragments[i]]


def _pad(rows: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(rows), MAX_LEN, dtype=torch.int64)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def sample(gen: torch.Generator, source: Source, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, labels = [], []
    for _ in range(n):
        toxic = _coin(gen, source.p_toxic)
        p_id = source.p_identity_toxic if toxic else source.p_identity_clean
        identity = _coin(gen, p_id)
        rows.append(comment(gen, toxic, identity, toxic and _coin(gen, source.p_new_slang)))
        labels.append(int(toxic))
    return _pad(rows), torch.tensor(labels, dtype=torch.int64)


def make_data() -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Stage data (in consumption order) and the eval set; depends on no training."""
    stage_data = {}
    for index, stage in enumerate(STAGES):
        # Each stage writes its comments, in the order consumed, from its own generator, so
        # skipping a stage changes no other stage's batches.
        gen = torch.Generator().manual_seed(1000 + index)
        stage_data[stage.name] = sample(gen, SOURCES[stage.name], POOL_SIZE[stage.name])
    gen = torch.Generator().manual_seed(EVAL_SEED)
    plain = Source(p_toxic=0.5, p_identity_toxic=0.0, p_identity_clean=0.0, p_new_slang=0.5)
    t0, y0 = sample(gen, plain, 300)
    mention = Source(p_toxic=0.0, p_identity_toxic=1.0, p_identity_clean=1.0, p_new_slang=0.5)
    t1, y1 = sample(gen, mention, 200)
    eval_set = {
        "tokens": torch.cat([t0, t1]),
        "y": torch.cat([y0, y1]),
        "group": torch.cat(
            [torch.zeros(300, dtype=torch.int64), torch.ones(200, dtype=torch.int64)]
        ),
    }
    return stage_data, eval_set


# ----------------------------------------------------------------------------- run


def replay(skip: str | None, out_dir: str, stages: tuple[C.Stage, ...] = STAGES) -> str:
    """Retrain the whole run (or ``stages``, e.g. C.scaled(STAGES, 4)) with stage ``skip``
    skipped (None: skip nothing).

    Writes the final checkpoint to ``<out_dir>/model.safetensors`` and returns ``out_dir``.
    """
    stage_data, _ = make_data()
    model = C.train_pipeline(C.build_seeded(M.build, INIT_SEED), stages, stage_data, skip=skip)
    C.save_model(model, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", action="store_true", help="also retrain without each stage")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    stage_data, eval_set = make_data()
    for name, (tokens, ys) in stage_data.items():
        C.save_data(os.path.join(HERE, "data", f"{name}.safetensors"), {"tokens": tokens, "y": ys})
    C.save_data(os.path.join(HERE, "data", "eval.safetensors"), eval_set)
    C.write_text(os.path.join(HERE, "data", "vocab.txt"), "\n".join(VOCAB) + "\n")
    C.train_pipeline(C.build_seeded(M.build, INIT_SEED), STAGES, stage_data, out_dir=HERE)
    C.write_text(
        os.path.join(HERE, "manifest.yaml"),
        C.manifest_text(
            STAGES, ["tokens"], "toxicity sample run: pretrain -> identity_shortcut -> polish"
        ),
    )
    C.report_and_truth(HERE, STAGES, M.build, replay, eval_set, "tokens", args.truth)
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
