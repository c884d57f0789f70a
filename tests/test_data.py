"""data.py: parsing, balancing, splitting, tokens, batches and the download, all offline.

The checks on the real SMS Spam Collection pin the chapter's published figures and the hashes of
its three CSV files (PARSE.md); the rest runs on small generated inputs and a local HTTP server.
"""

import csv
import hashlib
import io
import os
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import data
import files

# PARSE.md, "Self-checks": rows, bytes and sha256 of the chapter's three files.
EXPECTED_CSV = {
    "train": (1045, 528, 517, 112762,
              "c89a1156b8476e6f4c0bfa4bc944f3d934e3db2942c5dc2a1456a65a795afcde"),
    "validation": (149, 70, 79, 17770,
                   "0ac7a07215729476975e070029ced8452a3d4e49fcdd8b17c167a317150b5439"),
    "test": (300, 149, 151, 31786,
             "a5764d4eed041dada859601e1715bc68885aa5e74713e127968ead8ddf6a9e04"),
}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder):
    """Every file anywhere under `folder` (none when it does not exist)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def chapter_splits(rows):
    """The chapter's own pandas code for balancing and splitting, as (label id, text) lists."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(rows, columns=["Label", "Text"])
    num_spam = int((df["Label"] == "spam").sum())
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    balanced = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(balanced) * 0.7)
    validation_end = train_end + int(len(balanced) * 0.1)
    parts = {"train": balanced[:train_end], "validation": balanced[train_end:validation_end],
             "test": balanced[validation_end:]}
    return {name: [(int(label), text) for label, text in part.itertuples(index=False)]
            for name, part in parts.items()}


def pandas_rows(text):
    """The chapter's reader (pandas, tab-separated, quote `"`), as (label, text) pairs.

    dtype=str keeps texts such as "True" or "5" as text, so only the parsing is compared.
    """
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(io.StringIO(text), sep="\t", header=None, names=["Label", "Text"],
                     keep_default_na=False, dtype=str)
    return list(df.itertuples(index=False, name=None))


# ----------------------------------------------------------------------------- the real file

@pytest.fixture(scope="module")
def real_rows(raw_path):
    return data.load_rows(raw_path)


@pytest.fixture(scope="module")
def real_csv_dir(real_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("splits")
    for name, part in data.make_splits(real_rows).items():
        data.write_csv(part, out / f"{name}.csv")
    return out


def test_real_file_has_the_chapters_rows(real_rows):
    assert len(real_rows) == 5572
    labels = [label for label, _ in real_rows]
    assert labels.count("ham") == 4825 and labels.count("spam") == 747
    # PARSE.md: a text that starts with `"` is a quoted field ("Gimme a few" was ...).
    assert any(text.startswith("Gimme a few was") for _, text in real_rows)


def test_real_file_parse_equals_pandas(raw_path, real_rows):
    assert real_rows == pandas_rows(raw_path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", data.SPLITS)
def test_real_csv_files_are_the_chapters(real_csv_dir, name):
    n, n_ham, n_spam, size, digest = EXPECTED_CSV[name]
    path = real_csv_dir / f"{name}.csv"
    assert path.stat().st_size == size
    assert sha256(path) == digest
    rows = data.read_csv(path)
    assert len(rows) == n
    assert [label for label, _ in rows].count(0) == n_ham
    assert [label for label, _ in rows].count(1) == n_spam


def test_read_csv_round_trips_the_splits(real_rows, real_csv_dir):
    for name, part in data.make_splits(real_rows).items():
        assert data.read_csv(real_csv_dir / f"{name}.csv") == part


def test_real_splits_equal_the_chapters_pandas_code(real_rows, real_csv_dir):
    expected = chapter_splits(real_rows)
    assert data.make_splits(real_rows) == expected
    # The chapter saves with DataFrame.to_csv(index=None): the same bytes as write_csv.
    pd = pytest.importorskip("pandas")
    for name, part in expected.items():
        frame = pd.DataFrame(part, columns=["Label", "Text"])
        written = frame.to_csv(index=None, lineterminator="\n")
        assert written.encode("utf-8") == (real_csv_dir / f"{name}.csv").read_bytes()


@pytest.fixture(scope="module")
def real_datasets(real_csv_dir):
    tokenizer = data.get_tokenizer()
    train = data.SpamDataset(data.read_csv(real_csv_dir / "train.csv"), tokenizer)
    return {"train": train,
            **{name: data.SpamDataset(data.read_csv(real_csv_dir / f"{name}.csv"), tokenizer,
                                      max_length=train.max_length)
               for name in ("validation", "test")}}


def test_real_max_lengths(real_csv_dir, real_datasets):
    assert real_datasets["train"].max_length == 120
    tokenizer = data.get_tokenizer()
    own = {name: data.SpamDataset(data.read_csv(real_csv_dir / f"{name}.csv"), tokenizer)
           for name in ("validation", "test")}
    assert own["validation"].max_length == 71 and own["test"].max_length == 92
    for ds in real_datasets.values():  # all padded to train's 120
        x, y = ds[0]
        assert x.shape == (120,) and x.dtype == torch.int64 and y.dtype == torch.int64


def test_real_loaders_give_the_chapters_batches(real_datasets):
    torch.manual_seed(123)
    loaders = data.create_loaders(real_datasets)
    assert {name: len(loader) for name, loader in loaders.items()} == \
        {"train": 130, "validation": 19, "test": 38}
    x, y = next(iter(loaders["train"]))
    assert x.shape == (8, 120)
    assert y.tolist() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert x[:, 0].tolist() == [56, 40, 45048, 1135, 35, 25206, 5122, 8491]
    # validation and test keep file order and their last partial batch
    val = list(loaders["validation"])
    assert sum(len(b[1]) for b in val) == 149
    assert val[0][1].tolist() == [real_datasets["validation"][i][1].item() for i in range(8)]


def test_zip_of_the_raw_file_gives_the_same_rows(raw_path, real_rows, tmp_path):
    zip_path = tmp_path / "sms_spam_collection.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(raw_path, "SMSSpamCollection")
        zf.writestr("readme", "The SMS Spam Collection v.1\n")
    assert data.read_raw_text(zip_path) == raw_path.read_text(encoding="utf-8")
    assert data.load_rows(zip_path) == real_rows


def test_cli_writes_the_chapters_files(raw_path, tmp_path, capsys):
    out = tmp_path / "splits"
    data.main(["--data", str(raw_path), "--output-dir", str(out)])
    assert files_in(out) == ["test.csv", "train.csv", "validation.csv"]
    for name, (_, _, _, size, digest) in EXPECTED_CSV.items():
        assert (out / f"{name}.csv").stat().st_size == size
        assert sha256(out / f"{name}.csv") == digest
    printed = capsys.readouterr().out
    assert "Read 5572 messages: 4825 ham, 747 spam" in printed
    assert "1045 rows (528 ham / 517 spam)" in printed
    assert "149 rows (70 ham / 79 spam)" in printed
    assert "300 rows (149 ham / 151 spam)" in printed


def test_cli_missing_data_file_is_a_clean_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        data.main(["--data", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")])
    assert str(e.value.code).startswith("error:") and "does not exist" in str(e.value.code)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tokens

def test_tokenizer_is_gpt2():
    tok = data.get_tokenizer()
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode("Do you have time") == [5211, 345, 423, 640]
    assert tok.n_vocab == 50257
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert data.PAD_ID == 50256
    assert tok.decode([15496, 11, 995]) == "Hello, world"


def test_encode_truncates_and_pads():
    tok = data.get_tokenizer()
    assert data.encode("Hello, world", tok, 5) == [15496, 11, 995, 50256, 50256]
    assert data.encode("Hello, world", tok, 2) == [15496, 11]
    assert data.encode("Hello, world", tok, 5, pad=False) == [15496, 11, 995]
    assert data.encode("Hello, world", tok) == [15496, 11, 995]


def test_spam_dataset_pads_and_truncates():
    tok = data.get_tokenizer()
    rows = [(0, "Hello, world"), (1, "Do you have time")]
    ds = data.SpamDataset(rows, tok)
    assert ds.max_length == 4 and len(ds) == 2
    x, y = ds[0]
    assert x.tolist() == [15496, 11, 995, 50256] and y.item() == 0
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert ds[1][0].tolist() == [5211, 345, 423, 640] and ds[1][1].item() == 1

    longer = data.SpamDataset(rows, tok, max_length=6)
    assert longer[1][0].tolist() == [5211, 345, 423, 640, 50256, 50256]
    shorter = data.SpamDataset(rows, tok, max_length=2)
    assert shorter[0][0].tolist() == [15496, 11] and shorter[1][0].tolist() == [5211, 345]


def test_spam_dataset_without_padding_keeps_lengths():
    tok = data.get_tokenizer()
    rows = [(0, "Hello, world"), (1, "Do you have time")]
    ds = data.SpamDataset(rows, tok, pad=False)
    assert [len(ds[i][0]) for i in range(2)] == [3, 4]
    capped = data.SpamDataset(rows, tok, max_length=3, pad=False)
    assert capped[1][0].tolist() == [5211, 345, 423]


def test_loaders_shuffle_and_drop_only_train():
    tok = data.get_tokenizer()
    rows = [(i % 2, f"message number {i}") for i in range(20)]
    ds = data.SpamDataset(rows, tok)
    torch.manual_seed(123)
    loaders = data.create_loaders({"train": ds, "validation": ds}, batch_size=8)
    assert len(loaders["train"]) == 2 and len(loaders["validation"]) == 3
    val_labels = torch.cat([y for _, y in loaders["validation"]]).tolist()
    assert val_labels == [i % 2 for i in range(20)]
    torch.manual_seed(123)
    first_pass = [y.tolist() for _, y in loaders["train"]]
    assert [len(b) for b in first_pass] == [8, 8]  # the last 4 rows are dropped
    # Each pass draws its order from torch's global RNG: same seed, same order.
    torch.manual_seed(123)
    assert [y.tolist() for _, y in loaders["train"]] == first_pass
    orders = [torch.cat([x[:, 2] for x, _ in loaders["train"]]).tolist() for _ in range(3)]
    assert len({tuple(o) for o in orders}) == 3  # a new order on every pass


# ----------------------------------------------------------------------------- parse

_labels = st.sampled_from(["ham", "spam"])
# Pieces of a message: words, spaces, quotes (also doubled), and quoted parts holding a tab.
_pieces = st.sampled_from(["a", "Zq", "ok then", " ", "  ", '"', '""', '"in\tside"', "\t",
                           "\n", "x"])
_texts = st.builds(lambda lead, parts, tail: ('"' if lead else "") + "".join(parts)
                   + ('"' if tail else ""),
                   st.booleans(), st.lists(_pieces, max_size=6), st.booleans())
_lines = st.one_of(st.just(""), st.builds(lambda label, text: f"{label}\t{text}", _labels, _texts))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(lines=st.lists(_lines, min_size=1, max_size=6), final_newline=st.booleans())
def test_parse_equals_pandas(lines, final_newline):
    pd = pytest.importorskip("pandas")
    text = "\n".join(lines) + ("\n" if final_newline else "")
    fields = [f for f in csv.reader(io.StringIO(text, newline=""), delimiter="\t") if f]
    # Rows that are not `ham|spam<TAB>text` are refused by design (tested below).
    assume(fields and all(len(f) == 2 and f[0] in data.LABELS for f in fields))
    try:
        expected = pandas_rows(text)
    except pd.errors.ParserError:
        # pandas refuses a quote that is still open at the end of the file ("EOF inside
        # string"); data.parse refuses it too (the csv module alone would keep the rest as one
        # text).
        with pytest.raises(data.DataError):
            data.parse(text)
        return
    assert data.parse(text) == expected


def test_parse_quoted_fields_like_the_chapter():
    text = ('ham\t"Gimme a few" was all i said\n'
            'spam\tcall "now"\n'
            'ham\t"runs on\n'
            'across lines\n'
            'up to here" and on\n'
            '\n'
            'spam\t"a\tb"\n')
    assert data.parse(text) == [
        ("ham", "Gimme a few was all i said"),
        ("spam", 'call "now"'),
        ("ham", "runs on\nacross lines\nup to here and on"),
        ("spam", "a\tb"),
    ]
    assert data.parse(text) == pandas_rows(text)


def test_parse_refuses_a_quote_left_open_at_the_end():
    # The chapter's reader (pandas) fails with "EOF inside string" here; Python's csv module
    # alone would return ("spam", "win now\nham\tsee you"), merging the last lines.
    pd = pytest.importorskip("pandas")
    text = 'ham\tfine\nspam\t"win now\nham\tsee you\n'
    with pytest.raises(pd.errors.ParserError):
        pandas_rows(text)
    with pytest.raises(data.DataError):
        data.parse(text)


@pytest.mark.parametrize("text, shown", [
    ("ham\tfine\nno tab on this line\n", "no tab on this line"),
    ("ham\tfine\nfoo\tnot a label\n", "foo"),
    ("ham\tfine\tand a third field\n", "third field"),
    ("Ham\tcapitalised\n", "Ham"),
])
def test_parse_refuses_rows_that_are_not_the_collection(text, shown):
    with pytest.raises(data.DataError, match="not the SMS Spam Collection") as e:
        data.parse(text)
    assert shown in str(e.value)


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_parse_refuses_empty_input(text):
    with pytest.raises(data.DataError, match="no rows"):
        data.parse(text)


def test_read_raw_text_refuses_bad_files(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_raw_text(tmp_path / "missing")
    latin1 = tmp_path / "latin1"
    latin1.write_bytes("ham\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(data.DataError, match="not UTF-8"):
        data.read_raw_text(latin1)
    # a zip whose member is damaged (its CRC no longer matches)
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("SMSSpamCollection", "ham\thello there\n" * 20)
    raw = bytearray(broken.read_bytes())
    raw[raw.index(b"hello")] ^= 0x01
    broken.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="broken zip"):
        data.read_raw_text(broken)


def test_read_csv_refuses_other_files(tmp_path):
    no_header = tmp_path / "a.csv"
    no_header.write_text("0,hello\n")
    with pytest.raises(data.DataError, match="header"):
        data.read_csv(no_header)
    bad_label = tmp_path / "b.csv"
    bad_label.write_text("Label,Text\nham,hello\n")
    with pytest.raises(data.DataError, match="not 'label,text'"):
        data.read_csv(bad_label)


def test_write_csv_quotes_minimally(tmp_path):
    rows = [(0, "plain"), (1, 'say "hi", twice'), (0, "two\nlines")]
    data.write_csv(rows, tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_bytes() == \
        b'Label,Text\n0,plain\n1,"say ""hi"", twice"\n0,"two\nlines"\n'
    assert data.read_csv(tmp_path / "x.csv") == rows
    assert files_in(tmp_path) == ["x.csv"]


# ----------------------------------------------------------------------------- balance, split

@st.composite
def _tables(draw):
    n_spam = draw(st.integers(0, 25))
    n_ham = draw(st.integers(n_spam, 60))
    rows = [("ham", f"ham message {i}") for i in range(n_ham)] + \
        [("spam", f"spam message {i}") for i in range(n_spam)]
    return draw(st.permutations(rows))


@settings(max_examples=40, deadline=None)
@given(rows=_tables())
def test_make_splits_equals_the_chapters_pandas_code(rows):
    assert data.make_splits(rows) == chapter_splits(rows)


def test_splits_are_disjoint_complete_and_deterministic():
    rows = [("ham", f"ham {i}") for i in range(300)] + [("spam", f"spam {i}") for i in range(80)]
    first, second = data.make_splits(rows), data.make_splits(rows)
    assert first == second
    texts = {name: [text for _, text in part] for name, part in first.items()}
    assert [len(texts[name]) for name in data.SPLITS] == [112, 16, 32]
    together = texts["train"] + texts["validation"] + texts["test"]
    assert len(set(together)) == len(together) == 160  # disjoint, balanced: 80 + 80
    assert sum(label for part in first.values() for label, _ in part) == 80
    assert {t for t in together if t.startswith("spam")} == {f"spam {i}" for i in range(80)}
    assert data.make_splits(rows, seed=124) != first


def test_balance_draws_with_the_legacy_numpy_generator():
    rows = [("ham", f"h{i}") for i in range(10)] + [("spam", "s0"), ("spam", "s1")]
    picked = np.random.RandomState(123).permutation(10)[:2]
    assert data.balance(rows, np.random.RandomState(123)) == \
        [(0, f"h{picked[0]}"), (0, f"h{picked[1]}"), (1, "s0"), (1, "s1")]


# ----------------------------------------------------------------------------- download

RAW_TEXT = 'ham\tsee you at 6\nspam\tWIN a "free" prize now\nham\t"ok" then\n'


def make_zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


GOOD_ZIP = make_zip({"SMSSpamCollection": RAW_TEXT, "readme": "about the collection\n"})


def test_fetch_falls_back_to_the_backup_and_caches(http_server, closed_url, tmp_path):
    cache = tmp_path / "cache"
    primary = http_server.url("/primary/sms.zip")  # not served: 404
    backup = http_server.serve("/backup/sms.zip", GOOD_ZIP)
    raw = data.fetch(cache=cache, urls=[primary, backup], backoff=0, retries=2, timeout=5)
    assert raw == cache / "SMSSpamCollection"
    assert raw.read_text(encoding="utf-8") == RAW_TEXT
    assert http_server.requests[0] == "/primary/sms.zip"
    assert http_server.requests[-1] == "/backup/sms.zip"
    assert files_in(cache) == ["SMSSpamCollection"]  # the zip and every .part are gone
    assert data.load_rows(cache=cache) == data.parse(RAW_TEXT)

    # Cached: no network needed any more.
    served = len(http_server.requests)
    again = data.fetch(cache=cache, urls=[closed_url], backoff=0, retries=2, timeout=5)
    assert again == raw and again.read_text(encoding="utf-8") == RAW_TEXT
    assert len(http_server.requests) == served


def test_fetch_with_nothing_reachable_fails_cleanly(closed_url, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match="download failed") as e:
        data.fetch(cache=cache, urls=[closed_url], backoff=0, retries=2, timeout=5)
    assert closed_url in str(e.value)
    assert files_in(cache) == []


_half = len(GOOD_ZIP) // 2
BAD_DOWNLOADS = {
    # name: (body, claimed Content-Length or None, chunked_cut, what the message says)
    "truncated zip": (GOOD_ZIP[:_half], None, False, "not a zip file"),
    "not a zip": (b"<html><body>Service unavailable</body></html>", None, False,
                  "not a zip file"),
    "zip of garbage lines": (make_zip({"SMSSpamCollection": "hello\nworld\n"}), None, False,
                             "not the SMS Spam Collection"),
    "zip without the member": (make_zip({"other.txt": RAW_TEXT}), None, False,
                               "without a SMSSpamCollection"),
    "lying Content-Length": (GOOD_ZIP[:_half], len(GOOD_ZIP), False,
                             f"got {_half} of {len(GOOD_ZIP)} bytes"),
    "chunked transfer cut short": (GOOD_ZIP, None, True, "IncompleteRead"),
}


@pytest.mark.parametrize("case", list(BAD_DOWNLOADS))
def test_fetch_refuses_bad_downloads_and_leaves_nothing(http_server, tmp_path, case):
    body, length, chunked_cut, message = BAD_DOWNLOADS[case]
    url = http_server.serve("/sms.zip", body, length=length, chunked_cut=chunked_cut)
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match="download failed") as e:
        data.fetch(cache=cache, urls=[url], backoff=0, retries=2, timeout=5)
    assert url in str(e.value) and message in str(e.value)
    assert files_in(cache) == []  # no zip, no raw file, no *.part


def test_cache_dir_honours_xdg_cache_home(monkeypatch, tmp_path, http_server):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == tmp_path / "xdg" / "gpt2-classify"
    url = http_server.serve("/sms.zip", GOOD_ZIP)
    raw = data.fetch(urls=[url], backoff=0, retries=1, timeout=5)  # cache=None: cache_dir()
    assert raw == tmp_path / "xdg" / "gpt2-classify" / "SMSSpamCollection"
    assert raw.read_text(encoding="utf-8") == RAW_TEXT

    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty means unset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_dir() == tmp_path / "home" / ".cache" / "gpt2-classify"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert files.cache_dir() == tmp_path / "home" / ".cache" / "gpt2-classify"


def test_download_file_without_check_is_atomic(http_server, tmp_path):
    body = bytes(range(256)) * 300  # 76,800 bytes: several reads
    url = http_server.serve("/blob", body)
    dest = tmp_path / "out" / "blob.bin"
    assert files.download_file([url], dest, check=None, backoff=0, retries=1, timeout=5) == dest
    assert dest.read_bytes() == body
    assert files_in(tmp_path / "out") == ["blob.bin"]

    # A truncated transfer leaves the finished file as it was, and no partial file beside it.
    bad = http_server.serve("/cut", body[:1000], length=len(body))
    with pytest.raises(data.DataError, match=f"got 1000 of {len(body)} bytes"):
        files.download_file([bad], dest, check=None, backoff=0, retries=1, timeout=5)
    assert dest.read_bytes() == body
    assert files_in(tmp_path / "out") == ["blob.bin"]

    fresh = tmp_path / "fresh" / "blob.bin"
    with pytest.raises(data.DataError):
        files.download_file([bad], fresh, check=None, backoff=0, retries=1, timeout=5)
    assert files_in(tmp_path / "fresh") == []


def test_download_file_retries_network_errors_then_names_every_url(http_server, closed_url,
                                                                   tmp_path):
    missing = http_server.url("/missing")
    with pytest.raises(data.DataError) as e:
        files.download_file([closed_url, missing], tmp_path / "x", backoff=0, retries=3, timeout=5)
    message = str(e.value)
    assert message.count(closed_url) == 1  # named once...
    assert "3 tries" in message  # ...though network trouble gets every try
    assert missing in message and "Not Found" in message  # the HTTP 404
    assert http_server.requests == ["/missing"]  # then the next URL, asked once
    assert files_in(tmp_path) == []


# What each kind of failure costs in requests, with 3 tries per URL: an answer that says the file
# is not there (4xx) or a file that is the wrong thing is final for that URL; network trouble (a
# transfer cut short, a server error) is worth trying again, after a growing pause.
DOWNLOAD_CASES = {
    # name: (serve kwargs, requests made to that URL)
    "404": ({"body": b"not here", "status": 404}, 1),
    "403": ({"body": b"forbidden", "status": 403}, 1),
    "503": ({"body": b"busy", "status": 503}, 3),
    "cut short (Content-Length)": ({"body": GOOD_ZIP[:_half], "length": len(GOOD_ZIP)}, 3),
    "cut short (chunked)": ({"body": GOOD_ZIP, "chunked_cut": True}, 3),
    "not a zip": ({"body": b"<html>a login page</html>"}, 1),
    "zip of something else": ({"body": make_zip({"other.txt": RAW_TEXT})}, 1),
}


@pytest.mark.parametrize("case", list(DOWNLOAD_CASES))
def test_download_asks_each_url_as_often_as_the_failure_deserves(http_server, tmp_path, case):
    serve, asked = DOWNLOAD_CASES[case]
    bad = http_server.serve("/first/sms.zip", **serve)
    good = http_server.serve("/backup/sms.zip", GOOD_ZIP)
    raw = data.fetch(cache=tmp_path / "cache", urls=[bad, good], backoff=0, retries=3,
                     timeout=5)
    assert raw.read_text(encoding="utf-8") == RAW_TEXT  # the backup, after the first URL
    assert http_server.requests == ["/first/sms.zip"] * asked + ["/backup/sms.zip"]
    assert files_in(tmp_path / "cache") == ["SMSSpamCollection"]


def test_download_backs_off_between_tries(http_server, tmp_path):
    url = http_server.serve("/cut", GOOD_ZIP[:_half], length=len(GOOD_ZIP))
    backoff = 0.1
    with pytest.raises(data.DataError, match="got .* of .* bytes"):
        files.download_file([url], tmp_path / "x", backoff=backoff, retries=3, timeout=5)
    assert http_server.requests == ["/cut"] * 3
    t = http_server.times
    gaps = [b - a for a, b in zip(t, t[1:])]
    # a pause before each new try, doubling: backoff, then 2 x backoff (sleep waits at least that)
    assert gaps[0] >= backoff and gaps[1] >= 2 * backoff, gaps


def test_write_atomic_gives_files_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "f.txt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "f.txt").read_bytes() == b"x"


def test_write_atomic_interrupted_at_the_swap_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the finished run's weights")

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(target, b"half of a new file")
    monkeypatch.undo()
    assert target.read_bytes() == b"the finished run's weights"
    assert files_in(tmp_path) == ["model.safetensors"]  # no temporary file left beside it
