"""What README's "Your own data" promises about a user's file, held by tests (issue 23).

The marks spreadsheets and Windows editors write (a UTF-8 byte-order mark, CRLF line ends), the
format from the extension in any case, columns by name in any case and in any place, integer
labels, blank lines; and, stated for all inputs with hypothesis, that the stratified split puts
every class in every split whenever a class has rows enough, and that padding never changes
a flexible-position logit.
"""

import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import data
import gpt
import shortcuts
import tables

BOM = "\ufeff"
ROWS = [("spam", "WIN cash, now"), ("ham", "see you\nat 6"), ("ham", 'say "hi"')]
# A .tsv is one row per line, its quotes ordinary characters (docs/own-data.md): no line breaks
TSV_ROWS = [("spam", "WIN cash, now"), ("ham", "see you at 6"), ("ham", 'say "hi"')]


def as_csv(rows, delimiter=",", eol="\n", header=("text", "label")):
    def field(v):
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in f'"\n{delimiter}') else v
    lines = [delimiter.join(header)]
    for label, text in rows:
        cells = {"text": text, "label": label}
        lines.append(delimiter.join(field(cells[h.lower()]) if h.lower() in cells else "x"
                                    for h in header))
    return eol.join(lines) + eol


def as_tsv(rows, header=("text", "label")):
    """A .tsv as spreadsheets export it: tab-separated, nothing quoted."""
    table = [dict(zip(header, header))] + [{"text": t, "label": y} for y, t in rows]
    return "".join("\t".join(r[h] for h in header) + "\n" for r in table)


def as_jsonl(rows, eol="\n"):
    return "".join(json.dumps({"text": t, "label": y}) + eol for y, t in rows)


def read(path, **kw):
    return [(r.label, r.text) for r in tables.read_records(path, **kw)]


@pytest.mark.parametrize("name, first", [("d.csv", "text"), ("d.csv", "label"),
                                         ("d.tsv", "text"), ("d.tsv", "label")])
def test_a_byte_order_mark_before_the_first_column_name(tmp_path, name, first):
    # Excel's "CSV UTF-8" puts U+FEFF before the header: the first column must still be found
    # by its name, whichever column (text or label) comes first.
    header = ("text", "label") if first == "text" else ("label", "text")
    path = tmp_path / name
    tsv = name.endswith("tsv")
    rows = TSV_ROWS if tsv else ROWS
    path.write_bytes((BOM + (as_tsv(rows, header) if tsv else as_csv(rows, header=header))
                      ).encode("utf-8"))
    assert read(path) == rows
    assert [r.row for r in tables.read_records(path)] == [2, 3, 4]


def test_a_byte_order_mark_before_the_first_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((BOM + as_jsonl(ROWS)).encode("utf-8"))
    assert read(path) == ROWS


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl"])
def test_crlf_line_ends_leave_no_carriage_return_in_texts_or_labels(tmp_path, name):
    path = tmp_path / name
    rows = [("spam", "WIN cash now"), ("ham", "see you at 6"), ("ham", "ok")]
    text = as_jsonl(rows, "\r\n") if name.endswith("jsonl") else \
        as_csv(rows, "\t" if name.endswith("tsv") else ",", "\r\n")
    path.write_bytes((BOM + text).encode("utf-8"))  # Windows Excel: both at once
    assert read(path) == rows
    # the label column last, too (its value ends right before the \r)
    if not name.endswith("jsonl"):
        path.write_bytes(as_csv(rows, "\t" if name.endswith("tsv") else ",", "\r\n",
                                header=("label", "text")).encode("utf-8"))
        assert read(path) == rows


def test_a_crlf_file_trains_on_its_real_classes(tmp_path):
    rows = [("a", f"alpha {i}") for i in range(10)] + [("b", f"beta {i}") for i in range(10)]
    path = tmp_path / "d.csv"
    path.write_bytes((BOM + as_csv(rows, eol="\r\n", header=("text", "label"))).encode())
    loaded = tables.file_data(path)
    assert loaded.class_names == ["a", "b"]
    got = sorted((loaded.class_names[y], t) for part in loaded.splits.values() for y, t in part)
    assert got == sorted(rows)


def test_the_format_comes_from_the_extension_in_any_case(tmp_path):
    for name, content, rows in (("d.CSV", as_csv(ROWS), ROWS),
                                ("d.Tsv", as_tsv(TSV_ROWS), TSV_ROWS),
                                ("d.JSONL", as_jsonl(ROWS), ROWS)):
        (tmp_path / name).write_text(content, encoding="utf-8")
        assert read(tmp_path / name) == rows, name


def test_columns_anywhere_in_any_case_and_other_columns_ignored(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(as_csv(ROWS, header=("id", "LABEL", "notes", "Text")), encoding="utf-8")
    assert read(path) == ROWS
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"ID": i, "Text": t, "Label": y, "more": [1]}) + "\n"
                            for i, (y, t) in enumerate(ROWS)), encoding="utf-8")
    assert read(path) == ROWS


def test_integer_labels_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": "0"}\n  \n'
                    '{"text": "z", "label": 10}\n', encoding="utf-8")
    records = tables.read_records(path)
    assert [(r.label, r.text, r.row, r.where) for r in records] == [
        ("1", "x", 1, "line"), ("0", "y", 3, "line"), ("10", "z", 5, "line")]
    assert tables.class_order([r.label for r in records]) == ["0", "1", "10"]  # numerically
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nx, 1\n\ny,01\n", encoding="utf-8")
    records = tables.read_records(csv_path)
    # blank lines skipped; rows numbered as a spreadsheet shows them (the blank one is row 3)
    assert [(r.label, r.text, r.row) for r in records] == [("1", "x", 2), ("01", "y", 4)]
    # "01" is the class 1
    assert [r.label for r in tables.normalise_labels(records, csv_path)] == ["1", "1"]


def test_unlabelled_rows_for_predict_need_no_label_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes((BOM + "Text\r\nhello\r\n\"two\r\nlines\"\r\n").encode("utf-8"))
    records = tables.read_records(path, labelled=False)
    assert [(r.text.splitlines(), r.label, r.row) for r in records] == [
        (["hello"], None, 2), (["two", "lines"], None, 3)]


# ----------------------------------------------------------------------------- hypothesis

@settings(max_examples=80, deadline=None)
@given(counts=st.lists(st.integers(1, 25), min_size=2, max_size=4),
       val=st.one_of(st.sampled_from([0.1, 0.3, 0.45, 0.49]), st.floats(0.01, 0.49)),
       test=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45, 0.49]), seed=st.integers(0, 2**31 - 1))
@example(counts=[10, 10], val=0.45, test=0.45, seed=0)  # rounding up once left train none
def test_the_stratified_split_keeps_every_class_in_every_split_when_it_can(
        counts, val, test, seed):
    rows = [(c, f"class {c} row {i}") for c, n in enumerate(counts) for i in range(n)]
    names = [f"c{c}" for c in range(len(counts))]
    fracs = {name: f for name, f in (("validation", val), ("test", test)) if f > 0}
    can = all(n >= 1 + len(fracs) for n in counts)  # one row for train and for each split
    if not can:
        with pytest.raises(data.DataError, match="too few to put one in each of"):
            tables.stratified_split(rows, fracs, names, seed)
        return
    splits = tables.stratified_split(rows, fracs, names, seed)
    assert list(splits) == ["train", *fracs]
    for name, part in splits.items():
        assert {y for y, _ in part} == set(range(len(counts))), name
    assert sorted(r for part in splits.values() for r in part) == sorted(rows)  # a partition
    assert tables.stratified_split(rows, fracs, names, seed) == splits  # seeded


TINY = gpt.GPTConfig(vocab_size=100, context_length=48, emb_dim=32, n_heads=2, n_layers=2)
PAD = 99


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    model = gpt.GPTModel(TINY).eval()
    gpt.setup_classifier(model, 3, "last_block")
    with torch.no_grad():  # a head and biases that are not near zero: differences show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.lists(st.integers(0, PAD - 1), min_size=1, max_size=20),
                      min_size=1, max_size=4),
       extra=st.integers(0, 20), shortcut=st.sampled_from(["none", "tail", "prepared"]))
def test_padding_never_changes_a_flexible_position_logit(tiny_classifier, texts, extra,
                                                         shortcut):
    model = tiny_classifier
    kw = {"none": {}, "tail": {"tail": True}, "prepared": {"prepared": True, "tail": True}}

    def logits(ids):
        with torch.no_grad():
            return shortcuts.classify_logits(model, torch.tensor(ids), position="flexible",
                                             pad_id=PAD, **kw[shortcut])
    alone = torch.cat([logits([t]) for t in texts])  # each text by itself, unpadded
    width = max(map(len, texts)) + extra  # a batch of them, right-padded to any width
    batch = logits([t + [PAD] * (width - len(t)) for t in texts])
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=1e-4)
