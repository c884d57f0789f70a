"""How fast this machine runs chapter 6's fine-tuning, and what each speed lever buys.

    python -m pytest bench --benchmark-only              # CPU: under 5 minutes
    python -m pytest bench --benchmark-only -k cuda      # one device
    python -m pytest -q bench --benchmark-disable        # smoke pass: tiny sizes, untimed

GPT-2 small with random weights (seed 123) and the chapter's set-up (seed 123 again; the last
block, final norm and new head trainable), batches of 8 x 120 tokens. Rows: device (cpu, cuda, mps;
absent ones skip) x precision (fp32; bf16 autocast on CPU and CUDA; fp16 autocast with a
GradScaler on CUDA) x variant:

    plain      the chapter's loop as written: explicit attention scores, manual layer norm and
               GELU (`GPTModel(cfg, plain=True)`), fp32, the full forward every step
    fused      finetune.py --no-shortcuts: the same maths through PyTorch's fused kernels
    shortcuts  finetune.py's default (`finetune.build_classifier`): the frozen trunk's outputs
               cached per example (`shortcuts.TrunkCache`) and the last block run at the
               classified position only

and, for plain, fused and shortcuts bf16, every layer trainable (no trunk to cache: tail only).
Per row the tests time an evaluation batch, a trunk fill (shortcuts), a training step and, where
quick enough or asked for, a whole epoch; conftest.py projects the chapter's 5-epoch training phase
from them and prints the summary. No timing is ever asserted.
"""

import copy
import inspect
import statistics
import time
from contextlib import nullcontext

import pytest
import torch

import data
import ddp
import finetune
import gpt
import shortcuts

EPOCH_AUTO_S = 30  # time whole epochs unasked only where the projected one takes this long or less


# ----------------------------------------------------------------------------- rows

DEVICES = {  # device: (available, why not, precisions it runs)
    "cpu": (True, "", ("fp32", "bf16")),
    "cuda": (torch.cuda.is_available(), "CUDA is not available (torch.cuda.is_available() is "
             "False)", ("fp32", "bf16", "fp16")),
    "mps": (torch.backends.mps.is_available(), "MPS is not available "
            "(torch.backends.mps.is_available() is False)", ("fp32",)),
}
# (variant, precision, trainable); a precision runs only where the device supports it.
VARIANTS = [
    ("plain", "fp32", "last_block"),
    ("fused", "fp32", "last_block"),
    ("fused", "bf16", "last_block"),
    ("fused", "fp16", "last_block"),
    ("shortcuts", "fp32", "last_block"),
    ("shortcuts", "bf16", "last_block"),
    ("shortcuts", "fp16", "last_block"),
    ("plain", "fp32", "all"),
    ("fused", "fp32", "all"),
    ("shortcuts", "bf16", "all"),
]


def _cases():
    cases = []
    for device, (available, why, precisions) in DEVICES.items():
        marks = [] if device == "cpu" else [pytest.mark.gpu]
        if not available:
            marks.append(pytest.mark.skip(reason=why))
        for variant, precision, trainable in VARIANTS:
            if precision in precisions:
                name = f"{device}-{precision}-{variant}" + ("-all" if trainable == "all" else "")
                cases.append(pytest.param((device, precision, variant, trainable), id=name,
                                          marks=marks))
    return cases


CASES = _cases()
SHORTCUT_CASES = [c for c in CASES if c.values[0][2] == "shortcuts"]


# ----------------------------------------------------------------------------- devices

def sync(device):
    """Wait for the device: a timed function ends only when its work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def rounds(config, device, kind="step", trainable="last_block"):
    """(warm-up rounds, timed rounds). On CPU few: a step takes seconds there, an all-layers
    step several times more, and an epoch minutes (a quick piece gets more: `measure`'s
    stretch). --bench-rounds sets the timed rounds."""
    cpu = device.type == "cpu"
    if kind == "epoch":  # its warm-up round is cut to 3 steps (see test_epoch)
        default, warmup = (1 if cpu else 2), 1
    else:
        default, warmup = ((1 if trainable == "all" else 3) if cpu else 20), (1 if cpu else 3)
    n = config.getoption("bench_rounds")
    return warmup, default if n is None else n


ROUNDS_RULE = ("CPU: 3 timed rounds after 1 warm-up, 1 for all-layers rows and epochs, and a "
               "piece of milliseconds (a cached step, an evaluation batch) as many as fill 1 s, "
               "up to 50; GPU: 20 after 3, epochs 2 after 1; or --bench-rounds")
# On a CPU a quick piece is timed over more rounds: the median of 3 rounds of a 17 ms step moved
# by a quarter between runs on a 2-core machine, the whole phase's steps with it.
QUICK_TIMED_S, QUICK_MAX_ROUNDS = 1.0, 50


def stretched(config, device):
    """Whether `measure` may time more rounds than `rounds` says for a quick piece: on a CPU,
    unless --bench-rounds fixes them."""
    return device.type == "cpu" and config.getoption("bench_rounds") is None


@pytest.fixture(scope="session")
def peak_tflops(pytestconfig, sizes, results):
    """peak(device, precision) -> TFLOP/s: --peak-tflops, or the best of a few square matmuls."""
    given = pytestconfig.getoption("peak_tflops")
    results.context["peak"] = (f"--peak-tflops {given}" if given else
                               "measured: the best of 9 or more tries (on a CPU: 2 s or more "
                               "of each) of square matmuls, 2048 on CPU and 8192 on a GPU "
                               "(smoke pass: 4 of 256), per device and dtype; on a CPU also "
                               "through oneDNN's linear (shortcuts.FrozenBlock's), square and in a "
                               "fill's feed-forward shape")
    cache = {}

    def peak(device, precision):
        if given:
            return given
        key = (device.type, precision)
        if key not in cache:
            dtype = gpt.PRECISIONS.get(precision) or torch.float32
            # The smoke pass too measures a real peak (smaller, fewer): a peak taken from one
            # cold call of a toy matmul would be far too low and give MFUs over 100%.
            n = 256 if sizes.tiny else 2048 if device.type == "cpu" else 8192
            gen = torch.Generator().manual_seed(0)
            a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
            products = [(lambda: a @ b, 2 * n**3)]  # (product, its FLOPs)
            # The trunk's fill runs on oneDNN's linear, which on some CPUs (AMD's) is twice as
            # fast as torch.matmul in fp32: the peak is the faster of the two, square and in
            # the shape of a block's feed-forward product (as many rows as a fill's tokens).
            onednn = shortcuts.onednn_linear(dtype) if device.type == "cpu" else None
            if onednn is not None:
                e, rows = sizes.cfg.emb_dim, sizes.fill_batch * sizes.tokens
                x, w = (torch.randn(shape, generator=gen).to(dtype)
                        for shape in ((rows, e), (4 * e, e)))
                products += [(lambda: onednn(a, b, None, "none", [], ""), 2 * n**3),
                             (lambda: onednn(x, w, None, "none", [], ""), 2 * rows * e * 4 * e)]
            best = 0.0
            # At least 10 tries of each (5 in the smoke pass), and on a full-size CPU run for
            # at least 2 s each: on a machine shared with other work, a few tries can all land
            # in a busy moment, and a peak measured too low reads as an MFU over 100%.
            least = 0.0 if sizes.tiny or device.type != "cpu" else 2.0
            for product, work in products:
                i, start = 0, time.perf_counter()
                while i < (5 if sizes.tiny else 10) or time.perf_counter() - start < least:
                    sync(device)
                    t = time.perf_counter()
                    product()
                    sync(device)
                    if i:  # the first one warms up
                        best = max(best, work / (time.perf_counter() - t))
                    i += 1
            cache[key] = best / 1e12
        return cache[key]

    return peak


# ----------------------------------------------------------------------------- the model

@pytest.fixture(scope="session")
def base_models(sizes):
    """GPT-2 with random weights drawn after torch.manual_seed(123), built once per kind
    (plain or fused) and copied for every test: identical to building it afresh, but the 124M
    random draws take seconds."""
    cache = {}

    def get(plain):
        if plain not in cache:
            torch.manual_seed(123)  # the random initial weights
            cache[plain] = gpt.GPTModel(sizes.cfg, plain=True) if plain else \
                gpt.GPTModel(sizes.cfg)  # (without the switch where gpt.py has none)
        return cache[plain]

    return get


def _lever_missing(variant, precision):
    """Why the project cannot run this row (a lever it does not offer now), else None."""
    if variant == "plain" and "plain" not in inspect.signature(gpt.GPTModel).parameters:
        return "gpt.GPTModel has no plain= switch (the chapter's explicit formulas)"
    if precision not in getattr(gpt, "PRECISIONS", {"fp32": None}):
        return f"gpt.PRECISIONS offers no {precision}"
    if variant == "shortcuts":
        if not hasattr(finetune, "build_classifier"):
            return "finetune.build_classifier is missing"
        if not {"shortcuts", "precision"} <= set(finetune.TrainConfig.__dataclass_fields__):
            return "finetune.TrainConfig has no shortcuts / precision fields"
    return None


class Setup:
    """The chapter's classification set-up for one row, on its device, ready to train."""

    def __init__(self, case, base_models, sizes):
        device, precision, variant, trainable = case
        why = _lever_missing(variant, precision)
        if why:
            pytest.skip(f"{variant} {precision}: {why}")
        self.device, self.precision = torch.device(device), precision
        self.variant, self.trainable = variant, trainable
        self.model = copy.deepcopy(base_models(variant == "plain"))
        torch.manual_seed(123)  # the new classification head
        gpt.setup_classifier(self.model, trainable=trainable)
        self.model.to(self.device)
        self.cfg = finetune.TrainConfig(shortcuts=variant == "shortcuts", precision=precision,
                                        trainable_layers=trainable, device=device)
        self.note = None
        self.classifier = self.new_classifier()
        self.optimizer = finetune.build_optimizer(self.model, self.cfg, self.device)
        # fp16 gradients underflow without scaling; the scaler is a no-op otherwise.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.dtype = gpt.PRECISIONS[precision]

    def new_classifier(self):
        """The module the loop calls; for `shortcuts` a new one holds a new, empty trunk cache."""
        if self.variant == "shortcuts":
            classifier, self.note = finetune.build_classifier(self.model, self.cfg, self.device)
            return classifier
        # plain and fused: the chapter's model(x)[:, -1, :], under autocast if asked
        return gpt.Classifier(self.model, autocast_dtype=gpt.PRECISIONS[self.precision])

    @property
    def trunk(self):
        taken = self.classifier.shortcuts
        return taken.trunk if taken is not None else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, x, y):
        """One step of the chapter's loop: zero grads, loss, backward, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = finetune.calc_loss_batch(x, y, self.classifier, self.device)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sync(self.device)
        return loss

    def eval_batch(self, x, y):
        """One evaluation batch as calc_loss_loader does it: no grad, loss, .item()."""
        with torch.no_grad():
            loss = finetune.calc_loss_batch(x, y, self.classifier, self.device).item()
        sync(self.device)
        return loss

    def flops(self, kind, batch, tokens):
        """Model FLOPs of one call of `kind` (step, eval or fill) on `batch` x `tokens`.

        Forward: 2 per multiply-add of every linear layer (12 E^2 per position of a block) plus
        attention, 4 E Tq T per block (scores and weighted sum, the full T x T as nanoGPT counts
        it). A trained block costs 3 times its forward (the 6N rule). Frozen blocks under the
        trunk cache cost nothing except in a fill. The tail block (`shortcuts.block_at`) forms no
        keys or values: at its one position the query, W_k^T q, the context's W_v, out_proj and the
        feed-forward (24 E^2), and over all T the scores and the weighted sum of the normalised
        inputs, one E-long dot product per head each (4 E T H).
        Layer norms, softmax, embeddings and the optimizer are not counted.
        """
        cfg, T = self.model.cfg, tokens
        e, heads = cfg.emb_dim, cfg.n_heads
        cached = self.trunk.n_blocks if self.trunk is not None else 0
        blocks = list(self.model.trf_blocks)
        tail = self.classifier.shortcuts is not None and self.classifier.shortcuts.tail

        def forward(tq):  # one block, one example: keys and values at all T, the rest at tq
            return 2 * (2 * e * e * T + 10 * e * e * tq) + 4 * e * tq * T

        def forward_at_one():  # the tail block, re-associated, one example
            return 2 * 12 * e * e + 4 * e * T * heads

        if kind == "fill":
            return batch * cached * forward(T)
        total = 0
        rest = blocks[cached:]
        for i, block in enumerate(rest):
            f = forward_at_one() if tail and i == len(rest) - 1 else forward(T)
            trained = kind == "step" and any(p.requires_grad for p in block.parameters())
            total += 3 * f if trained else f
        head = 2 * e * self.model.out_head.out_features  # at the classified position
        head_trained = any(p.requires_grad for p in self.model.out_head.parameters())
        total += 3 * head if kind == "step" and head_trained else head
        return batch * total


@pytest.fixture
def row_of(sizes, results, peak_tflops):
    """The summary's Row of a case (made on first use), with its device name and peak."""
    def get(case):
        device, precision, variant, trainable = case
        row = results.row(device=device, device_name=ddp.device_name(torch.device(device)),
                          precision=precision, variant=variant, trainable=trainable,
                          batch=sizes.batch, tokens=sizes.tokens, fill_batch=sizes.fill_batch)
        if row.peak_tflops is None:
            row.peak_tflops = peak_tflops(torch.device(device), precision)
        return row
    return get


@pytest.fixture
def setup_row(base_models, sizes, results, row_of):
    """(Setup, Row) for a case; notes what the summary's header needs."""
    def make(case):
        s = Setup(case, base_models, sizes)
        row = row_of(case)
        row.trunk = s.trunk is not None
        if s.note:
            row.notes.append(f"{row.device_name} {s.precision} {s.variant} {s.trainable}: "
                             f"{s.note}")
        results.context.update(threads=torch.get_num_threads(),
                               shape=f"{sizes.batch} x {sizes.tokens} tokens",
                               rounds="one untimed call each" if sizes.tiny else ROUNDS_RULE)
        return s, row
    return make


def batches(token_data, split, batch, count=None):
    """The split's batches in order, as (ids, labels) on the CPU (the loop moves them)."""
    ids, labels = token_data[split]
    n = len(ids) // batch if count is None else count
    return [(ids[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch])
            for i in range(n)]


def timed(benchmark, target, setup, warmup, n, group):
    """benchmark.pedantic over `target`, its arguments from `setup()`: the median seconds of the
    timed rounds. With --benchmark-disable it runs once, timed here instead, so that the smoke
    pass goes through every line that a measurement does."""
    benchmark.group = group
    start = time.perf_counter()
    benchmark.pedantic(target, setup=setup, rounds=n, warmup_rounds=warmup)
    if benchmark.enabled:
        return benchmark.stats.stats.median
    return time.perf_counter() - start


def measure(benchmark, target, pool, warmup, n, group, stretch=False):
    """`timed` over `target(x, y)`, one pool batch per round in turn. With `stretch` (see
    `stretched`), one more untimed call first says how long a round takes, and a quick piece
    gets as many rounds as fill QUICK_TIMED_S, up to QUICK_MAX_ROUNDS (never fewer than `n`).
    Returns the median seconds and the rounds timed."""
    turn = iter(range(10**9))

    def setup():
        return pool[next(turn) % len(pool)], {}

    if stretch and benchmark.enabled:
        args, _ = setup()
        start = time.perf_counter()
        target(*args)
        once = time.perf_counter() - start
        n = max(n, min(QUICK_MAX_ROUNDS, int(QUICK_TIMED_S / max(once, 1e-9))))
    return timed(benchmark, target, setup, warmup, n, group), n


def report(benchmark, results, row, setup, kind, seconds, flops, examples, token_data, sizes):
    """Fill the benchmark's extra_info and hand the piece to the summary."""
    info = benchmark.extra_info
    info.update(device=setup.device.type, device_name=row.device_name, torch=torch.__version__,
                threads=torch.get_num_threads(), precision=setup.precision,
                variant=setup.variant, trainable=setup.trainable, kind=kind,
                batch=sizes.fill_batch if kind == "fill" else sizes.batch, tokens=sizes.tokens,
                data=token_data["source"],
                seconds=seconds, examples_per_s=examples / seconds,
                tokens_per_s=examples * sizes.tokens / seconds, flops=flops,
                peak_tflops=row.peak_tflops,
                mfu=row.checked_mfu(flops, seconds, kind),
                trunk_cache=row.trunk, tiny=sizes.tiny)
    if setup.note:
        info["note"] = setup.note
    results.context["data"] = token_data["source"]
    results.record(row, kind, seconds, flops, info)


# ----------------------------------------------------------------------------- benchmarks
# In this order on purpose: a row's evaluation and fill are measured before its step, so the
# step's extra_info already carries the row's projection (later pieces update the earlier ones).

@pytest.mark.parametrize("case", CASES)
def test_eval_batch(benchmark, case, setup_row, token_data, sizes, results, pytestconfig):
    """One evaluation batch (no grad forward, loss, .item()); `shortcuts` reads cached examples."""
    s, row = setup_row(case)
    s.classifier.eval()
    # The cached evaluation reads examples already in the cache; the others alternate two.
    pool = batches(token_data, "validation", sizes.batch, count=1 if s.trunk else 2)
    if s.trunk is not None:
        for x, y in pool:
            s.eval_batch(x, y)
    warmup, n = rounds(pytestconfig, s.device, "eval", s.trainable)
    seconds, _ = measure(benchmark, s.eval_batch, pool, warmup, n, f"eval batch, {s.device.type}",
                         stretched(pytestconfig, s.device))
    report(benchmark, results, row, s, "eval", seconds, s.flops("eval", sizes.batch, sizes.tokens),
           sizes.batch, token_data, sizes)


@pytest.mark.parametrize("case", SHORTCUT_CASES)
def test_trunk_fill(benchmark, case, setup_row, token_data, sizes, results, pytestconfig):
    """The trunk cache computing a batch of new examples, as many as finetune.py fills at once
    (shortcuts.FILL_BATCH): a fresh cache (and batch) each round."""
    s, row = setup_row(case)
    if s.trunk is None:
        pytest.skip(f"no trunk cache for {s.trainable}: {s.note or 'build_classifier made none'}")
    s.classifier.eval()
    pool = batches(token_data, "train", sizes.fill_batch)
    filled = []

    def fill(x, y):
        trunk = shortcuts.TrunkCache(s.model)  # cheap: lists the frozen weights
        with s.autocast():  # as the Classifier runs it
            out = trunk(x.to(s.device))
        sync(s.device)
        filled.append((trunk, x))
        return out

    warmup, n = rounds(pytestconfig, s.device, "fill", s.trainable)
    seconds, _ = measure(benchmark, fill, pool, warmup, n, f"trunk fill, {s.device.type}",
                         stretched(pytestconfig, s.device))
    trunk, x = filled[-1]  # a text can occur twice in the data: one entry per distinct example
    assert len(trunk.store) == len(torch.unique(x, dim=0)), "the fill missed examples"
    report(benchmark, results, row, s, "fill", seconds,
           s.flops("fill", sizes.fill_batch, sizes.tokens), sizes.fill_batch, token_data, sizes)


@pytest.mark.parametrize("case", CASES)
def test_train_step(benchmark, case, setup_row, token_data, sizes, results, pytestconfig):
    """One training step of the chapter's loop; `shortcuts` steps on cached examples (fills
    apart)."""
    s, row = setup_row(case)
    s.classifier.train()
    # The cached step: its examples are filled first, outside the timing.
    pool = batches(token_data, "train", sizes.batch, count=1 if s.trunk else 2)
    if s.trunk is not None:
        with torch.no_grad():
            for x, _ in pool:
                s.classifier(x.to(s.device))
    warmup, n = rounds(pytestconfig, s.device, "step", s.trainable)
    losses = []

    def step(x, y):
        losses.append(s.train_step(x, y))

    seconds, n = measure(benchmark, step, pool, warmup, n, f"train step, {s.device.type}",
                         stretched(pytestconfig, s.device))
    assert torch.isfinite(losses[-1]).item()
    row.split = step_split(s, pool, max(n, 3))
    benchmark.extra_info["step_split_ms"] = row.split
    report(benchmark, results, row, s, "step", seconds, s.flops("step", sizes.batch, sizes.tokens),
           sizes.batch, token_data, sizes)


def step_split(s, pool, n):
    """A training step's parts, timed apart over `n` more steps (device synced between parts):
    the median ms of the forward pass and loss, the backward, the optimizer (the scaler's step
    and update) and the rest (zero_grad and whatever the step does between them)."""
    parts = {k: [] for k in ("forward", "backward", "optimizer", "rest")}
    for i in range(n):
        x, y = pool[i % len(pool)]
        sync(s.device)
        t0 = time.perf_counter()
        s.optimizer.zero_grad(set_to_none=True)
        sync(s.device)
        t1 = time.perf_counter()
        loss = finetune.calc_loss_batch(x, y, s.classifier, s.device)
        sync(s.device)
        t2 = time.perf_counter()
        s.scaler.scale(loss).backward()
        sync(s.device)
        t3 = time.perf_counter()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        sync(s.device)
        t4 = time.perf_counter()
        for k, dt in (("forward", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3),
                      ("rest", t1 - t0)):
            parts[k].append(dt * 1e3)
    return {k: statistics.median(v) for k, v in parts.items()}


@pytest.mark.parametrize("case", CASES)
def test_epoch(benchmark, case, setup_row, row_of, token_data, sizes, results, pytestconfig,
               full_epochs):
    """A whole first epoch through finetune.train_classifier_simple (130 steps, its evaluations
    and accuracies; a cold trunk cache): the check on the projection. Where slow, only when
    asked."""
    first, _, missing = row_of(case).first_epoch()
    if not (sizes.tiny or full_epochs):
        if first is None:
            pytest.skip(f"no projection yet to judge the epoch by (needs {', '.join(missing)}); "
                        "pass --full-epochs or set BENCH_FULL=1")
        if first > EPOCH_AUTO_S:
            pytest.skip(f"projected epoch {first:.0f} s > {EPOCH_AUTO_S} s here; pass "
                        "--full-epochs or set BENCH_FULL=1")
    s, row = setup_row(case)
    sets = {name: torch.utils.data.TensorDataset(*token_data[name])
            for name in ("train", "validation")}
    torch.manual_seed(123)  # the loaders, as finetune.run seeds them
    loaders = data.create_loaders(sets, batch_size=sizes.batch)
    turn = iter(range(10**9))
    histories = []

    def setup():
        s.classifier = s.new_classifier()  # a cold trunk cache, as epoch 1 starts with
        # The warm-up round stops after 3 steps: it only has to warm kernels and caches.
        # TrainConfig's defaults are the chapter's: eval_freq 50, eval_iter 5.
        cfg = finetune.TrainConfig(epochs=1, max_steps=3 if next(turn) < warmup else None)
        return (cfg,), {}

    def epoch(cfg):  # its log lines go to pytest's capture
        histories.append(finetune.train_classifier_simple(s.classifier, loaders, s.optimizer,
                                                          cfg, s.device, s.scaler))
        sync(s.device)

    warmup, n = rounds(pytestconfig, s.device, "epoch", s.trainable)
    seconds = timed(benchmark, epoch, setup, warmup, n, f"epoch, {s.device.type}")
    steps = histories[-1]["steps"]
    assert steps == len(loaders["train"])
    # The FLOPs of the epoch just run: its steps, its evaluation batches (3 loss evaluations
    # and the accuracies for the chapter's 130 steps) and, with the cache, a fill of every
    # example it reads.
    cfg = finetune.TrainConfig()
    per_eval = sum(min(cfg.eval_iter, len(loaders[k])) for k in ("train", "validation"))
    evals = (len(range(0, steps, cfg.eval_freq)) + 1) * per_eval
    val_read = min(cfg.eval_iter * sizes.batch, len(sets["validation"]))
    filled = len(sets["train"]) + val_read if s.trunk else 0  # examples, one fill each
    flops = sum(count * s.flops(kind, batch, sizes.tokens) for kind, count, batch in (
        ("step", steps, sizes.batch), ("eval", evals, sizes.batch), ("fill", filled, 1)))
    report(benchmark, results, row, s, "epoch", seconds, flops, steps * sizes.batch,
           token_data, sizes)
