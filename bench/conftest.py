"""The benchmarks' set-up: options, sizes, data, the projection of the chapter's run, the summary.

    python -m pytest bench --benchmark-only                  # measure this machine
    python -m pytest bench --benchmark-only --full-epochs    # also whole epochs where slow (CPU)
    python -m pytest -q bench --benchmark-disable            # smoke pass on tiny sizes (CI)

Each test in test_speed.py times one piece of the chapter's training phase (a training step, an
evaluation batch, a trunk-cache fill, optionally a whole epoch) for one row: a device, a precision,
a variant and a trainable set. `Results` gathers the pieces, projects the chapter's whole training
phase from them (section 6.7), and the end of the session prints that as a table and writes it as
Markdown (`--bench-summary`, default bench-summary.md). This directory has its own conftest so
that `pytest bench` and the project's tests/ never share fixtures.
"""

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import data
import ddp
import files
import gpt
import shortcuts

# ----------------------------------------------------------------------------- the chapter's run
# Sections 6.3 and 6.7: 1,045 training examples in 130 batches of 8 x 120 tokens, 5 epochs;
# every 50 steps the loss over the first 5 batches of train and of validation; after each epoch
# the accuracy over the first 5 batches of each.
EPOCHS, STEPS_PER_EPOCH, EVAL_FREQ, EVAL_ITER = 5, 130, 50, 5
STEPS = EPOCHS * STEPS_PER_EPOCH  # 650
LOSS_EVALS = len(range(0, STEPS, EVAL_FREQ))  # 13: steps 0, 50, ..., 600
EVAL_BATCHES = LOSS_EVALS * 2 * EVAL_ITER + EPOCHS * 2 * EVAL_ITER  # 130 + 50 = 180
# Epoch 1 alone: loss evaluations at steps 0, 50 and 100, then its accuracies.
FIRST_EPOCH_EVAL_BATCHES = len(range(0, STEPS_PER_EPOCH, EVAL_FREQ)) * 2 * EVAL_ITER + 2 * EVAL_ITER
CHAPTER_BATCH = 8
# The trunk cache computes the frozen part once per distinct example that the phase reads: every
# training example (five shuffles reach all 1,045) and the 40 validation examples evaluated.
DISTINCT_EXAMPLES = 1045 + EVAL_ITER * CHAPTER_BATCH  # 1,085
# finetune.py fills the cache ahead of the loop in batches of shortcuts.FILL_BATCH (16): the fill
# benchmark times one such batch, and the projection counts 1085/16 of them.

# The chapter's timings (5 epochs, GPT-2 small): (words in the device name, trainable, figure).
CHAPTER_FIGURES = [
    (("A100",), "all", "0.69 min (A100, all layers, table #5)"),
    (("A100",), "last_block", "0.28 min (A100, table #1); < 0.5 min (text)"),
    (("V100",), "last_block", "< 0.5 min (V100)"),
    (("3060",), "last_block", "0.67 min (RTX 3060)"),
    (("Apple", "M3"), "last_block", "~6 min (M3 MacBook Air)"),
]
CHAPTER_NOTE = ("Chapter's figures (5 epochs, GPT-2 small, pretrained): ~6 min on "
                "an M3 MacBook Air; under 0.5 min on a V100 or A100; 0.67 min on an RTX 3060; "
                "0.28 min on an A100 (0.69 min with all layers trainable).")


def checked_mfu(flops, seconds, peak_tflops, what):
    """Model FLOP utilisation: `flops` done in `seconds` over the peak. Over 100% is impossible,
    so it means a wrong peak or a wrong FLOP count: refused (ValueError), never printed."""
    mfu = flops / seconds / (peak_tflops * 1e12)
    if mfu > 1:
        raise ValueError(f"MFU {mfu:.0%} for {what}: over 100%, so the peak "
                         f"({peak_tflops:.3g} TFLOP/s) or the FLOP count ({flops:.3g}) is wrong")
    return mfu


def chapter_figure(device_name, trainable):
    for words, which, figure in CHAPTER_FIGURES:
        if which == trainable and any(w.lower() in device_name.lower() for w in words):
            return figure
    return "-"


# ----------------------------------------------------------------------------- options

def pytest_addoption(parser):
    group = parser.getgroup("chapter-6 benchmarks (bench/)")
    group.addoption("--peak-tflops", type=float, metavar="X",
                    help="peak TFLOP/s used for MFU, for every row (default: measured in this "
                    "session by square matmuls, per device and precision)")
    group.addoption("--full-epochs", action="store_true", default=False,
                    help="time whole epochs (130 steps) everywhere, slow on a CPU (minutes "
                    "per row and round); without it (and without BENCH_FULL=1) only where the "
                    "projected epoch takes 30 s or less")
    group.addoption("--bench-rounds", type=int, metavar="N",
                    help="timed rounds per benchmark, after the warm-up (default on CPU: 3, 1 for "
                    "all-layers rows and epochs, and for a piece of milliseconds as many as fill "
                    "1 s, up to 50; on a GPU: 20, 2 for epochs)")
    group.addoption("--bench-summary", metavar="PATH",
                    help="write the summary table as Markdown here (default: bench-summary.md in "
                    "the current directory; in the smoke pass nothing unless given)")


def pytest_xdist_auto_num_workers(config):
    """setup.cfg spreads tests/ over the cores with `-n auto`; timings taken beside other workers
    would measure them too (pytest-benchmark turns itself off under xdist), so bench/ runs in one
    process."""
    return 0


def pytest_configure(config):
    config.stash[RESULTS] = Results(time.time(), _loadavg())


def _loadavg():
    try:
        return os.getloadavg()
    except OSError:  # not on every platform
        return None


# ----------------------------------------------------------------------------- sizes and data

@dataclass(frozen=True)
class Sizes:
    """What is measured: the chapter's sizes, or tiny ones for the smoke pass."""
    tiny: bool
    cfg: gpt.GPTConfig
    batch: int
    tokens: int
    train_examples: int  # for the whole-epoch loaders
    val_examples: int
    fill_batch: int  # examples per trunk-cache fill, as finetune.py fills ahead of the loop


def is_tiny(config):
    """The smoke pass: benchmarks disabled (each function runs once, untimed), or BENCH_TINY=1."""
    disabled = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
    return disabled or os.environ.get("BENCH_TINY") == "1"


@pytest.fixture(scope="session")
def sizes(pytestconfig):
    if is_tiny(pytestconfig):
        cfg = gpt.GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2)
        return Sizes(True, cfg, batch=2, tokens=16, train_examples=6, val_examples=4,
                     fill_batch=4)
    return Sizes(False, gpt.PRESETS["small"][0], batch=CHAPTER_BATCH, tokens=120,
                 train_examples=1045, val_examples=149, fill_batch=shortcuts.FILL_BATCH)


@pytest.fixture(scope="session")
def full_epochs(pytestconfig):
    return pytestconfig.getoption("full_epochs") or os.environ.get("BENCH_FULL") == "1"


@pytest.fixture(scope="session")
def token_data(sizes):
    """{"train": (ids (N, T), labels (N,)), "validation": (...), "source": str}.

    The chapter's tokenized splits when the raw data is at hand ($SMS_SPAM_DATA, else
    ../shared/data/SMSSpamCollection beside the repository); otherwise random token ids of the
    same shape with labels 0/1. The tiny sizes cut both to their first examples and tokens.
    """
    default = Path(__file__).resolve().parents[1].parent / "shared/data/SMSSpamCollection"
    path = os.environ.get("SMS_SPAM_DATA")
    if path and not Path(path).is_file():
        raise pytest.UsageError(f"SMS_SPAM_DATA={path} is not a file")
    path = Path(path) if path else default
    n = {"train": sizes.train_examples, "validation": sizes.val_examples}
    if path.is_file():
        splits = data.make_splits(data.load_rows(path))
        tokenizer = data.get_tokenizer()
        train = data.SpamDataset(splits["train"], tokenizer)
        sets = {"train": train,
                "validation": data.SpamDataset(splits["validation"], tokenizer, train.max_length)}
        out = {"source": f"SMS Spam Collection ({path}), padded to {train.max_length}"
               + (f", cut to the first {sizes.tokens} tokens" if sizes.tiny else "")}
        for name, ds in sets.items():
            ids = torch.tensor(ds.encoded[:n[name]])[:, :sizes.tokens]
            out[name] = ids, torch.tensor(ds.labels[:n[name]])
        return out
    gen = torch.Generator().manual_seed(123)  # its own generator: torch's global RNG stays put
    out = {"source": "synthetic token ids (no SMSSpamCollection found)"}
    for name in n:
        out[name] = (torch.randint(0, sizes.cfg.vocab_size, (n[name], sizes.tokens), generator=gen),
                     torch.randint(0, 2, (n[name],), generator=gen))
    return out


# ----------------------------------------------------------------------------- global state

@pytest.fixture(scope="session", autouse=True)
def _all_cpu_threads():
    """Use every core this process may run on (never fewer than torch chose); restore after."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(before, cores or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_rng():
    """The benchmarks seed torch (123, as the chapter does); leave its RNGs as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


# ----------------------------------------------------------------------------- results

RESULTS = pytest.StashKey()


@pytest.fixture(scope="session")
def results(pytestconfig):
    return pytestconfig.stash[RESULTS]


@dataclass
class Row:
    """One line of the summary: what a device does with one precision, variant, trainable set."""
    device: str
    device_name: str
    precision: str
    variant: str
    trainable: str
    batch: int
    tokens: int
    fill_batch: int = None  # examples per fill (the fill's seconds and FLOPs are per fill)
    trunk: bool = None  # whether the classifier caches the frozen trunk (then fills count)
    peak_tflops: float = None
    seconds: dict = field(default_factory=dict)  # kind -> median seconds of one call
    flops: dict = field(default_factory=dict)  # kind -> model FLOPs of one call
    split: dict = None  # a step's median ms in forward, backward, optimizer and the rest
    infos: list = field(default_factory=list)  # the benchmarks' extra_info dicts, kept current
    notes: list = field(default_factory=list)

    def checked_mfu(self, flops, seconds, what):
        """This row's MFU for `flops` done in `seconds` (see `checked_mfu`)."""
        return checked_mfu(flops, seconds, self.peak_tflops,
                           f"{self.device_name} {self.precision} {self.variant} "
                           f"{self.trainable} {what}")

    def phase(self):
        """The chapter's training phase (section 6.7) projected from the pieces measured so far:
        seconds, FLOPs and what is still missing. 650 steps + 180 evaluation batches, plus, with
        the trunk cache, one fill per distinct example the phase reads (1,085)."""
        parts = {"step": STEPS, "eval": EVAL_BATCHES}
        if self.trunk:
            parts["fill"] = DISTINCT_EXAMPLES / self.fill_batch
        return self._total(parts)

    def first_epoch(self):
        """Epoch 1 alone (what the epoch benchmark times): 130 steps, 40 evaluation batches and,
        with the cache, its fills (all of it is new then)."""
        parts = {"step": STEPS_PER_EPOCH, "eval": FIRST_EPOCH_EVAL_BATCHES}
        if self.trunk:
            parts["fill"] = DISTINCT_EXAMPLES / self.fill_batch
        return self._total(parts)

    def _total(self, parts):
        missing = [k for k in parts if k not in self.seconds]
        if missing or self.trunk is None:
            return None, None, missing or ["step"]
        seconds = sum(n * self.seconds[k] for k, n in parts.items())
        flops = sum(n * self.flops[k] for k, n in parts.items())
        return seconds, flops, []

    def projection(self):
        """The figures every benchmark of this row reports, from what is measured so far."""
        seconds, flops, missing = self.phase()
        if seconds is None:
            return {"projection": f"needs {', '.join(missing)}"}
        first, _, _ = self.first_epoch()
        out = {"projected_epoch_s": seconds / EPOCHS,  # the mean epoch of the five
               "projected_first_epoch_s": first,
               "projected_run_min": seconds / 60,
               "run_examples_per_s": STEPS * self.batch / seconds,
               "run_tokens_per_s": STEPS * self.batch * self.tokens / seconds}
        if self.peak_tflops:
            out["run_mfu"] = self.checked_mfu(flops, seconds, "projected phase")
        return out


PROJECTION_KEYS = ("projection", "projected_epoch_s", "projected_first_epoch_s",
                   "projected_run_min", "run_examples_per_s", "run_tokens_per_s", "run_mfu")


class Results:
    """Measured rows, filled by the tests and read by the summary; never hard-coded."""

    def __init__(self, start, load_start):
        self.rows = {}
        self.start, self.load_start = start, load_start
        self.context = {}  # data source, threads, peak source, rounds: for the summary's header

    def row(self, **key):
        k = tuple(sorted(key.items()))
        if k not in self.rows:
            self.rows[k] = Row(**key)
        return self.rows[k]

    def record(self, row, kind, seconds, flops, extra_info):
        """Add one measured piece to `row`, and bring every extra_info of the row up to date."""
        row.seconds[kind], row.flops[kind] = seconds, flops
        row.infos.append(extra_info)
        projection = row.projection()
        for info in row.infos:
            for key in PROJECTION_KEYS:
                info.pop(key, None)
            info.update(projection)


# ----------------------------------------------------------------------------- the summary

def _fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value * scale, spec)


def summary_rows(results):
    """The summary table as lists of strings, with its header first."""
    head = ["device", "precision", "variant", "trainable", "step ms", "eval ms", "fill ms/batch",
            "train ex/s", "MFU", "epoch s", "epoch 1 s meas. (proj.)", "5 epochs min",
            "speed-up vs plain", "chapter"]
    rows = list(results.rows.values())
    lines = [head]
    for r in rows:
        seconds, flops, missing = r.phase()
        base = _baseline(rows, r)
        base_s = base.phase()[0] if base is not None else None
        if seconds is None:
            speed = "-"
        elif r is base:
            speed = "1.00x (baseline)"
        elif base_s is not None:
            other = "" if base.trainable == r.trainable else f" (vs {base.trainable})"
            speed = f"{base_s / seconds:.2f}x{other}"
        else:
            speed = "-"
        first, _, _ = r.first_epoch()
        measured = r.seconds.get("epoch")
        epoch1 = "-" if measured is None else f"{measured:.1f} ({_fmt(first, '.1f')})"
        mfu = None
        if seconds is not None and r.peak_tflops:
            mfu = r.checked_mfu(flops, seconds, "projected phase")
        lines.append([
            r.device_name, r.precision, r.variant, r.trainable,
            _fmt(r.seconds.get("step"), ".1f", 1e3), _fmt(r.seconds.get("eval"), ".1f", 1e3),
            _fmt(r.seconds.get("fill"), ".1f", 1e3) if r.trunk else "-",
            "-" if seconds is None else f"{STEPS * r.batch / seconds:.1f}",
            "-" if mfu is None else f"{mfu:.1%}",
            "-" if seconds is None else f"{seconds / EPOCHS:.1f}",
            epoch1,
            f"needs {', '.join(missing)}" if seconds is None else f"{seconds / 60:.2f}",
            speed, chapter_figure(r.device_name, r.trainable)])
    return lines


def roofline_rows(results):
    """Per row, the distance to the machine's limit: the fill's achieved TFLOP/s against the
    measured peak, and a training step's milliseconds split into forward, backward, optimizer
    and the rest (zero_grad, Python, the loss's .item() none: see test_train_step)."""
    head = ["device", "precision", "variant", "trainable", "fill TFLOP/s", "peak TFLOP/s",
            "fill % of peak", "step ms", "forward ms", "backward ms", "optimizer ms", "rest ms"]
    lines = [head]
    for r in results.rows.values():
        fill = None
        if r.trunk and "fill" in r.seconds:
            fill = r.flops["fill"] / r.seconds["fill"] / 1e12
        split = r.split or {}
        lines.append([
            r.device_name, r.precision, r.variant, r.trainable, _fmt(fill, ".3f"),
            _fmt(r.peak_tflops, ".3f"),
            "-" if fill is None or not r.peak_tflops else f"{fill / r.peak_tflops:.0%}",
            _fmt(r.seconds.get("step"), ".1f", 1e3),
            *(_fmt(split.get(k), ".1f") for k in ("forward", "backward", "optimizer", "rest"))])
    return lines


def limit_rows(results):
    """The headline, per row with the trunk cache: the distance to this machine's limit. The
    floor is the chapter's phase with the cache's fill (1,085 examples through the frozen blocks)
    at the measured peak and every step and evaluation free; our time is the projected phase; the
    share is floor / ours. Beside it, the ratio to the chapter's code (the `plain` row)."""
    head = ["device", "precision", "variant", "trainable", "floor s (fill FLOPs at peak)",
            "ours s (projected phase)", "share of the limit", "fill s", "steps s", "evals s",
            "vs the chapter's code"]
    lines = [head]
    rows = list(results.rows.values())
    for r in rows:
        seconds, _, _ = r.phase()
        if not r.trunk or seconds is None or not r.peak_tflops:
            continue
        fills = DISTINCT_EXAMPLES / r.fill_batch
        floor = fills * r.flops["fill"] / (r.peak_tflops * 1e12)
        base = _baseline(rows, r)
        base_s = base.phase()[0] if base is not None else None
        lines.append([
            r.device_name, r.precision, r.variant, r.trainable, f"{floor:.1f}", f"{seconds:.1f}",
            f"{floor / seconds:.0%}", f"{fills * r.seconds['fill']:.1f}",
            f"{STEPS * r.seconds['step']:.1f}", f"{EVAL_BATCHES * r.seconds['eval']:.1f}",
            "-" if base_s is None else f"{base_s / seconds:.2f}x"])
    return lines


def cpu_line():
    """The CPU named, with whether it has AMX tiles (and whether oneDNN's bf16 kernels run)."""
    name = ddp.device_name(torch.device("cpu"))
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() if torch.backends.mkldnn.is_available() \
        else False
    return (f"CPU: {name}; AMX: {'yes' if shortcuts.HAS_AMX else 'no'}; oneDNN bf16: "
            f"{'yes' if bf16 else 'no'}; {os.cpu_count()} logical CPUs.")


def _baseline(rows, r):
    """`plain` on the same device: same precision and trainable set if measured, else fp32 with
    the same trainable set, else fp32 with the chapter's default (last block)."""
    for precision, trainable in ((r.precision, r.trainable), ("fp32", r.trainable),
                                 ("fp32", "last_block")):
        for b in rows:
            if (b.device, b.variant, b.precision, b.trainable) == \
                    (r.device, "plain", precision, trainable) and b.phase()[0] is not None:
                return b
    return None


def markdown_table(lines):
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    fmt = [f"| {' | '.join(c.ljust(w) for c, w in zip(line, widths))} |" for line in lines]
    return [fmt[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *fmt[1:]]


def summary_markdown(results, tiny, wall_s, load_end):
    ctx = results.context
    title = "# Chapter 6 fine-tuning: benchmark summary"
    if tiny:
        title += " (SMOKE PASS: tiny model, one untimed call each; not a measurement)"
    load = "unknown"
    if results.load_start is not None and load_end is not None:
        load = f"{results.load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end"
    out = [title, "",
           f"torch {torch.__version__}, {platform.python_implementation()} "
           f"{platform.python_version()}, {ctx.get('threads', '?')} CPU threads; "
           f"1-minute load average {load}; suite wall time {wall_s:.0f} s.",
           f"Data: {ctx.get('data', '?')}. Random GPT-2 weights (seed 123); batches of "
           f"{ctx.get('shape', '?')}. Times: the median of the timed rounds "
           f"({ctx.get('rounds', '?')}).",
           cpu_line(),
           "",
           *markdown_table(summary_rows(results)),
           "",
           "The distance to this machine's limit (the headline): the floor is the fill's FLOPs "
           "at the measured peak, with the 650 steps and 180 evaluations free; the share is "
           "floor / ours:",
           "",
           *(markdown_table(limit_rows(results)) if len(limit_rows(results)) > 1
             else ["(no row with the trunk cache and a whole projection)"]),
           "",
           "Distance to the limit (the fill: FLOPs of one fill over its median time, against "
           "the measured peak; a step: the medians of its parts, timed apart in extra rounds):",
           "",
           *markdown_table(roofline_rows(results)),
           "",
           "- Projection of the training phase (section 6.7): 650 steps + 180 evaluation batches "
           "(13 loss evaluations and 5 accuracies, 5 + 5 batches each); with the trunk cache "
           "(`shortcuts`, last block) also one fill per distinct example read (1,085 = "
           f"1,045 train + 40 validation), in batches of {shortcuts.FILL_BATCH} as finetune.py "
           "fills ahead of the loop (`fill ms/batch` is one such batch), i.e. "
           f"1085/{shortcuts.FILL_BATCH} fills; the cached step and evaluation are then timed on "
           "cached examples. `epoch s` is the mean of the five epochs; `epoch 1 s` a measured "
           "whole first epoch (`finetune.train_classifier_simple`, cold cache) with its "
           "projection.",
           "- `train ex/s`: the 5,200 training examples over the projected phase (evaluations "
           "and fills included). MFU: model FLOPs (6 x params x tokens for trained matmuls, "
           "2 x for frozen ones, attention 4 T Tq E per layer forward, x 3 when trained) per "
           f"second over the peak ({ctx.get('peak', '?')}).",
           "- Speed-up: the `plain` row's projected minutes over this row's, on the same device "
           "(same precision and trainable set where measured, else plain fp32).",
           f"- {CHAPTER_NOTE} They use pretrained weights; speed does not depend on the values.",
           ]
    notes = sorted({n for r in results.rows.values() for n in r.notes})
    out += [f"- Note: {n}" for n in notes]
    return "\n".join(out) + "\n"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(RESULTS, None)
    if not results or not results.rows:
        return
    tiny = is_tiny(config)
    text = summary_markdown(results, tiny, time.time() - results.start, _loadavg())
    tr = terminalreporter
    tr.write_sep("=", "chapter-6 benchmark summary")
    for line in text.splitlines():
        tr.write_line(line)
    path = config.getoption("bench_summary")
    if path is None and not tiny:
        path = "bench-summary.md"
    if path is not None:
        files.write_atomic(Path(path), text.encode("utf-8"))
        tr.write_line(f"Summary written to {Path(path).resolve()}")
