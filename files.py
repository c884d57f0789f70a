"""Files and run folders: what docs/files-and-errors.md promises, as code. Nothing here knows
about GPT-2.

- atomic writes (`write_atomic`, `write_json`) and the downloader (`download_file`: retries,
  a temporary file renamed only once whole and checked);
- probes run before any long work (`check_writable`, `check_free_space`) and OS errors in words;
- progress bars on stderr, kept off the printed lines (`progress`, `bars_paused`, `Tee`);
- the run folder's lifecycle: planned (`plan_output_dir`), made only once every input passed its
  checks, built aside while a finished run is being replaced (`RunFolder`, `swap_in`), written
  whole (`write_run`) or rescued to a temporary folder when its disk fails (`rescue`), and
  run.json written and read here alone (`write_run`, `read_run_info`).

    python finetune.py --output-dir runs/spam --overwrite   # replaced only once it has finished
"""

import contextlib
import errno
import hashlib
import http.client
import io
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

import ddp

try:
    import fcntl  # the run folder's lock (POSIX; elsewhere runs go unlocked)
except ImportError:
    fcntl = None


class DataError(Exception):
    """A file or download that is not what we need; the message says what to do."""


def cache_dir():
    """Per-user cache folder: $XDG_CACHE_HOME/gpt2-classify, else ~/.cache/gpt2-classify."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gpt2-classify"


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


def check_file(path, what="", fix="check the path"):
    """Raise DataError unless `path` is a regular file: a missing path, a folder, and a pipe
    or device (a FIFO, /dev/zero: its bytes cannot be read twice, or never end) are each named
    as what they are. `what` names the flag, `fix` says what to do for a missing path."""
    path = Path(path)
    where = f"{what} {path}".strip()
    if path.is_file():
        return path
    if path.is_dir():
        raise DataError(f"{where} is a folder; pass a file")
    if os.path.exists(path):
        raise DataError(f"{where} is not a regular file (a pipe, socket or device): its rows "
                        "cannot be read as a file's; save them to a file and pass its path")
    raise DataError(f"{where} does not exist; {fix}")


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


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, content, sync=False):
    """Write bytes to `path` through a temporary file, so it is either absent or complete.
    `content` may also be a function that writes to the open file (a large checkpoint, written
    without a copy of it in memory); `sync` makes the bytes reach the disk before the rename,
    so that a power cut too leaves the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            content(f) if callable(content) else f.write(content)
            if sync:
                f.flush()
                os.fsync(f.fileno())
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


# ------------------------------------------------------------------------------------- run folders

class Tee:
    """Writes to the terminal and to the run's log file at once, a whole line at a time, with
    any progress bar cleared meanwhile: a bar never shares a line with the log."""

    def __init__(self, *streams):
        self.streams, self.pending = streams, ""

    def write(self, text):
        self.pending += text
        if "\n" in self.pending:
            lines, _, self.pending = self.pending.rpartition("\n")
            self._emit(lines + "\n")
        return len(text)

    def _emit(self, text):
        with bars_paused():
            for s in self.streams:
                s.write(text)

    def flush(self):
        if self.pending:
            text, self.pending = self.pending, ""
            self._emit(text)
        for s in self.streams:
            s.flush()


def file_sha256(path):
    """The sha256 of a file, read in 1 MiB pieces (a 6 GB checkpoint never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(tensors, path, metadata=None):
    """Tensors as safetensors, written atomically (`metadata`: strings kept in its header)."""
    write_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                            metadata=metadata))


# An unfinished run's last checkpoint (finetune.py --resume goes on from it); a finished run
# keeps none.
CHECKPOINT = "checkpoint.pt"

# Every file a run writes (run.json lists those of each finished run, too): --overwrite
# replaces a folder only when it holds nothing else.
RUN_FILES = {"run.json", "log.txt", "metrics.json", "model.safetensors", "trained.safetensors",
             "loss-plot.pdf", "loss-plot.png", "accuracy-plot.pdf", "accuracy-plot.png",
             "reliability-plot.pdf", "reliability-plot.png", "data-check.json", CHECKPOINT}


class RunFailed(Exception):
    """A run that stopped after its folder was made; the message says what was kept, where."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept, where."""


def unfinished_path(out):
    """Where a run that will replace the finished run in `out` is built until it finishes."""
    return out.with_name(out.name + ".unfinished")


def run_files(out):
    """The names in `out` that finetune.py wrote (`out` holding a finished run)."""
    try:
        listed = set(read_json(out / "run.json").get("files", []))
    except (OSError, ValueError, AttributeError):
        listed = set()
    return RUN_FILES | listed


def plan_output_dir(cfg):
    """(run folder, whether it holds a finished run that --overwrite replaces), checked before
    any work and without touching anything. Raises ValueError or data.DataError."""
    if cfg.output_dir is None:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        while out.exists():  # two runs started within the same second
            out = out.with_name(out.name + "-1")
    else:
        out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a folder")
    replace = (out / "run.json").is_file()
    if replace and not cfg.overwrite:
        raise ValueError(f"{out} holds a finished run; pass --overwrite to replace it, or "
                         "choose another --output-dir")
    others = sorted(n for n in os.listdir(out) if n not in run_files(out)
                    and not n.endswith(".part")) if out.is_dir() else []
    if others:  # never overwrite or delete what a user put there (their weights, say)
        names = f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
        if replace:
            raise ValueError(f"--overwrite would replace the run folder {out}, but it also "
                             f"holds {names}, which finetune.py did not write; move them out "
                             "first, or choose another --output-dir")
        raise ValueError(f"--output-dir {out} already holds {names}, which finetune.py did not "
                         "write; choose a new or empty folder")
    if replace:
        if (unfinished_path(out) / "run.json").exists():
            raise ValueError(f"{unfinished_path(out)} holds a finished run that was never moved "
                             f"into {out}; rename or delete it first")
    check_writable(out, "--output-dir", "choose another --output-dir, on a disk that can be "
                        "written")
    return out, replace


def plan_resume(folder):
    """(run folder, whether it replaces a finished run, the folder holding the checkpoint) of
    the unfinished run in `folder` that --resume goes on with: `folder` itself, or where it
    holds a finished run that an --overwrite run was replacing, folder.unfinished (either may
    be named). Raises ValueError, saying what to do, where there is nothing to resume."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--resume {folder}: no such folder; pass the run folder of the run "
                         "to go on with")
    out = folder
    if folder.name.endswith(".unfinished") and (folder / CHECKPOINT).is_file():
        named = folder.with_name(folder.name[:-len(".unfinished")])
        out = named if is_finished(named) else folder
    replace = is_finished(out) and (unfinished_path(out) / CHECKPOINT).is_file()
    work = unfinished_path(out) if replace else out
    if is_finished(work):
        raise ValueError(f"--resume {folder}: the run there has finished (run.json); there is "
                         f"nothing to resume: evaluate.py --run {folder} uses it, and "
                         "--overwrite trains it again")
    if not (work / CHECKPOINT).is_file() and not (work / "log.txt").is_file():
        model = (work / "config.json").is_file() or (work / "model.safetensors").is_file()
        raise ValueError(f"--resume {folder}: not a run folder (a run folder of finetune.py "
                         f"holds log.txt, and while unfinished {CHECKPOINT}); "
                         + (f"it holds a model: to train from it, pass --weights {folder} and "
                            "a new --output-dir" if model else
                            "pass the folder of the run to go on with"))
    if not (work / CHECKPOINT).is_file():
        raise ValueError(f"--resume {folder}: {work} holds no checkpoint ({CHECKPOINT}): its "
                         "run stopped before its first epoch ended (or ran with "
                         "--no-checkpoints); start it again: python finetune.py --output-dir "
                         f"{out} with the run's flags")
    return out, replace, work


def drop_checkpoint(folder):
    """Remove the checkpoint of a run that has just finished (its run.json written), with any
    temporary file of one whose writing was cut short: a finished run keeps none."""
    for p in [folder / CHECKPOINT, *folder.glob(CHECKPOINT + ".*.part")]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def check_free_space(out, tensors):
    """Refuse a run whose files will not fit on the disk, before training rather than after."""
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + (2 << 20)  # + plots
    there = existing_parent(out)
    free = shutil.disk_usage(there).free
    if free < need:
        raise ValueError(f"--output-dir {out}: the run will write about {need / 1e6:,.0f} MB, but "
                         f"only {free / 1e6:,.0f} MB are free on the disk of {there}; free some "
                         "space or choose another --output-dir")


class RunLog:
    """log.txt: held in memory until the run folder is made, then written there line by line
    (and still kept in memory: a few kB, for a run saved elsewhere when its folder fails)."""

    def __init__(self):
        self.early, self.file = io.StringIO(), None

    def write(self, text):
        self.early.write(text)
        if self.file:
            self.file.write(text)
        return len(text)

    def text(self):
        return self.early.getvalue()

    def flush(self):
        if self.file:
            self.file.flush()


class RunFolder:
    """The run folder, made only when `make()` is called: once every input has passed its checks.

    Used as `with RunFolder(out, replace) as folder:` around the whole run, it decides what a
    failure leaves. Before `make()`, nothing: the error passes through and no folder was made.
    After it, the log (with the error line) is kept and the error raised says what was kept,
    where. A new or unfinished `out` is written in place; a finished run in `out` (--overwrite)
    stays untouched while the new run is built in out.unfinished, which takes its place only
    once it has finished (`swap_in`).
    """

    def __init__(self, out, replace, errors=(), resumed_log=None):
        self.out, self.replace, self.log = out, replace, RunLog()
        self.errors = errors  # the caller's error types whose message is the error line
        self.work = unfinished_path(out) if replace else out
        self.made, self.lock = False, None
        self.run_id = uuid.uuid4().hex  # written into each of its files: they belong together
        # --resume: the log as its checkpoint kept it (what came later is written again)
        self.resumed_log = resumed_log

    def make(self):
        """Make the folder, holding it alone from here to the run's end (`hold`)."""
        work = self.work
        self.lock = hold(self.out)
        if not self.replace and (self.out / "run.json").is_file():
            raise ValueError(f"{self.out} holds a finished run now (another finetune.py finished "
                             "there meanwhile); pass --overwrite to replace it, or choose "
                             "another --output-dir")
        if self.replace and work.exists() and self.resumed_log is None:
            shutil.rmtree(work)  # an earlier attempt that did not finish
        work.mkdir(parents=True, exist_ok=True)
        if self.resumed_log is not None:
            early, self.log.early = self.log.text(), io.StringIO()
            self.log.early.write(self.resumed_log + early)
        self.log.file = open(work / "log.txt", "w", encoding="utf-8", buffering=1)
        self.log.file.write(self.log.text())
        self.made = True
        return work

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if not self.made:
            release(self.lock)
            if type(e) in (ValueError, DataError, *self.errors):  # after "Run folder:" was said
                made = f"nothing was written to {self.out}" if self.out.exists() else \
                    f"nothing was written: the run folder {self.out} was not made"
                raise type(e)(f"{e} ({made})") from e
            return False
        try:
            self.log.file.close()
            if e is None and self.replace:
                swap_in(self.work, self.out)
        except OSError as late:
            e = late
        finally:
            release(self.lock)
        if e is None:
            return False
        error = self.failed(e)
        if error is e:
            return False  # an unexpected error (a bug): logged, and raised as it is
        raise error from e

    def failed(self, e):
        """The error to raise for `e`, its line written to the log as well."""
        out, work = self.out, self.work
        if work == out:
            kept = f"{out / 'log.txt'} keeps the log; the run is unfinished (no run.json)"
        else:
            kept = (f"the finished run in {out} is unchanged; this run's log is in "
                    f"{work / 'log.txt'}")
        if (work / CHECKPOINT).is_file():
            kept += (f"; {work / CHECKPOINT} its last checkpoint: python finetune.py --resume "
                     f"{out} goes on from there")
        if isinstance(e, KeyboardInterrupt):
            error, message = Interrupted, "interrupted"
        elif isinstance(e, OSError):
            error, message = RunFailed, f"could not write {describe_os_error(e)}"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                message += "; free some space, then train again"
        elif isinstance(e, (ValueError, DataError, RunFailed, *self.errors)):
            error, message = RunFailed, str(e)
        else:
            error, message = None, f"{type(e).__name__}: {e}"
        line = f"{message}. Kept: {kept}"
        try:
            with open(work / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{'' if error is Interrupted else 'error: '}{line}\n")
        except OSError:
            pass  # a full disk, say: the line still goes to the terminal
        return error(line) if error else e


def hold(out):
    """Hold the run folder `out` (made here if need be) alone until `release`: an exclusive
    lock on the folder itself, which the system drops when the process ends, however it ends.
    ValueError where another process holds it: two runs never write into one folder."""
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"another finetune.py is writing to {out} (it holds the folder); wait "
                         "for it to finish, or choose another --output-dir") from None
    return fd


def release(lock):
    if lock is not None:
        os.close(lock)  # closing the descriptor drops the lock


class NoFolder:
    """The run folder of a process other than rank 0 under torchrun: nothing written or printed."""

    def __init__(self):
        self.log = open(os.devnull, "w")

    def make(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.close()
        return False


def swap_in(work, out):
    """Move the finished run in `work` to `out`, in place of the finished run there.

    Two renames: at every moment `out` holds a finished run, except between them, where a crash
    would leave the old run in out.replaced and the new one in out.unfinished, both whole.
    """
    old = out.with_name(out.name + ".replaced")
    if old.exists():
        shutil.rmtree(old)  # a run replaced earlier, by a swap cut short after its second rename
    os.rename(out, old)
    os.rename(work, out)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old)


def write_run(folder, tensors, metrics, info, plots=None):
    """The finished run's files in `folder`: weights, metrics, plots (`plots(folder)` writes
    them and returns their names), then run.json, whose presence marks the run as finished
    (every file written atomically). The weights' header and metrics.json carry run.json's
    `run_id`, so that files of two runs never pass for one (`check_belongs`)."""
    save_model(tensors, folder / info["weights_file"], {"run_id": info["run_id"]})
    write_json(folder / "metrics.json", metrics)
    files = plots(folder) if plots else []
    files += [info["weights_file"], "metrics.json", "run.json", "log.txt"]
    write_json(folder / "run.json", {**info, "files": sorted(files)})


def rescue(e, tensors, metrics, info, plots, log):
    """What to say when the run folder could not take the finished run: the run is written,
    whole, to a new folder in the system's temporary folder (another disk, often) instead."""
    message = f"could not write {describe_os_error(e)}"
    try:
        spare = Path(tempfile.mkdtemp(prefix="gpt2-classify-run-"))
        write_run(spare, tensors, metrics, info, plots)
        write_atomic(spare / "log.txt", log.text().encode("utf-8"))
    except OSError as again:
        return f"{message}, nor in the temporary folder ({describe_os_error(again)}); " \
            "free some space, then train again"
    return (f"{message}; the finished run was saved to {spare} instead (evaluate.py --run "
            f"{spare} uses it): move it where you want it")


# ------------------------------------------------------------------------------------ reading a run

class RunError(Exception):
    """A run folder that cannot be used; the message says why and what to do."""


# What run.json must hold (finetune.py writes them all; "data" is optional: older runs lack it).
RUN_KEYS = ("model", "num_classes", "class_names", "max_length", "pad_id", "padding",
            "token_position", "average_embeddings", "batch_size", "final_train_dropped")


def is_finished(folder):
    """finetune.py writes run.json last: its presence marks a finished run."""
    return (Path(folder) / "run.json").is_file()


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_run_info(run_dir, model_fields=()):
    """A finished run's run.json, checked: RunError (saying what to do) where `run_dir` is no
    finished run or its run.json lacks a key (`model_fields`: the keys its "model" must hold)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        hint = ""
        if (run_dir.with_name(run_dir.name + ".unfinished") / "run.json").is_file():
            hint = (f"; {run_dir}.unfinished holds a finished run that a crash kept from being "
                    f"moved there: rename it to {run_dir}")
        raise RunError(f"--run {run_dir} is not a folder; pass a run folder made by "
                       f"finetune.py{hint}")
    if not (run_dir / "run.json").is_file():
        if (run_dir / "config.json").is_file():
            raise RunError(f"{run_dir} is a model folder (config.json), not a run of "
                           "finetune.py: fine-tune it first (python finetune.py --weights "
                           f"{run_dir} ...), then pass that run's folder as --run")
        if not (run_dir / "log.txt").is_file():
            raise RunError(f"{run_dir} is not a finished run of finetune.py, nor one that "
                           "started (no run.json, no log.txt); pass a run folder, such as "
                           "runs/<timestamp>")
        raise RunError(f"{run_dir} is not a finished run (no run.json): its training did not "
                       "finish; run finetune.py again or pass another --run")
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except ValueError as e:
        raise RunError(f"{run_dir / 'run.json'} is damaged ({e}); train the run again") from e
    missing = [k for k in RUN_KEYS if k not in info] if isinstance(info, dict) else ["model"]
    if not missing and isinstance(info["model"], dict):
        missing = [f"model.{name}" for name in model_fields if name not in info["model"]]
    if not missing and isinstance(info.get("data"), dict):
        missing = [f"data.{k}" for k in ("path", "sha256") if k not in info["data"]]
    if missing:
        raise RunError(f"{run_dir / 'run.json'} has no {', '.join(map(repr, missing))} "
                       "(edited by hand?); put it back as finetune.py wrote it, or train the "
                       "run again")
    return info


def latest_run(root="runs"):
    """The most recently finished run folder under `root` (by its run.json's time)."""
    finished = sorted(Path(root).glob("*/run.json"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not finished:
        raise RunError(f"no finished run under {root}/; train one with python finetune.py, or "
                       "pass --run DIR")
    return finished[-1].parent


def check_belongs(run_dir, info, weights_file):
    """RunError unless the run's weights file and metrics.json carry run.json's run id: a
    folder that mixes two runs' files (two runs given one --output-dir by hand, a file copied
    in) is refused, not scored. Runs made before run ids were written are taken as they are."""
    run_id = info.get("run_id")
    if run_id is None:
        return
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            theirs = (f.metadata() or {}).get("run_id")
    except Exception:  # unreadable: read_tensors says so, in its own words
        return
    metrics = Path(run_dir) / "metrics.json"
    try:
        measured = read_json(metrics).get("run_id") if metrics.is_file() else run_id
    except (OSError, ValueError, AttributeError):
        measured = None
    for name, other in ((weights_file.name, theirs), ("metrics.json", measured)):
        if other != run_id:
            raise RunError(f"{Path(run_dir) / name} is not this run's (its run id is {other}, "
                           f"run.json's {run_id}): the folder mixes the files of two runs; "
                           "train the run again into a folder of its own")
