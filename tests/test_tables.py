"""tables.py: users' own CSV, TSV and JSONL files, read and checked row by row; labels that
only look alike, and labels that would break the tables printed."""

import json

import pytest

import files
import tables
from files import DataError


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
