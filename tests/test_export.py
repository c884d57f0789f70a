"""export.py, round trip (issue 29): tiny runs trained here, exported with `evaluate.py --export`,
loaded by transformers' pipeline and by onnxruntime, whose probabilities and logits are held
against the run's own (`evaluate.predict_proba`, what `--text` prints) on 20 texts: one past
max_length, one word, emoji, other scripts, GPT-2's special token written as text.

The runs use the tiny checkpoint of conftest.py (GPT-2's vocabulary, 2 layers of width 32) for
two steps: about a second each.
"""

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import evaluate
import export
import finetune
from conftest import one_error_line

pytestmark = pytest.mark.slow  # tiny finetune.py runs
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
CPU = torch.device("cpu")

TEXTS = [
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "Ok lar... Joking wif u oni...",
    "hi",
    "Congratulations 🎉🎉 you won a free 🍕, reply YES",
    "Привет! Как дела? Увидимся завтра.",
    "你好，明天见。我们一起吃饭吧",
    "مرحبا، كيف حالك اليوم؟",
    "Grüße aus Köln, à bientôt, señor!",
    "text me <|endoftext|> back",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines",
    "I'll be there, she's sure they've got it, we'd THOUGHT it'S fine",
    "call 09061701461 now, code KL341, valid 12 hrs only $$$",
    "visit http://example.com/claim?id=123&x=y now",
    "…— “quotes” ‘and’ dashes –",
    "a" * 300,
    "URGENT",
    "see you at home later then call me",
    "free win prize cash claim now call txt urgent award guaranteed",
    " ".join(["This long message goes on and on, past the run's max_length."] * 40),
]
CLASSES = {"0": "sport", "1": "tech news", "2": "food & drink"}
WORDS = {"0": "ball goal team match score coach", "1": "code chip data cloud app server",
         "2": "bread soup cake salt rice pepper"}


def write_own_file(path):
    rows = ["text,label"]
    for i in range(45):
        label = str(i % 3)
        words = WORDS[label].split()
        rows.append(" ".join(words[(i + j) % len(words)] for j in range(2 + i % 7)) + f",{label}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def train(out, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        finetune.main([*map(str, args), "--output-dir", str(out), "--epochs", "1",
                       "--max-steps", "2", "--no-initial-eval"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_weights, small_raw_path):
    """name -> a finished tiny run folder: the chapter's rule on SMS-format data (`last`
    after padding to max_length), own files with named classes (`flexible` under per-batch
    padding, the default), LoRA, every layer trained, bf16, texts left unpadded."""
    root = tmp_path_factory.mktemp("export-runs")
    own = write_own_file(root / "topics.csv")
    names = ",".join(f"{k}={v}" for k, v in CLASSES.items())
    named = ["--train-file", own, "--label-names", names]
    w = ["--weights", tiny_weights]
    return {
        "last": train(root / "last", "--data", small_raw_path, *w),
        "flexible": train(root / "flexible", *named, *w),
        "flexible-padded": train(root / "flexible-padded", *named, *w,
                                 "--context-length", "longest"),
        "lora": train(root / "lora", "--data", small_raw_path, *w, "--trainable-layers", "lora",
                      "--lr", "1e-2"),
        "all": train(root / "all", *named, *w, "--trainable-layers", "all", "--lr", "1e-3"),
        "bf16": train(root / "bf16", "--data", small_raw_path, *w, "--precision", "bf16",
                      "--lr", "1e-3"),
        "unpadded": train(root / "unpadded", *named, *w, "--no-padding", "--batch-size", "1",
                          "--token-position", "last"),
    }


def run_export(run, fmt, out, *extra):
    """evaluate.py --export, its printed lines."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        evaluate.main(["--run", str(run), "--export", fmt, str(out), *map(str, extra)])
    return buf.getvalue()


def pipeline_call(folder):
    """The keyword arguments the model card tells a user to pass to pipeline(), read from the
    card itself."""
    card = (folder / "README.md").read_text(encoding="utf-8")
    line = re.search(r'pipeline\("text-classification", model="[^"]*", (.*)\)\n', card)
    return eval(f"dict({line.group(1)})")  # the card's own words: truncation=True, ...


def pipeline_probs(folder, texts, **kw):
    pipe = transformers.pipeline("text-classification", model=str(folder), device="cpu",
                                 **pipeline_call(folder))
    return [{d["label"]: d["score"] for d in row} for row in pipe(texts, top_k=None, **kw)]


def largest_gap(ours, theirs):
    assert [sorted(p) for p in ours] == [sorted(p) for p in theirs]
    return max(abs(p[c] - q[c]) for p, q in zip(ours, theirs) for c in p)


def our_probs(run, texts=TEXTS):
    classifier, info = evaluate.load_run(run, CPU)
    return evaluate.predict_proba(texts, classifier, info, CPU), classifier, info


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """name -> the Hugging Face export of each run (a folder)."""
    root = tmp_path_factory.mktemp("exported")
    for name, run in runs.items():
        run_export(run, "hf", root / name)
    return {name: root / name for name in runs}


# ------------------------------------------------------------------------------ Hugging Face

@pytest.mark.parametrize("name", ["last", "flexible", "flexible-padded", "lora", "all",
                                  "unpadded"])
def test_transformers_pipeline_gives_the_runs_probabilities(runs, exported, name):
    ours, _, info = our_probs(runs[name])
    theirs = pipeline_probs(exported[name], TEXTS)
    assert largest_gap(ours, theirs) <= 1e-5
    assert set(theirs[0]) == set(info["class_names"])
    # in batches (the pipeline pads each batch with the tokenizer's pad token): the same
    assert largest_gap(ours, pipeline_probs(exported[name], TEXTS, batch_size=7)) <= 1e-5


def test_the_label_names_are_the_runs_and_the_model_loads_whole(runs, exported):
    folder = exported["flexible"]
    model, loading = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, output_loading_info=True)
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched tensor
    assert model.config.id2label == dict(enumerate(CLASSES.values()))
    assert model.config.label2id == {v: i for i, v in enumerate(CLASSES.values())}
    assert json.loads((runs["flexible"] / "run.json").read_text())["class_names"] == \
        list(CLASSES.values())


def test_the_tokenizer_encodes_as_the_run_did(runs, exported):
    tok = transformers.AutoTokenizer.from_pretrained(exported["last"])
    ours = data.get_tokenizer()
    info = json.loads((runs["last"] / "run.json").read_text())
    n = info["max_length"]
    for text in TEXTS:
        assert tok(text)["input_ids"] == ours.encode_ordinary(text), text
        assert tok(text, **pipeline_call(exported["last"]))["input_ids"] == \
            data.encode(text, ours, n), text
    assert "attention_mask" not in tok(TEXTS[0])
    assert tok.model_max_length == n


def test_the_tokenizer_encodes_any_text_as_tiktoken_does(exported):
    tok = transformers.AutoTokenizer.from_pretrained(exported["flexible"])
    ours = data.get_tokenizer()

    @settings(max_examples=300, deadline=None)
    @given(st.text(min_size=1, max_size=40))
    def same(text):
        assert tok(text)["input_ids"] == ours.encode_ordinary(text)
    same()


def test_the_chapters_rule_needs_the_padding_the_card_names(runs, exported):
    """`last` classifies the last position after padding to max_length: transformers reads it
    only when the texts are padded so; unpadded, it reads the last real token, which scores
    otherwise: the card says to pad, and config.json's pad id is no token at all."""
    folder = exported["last"]
    config = json.loads((folder / "config.json").read_text())
    assert pipeline_call(folder) == config["gpt2_classify"]["tokenizer_call"] == \
        {"padding": "max_length", "truncation": True}
    assert config["pad_token_id"] >= config["vocab_size"]
    ours, _, _ = our_probs(runs["last"])
    pipe = transformers.pipeline("text-classification", model=str(folder), device="cpu",
                                 truncation=True)
    unpadded = [{d["label"]: d["score"] for d in row} for row in pipe(TEXTS, top_k=None)]
    assert largest_gap(ours, unpadded) > 1e-3
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"padding every text to {config['gpt2_classify']['max_length']} tokens" in card
    assert "without padding the last real token is classified, which scores differently" in card


def test_a_bf16_run_is_exported_in_fp32_with_the_difference_in_the_card(runs, exported):
    ours, classifier, info = our_probs(runs["bf16"], list(export.PROBES))
    theirs = pipeline_probs(exported["bf16"], list(export.PROBES))
    card = (exported["bf16"] / "README.md").read_text(encoding="utf-8")
    stated = float(re.search(r"computed in bf16 \(autocast\); this export computes in float32, "
                             r"which moves a probability by up to ([0-9.e+-]+)", card).group(1))
    measured = largest_gap(ours, theirs)
    assert 0 < measured and math.isclose(stated, measured, rel_tol=0.06, abs_tol=1e-7)
    # and transformers gives what the run computes in fp32
    fp32 = evaluate.predict_proba(list(export.PROBES), evaluate.inference_classifier(
        classifier.gpt, info), info, CPU)
    assert largest_gap(fp32, theirs) <= 1e-5


def test_the_model_card_says_what_it_is(runs, exported):
    run, folder = runs["last"], exported["last"]
    info = json.loads((run / "run.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    card = (folder / "README.md").read_text(encoding="utf-8")
    for name in info["class_names"]:
        assert f"| {name} |" in card
    assert info["data"]["sha256"] in card and "SMS Spam Collection" in card
    for split, acc in metrics["final_accuracy"].items():
        assert f"| {split} | {acc:.4f} |" in card
    assert f"Trained for {metrics['train_minutes']:.2f} minutes on {metrics['device']}" in card
    assert f"torch {torch.__version__}" in card and "safetensors" in card
    assert "| `max_steps` | `2` |" in card
    assert f"cut to its first {info['max_length']} tokens" in card
    assert 'from transformers import pipeline' in card and 'top_k=None' in card


def test_calibration_and_the_decision_threshold_are_carried(runs, tmp_path):
    """run.json's calibration (issue 28) is folded into the head, so transformers gives the
    calibrated probabilities; its decision threshold goes to config.json and the card."""
    run = tmp_path / "calibrated"
    shutil.copytree(runs["last"], run)
    info = json.loads((run / "run.json").read_text())
    t = 2.5
    info["calibration"] = {"temperature": t, "method": "validation NLL"}
    info["decision"] = {"positive_class": "spam", "threshold": 0.83, "target": "precision=0.99"}
    (run / "run.json").write_text(json.dumps(info))
    out = tmp_path / "hf"
    run_export(run, "hf", out)
    classifier, info = evaluate.load_run(run, CPU)
    tok = data.get_tokenizer()
    with torch.no_grad():
        ids = torch.tensor([data.encode(x, tok, info["max_length"]) for x in TEXTS])
        calibrated = torch.softmax(classifier(ids) / t, dim=-1)
    ours = [dict(zip(info["class_names"], row)) for row in calibrated.tolist()]
    assert largest_gap(ours, pipeline_probs(out, TEXTS)) <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["decision_threshold"] == 0.83 and config["positive_class"] == "spam"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "temperature, 2.5, is folded into the head" in card
    assert "Decide **spam** when its probability is at least 0.83 (target precision=0.99" in card


# ---------------------------------------------------------------------------- refused modes

@pytest.mark.parametrize("change, said", [
    ({"token_position": "first"}, "--token-position first"),
    ({"average_embeddings": True}, "--average-embeddings"),
    ({"model": {"causal": False}}, "--disable-causal-mask"),
])
def test_a_position_transformers_cannot_read_is_refused(runs, tmp_path, change, said):
    run = tmp_path / "run"
    shutil.copytree(runs["last"], run)
    info = json.loads((run / "run.json").read_text())
    for k, v in change.items():
        info[k] = {**info[k], **v} if isinstance(v, dict) else v
    (run / "run.json").write_text(json.dumps(info))
    message = one_error_line(evaluate, ["--run", run, "--export", "hf", tmp_path / "out"])
    assert said in message and "train it again with --token-position flexible" in message
    assert "--export onnx" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written


# ------------------------------------------------------------------------------------- ONNX

def onnx_logits(path, ids):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0]), session


@pytest.mark.parametrize("name, change", [
    ("last", {}), ("flexible-padded", {}), ("lora", {}),
    ("last", {"token_position": "first"}), ("last", {"average_embeddings": True}),
    ("last", {"calibration": {"temperature": 0.5}}),
])
def test_onnxruntime_gives_the_runs_logits(runs, tmp_path, name, change):
    pytest.importorskip("onnxruntime")
    run = runs[name]
    if change:
        run = tmp_path / "run"
        shutil.copytree(runs[name], run)
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, **change}))
    out = tmp_path / "model.onnx"
    printed = run_export(run, "onnx", out)
    assert "onnxruntime's logits match the run's" in printed
    classifier, info = evaluate.load_run(run, CPU)
    t = info.get("calibration", {}).get("temperature", 1.0)
    tok = data.get_tokenizer()
    for texts in (TEXTS, TEXTS[:3]):  # two batch sizes, padded as the run pads them
        ids = torch.tensor([data.encode(x, tok, info["max_length"]) for x in texts])
        got, session = onnx_logits(out, ids)
        with torch.no_grad():
            want = classifier(ids) / t
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-4
    if info["token_position"] == "flexible":  # the length axis is free too: unpadded texts
        for x in TEXTS[:4]:
            ids = torch.tensor([data.encode(x, tok, info["max_length"], pad=False)])
            with torch.no_grad():
                assert (onnx_logits(out, ids)[0] - classifier(ids) / t).abs().max() <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == info["class_names"]
    assert json.loads(meta["max_length"]) == info["max_length"]
    assert [d.shape for d in session.get_inputs()] == [["batch", "length"]]


def test_without_the_export_extra_onnx_says_how_to_install_it(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    message = one_error_line(evaluate, ["--run", runs["last"],
                             "--export", "onnx", tmp_path / "m.onnx"])
    assert 'pip install -e ".[export]"' in message
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------- bad input

def test_bad_runs_and_bad_targets_are_one_error_line_each(runs, exported, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "log.txt").write_text("Ep 1 (Step 000000): ...\n")
    assert "not a finished run" in one_error_line(evaluate, ["--run", unfinished, "--export", "hf",
                                                             tmp_path / "a"])
    no_weights = tmp_path / "no-weights"
    shutil.copytree(runs["flexible"], no_weights)
    info = json.loads((no_weights / "run.json").read_text())
    (no_weights / info["weights_file"]).unlink()
    message = one_error_line(evaluate, ["--run", no_weights, "--export", "hf", tmp_path / "b"])
    assert info["weights_file"] in message and "train the run again" in message
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    message = one_error_line(
        evaluate, ["--run", runs["flexible"], "--export", "hf", a_file / "out"])
    assert "is a file, not a folder" in message and str(a_file) in message
    message = one_error_line(evaluate, ["--run", runs["flexible"],
                             "--export", "hf", "/proc/exported"])
    assert "cannot be written" in message and "/proc" in message
    assert "that is a file" in one_error_line(
        evaluate, ["--run", runs["flexible"], "--export", "hf", a_file])
    assert "formats are hf" in one_error_line(
        evaluate, ["--run", runs["flexible"], "--export", "gguf", "x"])
    assert a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "no-weights", "unfinished"]


def test_an_existing_export_is_replaced_only_with_overwrite_and_only_when_whole(
        runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_export(runs["flexible"], "hf", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = one_error_line(evaluate, ["--run", runs["last"], "--export", "hf", out])
    assert "not empty; pass --overwrite" in message

    def broken(folder, info):  # a full disk half-way through the new export
        raise OSError(28, "No space left on device", str(folder / "vocab.json"))
    monkeypatch.setattr(export, "tokenizer_files", broken)
    assert "the disk is full" in one_error_line(evaluate, ["--run", runs["last"], "--export",
                                                           "hf", out, "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written folder
    monkeypatch.undo()
    run_export(runs["last"], "hf", out, "--overwrite")
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "not spam", "1": "spam"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (out / "notes.txt").write_text("mine")
    message = one_error_line(evaluate, ["--run", runs["last"],
                             "--export", "hf", out, "--overwrite"])
    assert "notes.txt" in message and (out / "notes.txt").read_text() == "mine"


def test_an_existing_onnx_file_needs_overwrite(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    assert "--overwrite" in one_error_line(evaluate,
                                           ["--run", runs["flexible"], "--export", "onnx", out])
    assert out.read_bytes() == b"old"
    run_export(runs["flexible"], "onnx", out, "--overwrite")
    assert out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_runs_alone(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--run", str(runs["last"]), "--export", "hf", str(tmp_path / "x"),
                       "--text", "hi"])
    assert "--export runs alone" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the docs page

def test_the_docs_pages_examples_print_the_runs_probabilities(runs, tmp_path, monkeypatch):
    """docs/export.md's Python, run as written in a folder holding `exported/spam` and
    `spam.onnx` (of the tiny `last` run): both print what evaluate.py gives."""
    pytest.importorskip("onnxruntime")
    page = Path(__file__).resolve().parents[1] / "docs" / "export.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2
    run_export(runs["last"], "hf", tmp_path / "exported" / "spam")
    run_export(runs["last"], "onnx", tmp_path / "spam.onnx")
    monkeypatch.chdir(tmp_path)
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(page), "exec"), namespace)
    ours, _, _ = our_probs(runs["last"], namespace["texts"])
    lines = printed.getvalue().splitlines()
    assert len(lines) == 2 * len(ours)
    for line, want in zip(lines, ours + ours):  # "not spam  0.5123  spam      0.4877"
        got = {m[0]: float(m[1]) for m in re.findall(r"(\S+(?: \S+)?)\s+([01]\.\d{4})", line)}
        assert got.keys() == want.keys()
        assert all(abs(got[c] - want[c]) <= 0.5e-4 + 1e-6 for c in want), (line, want)
