"""datacheck.py with known answers: duplicate, leak and conflict counts on a file the test
writes, texts compared with whitespace and case normalised, --dedup keeping the first row, and
the one-line summary (never one of the chapter's lines)."""

import pytest

import data
import datacheck
import tables
from reference import CHAPTER_LINE

NAMES = ["ham", "spam"]


def test_normalise_folds_whitespace_and_case():
    assert datacheck.normalise("  Ok\tLAR...\n joking ") == "ok lar... joking"
    assert datacheck.normalise("ß") == datacheck.normalise("SS")  # casefold, not lower


def test_counts_on_splits_with_known_answers():
    splits = {
        "train": [(0, "hello there"), (0, "Hello  there"), (0, "HELLO THERE"), (1, "win cash"),
                  (0, "see you"), (1, "claim now"), (0, "a")],
        "validation": [(1, "WIN cash"), (0, "new one"), (0, "new one")],
        "test": [(0, "see you"), (1, "see you"), (0, "hello there"), (1, "fresh spam")],
    }
    r = datacheck.check(splits, NAMES, lengths={"train": [2, 2, 2, 2, 2, 2, 1]},
                        cut={"train": 2, "validation": 0, "test": 1}, max_length=2)
    train = r["splits"]["train"]
    assert train["duplicates"]["examples"] == 2 and train["duplicates"]["texts"] == 1
    assert train["duplicates"]["shown"][0]["copies"] == 3
    assert train["classes"]["ham"] == {"count": 5, "share": 5 / 7}
    assert train["one_token"] == 1 and train["cut"] == {"examples": 2, "share": 2 / 7}
    assert r["splits"]["validation"]["duplicates"]["examples"] == 1
    assert r["splits"]["test"]["duplicates"]["examples"] == 1  # "see you" twice
    leaks = r["leaks"]
    assert leaks["train/validation"]["examples"] == 1 and \
        leaks["train/validation"]["share"] == 1 / 3
    assert leaks["train/test"]["examples"] == 3 and leaks["train/test"]["texts"] == 2
    assert leaks["validation/test"]["examples"] == 0
    assert len(leaks["train/test"]["shown"]) == 2
    # "see you": ham in train and test, spam in test; "win cash": spam both times (no conflict)
    assert r["conflicts"]["texts"] == 1
    [conflict] = r["conflicts"]["examples"]
    assert conflict["labels"] == {"ham": ["train:4", "test:0"], "spam": ["test:1"]}
    line = datacheck.summary(r)
    assert line.startswith("Data check: 4 repeated texts within splits; 4 examples whose text "
                           "is in an earlier split (train/validation 1, train/test 3); 1 text "
                           "under two labels; 0 empty, 1 of one token; 3 cut at max_length 2")
    assert not CHAPTER_LINE.match(line)
    lines = datacheck.report_lines(r)
    assert not any(CHAPTER_LINE.match(x) for x in lines)
    assert any("train/test: 3 examples (75.0% of test), 2 distinct texts" in x for x in lines)


def test_a_clean_split_has_nothing_to_report():
    splits = {"train": [(0, "a b"), (1, "c d")], "validation": [(0, "e f")],
              "test": [(1, "g h")]}
    r = datacheck.check(splits, NAMES)
    assert datacheck.summary(r).startswith(
        "Data check: 0 repeated texts within splits; 0 examples whose text is in an earlier "
        "split; 0 texts under two labels; 0 empty, 0 of one token")


def write(path, rows):
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows),
                    encoding="utf-8")
    return path


def test_own_file_duplicates_and_conflicts_by_row(tmp_path):
    f = write(tmp_path / "own.csv", [
        ("good film", "pos"), ("bad film", "neg"), ("Good  film", "pos"), ("GOOD FILM", "neg"),
        ("fine", "pos"), ("bad film", "neg")])
    records = tables.read_records(f)
    c = datacheck.record_conflicts(records, f)
    assert c["texts"] == 1
    assert c["examples"][0]["labels"] == {"pos": [2, 4], "neg": [5]}  # spreadsheet rows
    kept, dropped = datacheck.dedup_records(records)
    assert dropped == 2  # the second "good film" (pos) and the second "bad film"
    assert [r.row for r in kept] == [2, 3, 5, 6]  # the first kept; the conflict stays


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_splits(n):
    splits = {"train": [(0, "x y")] * n, "validation": [], "test": []}
    r = datacheck.check(splits, NAMES)
    assert r["leaks"]["train/validation"]["share"] == 0.0
    datacheck.summary(r)
    datacheck.report_lines(r)


def test_the_chapter_split_has_leaks(raw_path):
    """On the chapter's own split of the real data: test messages that are also, word for word,
    training messages (the figures docs/decisions.md gives)."""
    labelled = data.sms_data(raw_path)
    r = datacheck.check(labelled.splits, labelled.class_names)
    assert r["leaks"]["train/test"]["examples"] == 40
    assert r["leaks"]["train/validation"]["examples"] == 14
    assert r["splits"]["train"]["duplicates"]["examples"] == 54
    assert r["conflicts"]["texts"] == 0


def test_check_datasets_counts_one_token_and_cut_texts():
    tok = data.get_tokenizer()
    splits = {"train": [(0, "hi"), (1, "win a big cash prize now")], "validation": [(0, "hi")]}
    datasets = {"train": data.TextDataset(splits["train"], tok, max_length=3)}
    datasets["validation"] = data.TextDataset(splits["validation"], tok, 3)
    r = datacheck.check_datasets(splits, datasets, NAMES)
    assert r["max_length"] == 3
    assert r["splits"]["train"]["one_token"] == 1 and r["splits"]["train"]["cut"]["examples"] == 1
    assert r["leaks"]["train/validation"]["examples"] == 1 and r["files"] == []
