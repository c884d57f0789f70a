"""Users' own labelled files: CSV, TSV and JSONL read strictly (every row checked, each fault
one message naming the file, the row and a fix), the label rules (integer labels in numeric
order, look-alike labels normalised or refused, --labels, --label-names) and the stratified,
seeded split of a lone training file. `load_labelled` gives a run its rows: these files, or
the chapter's SMS data (data.py).

    python finetune.py --train-file reviews.csv --labels neg,neutral,pos
    python finetune.py --train-file train.jsonl --val-file val.jsonl --text-column review

See docs/own-data.md for the rules a file follows.
"""

import csv
import decimal
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import datacheck
import files
from data import SEED, SPLITS, LabelledData, sms_data
from files import DataError, check_file

FORMATS = ("csv", "tsv", "jsonl")
VAL_FRAC_OWN, TEST_FRAC_OWN = 0.1, 0.2  # the chapter's 70/10/20, for a lone --train-file


@dataclass
class Record:
    """One row of a user's file: where it is (`row`: 1-based, as a spreadsheet or editor shows
    it; `where`: "row" or "line"), its text, and its label (None where the file has none)."""
    row: int
    text: str
    label: str = None
    where: str = "row"


def file_format(path, fmt=None):
    """csv, tsv or jsonl: `fmt` where given, else from the file name's extension."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    ext = Path(path).suffix.lower().lstrip(".")
    if ext in FORMATS:
        return ext
    raise DataError(f"{path}: cannot tell its format from the extension {Path(path).suffix!r}; "
                    "name it .csv, .tsv or .jsonl, or pass --format csv|tsv|jsonl")


def read_file_text(path):
    """A user's file as text (UTF-8; a leading byte-order mark is dropped)."""
    path = check_file(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; it needs a header and at least one row")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8: byte offset {e.start} (line {line}) is "
                        f"{raw[e.start:e.start + 1]!r}; save the file as UTF-8") from None


def _find_column(path, columns, name, flag, what, fix=None):
    """Index (or key) of column `name` among `columns`, matched case-insensitively. `fix`: what
    to advise where there is no such column (default: pass `flag`)."""
    hits = [c for c in columns if str(c).strip().lower() == name.strip().lower()]
    if len(hits) > 1:
        raise DataError(f"{path} has {len(hits)} columns named {name!r} (case ignored): "
                        f"{', '.join(map(repr, hits))}; rename one")
    if not hits:
        shown = ", ".join(repr(c) for c in columns) or "none"
        raise DataError(f"{path} has no {what} column {name!r} (its columns: {shown}); "
                        f"{fix or f'pass {flag} NAME'}")
    return hits[0]


def _looks_like_data(columns):
    """Whether a file's header (its first row, as read) looks like a row of data: a name with
    a space or punctuation in it, or longer than a column name usually is."""
    return any(len(c) > 30 or re.search(r"\s|[^\w\s.-]", c.strip())
               for c in map(str, columns))


# Characters that show as nothing: stripped from labels (a label copied from a web page or a
# word processor may carry them), so that "spam" and "spam" + U+200B are one class.
INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b"
                              "\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067"
                              "\u2068\u2069\ufeff"))
# Letters of other scripts drawn as Latin ones: two labels that differ only by these are refused
# (Cyrillic, then Greek; after NFKC and casefolding).
LOOK_ALIKE = str.maketrans("асеіјорѕхуԁһӏвкмнт" "αβεικνορτυχζ",
                           "aceijopsxydhlbkmht" "abeiknoptyxz")
# What str.splitlines() breaks at: a label holding one would break every table printed.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def clean_label(label):
    """A label as compared: one Unicode form (NFC: a composed and a decomposed é are one),
    invisible characters (zero-width spaces, soft hyphens, direction marks, a BOM) taken out,
    surrounding spaces stripped."""
    return unicodedata.normalize("NFC", label).translate(INVISIBLE).strip()


def _label_text(path, value, where, row):
    """A label as text: strings and integers are labels; anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{path} {where} {row}: the label {value!r} is not a string or an "
                        "integer; write it as one")
    return str(value).strip()


def _check_label_line(path, record):
    """Refuse a label that holds a line break: every table printed (the log, the scores, the
    confusion matrix, --predict's columns) would break at it."""
    if any(c in record.label for c in LINE_BREAKS):
        raise DataError(f"{path} {record.where} {record.row}: the label {record.label!r} holds a "
                        "line break, which would break every table the run prints; write the "
                        "label on one line")


def _quote_error(path, n, start, end, e, line):
    """The error line for a CSV row whose quotes the csv module refused (strict)."""
    fix = ("if the quote is part of the text, put the whole field in quotes and double each "
           'quote inside it (\"He said ""hi""\"), or remove it')
    if "end of data" in str(e):
        return (f"{path} row {n} (line {start}): a quote opened in this row never closes, so "
                f"every line after it (to line {end}) would be read into one field; {fix}")
    if end > start:
        return (f"{path} row {n} (line {start}): a quote opened in this row closes only on "
                f"line {end}, and not at the end of a field, so lines {start} to {end} would "
                f"be read as one row; {fix}")
    return (f"{path} row {n} (line {start}): a field starts with a quote that closes before "
            f"the field ends ({line.strip()[:60]!r}); {fix}")


def _csv_rows(path, text, delimiter, quoting):
    """(row number, first line, last line, fields) of every row of a CSV/TSV text, the header
    included (row 1), blank rows as []. Quotes are read strictly (csv module, strict=True): a
    quote that never closes, or closes in the middle of a field, raises DataError naming the
    row and the line where it opened, instead of running on to the next quote."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # long texts are legal
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting,
                        strict=True)
    n = 0
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            line = io.StringIO(text, newline="").readlines()[start - 1]
            raise DataError(_quote_error(path, n + 1, start, reader.line_num, e, line)) from None
        n += 1
        yield n, start, reader.line_num, fields


def _row_of_its_own(line, n_fields, delimiter, label_index, labels):
    """Whether one physical line of a CSV reads as a whole row: the header's number of fields
    (taking its quotes as quotes, or as ordinary characters) and, where `labels` are known, one
    of them in the label column."""
    for quoting in (csv.QUOTE_MINIMAL, csv.QUOTE_NONE):
        fields = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter, quoting=quoting),
                      [])
        if len(fields) == n_fields and (label_index is None
                                        or fields[label_index].strip() in labels):
            return True
    return False


def _opens_last_field(line, delimiter):
    """Whether the quote left open on a row's first line opens that line's last field (a
    quoted text that goes on over the next lines, as RFC 4180 allows), not one that swallowed
    the delimiters and fields after it (a stray quote)."""
    fields = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter,
                             quoting=csv.QUOTE_NONE), [])
    open_at = [i for i, f in enumerate(fields) if f.lstrip().startswith('"') and
               f.count('"') % 2 == 1]
    return bool(open_at) and open_at[0] == len(fields) - 1


def _check_spanning_rows(path, rows, labels, lines, n_fields, delimiter, label_index):
    """Refuse a CSV row whose quoted field runs over lines that each read as a row of their
    own: a stray quote that swallowed the rows up to the next quote, which the csv module
    takes as one row with the last line's label. `rows`: (row, first line, last line) of the
    rows that span lines; `labels`: the file's labels; `lines`: the file's lines."""
    if label_index is None and n_fields < 2:
        return  # a file of texts alone: a line of text reads as a row whatever it holds
    for n, start, end in rows:
        for k in range(start, end):  # its lines but the last (that one closes the field)
            if k == start and _opens_last_field(lines[k - 1], delimiter):
                continue  # a text with line breaks in the row's last field: as the file means
            if _row_of_its_own(lines[k - 1], n_fields, delimiter, label_index, labels):
                raise DataError(
                    f"{path} row {n} (line {start}): a quote opened in this row runs on to "
                    f"line {end}, taking in line {k}, which reads as a row of its own "
                    f"({lines[k - 1].strip()[:40]!r}); if the quote is part of the text, put "
                    'the whole field in quotes and double each quote inside it (""), or remove '
                    "it; a text that really holds line breaks can also go in a .jsonl file")


def read_records(path, fmt=None, text_column="text", label_column="label", labelled=True,
                 label_fix=None):
    """The rows of a .csv, .tsv or .jsonl file as Records, every one checked: a missing column,
    an empty text or label, a short or long row, a JSON line that is not an object each raise
    DataError naming the file and the row. Blank lines are skipped; nothing else is dropped.

    Quotes: a .csv is read as RFC 4180 has it (a quoted field may hold commas, line breaks and
    doubled quotes), but a quote that never closes, closes inside a field, or runs over lines
    that read as rows of their own is refused, naming the row where it opened: rows are never
    merged. A .tsv is one row per line, its fields split at every tab, and quotes are ordinary
    characters (as most TSV writers, spreadsheets' "tab-separated" exports among them, mean
    them). Fields of any length are read. `label_fix`: the advice where the label column is
    missing (default: pass --label-column)."""
    fmt = file_format(path, fmt)
    text = read_file_text(path)
    records = []
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not valid JSON ({e.msg} at column "
                                f"{e.colno}); write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {n} is not a JSON object but "
                                f"{type(obj).__name__} {line.strip()[:40]!r}; write one "
                                '{"text": ..., "label": ...} object per line')
            t = obj[_find_column(f"{path} line {n}", list(obj), text_column, "--text-column",
                                 "text")]
            if not isinstance(t, str):
                raise DataError(f"{path} line {n}: the text is {t!r}, not a string")
            label = None
            if labelled:
                key = _find_column(f"{path} line {n}", list(obj), label_column,
                                   "--label-column", "label", label_fix)
                label = _label_text(path, obj[key], "line", n)
            records.append(Record(n, t, label, "line"))
    else:
        delimiter = "," if fmt == "csv" else "\t"
        rows = _csv_rows(path, text, delimiter,
                         csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
        _, _, _, header = next(rows)
        headerless = None
        if _looks_like_data(header):
            headerless = (f"its first row looks like data, not a header: add a first line "
                          f"naming the columns ({text_column!r}), or pass --text-column NAME "
                          "if that row is the header")
        ti = _find_column(path, header, text_column, "--text-column", "text", headerless)
        ti = header.index(ti)
        li = None
        if labelled:
            li = header.index(_find_column(path, header, label_column, "--label-column",
                                           "label", label_fix))
        spanning = []
        for n, start, end, fields in rows:
            if not fields:
                continue
            if len(fields) != len(header):
                fix = ("put quotes around a text that holds a comma or a line break"
                       if fmt == "csv" else "a .tsv row is one line, split at every tab (quotes "
                       "are ordinary characters there): take the tab or line break out of the "
                       "text, or save the file as .csv or .jsonl")
                raise DataError(f"{path} row {n} has {len(fields)} fields but the header has "
                                f"{len(header)}; {fix}")
            records.append(Record(n, fields[ti], None if li is None else fields[li].strip()))
            if end > start:
                spanning.append((n, start, end))
        if spanning:
            _check_spanning_rows(path, spanning, {r.label for r in records},
                                 io.StringIO(text, newline="").readlines(), len(header),
                                 delimiter, li)
    if not records:
        raise DataError(f"{path} has a header but no rows; add labelled rows")
    for r in records:
        if not r.text.strip():
            raise DataError(f"{path} {r.where} {r.row}: the text is empty; fill it in or "
                            "delete the row")
        if labelled:
            r.label = clean_label(r.label)
            if not r.label:
                raise DataError(f"{path} {r.where} {r.row}: the label is empty; fill it in or "
                                "delete the row")
            _check_label_line(path, r)
    return records


def _is_int(label):
    return bool(re.fullmatch(r"[+-]?\d+", label))


def _number(label):
    """The label's value where it is a plain decimal number (1, 01, +1, 1.0, .5, 1e0), else
    None."""
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?", label):
        return decimal.Decimal(label)
    return None


def _whole(label):
    """The label as an integer's text where it is a whole number ("01", "1.0", "1e0" and "+1"
    are "1"), else None."""
    value = _number(label)
    if value is None or value != value.to_integral_value() or value.adjusted() > 30:
        return None
    return str(int(value))


def _skeleton(label):
    """What a label looks like: compatibility forms folded (NFKC: a full-width or ligature
    letter as its plain one), one case, and letters of other scripts drawn as Latin ones
    taken as those."""
    return unicodedata.normalize("NFKC", clean_label(label)).casefold().translate(LOOK_ALIKE)


def _label_key(label):
    """What two labels that look alike share: a number's value, else what the text looks like
    (True and true, spam with a Latin a and spаm with a Cyrillic а)."""
    value = _number(label)
    return value if value is not None else _skeleton(label)


def _char_name(c):
    return f"{c!r} ({unicodedata.name(c, f'U+{ord(c):04X}')})"


def how_labels_differ(a, b):
    """In words, how two labels with one _label_key differ: how a number is written, case, or
    the characters that look alike (each named, as Unicode names it)."""
    if _number(a) is not None and _number(b) is not None:
        return "how the number is written"
    if a.casefold() == b.casefold():
        return "case"
    pairs = [(x, y) for x, y in zip(a, b) if x != y and x.casefold() != y.casefold()] \
        if len(a) == len(b) else []
    if pairs:
        shown = "; ".join(f"{_char_name(x)} against {_char_name(y)}" for x, y in
                          dict.fromkeys(pairs))
    else:
        shown = ", ".join(_char_name(c) for c in dict.fromkeys(a + b)
                          if c not in a or c not in b)
    return f"characters that look alike: {shown}"


def _alike(a, b):
    """Whether two labels that are not equal would read as one class."""
    return a != b and _label_key(a) == _label_key(b)


def normalise_labels(records, path):
    """The training file's labels, one spelling per class. Where every label is a whole number,
    each becomes its integer (01, 1.0, 1e0 and +1 are all the class 1). Otherwise two labels
    that differ only in case, in characters that look alike (a Latin a and a Cyrillic а, a
    full-width letter) or in how a number is written (True/true, 1/1e0) would be two classes
    that look like one: refused, naming a row of each and the difference. (Unicode forms and
    invisible characters were made one as the file was read: clean_label.)"""
    whole = [_whole(r.label) for r in records]
    if all(whole):
        for r, label in zip(records, whole):
            r.label = label
        return records
    seen = {}
    for r in records:
        other = seen.setdefault(_label_key(r.label), r)
        if other.label != r.label:
            raise DataError(f"{path}: the labels {other.label!r} ({other.where} {other.row}) and "
                            f"{r.label!r} ({r.where} {r.row}) differ only in "
                            f"{how_labels_differ(other.label, r.label)}, so they would be two "
                            "classes; write each class one way")
    return records


def match_label(label, class_names):
    """The class name that `label` (from a validation, test or scored file) stands for: itself,
    or where the classes are whole numbers the class of its value (01 or 1.0 for 1); None where
    it is no class."""
    if label in class_names:
        return label
    whole = _whole(label)
    if whole is not None and whole in class_names and all(map(_is_int, class_names)):
        return whole
    return None


def unknown_label(path, record, class_names, what="is not a class of the training data",
                  fix="fix the label, or add training rows of it"):
    """The error for a row whose label is no class: the classes, and the one it looks like."""
    known = ", ".join(map(repr, class_names))
    alike = [c for c in class_names if _alike(c, record.label)]
    hint = (f"; the class is written {alike[0]!r} (they differ in "
            f"{how_labels_differ(alike[0], record.label)})" if alike else "")
    return DataError(f"{path} {record.where} {record.row}: the label {record.label!r} {what} "
                     f"({known}){hint}; {fix}")


def parse_label_names(spec):
    """--label-names 0=ham,1=spam as {label: name} (a whole-number label as its integer)."""
    names = {}
    for part in spec.split(","):
        label, sep, name = (clean_label(x) for x in part.partition("="))
        if not sep or not label or not name:
            raise DataError(f"--label-names {spec!r}: {part.strip()!r} is not LABEL=NAME; write "
                            "it as 0=ham,1=spam")
        label = _whole(label) or label
        if label in names:
            raise DataError(f"--label-names {spec!r} names the label {label!r} twice; name "
                            "each label once")
        names[label] = name
    return names


def check_labels_not_names(fixed, spec, labels, source):
    """Refuse --labels that lists the names --label-names gives instead of the labels the file
    writes, saying the --labels that was meant."""
    by_name = {name: label for label, name in parse_label_names(spec).items()}
    if any(x not in labels and x in by_name for x in fixed):
        meant = ",".join(x if x in labels else by_name.get(x, x) for x in fixed)
        raise DataError(f"--labels {','.join(fixed)} lists the names --label-names gives, but "
                        f"--labels lists the labels as {source} writes them; pass --labels "
                        f"{meant}")


def name_classes(class_names, spec, source):
    """The class names with --label-names `spec` applied (each label it names shows as its
    name), checked: every label it names is a class of `source`, and no two classes share a
    name."""
    names = parse_label_names(spec)
    for label in names:
        if label not in class_names:
            raise DataError(f"--label-names names the label {label!r}, which {source} does not "
                            f"have (its labels: {', '.join(map(repr, class_names))}); name only "
                            "those")
    named = [names.get(c, c) for c in class_names]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        both = [repr(c) for c, n in zip(class_names, named) if n == twice[0]]
        raise DataError(f"--label-names gives the name {twice[0]!r} to two classes "
                        f"({', '.join(both)}); give each class its own name")
    return named


def file_labels(class_names, spec=None):
    """The labels a file holds for each class, in class order: the class names themselves, or
    under --label-names `spec` the label each name was given to."""
    if not spec:
        return list(class_names)
    given = {name: label for label, name in parse_label_names(spec).items()}
    return [given.get(c, c) for c in class_names]


def class_order(labels, fixed=None):
    """Class names in id order: `fixed` (from --labels) where given; else numeric where every
    label is an integer, else by name."""
    if fixed is not None:
        if len(set(fixed)) != len(fixed) or not all(fixed):
            raise DataError(f"--labels {','.join(fixed)} names a class twice or has an empty "
                            "name; list each class once")
        return list(fixed)
    distinct = set(labels)
    if distinct and all(_is_int(x) for x in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def stratified_split(rows, fracs, class_names, seed=SEED, source="the training file"):
    """Split (label id, text) rows into train and the splits of `fracs` ({name: fraction}),
    class by class, so that each class keeps its share in every split; each split gets at least
    one row of every class. Seeded: the same rows give the same split."""
    rng = np.random.RandomState(seed)
    by_class = {}
    for row in rows:
        by_class.setdefault(row[0], []).append(row)
    out = {"train": [], **{name: [] for name in fracs}}
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        counts = {name: max(1, int(n * f + 0.5)) for name, f in fracs.items()}
        while n - sum(counts.values()) < 1 and max(counts.values()) > 1:
            counts[max(counts, key=counts.get)] -= 1  # rounding up left train none: give it one
        if n - sum(counts.values()) < 1:
            names = " and ".join(["train", *fracs])
            fewer = ("give the other splits as files (--val-file, --test-file), or ask for "
                     "fewer splits (--test-frac 0)" if "test" in fracs else
                     "give the validation rows as a file (--val-file)")
            raise DataError(
                f"class {class_names[label]!r} has {n} row{'s' * (n != 1)} in {source}: too "
                f"few to put one in each of {names}; add rows of it, or {fewer}")
        order = [members[j] for j in rng.permutation(n)]
        for name, k in counts.items():
            out[name] += order[:k]
            order = order[k:]
        out["train"] += order
    return {name: [part[j] for j in rng.permutation(len(part))] for name, part in out.items()}


def file_source(path):
    """{"path": absolute path, "sha256": of its bytes}: which file a run read."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": files.file_sha256(path)}


def file_data(train_file, val_file=None, test_file=None, fmt=None, text_column="text",
              label_column="label", labels=None, val_frac=None, test_frac=None, seed=SEED,
              label_names=None, dedup=False):
    """A user's labelled files as labelled rows: every row checked, the class names ordered
    (and named, with --label-names), and the splits the files do not give cut from the training
    file (stratified, seeded). `dedup` (--dedup) drops each file's exact duplicates first; the
    texts a file gives two labels are named, with their rows, in `conflicts`."""
    if val_file is not None and val_frac is not None:
        raise DataError("--val-frac cuts validation from --train-file, but --val-file gives it; "
                        "drop one of the two")
    if test_file is not None and test_frac is not None:
        raise DataError("--test-frac cuts a test split from --train-file, but --test-file "
                        "gives it; drop one of the two")
    if val_frac is None:
        val_frac = 0.0 if val_file else VAL_FRAC_OWN
    if test_frac is None:
        test_frac = 0.0 if (test_file or val_file) else TEST_FRAC_OWN
    for flag, f in (("--val-frac", val_frac), ("--test-frac", test_frac)):
        if not 0 <= f < 1:
            raise DataError(f"{flag} must be at least 0 and below 1, not {f}")
    if val_file is None and val_frac == 0:
        raise DataError("training needs a validation split: give --val-file, or a --val-frac "
                        "above 0")
    if val_frac + test_frac >= 1:
        raise DataError(f"--val-frac {val_frac} and --test-frac {test_frac} leave no rows to "
                        "train on; make their sum less than 1")
    kw = dict(fmt=fmt, text_column=text_column, label_column=label_column)
    train = normalise_labels(read_records(train_file, **kw), train_file)
    scored = ("a file of texts without labels is not for training: classify it after training "
              "with python evaluate.py --run DIR --predict FILE --output OUT; if its labels are "
              "in another column, pass --label-column NAME")
    fixed = None if labels is None else [clean_label(x) for x in labels.split(",")]
    if fixed is not None and all(_is_int(r.label) for r in train):
        fixed = [_whole(x) or x for x in fixed]
    if fixed is not None and label_names:
        check_labels_not_names(fixed, label_names, {r.label for r in train}, train_file)
    class_names = class_order([r.label for r in train], fixed)
    ids = {name: i for i, name in enumerate(class_names)}
    given = {"train": (train_file, train)}
    for name, path in (("validation", val_file), ("test", test_file)):
        if path is not None:
            given[name] = (path, read_records(path, **kw, label_fix=scored))
    splits, notes, conflicts = {}, [], []
    for name, (path, records) in given.items():
        for r in records:
            if match_label(r.label, class_names) is None:
                raise unknown_label(path, r, class_names, "is not in --labels"
                                    if fixed is not None and name == "train" else
                                    "is not a class of the training data")
            r.label = match_label(r.label, class_names)
        conflicts.append(datacheck.record_conflicts(records, path))
        if dedup:
            records, dropped = datacheck.dedup_records(records)
            notes.append(f"--dedup dropped {dropped:,} exact duplicate{'s' * (dropped != 1)} "
                         f"from {path} (the same text, whitespace and case aside, with the same"
                         " label; the first of each kept)")
        splits[name] = [(ids[r.label], r.text) for r in records]
    counts = [sum(label == i for label, _ in splits["train"]) for i in range(len(class_names))]
    empty = [c for c, n in zip(class_names, counts) if n == 0]
    if empty:
        raise DataError(f"--labels names {', '.join(map(repr, empty))} but {train_file} has no "
                        "row of it; drop it from --labels or add rows")
    if len(class_names) < 2:
        raise DataError(f"{train_file} has only one class ({class_names[0]!r}); a classifier "
                        "needs at least two: add rows of another class")
    fracs = {name: f for name, f in (("validation", val_frac), ("test", test_frac))
             if f > 0 and name not in splits}
    if fracs:
        n = len(splits["train"])
        cut = stratified_split(splits.pop("train"), fracs, class_names, seed, str(train_file))
        splits = {"train": cut["train"], **{k: v for k, v in {**splits, **cut}.items()
                                            if k != "train"}}
        notes.append(f"Split {train_file} by class (seed {seed}): " + ", ".join(
            f"{name} {f:g}" if abs(len(cut[name]) / n - f) < 0.01 else
            f"{name} {len(cut[name]) / n:.2g} ({len(cut[name])} rows: {f:g} asked, but each "
            "class's share is whole rows, at least one)" for name, f in fracs.items())
            + ", train the rest")
    if label_names:
        class_names = name_classes(class_names, label_names, train_file)
    splits = {name: splits[name] for name in SPLITS if name in splits}
    sources = {flag: file_source(path) for flag, path in (
        ("train_file", train_file), ("val_file", val_file), ("test_file", test_file)) if path}
    return LabelledData(splits, class_names, notes, {**sources["train_file"], "files": sources},
                        conflicts)


def load_labelled(cfg):
    """The run's labelled data: a user's files where `cfg.train_file` is set, else the chapter's
    SMS data. `cfg` is a finetune.TrainConfig, or anything with its fields (run.json's flags)."""
    get = (lambda name: cfg.get(name)) if isinstance(cfg, dict) else \
        (lambda name: getattr(cfg, name, None))
    if get("train_file") is None:
        for flag in ("val_file", "test_file", "labels", "val_frac", "test_frac", "format",
                     "label_names"):
            if get(flag) is not None:
                raise DataError(f"--{flag.replace('_', '-')} goes with --train-file; give your "
                                "training file too")
        return sms_data(get("data"))
    if get("data") is not None:
        raise DataError("--data is the SMS Spam Collection and --train-file your own data; "
                        "give one of the two")
    return file_data(get("train_file"), get("val_file"), get("test_file"), get("format"),
                     get("text_column") or "text", get("label_column") or "label",
                     get("labels"), get("val_frac"), get("test_frac"),
                     label_names=get("label_names"), dedup=bool(get("dedup")))
