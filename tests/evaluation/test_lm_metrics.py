"""Causal-LM metrics (next_token_loss, sequence_logprob), JSONL text with a local tokenizer,
and train.loss for causal LMs, on real tiny GPT-2 models (no downloads)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from acctattr.cli import app
from acctattr.errors import DataError, ManifestError
from acctattr.evaluation.curvature import Curvature
from acctattr.evaluation.data import EvalData, stage_sample
from acctattr.evaluation.evaluator import Evaluator
from acctattr.evaluation.lm import next_token_loss, sequence_logprob
from acctattr.evaluation.metrics import RANGES, resolve_metric
from acctattr.runs.manifest import EvalSpec, load_manifest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from lm_runs import save_tokenizer, tiny_lm, write_jsonl, write_lm_run  # noqa: E402

README = Path(__file__).parents[2] / "README.md"
runner = CliRunner()


def eager(model):
    """The model with eager attention, as ``model: {hf: DIR}`` builds it."""
    model.config._attn_implementation = "eager"
    return model.eval()


def padded_batch(seed: int = 0, n: int = 6, width: int = 10, vocab: int = 30):
    """Random token rows of different lengths, right-padded with 0 (attention_mask 0,
    labels -100), the first ``prompt`` tokens of some rows labelled -100 too."""
    g = torch.Generator().manual_seed(seed)
    lengths = [width, 3, 7, 5, width - 1, 2][:n]
    prompts = [0, 1, 3, 0, 4, 0][:n]
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (m, p) in enumerate(zip(lengths, prompts, strict=True)):
        ids[i, :m] = torch.randint(3, vocab, (m,), generator=g)
        mask[i, :m] = 1
        labels[i, p:m] = ids[i, p:m]
    return ids, mask, labels, lengths


@pytest.fixture(scope="module")
def lm():
    return eager(tiny_lm(seed=1)).double()


def test_next_token_loss_is_hf_loss_per_example_and_the_batch_loss_its_token_mean(lm):
    """next_token_loss on a padded batch with -100 labels equals each example's own
    GPT2LMHeadModel(labels=...).loss, computed alone without padding; the model's batch loss
    is their mean weighted by counted tokens; sequence_logprob is minus loss times count."""
    ids, mask, labels, lengths = padded_batch()
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask)  # a ModelOutput with .logits
        ours = next_token_loss(out, labels, mask)
        logp = sequence_logprob(out.logits, labels, mask)
        batch_loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        alone = torch.stack([lm(input_ids=ids[i:i + 1, :m], labels=labels[i:i + 1, :m]).loss
                             for i, m in enumerate(lengths)])
    counted = (labels[:, 1:] != -100).sum(1)
    assert ours.shape == (len(lengths),)
    # transformers computes its loss from float32 logits (it casts them), ours stay float64
    alone, batch_loss = alone.double(), batch_loss.double()
    torch.testing.assert_close(ours, alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp, -alone * counted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((ours * counted).sum() / counted.sum(), batch_loss,
                               rtol=1e-6, atol=1e-6)
    assert (ours >= 0).all() and (logp <= 0).all()
    assert RANGES["next_token_loss"] == (0.0, None)
    assert RANGES["sequence_logprob"] == (None, 0.0)


def test_attention_mask_zero_positions_are_not_counted(lm):
    """Labels left on padding (not -100) are not counted where attention_mask is 0: the
    value equals HF's loss with -100 on the padding; without the mask they would count."""
    ids, mask, labels, _ = padded_batch()
    unmasked = torch.where(labels == -100, ids, labels)  # padding labelled as real tokens
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits
        hf = [lm(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1],
                 labels=torch.where(mask[i:i + 1] == 1, unmasked[i:i + 1], -100)).loss
              for i in range(ids.shape[0])]
    got = next_token_loss(logits, unmasked, mask)
    torch.testing.assert_close(got, torch.stack(hf).double(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(next_token_loss(logits, unmasked), got)


def test_no_counted_token_gives_nan_never_zero(lm):
    """An example whose labels are all -100 gets NaN from both metrics, never a silent 0."""
    ids, mask, labels, _ = padded_batch()
    labels[2] = -100
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits
    assert torch.isnan(next_token_loss(logits, labels, mask)[2])
    assert torch.isnan(sequence_logprob(logits, labels, mask)[2])
    assert not torch.isnan(sequence_logprob(logits, labels, mask)[[0, 1, 3]]).any()


def _eval_file(tmp_path: Path, with_mask_input: bool, labels_fn=None) -> EvalSpec:
    ids, mask, labels, _ = padded_batch()
    if labels_fn is not None:
        labels = labels_fn(labels)
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels,
               "group": torch.arange(ids.shape[0]) % 2}, tmp_path / "eval.safetensors")
    return EvalSpec(inputs=("input_ids", "attention_mask") if with_mask_input
                    else ("input_ids",), target="labels", metric="next_token_loss",
                    data=tmp_path / "eval.safetensors", group="group", batch_size=4)


def _evaluator(model, spec: EvalSpec, metric=None) -> Evaluator:
    metric = metric or resolve_metric(spec.metric, None, "eval.metric")
    params = {n: p.detach() for n, p in model.named_parameters()}
    return Evaluator(model, params, {}, EvalData(spec, None, metric.batch_keys), metric)


@pytest.mark.parametrize("with_mask_input", [True, False])
def test_evaluator_reads_attention_mask_from_the_file(lm, tmp_path, with_mask_input):
    """Through the Evaluator, next_token_loss on a safetensors eval file equals HF's
    per-example loss; attention_mask is given to the metric whether or not it is a model
    input (right padding leaves the real tokens' logits unchanged)."""
    spec = _eval_file(tmp_path, with_mask_input,
                      lambda lab: torch.where(lab == -100, 5, lab))  # padding not -100
    vals, groups = _evaluator(lm, spec).values()
    ids, mask, labels, lengths = padded_batch()
    with torch.no_grad():
        alone = torch.stack([lm(input_ids=ids[i:i + 1, :m], labels=labels[i:i + 1, :m]).loss
                             for i, m in enumerate(lengths)])
    # rows whose labels were all set to 5 before the prompt now count those: compare the
    # rows without a prompt, where only padding changed
    rows = [0, 3, 5]
    torch.testing.assert_close(vals[rows], alone[rows].double(), rtol=1e-6, atol=1e-6)
    assert groups is not None and groups.tolist() == [0, 1, 0, 1, 0, 1]


def test_linear_and_direct_evaluation_on_a_language_model(lm, tmp_path):
    """The JVP of next_token_loss along v equals the central finite difference of the
    metric (float64), so the linear evaluation works through an HF model's outputs."""
    spec = _eval_file(tmp_path, True)
    ev = _evaluator(lm, spec)
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2
         for n, p in ev.params.items()}
    lin = ev.linear(v)
    h = 1e-4
    plus = ev.direct({n: -h * t for n, t in v.items()}, torch.zeros(6, dtype=torch.float64))
    minus = ev.direct({n: h * t for n, t in v.items()}, torch.zeros(6, dtype=torch.float64))
    # direct(w, 0) = -f(theta - w): plus = -f(theta + h v), minus = -f(theta - h v)
    torch.testing.assert_close(lin, (minus - plus) / (2 * h), rtol=1e-6, atol=1e-8)


def test_user_metric_with_batch_keys_gets_the_attention_mask(lm, tmp_path):
    """A user metric declaring batch_keys = ("attention_mask",) is called with the batch's
    mask by keyword and gives the builtin's values; one without keeps fn(outputs, target)."""
    (tmp_path / "m.py").write_text(
        "from acctattr.evaluation.lm import next_token_loss\n"
        "def masked(out, target, attention_mask=None):\n"
        "    assert attention_mask is not None\n"
        "    return next_token_loss(out, target, attention_mask)\n"
        "masked.batch_keys = ('attention_mask',)\n"
        "def plain(out, target):\n"
        "    return next_token_loss(out, target)\n")
    from acctattr.runs.manifest import Ref

    spec = _eval_file(tmp_path, False)
    builtin = _evaluator(lm, spec).values()[0]
    ref = Ref("m.py:masked", tmp_path / "m.py", None, "masked")
    masked = resolve_metric(ref, None, "m")
    assert masked.batch_keys == ("attention_mask",)
    assert "attention_mask" in EvalData(replace(spec, metric=ref)).names  # read for it
    torch.testing.assert_close(_evaluator(lm, spec, masked).values()[0], builtin)
    plain = resolve_metric(Ref("m.py:plain", tmp_path / "m.py", None, "plain"), None, "m")
    assert plain.batch_keys == ()
    torch.testing.assert_close(_evaluator(lm, spec, plain).values()[0], builtin)  # -100 pads


def test_float_labels_are_refused_for_next_token_metrics(tmp_path):
    """Labels saved as floats would be truncated to token ids silently: refused, naming the
    file and tensor."""
    spec = _eval_file(tmp_path, True, lambda lab: lab.float())
    with pytest.raises(DataError, match=r"eval.safetensors: eval.target tensor 'labels' has "
                                        "dtype F32, but eval.metric next_token_loss needs "
                                        "integer token ids"):
        EvalData(spec)


def test_an_eval_example_without_counted_tokens_is_refused(tmp_path):
    """A safetensors eval example whose labels are all -100 is refused (DataError, exit 2)
    naming the file and the example index."""
    def empty_row(lab):
        lab = lab.clone()
        lab[4] = -100
        return lab

    spec = _eval_file(tmp_path, True, empty_row)
    with pytest.raises(DataError, match=r"eval.safetensors: example 4 has no token that "
                                        r"next_token_loss counts"):
        EvalData(spec)


# ---------------------------------------------------------------- training loss, curvature

def _sample():
    ids, mask, labels, _ = padded_batch(n=6)
    ids2, mask2, labels2, _ = padded_batch(seed=1, n=6)
    return {"input_ids": torch.cat([ids, ids2]), "attention_mask": torch.cat([mask, mask2]),
            "labels": torch.cat([labels, labels2])}


def test_curvature_on_next_token_loss_matches_autograd_of_hf_losses(lm):
    """The training-loss value and gradient are those of the mean over examples of each
    example's HF loss; the HVP matches a central difference of that gradient."""
    sample = _sample()
    loss = resolve_metric("next_token_loss", None, "train.loss")
    cv = Curvature(lm, {}, loss, sample, ("input_ids", "attention_mask"), "labels")
    params = {n: p.detach().clone() for n, p in lm.named_parameters()}
    value, grad, hvp = cv.expand(params)
    lm.zero_grad()
    hf = torch.stack([lm(input_ids=sample["input_ids"][i:i + 1],
                         attention_mask=sample["attention_mask"][i:i + 1],
                         labels=sample["labels"][i:i + 1]).loss for i in range(12)]).mean()
    hf.backward()  # through float32 logits (transformers casts them)
    assert value == pytest.approx(float(hf), rel=1e-6)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grad[n], p.grad, rtol=1e-4, atol=1e-6)
    lm.zero_grad()
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    h = 1e-6  # the error of the central difference falls as h^2: 4e-5 at h = 1e-5
    gp = cv.gradient({n: params[n] + h * v[n] for n in params})
    gm = cv.gradient({n: params[n] - h * v[n] for n in params})
    hv = hvp(v)
    for n in params:
        torch.testing.assert_close(hv[n], (gp[n] - gm[n]) / (2 * h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inputs", [("input_ids", "attention_mask"), ("input_ids",)])
def test_noise_groups_vectorise_over_gpt2_or_fall_back_to_the_loop(lm, inputs):
    """Per-group gradients of next_token_loss: vmap over the HF model works when
    attention_mask is a model input and gives the loop's numbers; without it transformers'
    data-dependent padding check defeats vmap and the loop is taken (same mean and noise)."""
    sample = _sample()
    loss = resolve_metric("next_token_loss", None, "train.loss")
    cv = Curvature(lm, {}, loss, sample, inputs, "labels")
    params = {n: p.detach() for n, p in lm.named_parameters()}
    names = list(params)
    looped = cv._group_gradients_looped([params[n].clone() for n in names], names, sample, 4)
    mean, var = cv.gradient_and_noise(params, 4)
    assert cv._batched == (inputs == ("input_ids", "attention_mask"))
    if cv._batched:
        batched = cv.group_gradients(params, sample, 4)
        for n in names:
            torch.testing.assert_close(batched[n], looped[n], rtol=1e-8, atol=1e-10)
    whole = cv.gradient(params)
    for n in names:
        torch.testing.assert_close(mean[n], whole[n], rtol=1e-8, atol=1e-10)
        assert var[n].abs().sum() > 0


def test_token_ids_alone_get_an_all_ones_mask_where_no_counted_prediction_sees_padding(lm):
    """A stage sample of token ids and labels only (no attention_mask anywhere), right-padded
    after its labels: Curvature gives the model an all-ones mask, so its per-group gradients
    come from one vectorised pass, with the unmasked model's numbers (each example's own HF
    loss). Left-padded, the padding may matter: no mask is made, and the loop is taken."""
    s = _sample()
    sample = {"input_ids": s["input_ids"], "labels": s["labels"]}
    loss = resolve_metric("next_token_loss", None, "train.loss")
    params = {n: p.detach() for n, p in lm.named_parameters()}
    cv = Curvature(lm, {}, loss, sample, ("input_ids",), "labels")
    assert cv.masked
    mean, var = cv.gradient_and_noise(params, 4)
    assert cv._batched
    lm.zero_grad()
    torch.stack([lm(input_ids=sample["input_ids"][i:i + 1],
                    labels=sample["labels"][i:i + 1]).loss for i in range(12)]).mean().backward()
    for n, p in lm.named_parameters():
        torch.testing.assert_close(mean[n], p.grad, rtol=1e-4, atol=1e-6)  # float32 logits
        assert var[n].abs().sum() > 0
    lm.zero_grad()

    # a token input under another name is still given positionally, the mask by keyword
    ids = Curvature(lm, {}, loss, {"ids": sample["input_ids"], "labels": sample["labels"]},
                    ("ids",), "labels")
    assert ids.masked
    torch.testing.assert_close(ids.gradient_and_noise(params, 4)[0], mean)
    assert ids._batched

    left = {k: v.flip(1) for k, v in sample.items()}  # the padding first
    cv = Curvature(lm, {}, loss, left, ("input_ids",), "labels")
    assert not cv.masked
    cv.gradient_and_noise(params, 4)
    assert not cv._batched


# ---------------------------------------------------------------- JSONL and the manifest

@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """The Trainer-written GPT-2 run with the README's "Language models" manifest."""
    root = write_lm_run(tmp_path_factory.mktemp("lm"))
    block = readme_manifest()
    (root / "manifest.yaml").write_text(block)
    return root


def readme_manifest() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Language models"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_language_model_manifest_checks_and_runs(lm_run):
    """The README's manifest parses, `acctattr check` passes on the Trainer-written run, and
    `acctattr run --estimator unrolled` computes both stages' effects on next_token_loss
    from JSONL stage data (the training-loss curvature path on an HF model)."""
    manifest = load_manifest(lm_run / "manifest.yaml")
    assert manifest.train_loss == "next_token_loss"
    assert manifest.eval.metric == "next_token_loss"
    assert manifest.eval.inputs == ("input_ids", "attention_mask")
    assert manifest.eval.target == "labels"
    assert manifest.stages[1].tokenizer == lm_run / "tokenizer"  # eval's, by default
    assert manifest.stages[1].max_length == 32
    res = runner.invoke(app, ["check", str(lm_run / "manifest.yaml")])
    assert res.exit_code == 0, res.output
    assert "2 stages (pretrain, sft)" in res.stdout
    res = runner.invoke(app, ["run", str(lm_run / "manifest.yaml"), "--format", "json", "-q",
                              "--estimator", "unrolled", "--flow-substeps", "4",
                              "--sample-size", "16"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["metric"] == {"name": "next_token_loss", "higher_is_better": False}
    assert doc["n_examples"] == 24
    assert {s["name"] for s in doc["stages"]} == {"pretrain", "sft"}
    assert all(s["groups"].keys() == {"0", "1"} for s in doc["stages"])


@pytest.mark.parametrize("inputs", [("input_ids", "attention_mask"), ("input_ids",)])
def test_jsonl_eval_is_tokenised_with_labels_masked_on_prompts_and_padding(lm_run, tmp_path,
                                                                          inputs):
    """JSONL eval text becomes input_ids / attention_mask / labels: text rows label every
    token, prompt/completion rows -100 on the prompt's tokens, padding -100 with mask 0,
    truncation at max_length; next_token_loss on it equals HF's loss per example, and the
    metric gets attention_mask even when the model does not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(lm_run / "tokenizer"), local_files_only=True)
    write_jsonl(tmp_path / "e.jsonl", [
        {"text": "the cat sat on the mat", "group": 0},
        {"prompt": "the dog ", "completion": "ran under a tree", "group": 1},
        {"text": "a big red bird flew over the log and then it was happy", "group": 1},
    ])
    (tmp_path / "e.jsonl").write_text((tmp_path / "e.jsonl").read_text() + "\n\n")  # blank
    spec = EvalSpec(inputs=inputs, target="labels",
                    metric="next_token_loss", data=tmp_path / "e.jsonl", group="group",
                    batch_size=2, tokenizer=lm_run / "tokenizer", max_length=8)
    data = EvalData(spec)
    batch = {k: torch.cat([b[k] for b in data.batches()]) for k in data.names}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert "attention_mask" in data.names
    assert ids.shape == (3, 8) and batch["group"].tolist() == [0, 1, 1]
    assert ids[0, :6].tolist() == tok("the cat sat on the mat")["input_ids"]
    assert mask.sum(1).tolist() == [6, 6, 8]
    assert labels[0].tolist() == ids[0, :6].tolist() + [-100, -100]
    assert labels[1].tolist() == [-100, -100] + ids[1, 2:6].tolist() + [-100, -100]
    assert labels[2].tolist() == ids[2].tolist()  # truncated to 8, all labelled
    model = eager(tiny_lm(seed=2))
    vals = _evaluator(model, spec).values()[0]
    with torch.no_grad():
        hf = [model(input_ids=ids[i:i + 1, :m], labels=labels[i:i + 1, :m]).loss
              for i, m in enumerate(mask.sum(1).tolist())]
    torch.testing.assert_close(vals, torch.stack(hf).double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("line", "message"), [
    ('{"txt": "the cat"}', r"e.jsonl, line 2: no key 'text' \(nor 'prompt' and "
                           r"'completion'\); it has txt"),
    ('{"text": 3}', r"e.jsonl, line 2: key 'text' must be a string, got int"),
    ('{"prompt": "the cat"}', r"e.jsonl, line 2: key 'completion' is missing"),
    ('{"text": "the cat", "group": "a"}', r"e.jsonl, line 2: key 'group' \(eval.group\) "
                                          r"must be an integer, got str"),
    ("not json", r"e.jsonl, line 2: not valid JSON"),
    ('{"prompt": "the cat ", "completion": "", "group": 0}',
     r"e.jsonl: example 1 \(line 2\) has no token that next_token_loss counts"),
    ('{"text": "cat", "group": 1}', r"e.jsonl: example 1 \(line 2\) has no token"),
])
def test_bad_jsonl_lines_exit_2_naming_file_line_and_key(lm_run, tmp_path, line, message):
    """`acctattr check` on a manifest whose eval JSONL has a bad second line exits 2 naming
    the file, the line and the key (or the example with no counted token)."""
    shutil.copytree(lm_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval.jsonl"))
    (tmp_path / "run" / "e.jsonl").write_text(
        '{"text": "the cat sat", "group": 0}\n' + line + "\n")
    doc = yaml.safe_load((tmp_path / "run" / "manifest.yaml").read_text())
    doc["eval"]["data"] = "e.jsonl"
    (tmp_path / "run" / "manifest.yaml").write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["check", str(tmp_path / "run" / "manifest.yaml")])
    assert res.exit_code == 2, res.output
    assert re.search(message, res.stderr), res.stderr


def test_missing_tokenizer_folder_is_a_manifest_error(lm_run, tmp_path):
    """A tokenizer folder that does not exist, under eval or a stage, is a manifest problem
    naming the key (exit 2); a folder without tokenizer files names the key too."""
    doc = yaml.safe_load(readme_manifest())
    doc["eval"]["tokenizer"] = "nowhere"
    doc["stages"][0]["tokenizer"] = "nowhere/either"
    shutil.copytree(lm_run, tmp_path / "run")
    (tmp_path / "run" / "manifest.yaml").write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["check", str(tmp_path / "run" / "manifest.yaml")])
    assert res.exit_code == 2
    assert "eval.tokenizer: nowhere not found" in res.stderr
    assert "stage 'pretrain': tokenizer: nowhere/either not found" in res.stderr
    (tmp_path / "run" / "empty").mkdir()
    doc["eval"]["tokenizer"] = "empty"
    del doc["stages"][0]["tokenizer"]
    (tmp_path / "run" / "manifest.yaml").write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["check", str(tmp_path / "run" / "manifest.yaml")])
    assert res.exit_code == 2
    assert "eval.data" in res.stderr and "eval.jsonl: tokenizer: no tokenizer could be " \
        "loaded from" in res.stderr


def test_jsonl_tokenizer_defaults_to_the_model_folder(lm_run, tmp_path):
    """Without eval.tokenizer the model.hf folder's own tokenizer files are used; with none
    there either, the manifest names eval.tokenizer as missing."""
    doc = yaml.safe_load(readme_manifest())
    del doc["eval"]["tokenizer"]
    shutil.copytree(lm_run, tmp_path / "run")
    path = tmp_path / "run" / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    m = load_manifest(path)
    assert m.eval.tokenizer == tmp_path / "run" / "init"
    assert m.stages[0].tokenizer == tmp_path / "run" / "init"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "run" / "init" / f).unlink()
    with pytest.raises(ManifestError, match="eval.tokenizer: eval.data eval.jsonl is JSONL"):
        load_manifest(path)


def test_stage_jsonl_sample_is_seeded_and_checked(lm_run, tmp_path):
    """A stage's JSONL sample: every line checked, a seeded subset tokenised (the same each
    time), prompt tokens -100; a bad line far from the sample still names its line."""
    names = ("input_ids", "attention_mask", "labels")
    a = stage_sample(lm_run / "sft.jsonl", names, 8, "sft", tokens="next_token_loss",
                          tokenizer=lm_run / "tokenizer", max_length=32)
    b = stage_sample(lm_run / "sft.jsonl", names, 8, "sft", tokens="next_token_loss",
                          tokenizer=lm_run / "tokenizer", max_length=32)
    assert a["input_ids"].shape[0] == 8
    assert all(torch.equal(a[k], b[k]) for k in names)
    assert (a["labels"][:, 0] == -100).all()  # every prompt is at least one token
    lines = (lm_run / "sft.jsonl").read_text().splitlines()
    lines[3] = '{"prompt": "the cat ", "completion": ""}'  # counts no token: left out
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    whole = stage_sample(tmp_path / "s.jsonl", names, 100, "sft", tokens="next_token_loss",
                         tokenizer=lm_run / "tokenizer")
    assert whole["input_ids"].shape[0] == len(lines) - 1
    lines[29] = '{"prompt": 1, "completion": "x"}'
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"stage 'sft': data .*s.jsonl, line 30: key 'prompt' "
                                        "must be a string"):
        stage_sample(tmp_path / "s.jsonl", names, 8, "sft",
                          tokenizer=lm_run / "tokenizer")


def _hf_folder(tmp_path: Path, arch: str) -> Path:
    from transformers import GPT2Config

    folder = tmp_path / arch
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30,  # type: ignore[call-arg]
               architectures=[arch]).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(("arch", "cls", "loss"), [
    ("GPT2LMHeadModel", None, "next_token_loss"),
    ("GPT2ForSequenceClassification", None, "cross_entropy"),
    ("GPT2ForSequenceClassification", "AutoModelForCausalLM", "next_token_loss"),
    ("LlamaForCausalLM", None, "next_token_loss"),
])
def test_train_loss_defaults_to_next_token_loss_for_causal_lms(tmp_path, arch, cls, loss):
    """train.loss (and eval.metric) default to next_token_loss when model.hf's class (model.
    class, else config.json's architectures[0]) is a *ForCausalLM / *LMHeadModel, else to
    cross_entropy; a written train.loss is kept."""
    folder = _hf_folder(tmp_path, arch)
    save_file({"x": torch.zeros(2, 3, dtype=torch.long)}, tmp_path / "e.safetensors")
    doc = {"version": 1, "model": {"hf": str(folder), **({"class": cls} if cls else {})},
           "stages": [{"name": "a", "start": str(folder), "end": str(tmp_path),
                       "optimizer": {"type": "adamw", "steps": 1, "lr": 0.1}}],
           "eval": {"data": "e.safetensors", "inputs": ["x"], "target": "x"}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    m = load_manifest(tmp_path / "m.yaml")
    assert m.train_loss == loss and m.eval.metric == loss
    doc["train"] = {"loss": "cross_entropy"}
    doc["eval"]["metric"] = "sequence_logprob"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    m = load_manifest(tmp_path / "m.yaml")
    assert m.train_loss == "cross_entropy" and m.eval.metric == "sequence_logprob"


def test_tokenizer_keys_need_jsonl_data(tmp_path):
    """tokenizer / max_length beside safetensors data are manifest errors naming the key."""
    folder = _hf_folder(tmp_path, "GPT2LMHeadModel")
    save_tokenizer(folder)
    save_file({"x": torch.zeros(2, 3, dtype=torch.long)}, tmp_path / "e.safetensors")
    doc = {"version": 1, "model": {"hf": str(folder)},
           "stages": [{"name": "a", "start": str(folder), "end": str(tmp_path),
                       "optimizer": {"type": "adamw", "steps": 1, "lr": 0.1},
                       "data": "e.safetensors", "max_length": 4}],
           "eval": {"data": "e.safetensors", "inputs": ["x"], "target": "x",
                    "tokenizer": str(folder)}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path / "m.yaml")
    assert "eval.tokenizer: 'tokenizer' goes with JSONL text data" in str(e.value)
    assert "stage 'a': max_length: 'max_length' goes with JSONL text data" in str(e.value)



def test_check_validates_stage_jsonl_lines(lm_run, tmp_path):
    """`acctattr check` reads every line of a stage's JSONL data: a non-string completion
    exits 2 naming the stage, the file, the line and the key."""
    shutil.copytree(lm_run, tmp_path / "run")
    path = tmp_path / "run" / "sft.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = '{"prompt": "the cat ", "completion": ["sat"]}'
    path.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["check", str(tmp_path / "run" / "manifest.yaml")])
    assert res.exit_code == 2, res.output
    assert re.search(r"stage 'sft': data .*sft.jsonl, line 7: key 'completion' must be a "
                     r"string, got list", res.stderr), res.stderr


def test_eval_function_batches_without_counted_tokens_are_refused(tmp_path):
    """Batches from an eval.data function: an example counting no token is refused naming
    its index over the whole eval set (offset by the batches before it)."""
    (tmp_path / "d.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    for k in range(2):\n"
        "        lab = torch.ones(3, 4, dtype=torch.long)\n"
        "        if k == 1:\n"
        "            lab[2, 1:] = -100\n"
        "        yield {'input_ids': lab.clone(), 'labels': lab,\n"
        "               'attention_mask': torch.ones(3, 4, dtype=torch.long)}\n")
    from acctattr.runs.manifest import Ref

    spec = EvalSpec(inputs=("input_ids",), target="labels", metric="sequence_logprob",
                    data_fn=Ref("d.py:batches", tmp_path / "d.py", None, "batches"))
    with pytest.raises(DataError, match=r"d.py:batches \(batch 1\): example 5 has no token "
                                        "that sequence_logprob counts"):
        list(EvalData(spec).batches())


def test_stage_sample_reads_the_mask_and_leaves_out_uncounted_examples(tmp_path):
    """A stage's safetensors sample carries attention_mask when the training loss reads it
    (even if no input names it); examples that count no token are left out of the sample
    (they added nothing to the Trainer's loss), and a sample with none left is refused."""
    ids, mask, labels, _ = padded_batch()
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels},
              tmp_path / "s.safetensors")
    got = stage_sample(tmp_path / "s.safetensors", ("input_ids", "labels"), 4, "ft",
                       extra=("attention_mask",), tokens="next_token_loss")
    assert set(got) == {"input_ids", "attention_mask", "labels"}
    assert got["input_ids"].shape[0] == 4
    labels[3] = -100
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels},
              tmp_path / "s.safetensors")
    got = stage_sample(tmp_path / "s.safetensors", ("input_ids", "labels"), 100, "ft",
                       extra=("attention_mask",), tokens="next_token_loss")
    assert torch.equal(got["input_ids"], ids[[0, 1, 2, 4, 5]])
    save_file({"input_ids": ids, "attention_mask": mask,
               "labels": torch.full_like(labels, -100)}, tmp_path / "s.safetensors")
    with pytest.raises(DataError, match=r"stage 'ft': data .*s.safetensors: no example of "
                                        "the sample counts a token"):
        stage_sample(tmp_path / "s.safetensors", ("input_ids", "labels"), 100, "ft",
                     extra=("attention_mask",), tokens="next_token_loss")


def test_the_schema_takes_the_language_model_manifest():
    """acctattr schema accepts the README's LM manifest (JSONL eval without inputs / target,
    tokenizer, max_length, the next-token metrics) and still requires inputs and target for
    safetensors eval data."""
    jsonschema = pytest.importorskip("jsonschema")
    from acctattr.runs.schema import manifest_schema
    from acctattr.runs.yaml_load import Loader

    validator = jsonschema.Draft7Validator(manifest_schema())
    doc = yaml.load(readme_manifest(), Loader=Loader)
    doc["stages"][0]["tokenizer"] = "tokenizer"
    doc["stages"][0]["max_length"] = 16
    assert [e.message for e in validator.iter_errors(doc)] == []
    doc["eval"]["data"] = "eval.safetensors"
    assert list(validator.iter_errors(doc)), "inputs and target are required there"


# ---------------------------------------------------------------- the padding warning


@pytest.fixture
def padding_log(monkeypatch):
    """The transformers padding warnings given from now on (a handler on the logger that
    gives them, behind acctattr's filter), transformers' once-per-process memory and
    acctattr's filter state reset so each test starts fresh, and its verbosity at warnings
    (a Trainer run elsewhere in the process sets it to errors only)."""
    import logging

    from transformers.utils import logging as hf_logging

    from acctattr.evaluation import lm as lm_mod

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()

    log = logging.getLogger("transformers.modeling_utils")

    def unfilter() -> None:  # an earlier test's filter (the process-wide one) removed
        for f in list(log.filters):
            if isinstance(f, lm_mod._NeedlessPadding):
                log.removeFilter(f)

    unfilter()
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]
    monkeypatch.setattr(lm_mod, "_FILTER", lm_mod._NeedlessPadding())
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(lm_mod.PADDING_WARNING):
                got.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    yield got
    log.removeHandler(handler)
    unfilter()
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]
    hf_logging.set_verbosity(verbosity)


def _right_padded_eval(tmp_path: Path, left: bool = False) -> EvalSpec:
    """padded_batch's rows (pad id 0 = the model's pad_token_id, labels -100 on padding),
    saved without attention_mask; ``left``: the padding moved before the tokens."""
    ids, _, labels, lengths = padded_batch()
    if left:
        ids = torch.stack([r.roll(r.shape[0] - m) for r, m in zip(ids, lengths, strict=True)])
        labels = torch.stack([r.roll(r.shape[0] - m)
                              for r, m in zip(labels, lengths, strict=True)])
    save_file({"input_ids": ids, "labels": labels}, tmp_path / "eval.safetensors")
    return EvalSpec(inputs=("input_ids",), target="labels", metric="next_token_loss",
                    data=tmp_path / "eval.safetensors", batch_size=4)


def test_right_padded_eval_without_mask_gives_no_padding_warning_same_numbers(
        lm, tmp_path, padding_log):
    """A Hugging Face LM evaluated on right-padded input_ids with no attention_mask: the
    evaluation passes an all-ones mask, so transformers does not warn that the input may
    be padded, and every number is bit for bit that of the unmasked model call."""
    spec = _right_padded_eval(tmp_path)
    ev = _evaluator(lm, spec)
    vals, _ = ev.values()
    v = {n: torch.full_like(p, 1e-3) for n, p in ev.params.items()}
    lin = ev.linear(v)
    ev.direct(v, vals)
    assert padding_log == []
    ids, _, labels, _ = padded_batch()
    with torch.no_grad():  # the call as it was: no mask (transformers warns here)
        plain = next_token_loss(lm(ids).logits, labels).double()
    assert padding_log, "the unmasked call itself should warn: the test would prove nothing"
    assert torch.equal(vals, plain)
    lm.zero_grad()
    with torch.enable_grad():
        from torch.func import functional_call, jvp

        params = {n: p.detach() for n, p in lm.named_parameters()}
        names = list(params)
        _, tangent = jvp(lambda *ps: next_token_loss(functional_call(
            lm, dict(zip(names, ps, strict=True)), (ids,)).logits, labels),
            tuple(params[n] for n in names), tuple(v[n] for n in names))
    assert torch.equal(lin, tangent.double())


def test_left_padded_eval_without_mask_keeps_the_padding_warning(lm, tmp_path, padding_log):
    """Left padding without a mask changes what the counted tokens see: the warning
    stands (no mask is made up)."""
    ev = _evaluator(lm, _right_padded_eval(tmp_path, left=True))
    ev.values()
    assert len(padding_log) == 1


def test_curvature_on_right_padded_sample_masks_it_warns_not_and_vectorises(lm, padding_log):
    """unrolled's training-loss passes over a right-padded sample without attention_mask:
    the model gets an all-ones mask (the same numbers), so there is no padding warning and
    transformers' padding check no longer defeats vmap. A left-padded sample is passed
    unmasked, and its first pass warns."""
    ids, _, labels, _ = padded_batch()
    sample = {"input_ids": ids, "labels": labels}
    loss = resolve_metric("next_token_loss", None, "train.loss")
    cv = Curvature(lm, {}, loss, sample, ("input_ids",), "labels")
    params = {n: p.detach() for n, p in lm.named_parameters()}
    cv.value(params)
    cv.gradient_and_noise(params, 3)
    assert cv._batched is True
    assert padding_log == []
    ev_ids = torch.stack([r.roll(4) for r in ids])
    left = Curvature(lm, {}, loss, {"input_ids": ev_ids, "labels": labels}, ("input_ids",),
                     "labels")
    left.value(params)
    assert len(padding_log) == 1


def test_lm_sample_run_prints_no_padding_warning():
    """`acctattr run sample_runs/lm/manifest.yaml -q` (right-padded questions, no
    attention_mask in the eval file) prints nothing on stderr but the estimator line."""
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    p = subprocess.run([sys.executable, "-m", "acctattr", "run",
                        str(root / "sample_runs/lm/manifest.yaml"), "-q", "-f", "json",
                        "--estimator", "frozen", "--threads", "1"],
                       capture_output=True, text=True, check=False, cwd=root)
    assert p.returncode == 0, p.stderr
    assert "attention_mask" not in p.stderr
    assert "may be padded" not in p.stderr
