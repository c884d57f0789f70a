"""End to end: finetune.py and evaluate.py on the real data with a tiny GPT-2 checkpoint.

The chapter's own code is transcribed in tests/reference.py, and our printed log must equal what
it prints, line for line, from the same initial weights.
"""

import json
import re
from pathlib import Path

import pytest
import torch

import data
import decisions
import evaluate
import files
import finetune
import gpt
import shortcuts
import reference

pytestmark = pytest.mark.slow

EP_LINE = re.compile(r"^Ep (\d+) \(Step (\d{6})\): Train loss (\d+\.\d{3}), Val loss (\d+\.\d{3})$")
ACC_LINE = re.compile(r"^Training accuracy: (\d+\.\d\d)% \| Validation accuracy: (\d+\.\d\d)%$")


@pytest.fixture(scope="module")
def real_data(raw_path):
    return str(raw_path)


def run_finetune(capsys, *args):
    finetune.main(list(map(str, args)))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_weights, real_data):
    """One default run (5 epochs), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        import io
        import sys
        buf = io.StringIO()
        mp.setattr(sys, "stdout", buf)
        finetune.main(["--weights", str(tiny_weights), "--data", real_data,
                       "--output-dir", str(out), "--device", "cpu"])
    return out, buf.getvalue()


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def chapter_reference(tiny_weights, real_data):
    """The chapter's own code (tests/reference.py) run from the same weights, default settings."""
    return reference.reference_run(tiny_weights, real_data)


def test_printout_equals_the_chapters_code(finished_run, chapter_reference):
    """Every line the chapter prints: the look before training (3 accuracies, 3 losses), each
    evaluation and epoch, and the three final accuracies."""
    _, out = finished_run
    expected = chapter_reference["lines"]
    assert len(expected) == 6 + 13 + 5 + 3
    assert reference.chapter_lines(out) == expected


def test_a_fresh_process_prints_the_chapters_log_too(tmp_path, tiny_weights, real_data,
                                                     chapter_reference):
    """`python finetune.py` in a process of its own: what a process-wide cache does on its first
    use (a check, a preparation) happens inside this run, not in an earlier test, and must not
    move a seeded draw (a first version of the oneDNN check did)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "finetune.py"), "--weights",
                           str(tiny_weights), "--data", str(real_data), "--output-dir",
                           str(tmp_path / "run"), "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert reference.chapter_lines(done.stdout) == chapter_reference["lines"]


def test_final_training_pass_covers_the_chapters_examples(finished_run, chapter_reference,
                                                          real_data, capsys):
    """The chapter's final training pass reads 1,040 of the 1,045 examples (drop_last, drawn
    from the RNG where training left it); run.json names the others, and evaluate.py leaves out
    exactly those, so it prints the chapter's three numbers."""
    run_dir, out = finished_run
    covered = chapter_reference["covered"]
    assert len(covered) == 1040
    info = json.loads((run_dir / "run.json").read_text())
    assert sorted(set(range(1045)) - covered) == sorted(info["final_train_dropped"])
    evaluate.main(["--run", str(run_dir), "--data", real_data, "--all-splits"])
    assert capsys.readouterr().out.splitlines()[:3] == chapter_reference["lines"][-3:]


def test_log_lines_and_their_order(finished_run):
    _, out = finished_run
    lines = out.splitlines()
    steps = [int(m.group(2)) for m in map(EP_LINE.match, lines) if m]
    assert steps == list(range(0, 650, 50))  # 130 steps an epoch, 5 epochs, every 50th
    assert sum(bool(ACC_LINE.match(line)) for line in lines) == 5
    i = next(i for i, line in enumerate(lines) if line.startswith("Training completed in"))
    assert re.fullmatch(r"Training completed in \d+\.\d\d minutes\.", lines[i])
    assert ACC_LINE.match(lines[i - 1])  # the last epoch's accuracies come right before
    assert re.fullmatch(r"Training accuracy: \d+\.\d\d%", lines[i + 1])
    assert re.fullmatch(r"Validation accuracy: \d+\.\d\d%", lines[i + 2])
    assert re.fullmatch(r"Test accuracy: \d+\.\d\d%", lines[i + 3])
    # the chapter's look before training: 3 accuracies then 3 losses
    before = lines.index("Before fine-tuning (accuracy over 10 batches, loss over 5):")
    assert [line.split(":")[0] for line in lines[before + 1:before + 7]] == [
        "Training accuracy", "Validation accuracy", "Test accuracy",
        "Training loss", "Validation loss", "Test loss"]
    assert before < lines.index(next(line for line in lines if EP_LINE.match(line)))


def test_run_folder_holds_everything(finished_run):
    run_dir, out = finished_run
    for name in ("trained.safetensors", "run.json", "metrics.json", "log.txt", "loss-plot.pdf",
                 "loss-plot.png", "accuracy-plot.pdf", "accuracy-plot.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert not list(run_dir.glob("*.part"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["max_length"] == 120 and info["pad_id"] == 50256
    assert info["class_names"] == ["not spam", "spam"]
    assert info["model"]["emb_dim"] == 32 and info["flags"]["epochs"] == 5
    assert len(info["final_train_dropped"]) == 5  # 1,045 examples, batches of 8, drop_last
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]["train_losses"]) == 13
    assert len(metrics["history"]["val_accs"]) == 5
    assert metrics["history"]["examples_seen"] == 5 * 130 * 8
    assert (run_dir / "log.txt").read_text() == out  # the log is what was printed
    assert (run_dir / "loss-plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "loss-plot.pdf").read_bytes()[:4] == b"%PDF"


def test_reload_gives_identical_accuracies(finished_run, real_data):
    run_dir, out = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    classifier, info = evaluate.load_run(run_dir, torch.device("cpu"))
    results = evaluate.evaluate_splits(classifier, info, torch.device("cpu"), real_data)
    assert {name: r["accuracy"] for name, r in results.items()} == metrics["final_accuracy"]


def test_evaluate_prints_the_same_accuracies(finished_run, real_data, capsys):
    run_dir, out = finished_run
    evaluate.main(["--run", str(run_dir), "--data", real_data, "--all-splits"])
    printed = capsys.readouterr().out.splitlines()
    final = out.splitlines()
    i = next(i for i, line in enumerate(final) if line.startswith("Training completed in"))
    assert printed[:3] == final[i + 1:i + 4]
    assert any(line.startswith("test ") for line in printed)
    assert "test: confusion (rows: true class, columns: predicted class)" in printed


def test_evaluate_classifies_new_text(finished_run, capsys, monkeypatch):
    run_dir, _ = finished_run
    texts = ["You are a winner you have been specially selected to receive $1000 cash.",
             "Hey, just wanted to check if we're still on for dinner tonight?"]
    evaluate.main(["--run", str(run_dir), "--text", texts[0], "--text", texts[1]])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    # What the chapter's classify_review gives with the saved weights: the last position of the
    # text padded to the training length (120), its argmax class and that class's probability.
    classifier, info = evaluate.load_run(run_dir, torch.device("cpu"))
    model, t = classifier.gpt, decisions.temperature_of(info)  # calibrated: softmax(logits / T)
    tokenizer = data.get_tokenizer()
    for line, text in zip(lines, texts):
        label, prob, shown = re.fullmatch(r"(spam|not spam)\s+(\d\.\d{4})  (.*)", line).groups()
        ids = tokenizer.encode(text)
        ids = torch.tensor([ids + [50256] * (120 - len(ids))])
        with torch.no_grad():
            probs = torch.softmax(model(ids)[0, -1] / t, dim=-1)
        assert label == ("spam" if probs.argmax() == 1 else "not spam")
        assert shown == text and prob == f"{probs.max().item():.4f}"
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO(texts[0] + "\n\n" + texts[1] + "\n"))
    evaluate.main(["--run", str(run_dir), "--stdin"])
    assert capsys.readouterr().out.splitlines() == lines  # blank lines skipped, same answers


def test_classify_matches_the_batched_forward(finished_run):
    run_dir, _ = finished_run
    classifier, info = evaluate.load_run(run_dir, torch.device("cpu"))
    tokenizer = data.get_tokenizer()
    text = "Do you have time"
    label, prob = evaluate.classify(text, classifier, tokenizer, info, torch.device("cpu"))
    ids = torch.tensor([data.encode(text, tokenizer, 120)])
    with torch.no_grad():
        logits = classifier.gpt(ids)[:, -1, :]
    assert label == info["class_names"][int(logits.argmax())]
    t = decisions.temperature_of(info)  # the run's calibration: softmax(logits / T)
    assert prob == pytest.approx(float(torch.softmax(logits / t, -1).max()), abs=1e-6)
    # ... through the inference shortcuts: FrozenBlocks before the last block, which runs at
    # the classified position only
    assert classifier.shortcuts.prepared and classifier.shortcuts.tail
    assert (len(classifier.gpt.trf_blocks) - 1, torch.float32, True) in \
        shortcuts._PREPARED[classifier.gpt]


@pytest.mark.parametrize("args, message", [
    (["--text", ""], "empty"),
    (["--text", "   "], "empty"),
])
def test_evaluate_refuses_empty_text(finished_run, args, message):
    run_dir, _ = finished_run
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(run_dir), *args])
    assert str(e.value).startswith("error:") and message in str(e.value)


def test_evaluate_refuses_bad_runs(tmp_path, finished_run):
    with pytest.raises(SystemExit, match="^error: .*not a folder"):
        evaluate.main(["--run", str(tmp_path / "nope"), "--text", "hi"])
    with pytest.raises(SystemExit, match="^error: .*not a finished run"):
        evaluate.main(["--run", str(tmp_path), "--text", "hi"])
    run_dir, _ = finished_run
    broken = tmp_path / "broken"
    broken.mkdir()
    info = json.loads((run_dir / "run.json").read_text())
    info["model"]["emb_dim"] = 64  # weights no longer fit the config
    (broken / "run.json").write_text(json.dumps(info))
    name = info["weights_file"]
    (broken / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(SystemExit, match="^error: .*(do|does) not fit"):
        evaluate.main(["--run", str(broken), "--text", "hi"])
    info["model"]["emb_dim"] = 32
    (broken / "run.json").write_text(json.dumps(info))
    (broken / name).write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="^error: .*not a readable safetensors file"):
        evaluate.main(["--run", str(broken), "--text", "hi"])


def test_a_finished_run_is_not_overwritten(finished_run, tiny_weights, real_data):
    run_dir, _ = finished_run
    before = (run_dir / "trained.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="^error: .*finished run.*--overwrite"):
        finetune.main(["--weights", str(tiny_weights), "--data", real_data,
                       "--output-dir", str(run_dir), "--max-steps", "1"])
    assert (run_dir / "trained.safetensors").read_bytes() == before
    assert (run_dir / "run.json").exists()


def test_two_runs_give_identical_logs(tmp_path, tiny_weights, real_data, capsys):
    def log(name, *extra):
        run_finetune(capsys, "--weights", tiny_weights, "--data", real_data, "--output-dir",
                     tmp_path / name, "--epochs", 1, "--eval-freq", 20, *extra)
        text = (tmp_path / name / "log.txt").read_text()
        return [line for line in text.splitlines()
                if not line.startswith(("Training completed", "Run folder", "Saved"))]
    first = log("a")
    assert first == log("b")
    # --overwrite replaces a finished run, with the same result
    assert first == log("a", "--overwrite")


def test_dropped_examples_are_the_ones_the_pass_leaves_out(real_data):
    splits = data.make_splits(data.load_rows(real_data))
    ds = data.SpamDataset(splits["train"], data.get_tokenizer())

    class Numbered(torch.utils.data.Dataset):  # items carry their index, to see which come
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return i, ds[i][1]

    torch.manual_seed(7)
    loader = data.create_loaders({"train": Numbered()})["train"]
    dropped = data.dropped_examples(loader)
    seen = {int(i) for batch, _ in loader for i in batch}
    assert dropped == sorted(set(range(len(ds))) - seen) and len(dropped) == 5


def comparable_lines(out):
    """The printed log without what may differ between equal runs: folder, mode, times, notes."""
    skip = ("Run folder:", "Training completed in", "Saved the fine-tuned model", "frozen-trunk",
            "Shortcuts")
    return [line for line in out.splitlines() if not line.startswith(skip)]


def test_fast_and_plain_print_the_same_log(tmp_path, tiny_weights, real_data, capsys):
    def log(*extra):
        out = run_finetune(capsys, "--weights", tiny_weights, "--data", real_data,
                           "--output-dir", tmp_path / "-".join(extra or ["exact"]),
                           "--epochs", 2, "--eval-freq", 25, *extra)
        return comparable_lines(out)
    exact = log("--no-shortcuts")
    assert sum(bool(EP_LINE.match(line) or ACC_LINE.match(line)) for line in exact) == 13
    reference.assert_same_log(log(), exact)  # the shortcuts are on by default
    reference.assert_same_log(log("--plain"), exact)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be 1 or more"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--context-length", "abc"], "--context-length must be"),
    (["--no-padding"], "--no-padding needs --batch-size 1"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    (["--weights", "/no/such/folder"], "not a preset"),
    (["--data", "/no/such/file"], "does not exist"),
    (["--context-length", "2000"], "the model takes 128"),
])
def test_bad_flags_give_one_clear_line(tmp_path, tiny_weights, real_data, args, message):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    base = ["--weights", str(tiny_weights), "--data", real_data,
            "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--no-initial-eval"]
    with pytest.raises(SystemExit) as e:
        finetune.main(base + args)
    assert str(e.value).startswith("error:") and message in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "run.json").exists()


def test_weights_that_cannot_be_downloaded_say_what_to_do(tmp_path, real_data, monkeypatch,
                                                          capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gpt, "HF_URL", "http://127.0.0.1:9/{repo}/{file}")  # closed port

    original = files.download_file

    def no_retry_download(urls, dest, **kw):
        return original(urls, dest, **{**kw, "retries": 1, "timeout": 2})
    monkeypatch.setattr(files, "download_file", no_retry_download)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data", real_data, "--output-dir", str(tmp_path / "run")])
    assert "--weights DIR" in str(e.value) and "--weights random" in str(e.value)


# ----------------------------------------------------------------------------- folders, resuming

def small_run_args(weights, raw, out, *extra):
    return ["--weights", str(weights), "--data", str(raw), "--output-dir", str(out),
            "--device", "cpu", "--epochs", "1", "--max-steps", "3", "--no-initial-eval", *extra]


def test_overwrite_replaces_a_finished_run_with_the_new_one(tmp_path, tiny_weights,
                                                            small_raw_path, capsys):
    out = tmp_path / "run"

    def weights():
        return {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    finetune.main(small_run_args(tiny_weights, small_raw_path, out, "--seed", "1"))
    first = weights()
    assert first
    with pytest.raises(SystemExit, match="^error: .*finished run.*--overwrite"):
        finetune.main(small_run_args(tiny_weights, small_raw_path, out, "--seed", "2"))
    assert weights() == first
    assert json.loads((out / "run.json").read_text())["flags"]["seed"] == 1
    finetune.main(small_run_args(tiny_weights, small_raw_path, out, "--seed", "2",
                                 "--overwrite"))
    assert json.loads((out / "run.json").read_text())["flags"]["seed"] == 2
    assert weights().keys() == first.keys() and weights() != first  # another head, model


def interrupt_training(monkeypatch):
    def train(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "train_classifier_simple", train)


def interrupt_saving_the_model(monkeypatch):
    def save_model(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(files, "save_model", save_model)


def interrupt_writing_run_json(monkeypatch):
    """The worst moment: everything else written, run.json (the mark of a finished run) not."""
    write_json = files.write_json

    def interrupted(path, obj):
        if str(path).endswith("run.json"):
            raise KeyboardInterrupt
        return write_json(path, obj)
    monkeypatch.setattr(files, "write_json", interrupted)


@pytest.mark.parametrize("interrupt", [interrupt_training, interrupt_saving_the_model,
                                       interrupt_writing_run_json],
                         ids=["training", "saving the model", "writing run.json"])
def test_an_interrupted_run_is_unfinished_and_runs_again(interrupt, tmp_path, tiny_weights,
                                                         small_raw_path, capsys):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        interrupt(mp)
        with pytest.raises(SystemExit, match="interrupted"):
            finetune.main(small_run_args(tiny_weights, small_raw_path, out))
    assert not (out / "run.json").exists()
    assert not list(tmp_path.rglob("*.part"))
    with pytest.raises(SystemExit, match="^error: "):  # evaluate.py will not use it
        evaluate.main(["--run", str(out), "--text", "hello"])
    # the same command again, without --overwrite: an unfinished folder is no finished run
    finetune.main(small_run_args(tiny_weights, small_raw_path, out))
    assert (out / "run.json").is_file()
    capsys.readouterr()
    evaluate.main(["--run", str(out), "--text", "hello"])
    assert capsys.readouterr().out.strip().endswith("hello")


@pytest.mark.parametrize("interrupt", [interrupt_training, interrupt_saving_the_model,
                                       interrupt_writing_run_json],
                         ids=["training", "saving the model", "writing run.json"])
def test_an_interrupted_overwrite_keeps_the_finished_run(interrupt, tmp_path, tiny_weights,
                                                         small_raw_path, capsys):
    out = tmp_path / "run"
    finetune.main(small_run_args(tiny_weights, small_raw_path, out, "--seed", "1"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.MonkeyPatch.context() as mp:
        interrupt(mp)
        with pytest.raises(SystemExit, match="interrupted"):
            finetune.main(small_run_args(tiny_weights, small_raw_path, out, "--seed", "2",
                                         "--overwrite"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # all of it, unchanged
    capsys.readouterr()
    evaluate.main(["--run", str(out), "--text", "hello"])
    assert capsys.readouterr().out.strip().endswith("hello")
    # asked again, the new run takes its place once it has finished
    finetune.main(small_run_args(tiny_weights, small_raw_path, out, "--seed", "2",
                                 "--overwrite"))
    assert json.loads((out / "run.json").read_text())["flags"]["seed"] == 2
