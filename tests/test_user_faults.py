"""Users' files, labels and messages under real faults (issue 20): a stray quote never merges
rows, labels that look alike are one class or refused, fields over 128 KiB are read, integer
labels can be named, a big confusion matrix stays out of the terminal, and every message says
what is wrong, where, and a fix that works.

One tiny run (the tiny checkpoint of conftest.py, two steps) serves the evaluate.py checks.
"""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
import evaluate
import finetune
import tables

ROOT = Path(__file__).resolve().parent.parent
LONG = 200 * 1024  # characters: over the csv module's default field limit of 128 KiB


def error_of(module, args):
    """The one `error:` line `module.main(args)` exits with."""
    with pytest.raises(SystemExit) as e:
        module.main(list(map(str, args)))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


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


def quick(tiny_weights, out, *extra):
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
                       *quick(tiny_weights, out)])
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
    message = error_of(finetune, ["--train-file", tmp_path / "d.csv", "--output-dir",
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
    message = error_of(finetune, ["--train-file", train, "--label-names", spec,
                                  "--output-dir", tmp_path / "run"])
    assert re.search(pattern, message), message
    assert "--label-names goes with --train-file" in error_of(
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
        message = error_of(module, args)
        assert "is not a regular file (a pipe, socket or device)" in message, message
        assert "does not exist" not in message and "save them to a file" in message


def test_a_model_folder_as_run_is_named_a_model_folder(tiny_hf_dir, tmp_path):
    folder, _ = tiny_hf_dir
    message = error_of(evaluate, ["--run", folder, "--text", "hi"])
    assert f"{folder} is a model folder (config.json), not a run of finetune.py" in message
    assert "did not finish" not in message and f"--weights {folder}" in message
    (tmp_path / "empty").mkdir()
    message = error_of(evaluate, ["--run", tmp_path / "empty", "--text", "hi"])
    assert "is not a finished run of finetune.py, nor one that started" in message
    assert "did not finish" not in message


def test_output_extension_and_tsv_output(named_run, tmp_path):
    run, folder = named_run
    message = error_of(evaluate, ["--run", run, "--predict", folder / "train.csv", "--output",
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
    message = error_of(evaluate, ["--run", copy, "--text", "hi"])
    assert re.search(pattern, message) and str(copy / "run.json") in message, message


def test_huge_class_weights_are_blamed_not_the_learning_rate(tmp_path, tiny_weights):
    train = write(tmp_path / "train.csv", "text,label\n" + "".join(
        f"{t},{y}\n" for y, t in labelled_rows(30)))
    message = error_of(finetune, ["--train-file", train, "--class-weights", "1e38,1e38",
                                  "--batch-size", "4", *quick(tiny_weights, tmp_path / "run")])
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
    message = error_of(evaluate, ["--run", run, "--file", texts])
    assert f"--predict {texts} --output OUT" in message


def test_a_header_less_file_is_told_to_add_a_header(named_run, tmp_path):
    run, _ = named_run
    texts = write(tmp_path / "texts.csv", "hello there, friend\nwin cash now!\n")
    message = error_of(evaluate, ["--run", run, "--predict", texts, "--output",
                                  tmp_path / "p.csv"])
    assert "its first row looks like data, not a header: add a first line naming the columns " \
        "('text')" in message, message
    # a header that merely names another column is still told about --text-column
    named = write(tmp_path / "named.csv", "body\nhello\n")
    message = error_of(evaluate, ["--run", run, "--predict", named, "--output",
                                  tmp_path / "p.csv"])
    assert message.endswith("pass --text-column NAME")


def test_an_early_error_says_no_run_folder_was_made(tmp_path, capsys):
    bad = write(tmp_path / "t.csv", "text,label\nhi,\n")
    out = tmp_path / "run"
    message = error_of(finetune, ["--train-file", bad, "--output-dir", out])
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
