"""End to end: every fault a user can make answered with one clear error line (what, where, a fix).
"""

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import data
import evaluate
import finetune
import gpt
import serve
import tables
from conftest import error_line, one_error_line


# -------------------------------------------------------------------------------------- messages

def sms_lines(n_ham=100, n_spam=40):
    """A small file in the SMS Spam Collection's format (not the published one)."""
    ham = [f"ham\tsee you at {i % 12 + 1} then, ok? bring the {i} books" for i in range(n_ham)]
    spam = [f"spam\tWIN a prize of ${i}00 now! txt WIN to 8{i:04d} to claim" for i in range(n_spam)]
    lines = ham[:n_ham // 2] + spam + ham[n_ham // 2:]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def sms_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "SMSSpamCollection"
    path.write_text(sms_lines(), encoding="utf-8")
    return path


def quick(tiny_weights, data_path, out, *extra):
    """finetune.py's arguments for a run of a few steps."""
    return ["--weights", str(tiny_weights), "--data", str(data_path), "--output-dir", str(out),
            "--device", "cpu", "--max-steps", "2", "--no-initial-eval", *map(str, extra)]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_weights, sms_file):
    """A finished run trained on the made-up file (and its printed output)."""
    out = tmp_path_factory.mktemp("runs") / "small"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        finetune.main(quick(tiny_weights, sms_file, out))
    return out, buf.getvalue()


# ----------------------------------------------------------------------------- the published data

def test_the_published_files_sha256_is_known(raw_path, tmp_path):
    assert hashlib.sha256(raw_path.read_bytes()).hexdigest() == data.SMS_SHA256
    rows, source = data.load(raw_path)
    assert len(rows) == data.SMS_ROWS and source["sha256"] == data.SMS_SHA256
    assert data.unpublished_warning(rows, source) is None
    zipped = tmp_path / "sms.zip"  # the zip's member is what is hashed
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(raw_path, "SMSSpamCollection")
    assert data.load(zipped)[1]["sha256"] == data.SMS_SHA256


def test_a_cut_short_copy_is_named_not_the_published_one(raw_path, tmp_path, tiny_weights,
                                                         capsys):
    raw = raw_path.read_bytes()
    cut = tmp_path / "SMSSpamCollection"
    cut.write_bytes(raw[:raw.index(b"\n", 300000) + 1])  # `head -c 300000`, at a line's end
    rows, source = data.load(cut)
    assert len(rows) < data.SMS_ROWS
    finetune.main(quick(tiny_weights, cut, tmp_path / "run", "--context-length", "128"))
    out = capsys.readouterr().out
    warning = f"warning: {cut.resolve()} is not the published SMS Spam Collection"
    assert out.count(warning) == 1, out  # once, plainly; the run goes on
    assert f"{len(rows):,} messages where the published file has 5,572" in out
    assert "the chapter's numbers will not be reproduced" in out
    assert warning in (tmp_path / "run" / "log.txt").read_text()
    assert (tmp_path / "run" / "run.json").is_file()

    data.main(["--data", str(cut), "--output-dir", str(tmp_path / "splits")])  # data.py too
    assert capsys.readouterr().err.count(warning) == 1


def test_the_published_data_gets_no_warning(raw_path, tmp_path, capsys):
    data.main(["--data", str(raw_path), "--output-dir", str(tmp_path / "splits")])
    captured = capsys.readouterr()
    assert "warning" not in captured.out + captured.err


# ----------------------------------------------------------------------------- the data in run.json

def test_run_json_records_the_data(small_run, sms_file):
    run_dir, _ = small_run
    info = json.loads((run_dir / "run.json").read_text())
    assert info["data"] == {"path": str(sms_file.resolve()),
                            "sha256": hashlib.sha256(sms_file.read_bytes()).hexdigest()}


def no_download(*args, **kwargs):
    raise AssertionError("evaluate.py downloaded data although run.json names the run's data")


def test_all_splits_defaults_to_the_data_trained_on(small_run, sms_file, monkeypatch, capsys):
    run_dir, _ = small_run
    monkeypatch.setattr(data, "fetch", no_download)
    evaluate.main(["--run", str(run_dir), "--all-splits"])
    default = capsys.readouterr()
    evaluate.main(["--run", str(run_dir), "--all-splits", "--data", str(sms_file)])
    given = capsys.readouterr()
    assert default.out == given.out and "Test accuracy" in default.out
    assert "warning" not in default.err + given.err


def test_all_splits_says_when_the_data_differs(small_run, tmp_path, capsys):
    run_dir, _ = small_run
    other = tmp_path / "other"
    other.write_text(sms_lines(120, 50), encoding="utf-8")
    evaluate.main(["--run", str(run_dir), "--all-splits", "--data", str(other)])
    err = capsys.readouterr().err
    assert f"warning: {other.resolve()} is not the data this run was trained on" in err
    assert err.count("warning") == 1


def test_all_splits_names_the_missing_data(small_run, tmp_path, monkeypatch):
    run_dir, _ = small_run
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    info = json.loads((moved / "run.json").read_text())
    info["data"]["path"] = str(tmp_path / "gone" / "SMSSpamCollection")
    (moved / "run.json").write_text(json.dumps(info))
    monkeypatch.setattr(data, "fetch", no_download)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(moved), "--all-splits"])
    message = error_line(e)
    assert "gone" in message and "--data PATH" in message and info["data"]["sha256"] in message


# ----------------------------------------------------------------------------- broken files

def damaged_zip(tmp_path):
    """A zip whose deflated bytes are damaged so that zlib itself fails deep inside."""
    text = sms_lines().encode()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("SMSSpamCollection", text)
    whole = good.read_bytes()
    start = whole.index(b"SMSSpamCollection") + len("SMSSpamCollection")  # the member's bytes
    for i in range(start + 2, start + 200):
        bad = bytearray(whole)
        bad[i] ^= 0xFF
        path = tmp_path / "damaged.zip"
        path.write_bytes(bytes(bad))
        try:
            with zipfile.ZipFile(path) as zf:
                zf.read("SMSSpamCollection")
        except zipfile.zlib.error:
            return path
        except zipfile.BadZipFile:
            continue
    raise AssertionError("no damage found that zlib itself reports")


def test_a_damaged_zip_is_one_line_in_both_scripts(tmp_path, tiny_weights, small_run):
    path = damaged_zip(tmp_path)
    with pytest.raises(SystemExit) as e:
        finetune.main(quick(tiny_weights, path, tmp_path / "run"))
    assert "broken zip" in error_line(e) and str(path) in str(e.value)
    run_dir, _ = small_run
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(run_dir), "--all-splits", "--data", str(path)])
    assert "broken zip" in error_line(e) and "download it again" in str(e.value)


def test_a_truncated_zip_is_called_cut_short(tmp_path, tiny_weights):
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("SMSSpamCollection", sms_lines())
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(SystemExit) as e:
        finetune.main(quick(tiny_weights, cut, tmp_path / "run"))
    message = error_line(e)
    assert "zip file cut short" in message and "UTF-8" not in message


def test_a_folder_as_data_is_called_a_folder(tmp_path, tiny_weights, sms_file):
    with pytest.raises(SystemExit) as e:
        finetune.main(quick(tiny_weights, sms_file.parent, tmp_path / "run"))
    message = error_line(e)
    assert "is a folder" in message and "does not exist" not in message
    assert f"did you mean {sms_file}" in message  # it holds the file


def test_a_latin1_file_gives_the_byte_and_the_fix(tmp_path, tiny_weights):
    path = tmp_path / "latin1"
    raw = "ham\thello\nham\tcaf\xe9 at 5?\n".encode("latin-1")
    path.write_bytes(raw)
    assert raw.index(b"\xe9") == 17
    with pytest.raises(SystemExit) as e:
        finetune.main(quick(tiny_weights, path, tmp_path / "run"))
    message = error_line(e)
    assert "not UTF-8" in message and "byte 17 (line 2) is 0xe9" in message
    assert "re-encode it as UTF-8" in message


@pytest.mark.parametrize("key", ["max_length", "num_classes", "token_position", "pad_id",
                                 "final_train_dropped", "model.emb_dim", "data.sha256"])
def test_a_run_json_missing_a_key_names_it(small_run, tmp_path, key):
    run_dir, _ = small_run
    edited = tmp_path / "run"
    shutil.copytree(run_dir, edited)
    info = json.loads((edited / "run.json").read_text())
    if "." in key:
        outer, inner = key.split(".")
        del info[outer][inner]
    else:
        del info[key]
    (edited / "run.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(edited), "--text", "hello"])
    message = error_line(e)
    assert f"has no '{key}'" in message and "run.json" in message


# ----------------------------------------------------------------------------- messages

def test_a_context_length_past_the_model_says_so(tmp_path, tiny_weights, sms_file):
    with pytest.raises(SystemExit) as e:
        finetune.main(quick(tiny_weights, sms_file, tmp_path / "run", "--context-length", "5000"))
    message = error_line(e)
    assert "--context-length 5000 is longer than the model's context" in message
    assert "the model takes 128 tokens" in message and "has 5000 tokens" not in message


def test_a_short_context_length_says_how_many_texts_are_cut(tmp_path, tiny_weights, sms_file,
                                                            capsys):
    finetune.main(quick(tiny_weights, sms_file, tmp_path / "run", "--context-length", "3"))
    out = capsys.readouterr().out
    rows = data.make_splits(data.load_rows(sms_file))
    tokenizer = data.get_tokenizer()
    cuts = [len(tokenizer.encode(t)) - 3 for _, t in rows["train"]]
    assert min(cuts) > 0  # every text here is longer than 3 tokens
    line = next(line for line in out.splitlines() if line.startswith("note:"))
    assert (f"cuts {len(cuts)} of {len(cuts)} train texts (by {min(cuts)} to {max(cuts)} tokens"
            in line), line
    assert "validation texts" in line and "test texts" in line
    assert "only their first 3 tokens are classified" in line


def test_the_default_context_length_prints_no_note(small_run):
    _, out = small_run
    assert "note:" not in out


def test_config_and_weights_of_other_widths_are_said_once(tiny_hf_dir, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(tiny_hf_dir[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(gpt.WeightsError) as e:
        gpt.load_gpt(folder)
    message = str(e.value)
    assert "config.json describes a model of width 64" in message
    assert "the weights have width 32" in message
    assert len(message) < 400 and message.count("has shape") == 0, message


def test_weights_disagreeing_in_many_shapes_name_a_few(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "w"
    shutil.copytree(tiny_hf_dir[0], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for name in list(tensors):  # a feed-forward width of 64 instead of 4 x 32
        if ".mlp.c_fc." in name:
            tensors[name] = tensors[name][..., :64].contiguous()
        elif name.endswith(".mlp.c_proj.weight"):
            tensors[name] = tensors[name][:64].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(gpt.WeightsError) as e:
        gpt.load_gpt(folder)
    message = str(e.value)
    assert message.count("has shape") == 3 and "3 more tensors do not fit" in message, message


def test_a_failed_data_download_names_each_url_once_and_the_way_forward(http_server, closed_url,
                                                                        tmp_path):
    missing = http_server.url("/missing.zip")
    with pytest.raises(data.DataError) as e:
        data.fetch(cache=tmp_path / "cache", urls=[closed_url, missing], retries=3, backoff=0,
                   timeout=5)
    message = str(e.value)
    assert message.count(closed_url) == 1 and message.count(missing) == 1, message
    assert "--data PATH" in message


# ----------------------------------------------------------------------------- text input

def test_a_long_text_says_it_was_cut_and_echoes_a_prefix(small_run, capsys):
    run_dir, _ = small_run
    text = " ".join(f"word{i}" for i in range(5000))
    evaluate.main(["--run", str(run_dir), "--text", text])
    out = capsys.readouterr().out
    assert len(out) < 300, out
    max_length = json.loads((run_dir / "run.json").read_text())["max_length"]
    n = len(data.get_tokenizer().encode(text))
    assert text[:40] in out and f"only its first {max_length} of {n:,} tokens" in out


def test_a_short_text_is_echoed_whole(small_run, capsys):
    run_dir, _ = small_run
    evaluate.main(["--run", str(run_dir), "--text", "see you at 5 then"])
    out = capsys.readouterr().out
    assert out.rstrip().endswith("  see you at 5 then") and "cut" not in out


def stdin_of(raw):
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")


@pytest.mark.parametrize("raw", [b"", b"\n  \n\n"])
def test_empty_stdin_says_there_was_no_text(small_run, monkeypatch, raw):
    run_dir, _ = small_run
    monkeypatch.setattr(sys, "stdin", stdin_of(raw))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(run_dir), "--stdin"])
    assert "standard input held no text" in error_line(e)


def test_stdin_that_is_not_utf8_is_one_line(small_run, monkeypatch):
    run_dir, _ = small_run
    monkeypatch.setattr(sys, "stdin", stdin_of("see you\ncaf\xe9 at 5\n".encode("latin-1")))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(run_dir), "--stdin"])
    message = error_line(e)
    assert "standard input is not UTF-8" in message and "line 2" in message


def test_stdin_in_utf8_is_classified_line_by_line(small_run, monkeypatch, capsys):
    run_dir, _ = small_run
    monkeypatch.setattr(sys, "stdin", stdin_of("café at 5?\r\n\nWIN now\n".encode()))
    evaluate.main(["--run", str(run_dir), "--stdin"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[-1] for line in lines] == ["café at 5?", "WIN now"]


# ----------------------------------------------------------------------------- --help

@pytest.mark.parametrize("main", [finetune.main, gpt.main], ids=["finetune", "gpt"])
def test_help_of_weights_lists_every_random_size(main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = re.sub(r"-\s+", "-", capsys.readouterr().out)  # argparse wraps after hyphens
    for name in ("random-medium", "random-large", "random-xl"):
        assert name in text


# ----------------------------------------------------------------------------- plots

@pytest.fixture
def figures(monkeypatch):
    """The figures finetune.py draws, kept as it closes them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (drawn.append(fig), close(fig)))
    return drawn


@pytest.mark.parametrize("steps", [20, 60])
def test_plots_of_short_runs_use_the_epochs_and_examples_seen(raw_path, tmp_path, tiny_weights,
                                                              figures, steps):
    finetune.main(["--weights", str(tiny_weights), "--data", str(raw_path), "--output-dir",
                   str(tmp_path / "run"), "--max-steps", str(steps), "--no-initial-eval"])
    loss, accuracy = figures  # 130 batches of 8 make an epoch
    for fig in (loss, accuracy):
        epochs_axis, examples_axis = fig.axes
        assert epochs_axis.get_xlim() == pytest.approx((0, steps / 130))
        assert examples_axis.get_xlim() == pytest.approx((0, steps * 8))
        for line in epochs_axis.get_lines():
            assert all(0 < x <= steps / 130 + 1e-9 for x in line.get_xdata())
            assert line.get_marker() not in (None, "None", "")  # one or two points: marked
    seen = [line.get_xdata() for line in loss.axes[0].get_lines()]
    assert seen[0] == pytest.approx([1 / 130] + ([51 / 130] if steps > 50 else []))


# ----------------------------------------------------------------------------- progress bars

class Terminal(io.StringIO):
    """stdout and stderr of a terminal: one stream, and a tty."""

    def isatty(self):
        return True


def screen(raw):
    """The lines a terminal shows for `raw`: \\r returns to the line's start, text overwrites,
    ESC[A moves up a line; other escape sequences are dropped."""
    lines, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]", raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        elif token == "\x1b[A":
            row = max(row - 1, 0)
        elif token.startswith("\x1b"):
            continue
        else:
            line = lines[row]
            line.extend(" " * (col - len(line) + 1))
            line[col] = token
            col += 1
    return ["".join(line).rstrip() for line in lines]


def test_progress_bars_show_in_a_terminal_and_stay_off_the_log(tmp_path, tiny_weights, raw_path,
                                                               monkeypatch):
    term = Terminal()
    for name in ("stdout", "stderr", "__stderr__"):
        monkeypatch.setattr(sys, name, term)
    finetune.main(["--weights", str(tiny_weights), "--data", str(raw_path), "--output-dir",
                   str(tmp_path / "run"), "--max-steps", "3", "--eval-freq", "1"])
    raw = term.getvalue()
    for bar in ("Looking before training", "Epoch 1", "Accuracy on every split"):
        assert f"{bar}: " in raw, bar  # each long piece of work showed a bar
    shown = screen(raw)
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert any(line.startswith("Ep 1 (Step 000000)") for line in log)
    for line in log:  # every line of the log is a whole line on the screen
        assert line in shown, (line, [s for s in shown if line[:10] in s])

    term.seek(0)
    term.truncate()
    evaluate.main(["--run", str(tmp_path / "run"), "--all-splits", "--data", str(raw_path)])
    assert "Evaluating every split: " in term.getvalue()
    assert any(line.startswith("Test accuracy: ") for line in screen(term.getvalue()))


def test_no_progress_bar_off_a_terminal(small_run, sms_file, capsys):
    run_dir, _ = small_run
    evaluate.main(["--run", str(run_dir), "--all-splits", "--data", str(sms_file)])
    captured = capsys.readouterr()
    assert "Evaluating" not in captured.err + captured.out


# ----------------------------------------------------------------------------- issue 27.4

def own_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def two_class_rows(n=12, labels=("0", "1")):
    return [f"text number {i} about {'cats' if i % 2 else 'dogs'},{labels[i % 2]}"
            for i in range(n)]


def test_final_splits_naming_a_split_the_run_lacks_is_one_error_line(tmp_path, tiny_weights):
    train = own_csv(tmp_path / "train.csv", two_class_rows())
    val = own_csv(tmp_path / "val.csv", two_class_rows(4))
    line = one_error_line(finetune, [
        "--weights", tiny_weights, "--train-file", train, "--val-file", val, "--output-dir",
        tmp_path / "run", "--device", "cpu", "--final-splits", "test", "--no-initial-eval",
        "--max-steps", "1"])
    assert line.startswith("error: --final-splits test names test, which this run does not have "
                           "(its splits: train, validation); name only those, or pass all")
    assert not (tmp_path / "run").exists()  # refused before training, not after


def test_labels_given_as_label_names_say_the_labels_meant(tmp_path, tiny_weights):
    train = own_csv(tmp_path / "train.csv", two_class_rows())
    line = one_error_line(finetune, [
        "--weights", tiny_weights, "--train-file", train, "--label-names", "0=ham,1=spam",
        "--labels", "spam,ham", "--output-dir", tmp_path / "run", "--device", "cpu"])
    assert line.startswith(f"error: --labels spam,ham lists the names --label-names gives, but "
                           f"--labels lists the labels as {train} writes them; pass --labels 1,0")
    assert tables.file_data(train, labels="1,0", label_names="0=ham,1=spam").class_names == \
        ["spam", "ham"]


def test_a_test_file_without_labels_points_to_predict(tmp_path, tiny_weights):
    train = own_csv(tmp_path / "train.csv", two_class_rows())
    texts = own_csv(tmp_path / "texts.csv", ["a text to classify", "another"], header="text")
    line = one_error_line(finetune, [
        "--weights", tiny_weights, "--train-file", train, "--test-file", texts, "--output-dir",
        tmp_path / "run", "--device", "cpu"])
    assert line.startswith(f"error: {texts} has no label column 'label' (its columns: 'text'); "
                           "a file of texts without labels is not for training: classify it "
                           "after training with python evaluate.py --run DIR --predict FILE "
                           "--output OUT")
    assert "--output OUT; if its labels are in another column, pass --label-column NAME" in line


def test_end_of_text_inside_a_served_text_is_classified_as_text():
    tokenizer = data.get_tokenizer()
    text = "a special <|endoftext|> token"
    assert data.PAD_ID not in data.encode(text, tokenizer, pad=False)  # ordinary tokens
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1)
    model = gpt.add_classification_head(gpt.GPTModel(cfg), 2)
    info = {"class_names": ["ham", "spam"], "max_length": 16, "padding": True, "batch_size": 8,
            "pad_id": data.PAD_ID, "token_position": "last"}
    classifier = evaluate.inference_classifier(model, info)
    probs, truncated = serve.class_probabilities([text], classifier, tokenizer, info,
                                                 torch.device("cpu"), evaluate.predict_proba)
    assert list(probs[0]) == ["ham", "spam"] and truncated == [False]
    page = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text("utf-8")
    assert "(`<|endoftext|>`)" not in page  # the 400 it promised never comes
    assert "`<|endoftext|>` inside a text is read as those 13 characters" in page


# --------------------------------------------------------------------------------- users' faults

ROOT = Path(__file__).resolve().parent.parent
LONG = 200 * 1024  # characters: over the csv module's default field limit of 128 KiB


def data_error(fn, *args, **kw):
    with pytest.raises(data.DataError) as e:
        fn(*args, **kw)
    return str(e.value)


def labelled_rows(n=12):
    """(label, text) rows of two integer classes, each with its own words."""
    return [(i % 2, ("free prize win cash now" if i % 2 else "see you at lunch then")
             + f" {i}") for i in range(n)]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def quick_user_faults(tiny_weights, out, *extra):
    return ["--weights", str(tiny_weights), "--output-dir", str(out), "--device", "cpu",
            "--max-steps", "2", "--no-initial-eval", *map(str, extra)]


@pytest.fixture(scope="module")
def named_run(tmp_path_factory, tiny_weights):
    """A run on a CSV of integer labels named with --label-names, one training text over
    128 KiB: (run folder, its folder of files)."""
    folder = tmp_path_factory.mktemp("faults")
    rows = labelled_rows(40)
    rows[3] = (1, "prize " * (LONG // 6))  # a long field in finetune's own file
    train = folder / "train.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows((t, y) for y, t in rows)
    out = folder / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", io.StringIO())
        finetune.main(["--train-file", str(train), "--label-names", "0=ham,1=spam",
                       "--val-frac", "0.2", "--test-frac", "0.2",
                       *quick_user_faults(tiny_weights, out)])
    return out, folder


# ----------------------------------------------------------------------------- quotes

def test_a_stray_quote_in_a_csv_is_refused_naming_the_row_and_line(tmp_path):
    body = [f"message {i},{'ham' if i % 3 else 'spam'}" for i in range(120)]
    cases = {  # where the stray quote's field would close, read loosely
        "never": 5, "mid-field": 40, "at a field's end": 7}
    for case, close in cases.items():
        lines = list(body)
        lines[10] = '"' + lines[10]  # row 12 (the header is row 1), line 12
        if case == "mid-field":
            lines[close] = f'he said "hi" {close},ham'
        elif case == "at a field's end":
            lines[10 + close] = f'a 5" screen {close},ham'  # closes right before the comma
        path = write(tmp_path / "d.csv", "text,label\n" + "\n".join(lines) + "\n")
        message = data_error(tables.read_records, path)
        assert re.search(r"d\.csv row 12 \(line 12\): a quote opened in this row", message), \
            (case, message)
        assert "double each quote" in message, message
    # a field that starts with a quote closed inside it
    path = write(tmp_path / "e.csv", 'text,label\n"Hello" he said,ham\nok,spam\n')
    assert re.search(r"e\.csv row 2 \(line 2\): a field starts with a quote that closes "
                     "before the field ends", data_error(tables.read_records, path))
    # finetune.py and --predict refuse it the same way: never fewer rows than the file holds
    lines = list(body)
    lines[10] = '"' + lines[10]
    write(tmp_path / "d.csv", "text,label\n" + "\n".join(lines) + "\n")
    message = one_error_line(finetune, ["--train-file", tmp_path / "d.csv", "--output-dir",
                                        tmp_path / "run"])
    assert "d.csv row 12 (line 12)" in message
    assert not (tmp_path / "run").exists()


def test_quoted_fields_that_mean_it_are_read_whole(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"line one\nline two, and more",ham\n'
                 '"x, y",spam\n"He said ""hi""",ham\nplain,spam\n')
    records = tables.read_records(path)
    assert [(r.row, r.label, r.text) for r in records] == [
        (2, "ham", "line one\nline two, and more"), (3, "spam", "x, y"),
        (4, "ham", 'He said "hi"'), (5, "spam", "plain")]


def test_a_text_with_line_breaks_in_the_last_column_is_read_whole(tmp_path):
    # label first, then a quoted text over lines: its first line ("ham,\"see you") has the
    # header's two fields and a known label, yet it is the row's own start, not a row swallowed
    path = write(tmp_path / "d.csv", 'label,text\nspam,"WIN, now"\nham,"see you\nat 6"\n'
                 'ham,"one\ntwo\nthree"\nspam,plain\n')
    assert [(r.row, r.label, r.text) for r in tables.read_records(path)] == [
        (2, "spam", "WIN, now"), (3, "ham", "see you\nat 6"), (4, "ham", "one\ntwo\nthree"),
        (5, "spam", "plain")]
    # while a stray quote in the label-first layout, swallowing whole rows, is still refused
    lines = [f"{'ham' if i % 3 else 'spam'},message {i}" for i in range(20)]
    lines[4] = 'ham,"stray ' + lines[4] + ",x"
    lines[8] = 'spam,it ends" here'
    path = write(tmp_path / "e.csv", "label,text\n" + "\n".join(lines) + "\n")
    assert "e.csv row 6 (line 6): a quote opened in this row" in \
        data_error(tables.read_records, path)


def test_a_tsv_is_one_row_per_line_with_quotes_as_characters(tmp_path):
    lines = [f"message {i}\t{'ham' if i % 3 else 'spam'}" for i in range(120)]
    lines[10] = '"' + lines[10]  # a stray quote, as exports hold them
    lines[50] = 'a 5" screen\tham'
    lines[70] = '"quoted"\tspam'
    path = write(tmp_path / "d.tsv", "text\tlabel\n" + "\n".join(lines) + "\n")
    records = tables.read_records(path)
    assert len(records) == 120  # not 106: no row swallowed
    texts = {r.row: r.text for r in records}
    assert texts[12] == '"message 10' and texts[52] == 'a 5" screen' and texts[72] == '"quoted"'
    # a tab inside a text is a row of three fields, said so with a fix that works for a .tsv
    write(path, "text\tlabel\na\tb\tham\n")
    message = data_error(tables.read_records, path)
    assert "row 2 has 3 fields" in message and "save the file as .csv or .jsonl" in message


def test_the_sms_file_keeps_the_chapters_quoted_parse():
    rows = data.parse('ham\t"a quoted\nmessage"\nspam\tplain\n')
    assert rows == [("ham", "a quoted\nmessage"), ("spam", "plain")]


# ----------------------------------------------------------------------------- labels

def test_labels_that_look_alike_are_one_class_or_refused(tmp_path):
    def loaded(labels):
        rows = [(y, f"text {i}") for i, y in enumerate(labels)]
        path = tmp_path / "t.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for y, t in rows))
        return tables.file_data(path, val_frac=0.25, test_frac=0)
    # whole numbers, however written, are their integer: one class each
    got = loaded(["1", "1.0", "01", "+1", "0", "0.0", "00", "-0"] * 2)
    assert got.class_names == ["0", "1"]
    assert sorted(y for s in got.splits.values() for y, _ in s) == [0] * 8 + [1] * 8
    # True/true, and 1/1.0 among text labels: refused, naming a row of each
    message = data_error(loaded, ["True", "false", "true", "false"] * 2)
    assert re.search(r"t\.jsonl: the labels 'True' \(line 1\) and 'true' \(line 3\) differ "
                     r"only in case", message), message
    message = data_error(loaded, ["1", "spam", "1.0", "spam"] * 2)
    assert "'1' (line 1) and '1.0' (line 3) differ only in how the number is written" in message


def test_a_validation_label_written_another_way_is_its_class(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\n" + "".join(
        f"t{i},{i % 2}\n" for i in range(8)))
    val = write(tmp_path / "val.csv", "text,label\nv1,1.0\nv2,00\n")
    got = tables.file_data(train, val)
    assert got.splits["validation"] == [(1, "v1"), (0, "v2")]
    write(val, "text,label\nv1,Spam\n")
    text_train = write(tmp_path / "tt.csv", "text,label\na,spam\nb,ham\n")
    message = data_error(tables.file_data, text_train, val)
    assert "the label 'Spam' is not a class" in message and "written 'spam'" in message


# ----------------------------------------------------------------------------- long fields

def test_fields_over_128_kib_are_read_in_every_format(tmp_path):
    long = "word " * (LONG // 5)
    write(tmp_path / "d.csv", f'text,label\n"{long}",a\nshort,b\n')
    write(tmp_path / "d.tsv", f"text\tlabel\n{long}\ta\nshort\tb\n")
    for name in ("d.csv", "d.tsv"):
        records = tables.read_records(tmp_path / name)
        assert [r.text for r in records] == [long, "short"], name


def test_a_long_field_trains_and_is_scored_and_predicted(named_run, tmp_path, capsys):
    run, _ = named_run
    info = json.loads((run / "run.json").read_text())
    assert info["splits"]["train"] + info["splits"]["validation"] + info["splits"]["test"] == 40
    long = "cash " * (LONG // 5)
    scored = write(tmp_path / "s.csv", f"text,label\n{long},1\nsee you,0\n")
    evaluate.main(["--run", str(run), "--file", str(scored)])
    assert f"{scored}: 2 rows" in capsys.readouterr().out
    evaluate.main(["--run", str(run), "--predict", str(scored), "--output",
                   str(tmp_path / "p.csv")])
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------- label names

def test_label_names_travel_with_the_run(named_run, tmp_path, capsys):
    run, _ = named_run
    info = json.loads((run / "run.json").read_text())
    assert info["class_names"] == ["ham", "spam"]
    # a file holds the labels (0, 1, or 1.0), or the names themselves
    scored = write(tmp_path / "s.csv", "text,label\nwin cash,1\nlunch,0\nprize,1.0\nhi,ham\n")
    evaluate.main(["--run", str(run), "--file", str(scored), "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "4 rows" in out
    assert re.search(r"^ham +\d", out, re.M) and re.search(r"^spam +\d", out, re.M)
    scores = json.loads((tmp_path / "s.json").read_text())["files"][str(scored)]
    assert set(scores["per_class"]) == {"ham", "spam"}
    assert [scores["per_class"][c]["support"] for c in ("ham", "spam")] == [2, 2]
    evaluate.main(["--run", str(run), "--predict", str(scored), "--output",
                   str(tmp_path / "p.tsv")])
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    assert lines[0] == "row\tpredicted\tham\tspam" and len(lines) == 5
    assert {line.split("\t")[1] for line in lines[1:]} <= {"ham", "spam"}
    # evaluate.py --all-splits reads the run's file again with the same names
    evaluate.main(["--run", str(run), "--all-splits"])
    assert "Test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("spec, pattern", [
    ("0=ham,2=spam", r"--label-names names the label '2', which .*train\.csv does not have "
                     r"\(its labels: '0', '1'\)"),
    ("0=ham,1=ham", r"--label-names gives the name 'ham' to two classes \('0', '1'\)"),
    ("0=ham,00=spam", r"names the label '0' twice"),
    ("0=ham,spam", r"'spam' is not LABEL=NAME"),
])
def test_bad_label_names_get_one_line(tmp_path, spec, pattern):
    train = write(tmp_path / "train.csv", "text,label\n" + "".join(
        f"t{i},{i % 2}\n" for i in range(20)))
    message = one_error_line(finetune, ["--train-file", train, "--label-names", spec,
                                        "--output-dir", tmp_path / "run"])
    assert re.search(pattern, message), message
    assert "--label-names goes with --train-file" in one_error_line(
        finetune, ["--label-names", spec, "--output-dir", tmp_path / "run"])


# ----------------------------------------------------------------------------- many classes

def test_a_big_confusion_matrix_is_not_printed_but_written_whole(capsys):
    def printed(n):
        names = [f"c{i}" for i in range(n)]
        labels = list(range(n)) * 2
        evaluate.print_scores({"test": evaluate.class_scores(labels, labels[::-1], names)},
                              names)
        return capsys.readouterr().out
    small = printed(evaluate.MAX_MATRIX)
    assert "test: confusion (rows: true class" in small
    big = printed(evaluate.MAX_MATRIX + 1)
    assert "confusion (rows" not in big
    assert "test: confusion matrix not printed (21 classes, over 20); --json PATH writes it " \
        "whole" in big
    assert len(big.splitlines()) < 40


def test_json_holds_the_whole_matrix_the_terminal_does_not(named_run, tmp_path, capsys,
                                                           monkeypatch):
    run, _ = named_run
    monkeypatch.setattr(evaluate, "MAX_MATRIX", 1)
    scored = write(tmp_path / "s.csv", "text,label\nwin cash,1\nlunch,0\n")
    evaluate.main(["--run", str(run), "--file", str(scored), "--json", str(tmp_path / "s.json")])
    assert "confusion matrix not printed (2 classes" in capsys.readouterr().out
    confusion = json.loads((tmp_path / "s.json").read_text())["files"][str(scored)]["confusion"]
    assert len(confusion) == 2 and sum(map(sum, confusion)) == 2


# ----------------------------------------------------------------------------- messages

def test_a_pipe_or_device_is_not_called_missing(tmp_path, named_run):
    run, _ = named_run
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    for module, args in (
            (finetune, ["--train-file", fifo, "--output-dir", tmp_path / "run"]),
            (finetune, ["--data", "/dev/zero", "--output-dir", tmp_path / "run"]),
            (evaluate, ["--run", run, "--predict", fifo, "--output", tmp_path / "p.csv"]),
            (evaluate, ["--run", run, "--file", "/dev/zero", "--format", "csv"])):
        message = one_error_line(module, args)
        assert "is not a regular file (a pipe, socket or device)" in message, message
        assert "does not exist" not in message and "save them to a file" in message


def test_a_model_folder_as_run_is_named_a_model_folder(tiny_hf_dir, tmp_path):
    folder, _ = tiny_hf_dir
    message = one_error_line(evaluate, ["--run", folder, "--text", "hi"])
    assert f"{folder} is a model folder (config.json), not a run of finetune.py" in message
    assert "did not finish" not in message and f"--weights {folder}" in message
    (tmp_path / "empty").mkdir()
    message = one_error_line(evaluate, ["--run", tmp_path / "empty", "--text", "hi"])
    assert "is not a finished run of finetune.py, nor one that started" in message
    assert "did not finish" not in message


def test_output_extension_and_tsv_output(named_run, tmp_path):
    run, folder = named_run
    message = one_error_line(evaluate, ["--run", run, "--predict", folder / "train.csv", "--output",
                                        tmp_path / "pred.txt"])
    assert "--output" in message and "name it .csv, .tsv or .jsonl" in message
    assert "--format" not in message


@pytest.mark.parametrize("edit, pattern", [
    ({"token_position": "middle"}, r"run\.json: token_position 'middle' is not last, first or "
                                   r"flexible"),
    ({"token_position": "last"}, r"run\.json: padding \"batch\" pads each batch only to its own "
                                 r"longest text, so token_position \"last\" would depend"),
    ({"average_embeddings": True}, r"so average_embeddings true would depend"),
])
def test_a_hand_edited_run_json_is_refused_naming_it(named_run, tmp_path, edit, pattern):
    run, _ = named_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    assert info["padding"] == "batch" and info["token_position"] == "flexible"
    (copy / "run.json").write_text(json.dumps({**info, **edit}))
    message = one_error_line(evaluate, ["--run", copy, "--text", "hi"])
    assert re.search(pattern, message) and str(copy / "run.json") in message, message


def test_huge_class_weights_are_blamed_not_the_learning_rate(tmp_path, tiny_weights):
    train = write(tmp_path / "train.csv", "text,label\n" + "".join(
        f"{t},{y}\n" for y, t in labelled_rows(30)))
    message = one_error_line(finetune, ["--train-file", train, "--class-weights", "1e38,1e38",
                                        "--batch-size", "4",
                                        *quick_user_faults(tiny_weights, tmp_path / "run")])
    assert "training diverged" in message and "smaller --class-weights (now 1e38,1e38" in message


def test_split_advice_and_note_fit_what_was_asked(tmp_path):
    one_row = write(tmp_path / "t.csv", "text,label\n" + "a,x\n" * 20 + "b,y\n")
    message = data_error(tables.file_data, one_row, test_frac=0)
    assert "class 'y' has 1 row" in message and "--test-frac 0" not in message
    assert "--val-file" in message
    many = write(tmp_path / "m.csv", "text,label\n" + "".join(
        f"t{i},c{i // 3}\n" for i in range(600)))  # 200 classes of 3 rows
    got = tables.file_data(many)
    assert [len(s) for s in got.splits.values()] == [200, 200, 200]
    note = got.notes[0]
    assert "validation 0.33 (200 rows: 0.1 asked, but each class's share is whole rows, at " \
        "least one)" in note and "test 0.33 (200 rows: 0.2 asked" in note
    plain = tables.file_data(write(tmp_path / "p.csv", "text,label\n" + "".join(
        f"t{i},c{i % 2}\n" for i in range(100))))
    assert plain.notes[0].endswith(": validation 0.1, test 0.2, train the rest")


def test_a_file_without_labels_is_pointed_to_predict(named_run, tmp_path):
    run, _ = named_run
    texts = write(tmp_path / "texts.csv", "text\nhello there\nwin cash\n")
    message = one_error_line(evaluate, ["--run", run, "--file", texts])
    assert f"--predict {texts} --output OUT" in message


def test_a_header_less_file_is_told_to_add_a_header(named_run, tmp_path):
    run, _ = named_run
    texts = write(tmp_path / "texts.csv", "hello there, friend\nwin cash now!\n")
    message = one_error_line(evaluate, ["--run", run, "--predict", texts, "--output",
                                        tmp_path / "p.csv"])
    assert "its first row looks like data, not a header: add a first line naming the columns " \
        "('text')" in message, message
    # a header that merely names another column is still told about --text-column
    named = write(tmp_path / "named.csv", "body\nhello\n")
    message = one_error_line(evaluate, ["--run", run, "--predict", named, "--output",
                                        tmp_path / "p.csv"])
    assert message.endswith("pass --text-column NAME")


def test_an_early_error_says_no_run_folder_was_made(tmp_path, capsys):
    bad = write(tmp_path / "t.csv", "text,label\nhi,\n")
    out = tmp_path / "run"
    message = one_error_line(finetune, ["--train-file", bad, "--output-dir", out])
    assert capsys.readouterr().out.startswith(f"Run folder: {out}")  # the log's first line
    assert message.endswith(f"(nothing was written: the run folder {out} was not made)")
    assert not out.exists()


# ----------------------------------------------------------------------------- the repository

def test_the_readmes_example_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = "\n".join(p.read_text(encoding="utf-8")
                       for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    outputs = set(re.findall(r"--output-dir (sms-csv)\b", readme))
    outputs |= set(re.findall(r"--(?:json|output) ([\w./-]+\.(?:json|csv|jsonl|tsv))\b",
                              readme))
    assert {"sms-csv", "predictions.csv", "test-scores.json"} <= outputs
    for name in outputs:
        probe = name + ("/train.csv" if "." not in name else "")
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT).returncode
        assert ignored == 0, f"{probe} (an output of the README's examples) is not ignored"
