"""End to end: whole runs with each option, and what a finished run promises.
"""

import collections
import csv
import io
import json
import os
import random
import shutil
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import decisions
import evaluate
import experiments
import files
import finetune
import gpt
import reference


# ------------------------------------------------------------------ what a finished run promises

CPU = torch.device("cpu")
WORDS = {"sport": "ball goal team match score coach", "tech": "code chip data cloud app server",
         "food": "bread soup cake salt rice pepper"}
COUNTS = {"sport": 30, "tech": 15, "food": 10}  # imbalanced: balanced weights differ


def write_rows(path, counts=COUNTS, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        for c, n in counts.items():
            for _ in range(n):
                words = WORDS[c].split()
                w.writerow([" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))), c])
    return path


def tiny_run(out, train, weights, *extra):
    """finetune.main on an own file; returns (log, the tensors check_free_space was given, the
    class weights train() was given)."""
    seen = {}
    real_check, real_train = files.check_free_space, finetune.train_classifier_simple

    def check(out_dir, tensors):
        seen["tensors"] = dict(tensors)
        return real_check(out_dir, tensors)

    def train_(*args, **kw):
        seen["class_weights"] = kw.get("class_weights", args[6] if len(args) > 6 else None)
        return real_train(*args, **kw)
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files, "check_free_space", check)
        mp.setattr(finetune, "train_classifier_simple", train_)
        mp.setattr(sys, "stdout", buf)
        finetune.main(["--train-file", str(train), "--weights", str(weights), "--output-dir",
                       str(out), "--epochs", "1", "--max-steps", "2", "--no-initial-eval",
                       *extra])
    return buf.getvalue(), seen["tensors"], seen["class_weights"]


def tensor_bytes(path):
    """The bytes of a safetensors file's tensors: its size less the 8-byte length and the
    JSON header."""
    raw = Path(path).read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, tiny_weights):
    """A 3-class own-files run trained with relative paths from its own working folder."""
    home = tmp_path_factory.mktemp("trained-here")
    write_rows(home / "train.csv")
    weights = os.path.relpath(tiny_weights, home)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        log, tensors, weight = tiny_run(Path("runs") / "first", "train.csv", weights,
                                        "--class-weights", "balanced")
    return {"home": home, "run": home / "runs" / "first", "log": log, "tensors": tensors,
            "class_weights": weight}


# ----------------------------------------------------------------------------- free space

Usage = collections.namedtuple("usage", "total used free")


def assert_estimate_is_the_bytes_written(run, tensors, monkeypatch, exact=True):
    info = json.loads((run / "run.json").read_text())
    weights = tensor_bytes(run / info["weights_file"])
    plots = 2 << 20  # what the check adds for the plots and small files
    free = {}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, free["now"]))
    # The estimate covers every file the run wrote ...
    written = sum(f.stat().st_size for f in run.iterdir())
    free["now"] = written - 1
    with pytest.raises(ValueError, match="the run will write about"):
        files.check_free_space(run, tensors)
    if not exact:  # (LoRA folded in after the check: the file is smaller than the estimate)
        return
    # ... and is the weights file's tensor bytes plus the allowance, to the byte.
    free["now"] = weights + plots
    files.check_free_space(run, tensors)
    free["now"] = weights + plots - 1
    with pytest.raises(ValueError, match="the run will write about"):
        files.check_free_space(run, tensors)


def test_the_free_space_estimate_is_the_bytes_the_run_writes(own_run, monkeypatch):
    run = own_run["run"]
    assert json.loads((run / "run.json").read_text())["weights_file"] == "trained.safetensors"
    assert_estimate_is_the_bytes_written(run, own_run["tensors"], monkeypatch)


@pytest.mark.parametrize("trainable, precision, extra", [
    ("last_layer", "fp32", ()), ("last_two_blocks", "bf16", ()), ("all", "fp32", ()),
    ("all", "bf16", ("--self-contained",)), ("lora", "bf16", ()),
    ("lora", "fp32", ("--self-contained",))])
def test_the_free_space_estimate_for_each_trainable_set_and_precision(
        tmp_path, tiny_weights, monkeypatch, trainable, precision, extra):
    train = write_rows(tmp_path / "train.csv", {"sport": 8, "tech": 8})
    out = tmp_path / "run"
    _, tensors, _ = tiny_run(out, train, tiny_weights, "--trainable-layers", trainable,
                             "--precision", precision, *extra)
    info = json.loads((out / "run.json").read_text())
    whole = trainable == "all" or "--self-contained" in extra
    assert info["weights_file"] == ("model.safetensors" if whole else "trained.safetensors")
    assert_estimate_is_the_bytes_written(out, tensors, monkeypatch,
                                         exact=not (trainable == "lora" and whole))


# ----------------------------------------------------------------------------- class weights

def test_a_run_trains_with_balanced_weights_of_its_training_split(own_run):
    # "3 classes, rows per split (train / validation / test): food 6 / 1 / 2; ..."
    line = next(x for x in own_run["log"].splitlines() if x.startswith("3 classes, rows per"))
    train = {part.split()[0]: int(part.split()[1]) for part in line.split(": ", 1)[1].split("; ")}
    names = json.loads((own_run["run"] / "run.json").read_text())["class_names"]
    assert names == sorted(WORDS)
    n = sum(train.values())
    expected = [n / (3 * train[c]) for c in names]
    assert len(set(expected)) == 3  # imbalanced: a weight per class, all different
    assert own_run["class_weights"].tolist() == pytest.approx(expected)


# ----------------------------------------------------------------------------- predictions

def test_predict_writes_every_row_in_order_past_one_batch_of_texts(own_run, tmp_path, capsys):
    rng = random.Random(5)
    words = " ".join(WORDS.values()).split()
    texts = [" ".join(rng.choice(words) for _ in range(1 + i % 9)) + f" {i}" for i in range(300)]
    src = tmp_path / "new.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "Text"])
        w.writerows([i, t] for i, t in enumerate(texts))
    classifier, info = evaluate.load_run(own_run["run"], CPU)
    names = info["class_names"]
    direct = evaluate.predict_proba(texts, classifier, info, CPU)
    assert len({tuple(p.values()) for p in direct}) > 100  # the rows tell apart: order shows
    for ext in ("csv", "jsonl"):
        out = tmp_path / f"pred.{ext}"
        evaluate.main(["--run", str(own_run["run"]), "--predict", str(src), "--output",
                       str(out)])
        assert capsys.readouterr().out.strip() == f"Wrote 300 predictions to {out}"
        if ext == "csv":
            lines = list(csv.reader(out.open(encoding="utf-8")))
            assert lines[0] == ["row", "predicted", *names]
            got = [(int(r[0]), r[1], dict(zip(names, map(float, r[2:])))) for r in lines[1:]]
            assert all(len(r) == 2 + len(names) for r in lines)
        else:
            objs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
            assert all(list(o) == ["row", "predicted", "probabilities"] for o in objs)
            assert all(list(o["probabilities"]) == names for o in objs)
            got = [(o["row"], o["predicted"], o["probabilities"]) for o in objs]
        assert [row for row, _, _ in got] == list(range(2, 302))  # every row, in order
        for (_, predicted, probs), want in zip(got, direct):
            assert sum(probs.values()) == pytest.approx(1, abs=2e-6)
            assert probs == pytest.approx(want, abs=2e-6)
            assert predicted == max(want, key=want.get)


# ----------------------------------------------------------------------------- finding a run

def test_latest_run_is_the_most_recently_finished_not_the_last_by_name(tmp_path):
    runs = tmp_path / "runs"
    for name, finished in (("20260101-000000", 3000), ("20260102-000000", 2000),
                           ("20260103-000000", None), ("zz-notes", None)):
        (runs / name).mkdir(parents=True)
        (runs / name / "log.txt").write_text("...")
        if finished:
            (runs / name / "run.json").write_text("{}")
            os.utime(runs / name / "run.json", (finished, finished))
    # 20260101 was replaced (--overwrite) after 20260102 finished; 20260103 is still training
    assert files.latest_run(runs) == runs / "20260101-000000"
    os.utime(runs / "20260102-000000" / "run.json", (4000, 4000))
    assert files.latest_run(runs) == runs / "20260102-000000"


def test_evaluate_without_run_names_and_uses_the_latest_finished(
        own_run, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(own_run["run"], runs / "b-older")
    shutil.copytree(own_run["run"], runs / "a-newer")
    os.utime(runs / "b-older" / "run.json", (1000, 1000))
    os.utime(runs / "a-newer" / "run.json", (2000, 2000))
    (runs / "a-newer" / "model.safetensors").write_bytes(b"not used")  # not the weights file
    (runs / "b-older" / "trained.safetensors").write_bytes(b"broken")  # would fail if taken
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--text", "ball goal team"])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == \
        f"Using the most recent finished run: {Path('runs', 'a-newer')}"
    assert captured.err.splitlines()[1:] == [decisions.explain(  # and how it gives probabilities
        json.loads((runs / "a-newer" / "run.json").read_text()))]
    assert captured.out.split()[0] in WORDS


def test_an_own_files_run_is_scored_from_another_working_folder(
        own_run, tmp_path, monkeypatch, capsys):
    log = own_run["log"].splitlines()
    end = log.index(next(x for x in log if x.startswith("Training completed")))
    final = log[end + 1:end + 4]
    assert [x.split(" accuracy")[0] for x in final] == ["Training", "Validation", "Test"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "train.csv").write_text("text,label\nnot the run's file,x\n")  # same name
    evaluate.main(["--run", str(own_run["run"]), "--all-splits", "--json", "s.json"])
    out = capsys.readouterr()
    assert out.out.splitlines()[:3] == final  # the run's own splits, from its own files
    assert "warning" not in out.err
    report = json.loads((elsewhere / "s.json").read_text())
    sizes = json.loads((own_run["run"] / "run.json").read_text())["splits"]
    assert report["splits"]["validation"]["examples"] == sizes["validation"]
    assert report["splits"]["test"]["examples"] == sizes["test"]


# ----------------------------------------------------------------------------- experiments

def fake_run(calls):
    """finetune.run's stand-in: a finished row folder at once, its accuracies numbering the
    call, its run.json the settings it was given."""
    def run(cfg):
        calls.append(cfg)
        folder = Path(cfg.output_dir)
        if cfg.overwrite:
            shutil.rmtree(folder, ignore_errors=True)
        elif (folder / "run.json").exists():
            raise ValueError(f"{folder} holds a finished run; pass --overwrite")
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "final_accuracy": {"train": len(calls) / 10, "validation": 0.5, "test": 0.5},
            "train_minutes": 1.0, "device": "cpu", "device_name": "x86_64"}))
        (folder / "run.json").write_text(json.dumps({"flags": asdict(cfg)}))
        return folder
    return run


def table_row(out, number):
    for line in (out / "experiments.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == str(number):
            return cells
    raise AssertionError(f"no row {number}")


def test_rerun_with_changed_settings_replaces_the_row_and_its_table_line(
        tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(finetune, "run", fake_run(calls))
    out = tmp_path / "out"
    base = ["--rows", "3", "--weights", "random", "--output-dir", str(out)]
    experiments.main(base)
    assert table_row(out, 3)[2:4] == ["`--weights random --trainable-layers last_layer`", "10.00"]
    # other settings without --rerun: refused, the finished row untouched
    with pytest.raises(SystemExit, match="row 3 .* finished with other settings"):
        experiments.main(base + ["--no-shortcuts", "--epochs", "2"])
    assert len(calls) == 1
    # with --rerun: trained again with the new settings, replacing the row (--overwrite)
    experiments.main(base + ["--no-shortcuts", "--epochs", "2", "--rerun"])
    assert len(calls) == 2 and calls[1].overwrite and not calls[1].shortcuts and \
        calls[1].epochs == 2
    flags = json.loads((out / "row-03" / "run.json").read_text())["flags"]
    assert (flags["shortcuts"], flags["epochs"]) == (False, 2)
    row = table_row(out, 3)
    assert row[2] == "`--weights random --epochs 2 --trainable-layers last_layer " \
        "--no-shortcuts`" and row[3] == "20.00"
    # the new settings are now the row's: asked again, kept; the old ones are refused
    experiments.main(base + ["--no-shortcuts", "--epochs", "2"])
    assert len(calls) == 2 and "Row 3: finished in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        experiments.main(base)


# -------------------------------------------------------------------- each option in a whole run

# Two epochs of 21 steps, losses every 8 steps; a larger learning rate than the chapter's so that
# what an option changes in training shows in the printed numbers.
FLAGS = ["--epochs", "2", "--eval-freq", "8", "--lr", "1e-3"]
REFERENCE = dict(num_epochs=2, eval_freq=8, lr=1e-3)
TINY_RANDOM = gpt.GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2,
                            n_layers=2)

CASES = {
    # name: (finetune.py flags, the reference's settings)
    "first token": (["--token-position", "first"], dict(position="first")),
    "flexible token": (["--token-position", "flexible"], dict(position="flexible")),
    "average": (["--average-embeddings"], dict(average=True)),
    "no causal mask": (["--disable-causal-mask"], dict(causal=False)),
    "last layer": (["--trainable-layers", "last_layer"], dict(trainable="last_layer")),
    "last two blocks": (["--trainable-layers", "last_two_blocks"],
                        dict(trainable="last_two_blocks")),
    "all layers": (["--trainable-layers", "all"], dict(trainable="all")),
    "lora": (["--trainable-layers", "lora", "--lora-rank", "4", "--lora-alpha", "2"],
             dict(trainable="lora", lora_rank=4, lora_alpha=2)),
    "context 64": (["--context-length", "64"], dict(context_length=64)),
    "context model": (["--context-length", "model"], dict(context_length=128)),
    "accumulation": (["--batch-size", "4", "--accumulation-steps", "3"],
                     dict(batch_size=4, accumulation_steps=3)),
    "ignore spam labels": (["--ignore-index", "1"], dict(ignore_index=1)),
    "loop settings": (["--batch-size", "6", "--eval-iter", "3", "--weight-decay", "0.5",
                       "--seed", "7"],
                      dict(batch_size=6, eval_iter=3, weight_decay=0.5, seed=7)),
    "no padding": (["--no-padding", "--batch-size", "1", "--eval-freq", "60"],
                   dict(pad=False, batch_size=1, eval_freq=60)),
}


def sample(ref, n=12):
    """The first validation examples as the run encodes them: (B, T) batches."""
    ds = ref["datasets"]["validation"]
    xs = [ds[i][0] for i in range(n)]
    if len({len(x) for x in xs}) == 1:
        return [torch.stack(xs)]
    return [x.unsqueeze(0) for x in xs]  # no padding: one text at a time


def ref_logits(ref, batches):
    with torch.no_grad():
        return torch.cat([ref["logits_of"](ref["model"], x) for x in batches])


def logits_of_default(default, ref):
    """The default run's model (its own position rule) on `ref`'s sample."""
    with torch.no_grad():
        return torch.cat([default["logits_of"](default["model"], x) for x in sample(ref)])


def same_log(a, b):
    try:
        reference.assert_same_log(a, b)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="module")
def raw_path(small_raw_path):
    return small_raw_path


@pytest.fixture(scope="module")
def default_reference(tiny_weights, raw_path):
    return reference.reference_run(tiny_weights, raw_path, **REFERENCE)


def run_and_check(tmp_path, capsys, raw_path, weights, flags, ref):
    """Our run with `flags` against the reference: printout, evaluate.py, reloaded logits."""
    out_dir = tmp_path / "run"
    finetune.main(["--weights", str(weights), "--data", str(raw_path), "--output-dir",
                   str(out_dir), "--device", "cpu", *FLAGS, *flags])
    out = capsys.readouterr().out
    reference.assert_same_log(reference.chapter_lines(out), ref["lines"])

    evaluate.main(["--run", str(out_dir), "--data", str(raw_path), "--all-splits"])
    assert capsys.readouterr().out.splitlines()[:3] == ref["lines"][-3:]

    classifier, _ = evaluate.load_run(out_dir, torch.device("cpu"))
    batches = sample(ref)
    with torch.no_grad():
        got = torch.cat([classifier(x) for x in batches])
    torch.testing.assert_close(got, ref_logits(ref, batches), atol=2e-4, rtol=1e-3)
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_option_is_wired_through_the_run(case, tmp_path, capsys, tiny_weights, raw_path,
                                         default_reference):
    flags, settings = CASES[case]
    ref = reference.reference_run(tiny_weights, raw_path, **{**REFERENCE, **settings})
    # The option matters here: the chapter's code prints another log with it, or its model
    # classifies otherwise, by more than the checks below let through.
    assert not same_log(ref["lines"], default_reference["lines"]) or \
        (ref_logits(ref, sample(ref)) - logits_of_default(default_reference, ref)).abs().max() \
        > 1e-3
    run_and_check(tmp_path, capsys, raw_path, tiny_weights, flags, ref)


@pytest.mark.slow
def test_default_run_matches_the_reference(tmp_path, capsys, tiny_weights, raw_path,
                                           default_reference):
    run_and_check(tmp_path, capsys, raw_path, tiny_weights, [], default_reference)


@pytest.mark.slow
@pytest.mark.parametrize("initial_eval", [True, False], ids=["with-look", "no-initial-eval"])
def test_every_seed_point_with_random_weights(initial_eval, tmp_path, capsys, raw_path,
                                              monkeypatch):
    """Random initial weights, the look before training, the head and the training order: each
    drawn right after seeding with --seed, whatever torch's RNG held before the run.

    The seed before the loaders is the one point no run can pin alone: building a DataLoader
    draws nothing, and nothing draws between it and the head's seed, so either of the two
    covers for the other (as in the chapter). Both gone, the head is drawn where the initial
    weights left the RNG, and this test fails."""
    monkeypatch.setitem(gpt.PRESETS, "small", (TINY_RANDOM, gpt.PRESETS["small"][1]))
    ref = reference.reference_run(TINY_RANDOM, raw_path, seed=7, initial_eval=initial_eval,
                                  **REFERENCE)
    torch.manual_seed(2024)  # a state the run must not depend on
    torch.rand(5)
    flags = ["--seed", "7"] + ([] if initial_eval else ["--no-initial-eval"])
    run_and_check(tmp_path, capsys, raw_path, "random", flags, ref)
