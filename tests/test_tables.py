"""tables.py: users' own CSV, TSV and JSONL files, their labels and split; and runs on them end to
end.
"""

import csv
import io
import json
import random
import re
import shutil
import sys

import pytest
import torch

import data
import evaluate
import files
import finetune
import gpt
import shortcuts
import tables
from files import DataError


# ----------------------------------------------------------------------------- quotes and labels

def jsonl(path, labels, times=4):
    """A .jsonl file holding each label `times` times (one text each)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(times):
            for label in labels:
                f.write(json.dumps({"text": f"text {i} {label}", "label": label}) + "\n")
    return path


def classes(path, **kw):
    return tables.file_data(path, val_frac=0.25, test_frac=0.0, **kw).class_names


@pytest.mark.parametrize("labels, expected", [
    (["spam", "spam\u200b", "ham"], ["ham", "spam"]),           # a zero-width space
    (["spam", "\ufeffspam\u00ad", "ham"], ["ham", "spam"]),     # a BOM, a soft hyphen
    (["caf\u00e9", "cafe\u0301", "tea"], ["caf\u00e9", "tea"]),  # composed and decomposed é
    (["1", "1e0", "0"], ["0", "1"]),                            # a number written as 1e0
    (["1", "10e-1", "2E0", "0"], ["0", "1", "2"]),
])
def test_labels_that_are_one_class_are_read_as_one(tmp_path, labels, expected):
    assert classes(jsonl(tmp_path / "rows.jsonl", labels)) == expected


@pytest.mark.parametrize("labels, said", [
    (["spam", "sp\u0430m", "ham"], "'a' (LATIN SMALL LETTER A) against '\u0430' (CYRILLIC "
                                   "SMALL LETTER A)"),
    (["\u03bfk", "ok", "no"], "'\u03bf' (GREEK SMALL LETTER OMICRON) against 'o' (LATIN SMALL "
                              "LETTER O)"),
    (["\uff53pam", "spam", "ham"], "'\uff53' (FULLWIDTH LATIN SMALL LETTER S) against 's'"),
    (["1", "1e0", "spam"], "differ only in how the number is written"),
    (["Spam", "spam", "ham"], "differ only in case"),
])
def test_labels_that_only_look_alike_are_refused_naming_the_difference(tmp_path, labels, said):
    path = jsonl(tmp_path / "rows.jsonl", labels)
    with pytest.raises(DataError) as e:
        classes(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: the labels ") and "(line 1)" in msg and "(line 2)" in msg
    assert said in msg and msg.endswith("write each class one way") and "\n" not in msg


def test_a_composed_and_a_decomposed_letter_are_not_called_a_case_difference(tmp_path):
    path = jsonl(tmp_path / "rows.jsonl", ["caf\u00e9", "cafe\u0301", "tea"])
    assert classes(path) == ["caf\u00e9", "tea"]  # was refused as differing "in case"


def test_a_label_with_a_line_break_is_refused(tmp_path):
    path = jsonl(tmp_path / "rows.jsonl", ["spam", "ham\nx"])
    with pytest.raises(DataError) as e:
        classes(path)
    assert str(e.value) == (f"{path} line 2: the label 'ham\\nx' holds a line break, which "
                            "would break every table the run prints; write the label on one "
                            "line")
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text('text,label\na,spam\nb,"ham\r\nx"\nc,spam\nd,ham\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 3: the label 'ham\\r\\nx' holds a line break"):
        tables.read_records(csv_path)
    for sep in ("\u2028", "\x85"):
        with pytest.raises(DataError, match="holds a line break"):
            classes(jsonl(tmp_path / "more.jsonl", ["spam", f"ham{sep}x"]))


def test_validation_labels_are_cleaned_and_matched_as_the_training_ones(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", ["1", "0"])
    val = jsonl(tmp_path / "val.jsonl", ["1e0", "0\u200b"], times=1)
    labelled = tables.file_data(train, val_file=val)
    assert labelled.class_names == ["0", "1"]
    assert sorted(y for y, _ in labelled.splits["validation"]) == [0, 1]
    val = jsonl(tmp_path / "val2.jsonl", ["sp\u0430m", "ham"], times=1)
    with pytest.raises(DataError) as e:
        tables.file_data(jsonl(tmp_path / "t.jsonl", ["spam", "ham"]), val_file=val)
    assert "the class is written 'spam' (they differ in characters that look alike: 'a' " \
           "(LATIN SMALL LETTER A) against '\u0430' (CYRILLIC SMALL LETTER A))" in str(e.value)


def test_a_scored_file_s_label_written_1e0_is_its_class():
    assert tables.match_label("1e0", ["0", "1"]) == "1"  # evaluate.py --file matches so
    assert tables.match_label("1e0", ["0", "spam"]) is None


# ----------------------------------------------------------------------------- quotes over lines

def test_a_quote_left_open_in_an_earlier_field_is_refused_not_merged(tmp_path):
    """A quote opened in a row's first field (not its last) that runs on to the next line is a
    stray quote, not a text with line breaks: the line it opened on reads as a row of its own,
    so the file is refused naming it, rather than read as one row with the next row's label."""
    path = tmp_path / "stray.csv"
    path.write_text('text,label\nfirst,ham\n"Hello there,ham\nAnother one",spam\nthird,ham\n')
    with pytest.raises(files.DataError, match=r"row 3 \(line 3\): a quote opened in this row "
                                              r"runs on to line 4"):
        tables.read_records(path)
    # ... while a quoted last field that goes on over lines is a text with line breaks
    path.write_text('label,text\nham,first\nspam,"Hello there\nAnother one"\nham,third\n')
    assert [(r.label, r.text) for r in tables.read_records(path)] == [
        ("ham", "first"), ("spam", "Hello there\nAnother one"), ("ham", "third")]


# -------------------------------------------------------------------------- own files end to end

CPU = torch.device("cpu")
WORDS = {  # each class its own words, so that a tiny model learns them in a few steps
    "sport": "ball goal team match score coach",
    "tech": "code chip data cloud app server",
    "food": "bread soup cake salt rice pepper",
    "music": "song drum guitar band note choir",
    "travel": "train plane hotel map road ticket",
}


def make_rows(n_per_class, classes=("sport", "tech", "food"), seed=0, long_every=10):
    """(label, text) rows: mostly short texts, every `long_every`-th one long (skewed lengths)."""
    rng = random.Random(seed)
    if not isinstance(n_per_class, dict):
        n_per_class = dict.fromkeys(classes, n_per_class)
    rows = []
    for i in range(max(n_per_class.values())):
        for c, n_c in n_per_class.items():
            if i >= n_c:
                continue
            n = 40 if i % long_every == long_every - 1 else rng.randint(1, 6)
            rows.append((c, " ".join(rng.choice(WORDS[c].split()) for _ in range(n))))
    return rows


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        w.writerow(header)
        for label, text in rows:
            w.writerow([text, label])  # header: the text column's name, the label column's
    return path


def write_jsonl(path, rows, text_key="text", label_key="label"):
    path.write_text("".join(json.dumps({text_key: t, label_key: y}) + "\n" for y, t in rows),
                    encoding="utf-8")
    return path


def main_error(module, args):
    """The `error:` line `module.main(args)` exits with."""
    with pytest.raises(SystemExit) as e:
        module.main(list(map(str, args)))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- reading files

def test_each_format_reads_the_same_rows(tmp_path):
    rows = [("a", 'a text, with "quotes"'), ("b", "tab\tinside"), ("a", "line\nbreak"),
            ("b", "caf\u00e9 \u2603")]
    as_csv = write_csv(tmp_path / "d.csv", rows)
    as_jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    expected = [(y, t) for y, t in rows]
    for path in (as_csv, as_jsonl):
        records = tables.read_records(path)
        assert [(r.label, r.text) for r in records] == expected, path
    # a .tsv row is one line split at tabs, its quotes ordinary characters (issue 20)
    tsv_rows = [(y, t) for y, t in rows if not set(t) & set("\t\n")]
    as_tsv = tmp_path / "d.tsv"
    as_tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for y, t in tsv_rows),
                      encoding="utf-8")
    assert [(r.label, r.text) for r in tables.read_records(as_tsv)] == tsv_rows
    # rows are numbered as a spreadsheet shows them (header = row 1); JSON lines by line
    assert [r.row for r in tables.read_records(as_csv)] == [2, 3, 4, 5]
    assert [r.row for r in tables.read_records(as_jsonl)] == [1, 2, 3, 4]
    # --format overrides the extension
    other = tmp_path / "d.txt"
    other.write_bytes(as_tsv.read_bytes())
    assert [(r.label, r.text) for r in tables.read_records(other, "tsv")] == tsv_rows


def test_columns_match_any_case_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffID,Label,TEXT\n1,x,hello\n2,y,world\n".encode("utf-8"))
    records = tables.read_records(path)
    assert [(r.label, r.text) for r in records] == [("x", "hello"), ("y", "world")]
    custom = write_csv(tmp_path / "c.csv", [("pos", "good")], header=("Review", "Sentiment"))
    records = tables.read_records(custom, text_column="review", label_column="SENTIMENT")
    assert [(r.label, r.text) for r in records] == [("pos", "good")]


def test_the_chapters_csvs_need_no_flags(tmp_path):
    data.write_csv([(0, "hello there"), (1, "WIN cash now")], tmp_path / "train.csv")
    records = tables.read_records(tmp_path / "train.csv")  # header Label,Text
    assert [(r.label, r.text) for r in records] == [("0", "hello there"), ("1", "WIN cash now")]


def test_class_order(tmp_path):
    assert tables.class_order(["b", "a", "c", "a"]) == ["a", "b", "c"]
    assert tables.class_order(["10", "9", "2"]) == ["2", "9", "10"]  # numeric, not "10" < "2"
    assert tables.class_order(["b", "a"], ["b", "a"]) == ["b", "a"]
    rows = [("10", "x"), ("9", "y"), ("09", "z"), ("2", "w")] * 3
    loaded = tables.file_data(write_csv(tmp_path / "t.csv", rows), val_frac=0.25, test_frac=0)
    assert loaded.class_names == ["2", "9", "10"]  # "09" is the class 9
    # labels may be JSON integers or strings; --labels fixes the order
    jrows = [(1, "x"), ("0", "y"), (2, "z")] * 4
    loaded = tables.file_data(write_jsonl(tmp_path / "t.jsonl", jrows), labels="2,0,1",
                              val_frac=0.25, test_frac=0)
    assert loaded.class_names == ["2", "0", "1"]
    assert {y for y, _ in loaded.splits["train"] + loaded.splits["validation"]} == {0, 1, 2}
    texts = {t: y for y, t in loaded.splits["train"] + loaded.splits["validation"]}
    assert texts["z"] == 0 and texts["y"] == 1 and texts["x"] == 2


# ----------------------------------------------------------------------------- the split

def test_stratified_split_keeps_each_classes_share(tmp_path):
    counts = {"sport": 200, "tech": 60, "food": 10}
    rows = make_rows(counts)
    loaded = tables.file_data(write_csv(tmp_path / "t.csv", rows))
    names = loaded.class_names
    splits = loaded.splits
    assert list(splits) == ["train", "validation", "test"]
    assert sorted(t for s in splits.values() for _, t in s) == sorted(t for _, t in rows)
    for name, frac in (("validation", 0.1), ("test", 0.2), ("train", 0.7)):
        for c, n in counts.items():
            got = sum(names[y] == c for y, _ in splits[name])
            assert abs(got - n * frac) <= 1, (name, c, got)
            assert got >= 1
    again = tables.file_data(write_csv(tmp_path / "t.csv", rows))
    assert again.splits == splits  # seeded
    # a class of 3 rows still reaches every split
    tiny = tables.file_data(write_csv(tmp_path / "u.csv", make_rows({"sport": 50, "tech": 3})))
    for part in tiny.splits.values():
        assert {y for y, _ in part} == {0, 1}


def test_which_splits_are_cut_from_the_training_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", make_rows(20))
    val = write_csv(tmp_path / "val.csv", make_rows(3, seed=1))
    test = write_csv(tmp_path / "test.csv", make_rows(4, seed=2))
    only_val = tables.file_data(train, val)
    assert list(only_val.splits) == ["train", "validation"]  # no test split unless asked
    assert len(only_val.splits["train"]) == 60 and len(only_val.splits["validation"]) == 9
    with_test = tables.file_data(train, val, test_frac=0.2)
    assert [len(s) for s in with_test.splits.values()] == [48, 9, 12]
    only_test = tables.file_data(train, None, test)
    assert [len(s) for s in only_test.splits.values()] == [54, 6, 12]
    given = tables.file_data(train, val, test)
    assert [len(s) for s in given.splits.values()] == [60, 9, 12]
    assert given.splits["train"] == [(given.class_names.index(y), t)
                                     for y, t in make_rows(20)]  # file order, untouched


# ----------------------------------------------------------------------------- bad input

BAD_FILES = {
    "missing column": ("d.csv", b"body,label\nhi,a\n",
                       r"d\.csv has no text column 'text' \(its columns: 'body', 'label'\); "
                       r"pass --text-column NAME"),
    "empty text": ("d.csv", b"text,label\nhi,a\n  ,b\n", r"d\.csv row 3: the text is empty"),
    "empty label": ("d.csv", b"text,label\nhi,a\nho,\n", r"d\.csv row 3: the label is empty"),
    "one class": ("d.csv", b"text,label\nhi,a\nho,a\n", r"only one class \('a'\)"),
    "class too small": ("d.csv", b"text,label\n" + b"x,a\n" * 30 + b"y,b\ny,b\n",
                        r"class 'b' has 2 rows in .*d\.csv: too few to put one in each of "
                        r"train and validation and test"),
    "invalid UTF-8": ("d.csv", b"text,label\nhi,a\ncaf\xe9,b\n",
                      r"d\.csv is not UTF-8: byte offset 19 \(line 3\)"),
    "JSON line not an object": ("d.jsonl", b'{"text": "hi", "label": "a"}\n[1, 2]\n',
                                r"d\.jsonl line 2 is not a JSON object"),
    "JSON line broken": ("d.jsonl", b'{"text": "hi", "label": "a"}\n{"text": \n',
                         r"d\.jsonl line 2 is not valid JSON"),
    "JSON label not a string": ("d.jsonl", b'{"text": "hi", "label": [1]}\n',
                                r"d\.jsonl line 1: the label \[1\] is not a string or an "
                                r"integer"),
    "empty file": ("d.csv", b"", r"d\.csv is empty"),
    "header only": ("d.csv", b"text,label\n", r"d\.csv has a header but no rows"),
    "unquoted comma": ("d.csv", b"text,label\nhi, there,a\n",
                       r"d\.csv row 2 has 3 fields but the header has 2; put quotes"),
    "unknown extension": ("d.txt", b"text,label\nhi,a\n", r"cannot tell its format"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_training_file_gives_one_clear_line(tmp_path, case):
    name, content, pattern = BAD_FILES[case]
    (tmp_path / name).write_bytes(content)
    message = main_error(finetune, ["--train-file", tmp_path / name,
                                    "--output-dir", tmp_path / "run"])
    assert re.search(pattern, message), message
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("args, pattern", [
    (["--val-file", "{val_bad}"], r"val_bad\.csv row 3: the label 'spam' is not a class of the "
                                  r"training data \('a', 'b'\)"),
    (["--labels", "a,c"], r"train\.csv row 4: the label 'b' is not in --labels"),
    (["--labels", "a,b,c"], r"--labels names 'c' but .*train\.csv has no row of it"),
    (["--labels", "a,a,b"], r"names a class twice"),
    (["--val-file", "{val}", "--val-frac", "0.2"], r"--val-frac cuts validation .* drop one"),
    (["--test-frac", "1.2"], r"--test-frac must be at least 0 and below 1"),
    (["--val-frac", "0.5", "--test-frac", "0.5"], r"leave no rows to train on"),
    (["--val-frac", "0"], r"training needs a validation split"),
    (["--data", "x"], r"--data is the SMS Spam Collection and --train-file your own data"),
    (["--class-weights", "1,x"], r"--class-weights '1,x': give balanced, or one positive"),
    (["--class-weights", "1,2,3"], r"--class-weights gives 3 weights for 2 classes \(a, b\)"),
    (["--batch-size", "64"], r"the training split has \d+ examples, fewer than one batch"),
    (["--context-length", "batch", "--token-position", "last"],
     r"--context-length batch pads each batch only to its own longest text"),
    (["--group-by-length", "--context-length", "longest"], r"--group-by-length .* needs"),
])
def test_bad_own_data_flags_give_one_clear_line(tmp_path, args, pattern, monkeypatch):
    monkeypatch.setattr(gpt, "load_gpt", lambda *a, **k: gpt.GPTModel(TINY))
    train = write_csv(tmp_path / "train.csv", [("a", "x"), ("a", "y"), ("b", "z")] * 10)
    val = write_csv(tmp_path / "val.csv", [("a", "x"), ("b", "y")])
    val_bad = write_csv(tmp_path / "val_bad.csv", [("a", "x"), ("spam", "y")])
    args = [a.format(val=val, val_bad=val_bad) for a in args]
    message = main_error(finetune, ["--train-file", train, "--output-dir", tmp_path / "run",
                                    "--max-steps", "1", *args])
    assert re.search(pattern, message), message


def test_own_data_flags_need_a_training_file(tmp_path):
    message = main_error(finetune, ["--val-file", "v.csv", "--output-dir", tmp_path / "run"])
    assert "--val-file goes with --train-file" in message


# ----------------------------------------------------------------------------- padding

TINY = gpt.GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2)


def test_per_batch_padding_gives_the_logits_of_padding_to_the_longest():
    torch.manual_seed(0)
    model = gpt.GPTModel(TINY).eval()
    torch.manual_seed(123)
    gpt.setup_classifier(model, 5, "last_block")
    rows = [(i % 5, text) for i, (_, text) in enumerate(make_rows(12, tuple(WORDS)))]
    tok = data.get_tokenizer()
    full = data.TextDataset(rows, tok)  # every text padded to the longest
    per_batch = data.TextDataset(rows, tok, pad="batch")
    assert per_batch.max_length == full.max_length > 30
    loaders = [torch.utils.data.DataLoader(full, batch_size=8),
               torch.utils.data.DataLoader(per_batch, batch_size=8, collate_fn=data.pad_batch)]
    widths = [x.shape[1] for x, _ in loaders[1]]
    assert min(widths) < full.max_length  # some batches are shorter ...
    for fast in (False, True):
        trunk = shortcuts.TrunkCache(model) if fast else None
        clf = gpt.Classifier(model, position="flexible",
                             shortcuts=shortcuts.Shortcuts(trunk=trunk, tail=fast))
        with torch.no_grad():
            a = torch.cat([clf(x) for x, _ in loaders[0]])
            b = torch.cat([clf(x) for x, _ in loaders[1]])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # ... and the logits agree
    assert [y for _, y in loaders[1]] and torch.equal(
        torch.cat([y for _, y in loaders[1]]), torch.tensor([y for y, _ in rows]))


def test_texts_are_cut_at_the_models_context(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpt, "load_gpt", lambda *a, **k: gpt.GPTModel(TINY))
    rows = make_rows(12) + [("tech", "code " * 300)]
    val = write_csv(tmp_path / "v.csv", make_rows(2, seed=1))
    test = write_csv(tmp_path / "s.csv", make_rows(2, seed=2) + [("food", "soup " * 200)])
    out = tmp_path / "run"
    finetune.main(["--train-file", str(write_csv(tmp_path / "t.csv", rows)), "--val-file",
                   str(val), "--test-file", str(test), "--output-dir", str(out),
                   "--max-steps", "1", "--no-initial-eval"])
    printed = capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert info["max_length"] == 128 and info["padding"] == "batch"
    assert re.search(r"note: the context length of 128 tokens cuts 1 of 37 train texts \(by "
                     r"\d+ to \d+ tokens, \d+ on average\), none of the validation texts, 1 of 7 "
                     r"test texts", printed), printed


def test_length_grouped_batches():
    lengths = [random.Random(i).choice([2, 3, 4, 60]) for i in range(203)]
    sampler = data.LengthGroupedBatches(lengths, 8, group=5)
    torch.manual_seed(1)
    first = list(sampler)
    assert len(first) == len(sampler) == 25
    flat = [i for b in first for i in b]
    assert len(flat) == len(set(flat)) == 200 and all(len(b) == 8 for b in first)
    # less padding than random batches of the same examples
    padded = sum(8 * max(lengths[i] for i in b) for b in first)
    torch.manual_seed(1)
    order = torch.randperm(203).tolist()
    random_padded = sum(8 * max(lengths[i] for i in order[j:j + 8]) for j in range(0, 200, 8))
    assert padded < 0.7 * random_padded
    torch.manual_seed(1)
    assert list(sampler) == first  # drawn from torch's RNG: seeded, repeatable
    assert list(sampler) != first  # and a new order each epoch
    # finetune's dropped_examples replays it
    ds = torch.utils.data.TensorDataset(torch.arange(203))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    torch.manual_seed(5)
    dropped = data.dropped_examples(loader)
    seen = {int(i) for (b,) in loader for i in b}
    assert sorted(set(range(203)) - seen) == dropped and len(dropped) == 3


# ----------------------------------------------------------------------------- class weights

def test_balanced_class_weights():
    w = finetune.class_weights("balanced", [0] * 6 + [1] * 2 + [2] * 4, ["a", "b", "c"])
    assert w.tolist() == pytest.approx([12 / 18, 12 / 6, 12 / 12])
    assert finetune.class_weights("1,4,2", [0, 1, 2], ["a", "b", "c"]).tolist() == [1, 4, 2]
    assert finetune.class_weights(None, [0, 1], ["a", "b"]) is None
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 0])
    loss = finetune.calc_loss_batch(torch.zeros(5, 1), target, lambda x: logits, CPU, weight=w)
    per = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert float(loss) == pytest.approx(float((per * w[target]).sum() / w[target].sum()))


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def five_class_run(tmp_path_factory, tiny_weights):
    """A 5-class run on a CSV with its own column names, then its files."""
    folder = tmp_path_factory.mktemp("own5")
    rows = make_rows(40, tuple(WORDS))
    train = write_csv(folder / "reviews.csv", rows, header=("Review", "Topic"))
    new = make_rows(6, tuple(WORDS), seed=9)
    labelled = write_csv(folder / "more.csv", new, header=("Review", "Topic"))
    unlabelled = folder / "new.jsonl"
    unlabelled.write_text("".join(json.dumps({"review": t}) + "\n" for _, t in new))
    out = folder / "run"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        finetune.main(["--train-file", str(train), "--text-column", "review", "--label-column",
                       "topic", "--weights", str(tiny_weights), "--output-dir", str(out),
                       "--epochs", "3", "--lr", "2e-3", "--trainable-layers", "all",
                       "--eval-freq", "20", "--class-weights", "balanced"])
    return {"run": out, "log": buf.getvalue(), "labelled": labelled, "new": unlabelled,
            "new_rows": new, "folder": folder}


@pytest.mark.slow
def test_five_class_run_end_to_end(five_class_run, capsys, tmp_path):
    r = five_class_run
    info = json.loads((r["run"] / "run.json").read_text())
    assert info["class_names"] == sorted(WORDS) and info["num_classes"] == 5
    assert info["token_position"] == "flexible" and info["padding"] == "batch"
    log = r["log"].splitlines()
    assert "5 classes, rows per split (train / validation / test): food 28 / 4 / 8; " \
        "music 28 / 4 / 8; sport 28 / 4 / 8; tech 28 / 4 / 8; travel 28 / 4 / 8" in log
    final = log[log.index(next(x for x in log if x.startswith("Training completed"))) + 1:][:3]
    test_acc = float(re.fullmatch(r"Test accuracy: (\d+\.\d\d)%", final[2]).group(1))
    assert test_acc >= 80  # the words tell the classes apart: the run learned them

    # --all-splits: the accuracies finetune printed, then F1 and 5 x 5 confusion matrices
    evaluate.main(["--run", str(r["run"]), "--all-splits", "--json", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == final
    report = json.loads((tmp_path / "s.json").read_text())
    for name, n in (("train", 136), ("validation", 20), ("test", 40)):  # 140 % 8 left out
        scores = report["splits"][name]
        assert sum(map(sum, scores["confusion"])) == scores["examples"] == n
        assert len(scores["confusion"]) == 5 and list(scores["per_class"]) == sorted(WORDS)
    assert "test: confusion (rows: true class, columns: predicted class)" in printed

    # --file: the run's columns, case-insensitively, and the same numbers as by hand
    evaluate.main(["--run", str(r["run"]), "--file", str(r["labelled"]),
                   "--json", str(tmp_path / "f.json")])
    printed = capsys.readouterr().out
    scores = json.loads((tmp_path / "f.json").read_text())["files"][str(r["labelled"])]
    classifier, info = evaluate.load_run(r["run"], CPU)
    probs = evaluate.predict_proba([t for _, t in r["new_rows"]], classifier, info, CPU)
    predicted = [max(p, key=p.get) for p in probs]
    truth = [y for y, _ in r["new_rows"]]
    assert scores["accuracy"] == pytest.approx(
        sum(a == b for a, b in zip(predicted, truth)) / len(truth))
    for c in WORDS:
        assert scores["per_class"][c]["support"] == truth.count(c)
    assert f"more.csv accuracy: {scores['accuracy'] * 100:.2f}%" in printed

    # --predict: one row per input row, probabilities per class name
    for ext in ("csv", "jsonl"):
        out = tmp_path / f"pred.{ext}"
        evaluate.main(["--run", str(r["run"]), "--predict", str(r["new"]), "--output", str(out)])
        if ext == "csv":
            got = list(csv.DictReader(out.open()))
            assert list(got[0]) == ["line", "predicted", *sorted(WORDS)]
            rows = [(int(g["line"]), g["predicted"], {c: float(g[c]) for c in WORDS})
                    for g in got]
        else:
            got = [json.loads(line) for line in out.read_text().splitlines()]
            rows = [(g["line"], g["predicted"], g["probabilities"]) for g in got]
        assert [row for row, _, _ in rows] == list(range(1, len(truth) + 1))
        assert [p for _, p, _ in rows] == predicted
        for (_, _, p), q in zip(rows, probs):
            assert sum(p.values()) == pytest.approx(1, abs=1e-4)
            assert p == pytest.approx(q, abs=1e-5)
    assert "Wrote 30 predictions" in capsys.readouterr().out
    message = main_error(evaluate, ["--run", r["run"], "--predict", r["new"], "--output", out])
    assert "exists; pass --overwrite" in message

    # --text with --top-k: class names and probabilities, most probable first
    evaluate.main(["--run", str(r["run"]), "--text", "goal ball team", "--top-k", "3"])
    line = capsys.readouterr().out.rstrip("\n")
    m = re.fullmatch(r"(\w+)\s+(\d\.\d{4})  (\w+)\s+(\d\.\d{4})  (\w+)\s+(\d\.\d{4})  "
                     r"goal ball team", line)
    assert m and m.group(1) == "sport" and float(m.group(2)) >= float(m.group(4))


@pytest.mark.slow
def test_evaluate_without_run_uses_the_latest(five_class_run, monkeypatch, capsys, tmp_path):
    runs = tmp_path / "runs"
    import shutil
    shutil.copytree(five_class_run["run"], runs / "20260101-000000")
    shutil.copytree(five_class_run["run"], runs / "20260102-000000")
    unfinished = runs / "20260103-000000"
    shutil.copytree(five_class_run["run"], unfinished)
    (unfinished / "run.json").unlink()
    import os
    os.utime(runs / "20260101-000000" / "run.json", (1000, 1000))  # finished first
    os.utime(runs / "20260102-000000" / "run.json", (2000, 2000))
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--text", "soup bread"])
    captured = capsys.readouterr()
    assert "Using the most recent finished run: runs/20260102-000000" in captured.err
    assert captured.out.startswith("food")
    monkeypatch.chdir(tmp_path / "runs")
    assert "no finished run under runs/" in main_error(evaluate, ["--text", "hi"])


@pytest.mark.slow
def test_a_run_whose_files_changed_classes_is_one_error_line(five_class_run, tmp_path):
    """The run's training file rewritten with a class less: --all-splits reads it again and
    says so in one line (a local name once hid the module files here: a traceback)."""
    run = tmp_path / "run"
    shutil.copytree(five_class_run["run"], run)
    info = json.loads((run / "run.json").read_text())
    train = tmp_path / "reviews.csv"
    write_csv(train, [row for row in make_rows(40, tuple(WORDS)) if row[0] != "sport"],
              header=("Review", "Topic"))
    for f in info["data"]["files"].values():
        f["path"] = str(train)
    info["flags"]["train_file"] = str(train)
    (run / "run.json").write_text(json.dumps(info))
    message = main_error(evaluate, ["--run", run, "--all-splits"])
    assert re.search(r"the run's data now has the classes \[.*\], the run was trained on", message)


@pytest.mark.slow
def test_evaluate_refuses_bad_files(five_class_run, tmp_path):
    run = five_class_run["run"]
    bad = write_csv(tmp_path / "b.csv", [("sport", "ball"), ("cooking", "pan")],
                    header=("review", "topic"))
    assert re.search(r"b\.csv row 3: the label 'cooking' is not a class of the run",
                     main_error(evaluate, ["--run", run, "--file", bad]))
    nocol = write_csv(tmp_path / "c.csv", [("sport", "ball")])
    assert "has no text column 'review'" in main_error(evaluate, ["--run", run, "--file", nocol])
    assert "--predict needs --output" in main_error(evaluate, ["--run", run, "--predict", bad])
    assert "--top-k must be 1 or more" in main_error(
        evaluate, ["--run", run, "--text", "x", "--top-k", "0"])


@pytest.mark.slow
def test_three_class_run_on_jsonl_with_files_for_each_split(tmp_path, tiny_weights, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(20))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(3, seed=1))
    out = tmp_path / "run"
    finetune.main(["--train-file", str(train), "--val-file", str(val), "--weights",
                   str(tiny_weights), "--output-dir", str(out), "--epochs", "1",
                   "--group-by-length", "--fast", "--precision", "bf16"])
    log = capsys.readouterr().out
    assert "60 training, 9 validation examples (no test split)" in log
    assert "Test accuracy" not in log
    info = json.loads((out / "run.json").read_text())
    assert info["class_names"] == ["food", "sport", "tech"] and "test" not in info["splits"]
    evaluate.main(["--run", str(out), "--all-splits"])
    printed = capsys.readouterr().out.splitlines()
    final = [x for x in log.splitlines()  # the final training and validation accuracy
             if x.startswith(("Training accuracy: ", "Validation accuracy: "))][-2:]
    assert printed[:2] == final


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--trainable-layers", "lora"],
    ["--trainable-layers", "last_layer", "--fast"],
    ["--no-padding", "--batch-size", "1"],
    ["--context-length", "model"],
    ["--average-embeddings"],
    ["--token-position", "first"],
    ["--precision", "bf16", "--fast", "--accumulation-steps", "2"],
])
def test_every_option_works_with_own_files(tmp_path, monkeypatch, flags, capsys):
    monkeypatch.setattr(gpt, "load_gpt", lambda *a, **k: gpt.GPTModel(TINY))
    train = write_csv(tmp_path / "t.csv", make_rows(12, tuple(WORDS)[:4]))
    out = tmp_path / "run"
    finetune.main(["--train-file", str(train), "--output-dir", str(out), "--max-steps", "3",
                   "--no-initial-eval", *flags])
    info = json.loads((out / "run.json").read_text())
    assert info["num_classes"] == 4
    evaluate.main(["--run", str(out), "--all-splits"])
    printed = capsys.readouterr().out
    assert re.search(r"Test accuracy: \d+\.\d\d%", printed)


# ----------------------------------------------------------------------------- one pipeline

@pytest.mark.slow
def test_the_chapters_csvs_as_own_files_print_the_chapters_log(tmp_path, tiny_weights, raw_path,
                                                               capsys):
    """The proof of one pipeline: data.py's three CSVs given back as own files, with the
    chapter's choices, print exactly what the SMS path prints, line for line."""
    splits = tmp_path / "S"
    data.main(["--data", str(raw_path), "--output-dir", str(splits)])
    capsys.readouterr()

    def log(*source):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        finetune.main([*source, "--weights", str(tiny_weights), "--output-dir", str(out),
                       "--device", "cpu"])
        lines = capsys.readouterr().out.splitlines()
        start = next(i for i, x in enumerate(lines) if x.startswith("Trainable parameters"))
        return [re.sub(r"\d+\.\d\d minutes", "T minutes", x) for x in lines[start:-1]], lines

    sms, sms_all = log("--data", str(raw_path))
    own, own_all = log("--train-file", str(splits / "train.csv"),
                       "--val-file", str(splits / "validation.csv"),
                       "--test-file", str(splits / "test.csv"),
                       "--token-position", "last", "--context-length", "longest")
    assert len(sms) > 20 and own == sms
    sizes = "1045 training, 149 validation, 300 test examples; max_length 120; batches " \
        "130 / 19 / 38"
    assert sizes in sms_all and sizes in own_all
    assert "2 classes, rows per split (train / validation / test): 0 528 / 70 / 149; " \
        "1 517 / 79 / 151" in own_all
