"""Stage embeddings as artifacts (acctattr/embeddings.py): `embed` then `run --embeddings`
equals `run`, byte for byte; a changed input or another estimator is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reportkit import cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"



@pytest.fixture
def digits(tmp_path) -> Path:
    """A copy of the digits sample run (its files may be changed by the test)."""
    shutil.copytree(SAMPLES / "digits", tmp_path / "digits",
                    ignore=shutil.ignore_patterns("__pycache__", "truth.json"))
    return tmp_path / "digits" / "manifest.yaml"


@pytest.mark.parametrize(("run", "estimator"), [
    *((r, e) for r in ("digits", "toxicity") for e in ("naive", "frozen", "auto")),
    ("lm", "frozen")])
def test_run_with_embeddings_is_byte_identical(tmp_path, run, estimator):
    """`embed` then `run --embeddings` prints the JSON `run` prints, byte for byte (per-example
    effects, warnings and auto's reason included), in the estimator's own evaluation and in
    the other one."""
    manifest = SAMPLES / run / "manifest.yaml"
    out = tmp_path / "emb"
    made = cli("embed", manifest, "-o", out, "--estimator", estimator, "-q")
    assert made.exit_code == 0, made.stderr
    index = json.loads((out / "embeddings.json").read_text())
    assert index["schema"] == "acctattr.embeddings/1"
    assert len(index["stages"]) == 3
    if run == "lm":
        pytest.importorskip("transformers")
    modes = [[], ["--evaluate", "direct" if estimator != "auto" else "linear"]]
    for mode in modes:
        args = ["run", manifest, "-f", "json", "-q", "--per-example", "--estimator", estimator,
                *mode]
        plain, stored = cli(*args), cli(*args, "--embeddings", out)
        assert plain.exit_code == 0 and stored.exit_code == 0, stored.stderr
        assert stored.stdout == plain.stdout
        assert stored.stderr == plain.stderr


def test_index_names_every_input_with_its_hash(digits, tmp_path):
    """embeddings.json lists the manifest, the model code, every checkpoint, optimizer state
    and data file with its sha256, the estimator and acctattr's version."""
    import hashlib

    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "frozen", "-q").exit_code == 0
    index = json.loads((out / "embeddings.json").read_text())
    paths = {i["path"]: i["sha256"] for i in index["inputs"]}
    for rel in ["manifest.yaml", "model.py", "ckpt/init/model.safetensors",
                "ckpt/polish/model.safetensors", "ckpt/shortcut/optimizer.pt",
                "data/polish.safetensors"]:
        assert paths[rel] == hashlib.sha256((digits.parent / rel).read_bytes()).hexdigest()
    assert "data/eval.safetensors" not in paths  # the eval set is not an input of v_k
    assert index["estimator"]["name"] == "frozen"
    assert index["acctattr_version"]


@pytest.mark.parametrize("rel", ["ckpt/shortcut/model.safetensors",
                                 "ckpt/pretrain/optimizer.pt", "data/shortcut.safetensors",
                                 "model.py"])
def test_changed_input_is_refused(digits, tmp_path, rel):
    """After embed, changing one input file makes run --embeddings exit 2 naming it."""
    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "frozen", "-q").exit_code == 0
    file = digits.parent / rel
    _perturb(file)
    got = cli("run", digits, "--estimator", "frozen", "-q", "--embeddings", out)
    assert got.exit_code == 2
    assert str(file) in got.stderr and "changed" in got.stderr
    assert "acctattr embed" in got.stderr


def _perturb(file: Path) -> None:
    """Change a file's content while keeping it valid (one weight, one moment, one comment)."""
    import torch
    from safetensors.torch import load_file, save_file

    if file.suffix == ".safetensors":
        tensors = load_file(file)
        name = next(n for n, t in sorted(tensors.items()) if t.is_floating_point())
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] += 0.01
        save_file(tensors, file)
    elif file.suffix == ".pt":
        state = torch.load(file, weights_only=True)
        first = next(iter(state["state"].values()))
        key = next(k for k, t in first.items() if t.is_floating_point() and t.ndim)
        first[key].view(-1)[0] += 0.01
        torch.save(state, file)
    else:
        file.write_text(file.read_text() + "\n# changed\n")


def test_changed_stage_in_manifest_is_refused_eval_change_is_not(digits, tmp_path):
    """A change to a stage's part of the manifest is refused; a change to the eval section
    is not (the embeddings serve any eval set)."""
    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "frozen", "-q").exit_code == 0
    text = digits.read_text()
    digits.write_text(text.replace("batch_size: 256", "batch_size: 100"))
    ok = cli("run", digits, "--estimator", "frozen", "-q", "--embeddings", out)
    assert ok.exit_code == 0, ok.stderr
    digits.write_text(text.replace("weight_decay: 0.0005", "weight_decay: 0.001", 1))
    bad = cli("run", digits, "--estimator", "frozen", "-q", "--embeddings", out)
    assert bad.exit_code == 2
    assert "manifest.yaml changed" in bad.stderr and "embeddings.json" in bad.stderr


def test_another_estimator_is_refused(digits, tmp_path):
    """Embeddings of one estimator are refused for another (exit 2, naming the file)."""
    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "naive", "-q").exit_code == 0
    got = cli("run", digits, "--estimator", "frozen", "-q", "--embeddings", out)
    assert got.exit_code == 2
    assert str(out / "embeddings.json") in got.stderr and "naive" in got.stderr


def test_altered_embedding_file_is_refused(digits, tmp_path):
    """A stage file changed after embed is refused (exit 2, naming it)."""
    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "naive", "-q").exit_code == 0
    f = sorted(out.glob("01-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    got = cli("run", digits, "--estimator", "naive", "-q", "--embeddings", out)
    assert got.exit_code == 2 and f.name in got.stderr


def test_embed_never_writes_into_the_run_folder_nor_over_foreign_files(digits, tmp_path):
    """embed refuses a folder inside the run's folder and a non-empty folder that is not an
    earlier embed output; it replaces an earlier output whole."""
    inside = cli("embed", digits, "-o", digits.parent / "emb", "-q")
    assert inside.exit_code == 2 and "run's folder" in inside.stderr
    assert not (digits.parent / "emb").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    got = cli("embed", digits, "-o", foreign, "--estimator", "naive", "-q")
    assert got.exit_code == 2 and (foreign / "keep.txt").read_text() == "mine"
    out = tmp_path / "emb"
    for est in ("naive", "frozen"):
        assert cli("embed", digits, "-o", out, "--estimator", est, "-q").exit_code == 0
    assert json.loads((out / "embeddings.json").read_text())["estimator"]["name"] == "frozen"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_atomic_folder_keeps_the_old_output_when_writing_fails(tmp_path):
    """An error while the new folder is written leaves the earlier output as it was and no
    temporary folder behind."""
    from acctattr.output.atomic import atomic_folder

    out = tmp_path / "emb"
    with atomic_folder(out, "--output", "embeddings.json") as tmp:
        (tmp / "embeddings.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out, "--output", "embeddings.json") as tmp:
        (tmp / "embeddings.json").write_text("new")
        raise RuntimeError("interrupted")
    assert (out / "embeddings.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["emb"]


def test_other_unrolled_options_are_refused(digits, tmp_path):
    """Unrolled embeddings computed with other options (here --dynamics linear) are refused,
    naming the option; the same options are accepted."""
    out = tmp_path / "emb"
    made = cli("embed", digits, "-o", out, "--estimator", "unrolled", "--dynamics", "linear",
               "-q")
    assert made.exit_code == 0, made.stderr
    other = cli("run", digits, "--estimator", "unrolled", "-q", "--embeddings", out)
    assert other.exit_code == 2 and "sgd_dynamics 'linear' there, 'flow' asked" in other.stderr
    same = cli("run", digits, "--estimator", "unrolled", "--dynamics", "linear", "-q",
               "--embeddings", out)
    assert same.exit_code == 0, same.stderr


def test_embed_run_and_ablate_leave_the_run_untouched(digits, tmp_path):
    """embed, run --embeddings and ablate change no file of the run (bytes, mtime) and create
    nothing in its folder."""
    from test_guarantees import snapshot

    before = snapshot(digits.parent)
    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "frozen", "-q").exit_code == 0
    assert cli("run", digits, "--estimator", "frozen", "-q", "--embeddings", out).exit_code == 0
    assert cli("ablate", digits, "--stage", "shortcut", "-o", tmp_path / "abl", "--estimator",
               "frozen", "--embeddings", out, "-q").exit_code == 0
    assert snapshot(digits.parent) == before


def test_missing_input_is_refused(digits, tmp_path):
    """A recorded input file that no longer exists is refused with exit 2, naming it."""
    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "naive", "-q").exit_code == 0
    index = out / "embeddings.json"
    doc = json.loads(index.read_text())
    doc["inputs"].append({"what": "stage 'polish': data", "path": "data/gone.safetensors",
                          "sha256": "0" * 64})
    index.write_text(json.dumps(doc))
    got = cli("run", digits, "--estimator", "naive", "-q", "--embeddings", out)
    assert got.exit_code == 2 and "gone.safetensors" in got.stderr and "is gone" in got.stderr


def _set(key: str, value):
    """embeddings.json edit: ``key`` a dotted path (estimator.name, stages.0.file, ...)."""
    def edit(doc: dict) -> None:
        *head, last = key.split(".")
        node = doc
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


@pytest.mark.parametrize("edit,needle", [
    (_set("stages", ["pretrain", "spurious"]), "stages is not a list"),
    (_set("stages", None), "stages is not a list"),
    (_set("inputs", ["manifest.yaml"]), "inputs is not a list"),
    (_set("inputs.0.path", 5), "inputs is not a list"),
    (_set("estimator.name", ["naive"]), "estimator.name is not one of"),
    (_set("estimator.name", "bogus"), "estimator.name is not one of"),
    (_set("estimator.config", "x"), "estimator.config is not an object"),
    (_set("stages.0.file", "../digits/manifest.yaml"), "not a file of"),
])
def test_malformed_index_is_refused(digits, tmp_path, edit, needle):
    """An embeddings.json of the wrong shape (edited or damaged) is exit 2 naming it and
    the field, never an internal error; a stage file outside the folder is never read."""
    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "naive", "-q").exit_code == 0
    index = out / "embeddings.json"
    doc = json.loads(index.read_text())
    edit(doc)
    index.write_text(json.dumps(doc))
    got = cli("run", digits, "--estimator", "naive", "-q", "--embeddings", out)
    assert got.exit_code == 2, got.stderr
    assert str(index) in got.stderr and needle in got.stderr, got.stderr


@pytest.mark.parametrize("damage", ["nan", "int"])
def test_non_finite_or_integer_embedding_is_refused(digits, tmp_path, damage):
    """A stage file holding NaN or integers, even with its sha256 recorded to match, is
    exit 2 naming it (it gave an undefined or a made-up result)."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "emb"
    assert cli("embed", digits, "-o", out, "--estimator", "naive", "-q").exit_code == 0
    index = out / "embeddings.json"
    doc = json.loads(index.read_text())
    f = out / doc["stages"][0]["file"]
    tensors = load_file(f)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].long() if damage == "int" else \
        torch.full_like(tensors[name], float("nan"))
    save_file(tensors, f)
    doc["stages"][0]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    index.write_text(json.dumps(doc))
    got = cli("run", digits, "--estimator", "naive", "-q", "--embeddings", out)
    assert got.exit_code == 2, got.stderr
    assert f.name in got.stderr and "not finite floating point" in got.stderr, got.stderr
