"""tables.py: users' own CSV, TSV and JSONL files, read and checked row by row."""

import pytest

import files
import tables


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
