"""What each speed lever of the default run buys, measured before/after side by side.

    python -m pytest bench/test_levers.py --benchmark-only -s     # CPU: a few minutes
    python -m pytest -q bench/test_levers.py --benchmark-disable  # smoke pass (tiny, untimed)

Each test times the same piece of work without the lever (before) and with it (after), in turn
(A B B A A B ...), so that a machine whose speed drifts (other work, clocks) drifts both alike,
and reports the median of the per-pair ratios before/after with their min and max: the figure
to quote. The pieces, GPT-2 small with random weights, batches of 8 x 120 tokens:

    fill-prep   one trunk-cache fill of 16 examples (fp32, bf16): the frozen blocks as
                written, under bf16 autocast casting the weights on every call (before), vs
                `shortcuts.FrozenBlock`s prepared once per run (weights cast once, Q/K/V in one
                product, oneDNN's linear with the GELU and residual adds fused) (after)
    fill-onednn the same fill, FrozenBlocks without oneDNN's linear (F.linear: MKL in fp32)
                vs with it
    fill-batch  the same fill, per example: batches of 8 (the loop's) and of 32 vs 16
                (shortcuts.FILL_BATCH: finetune.py fills the cache ahead of the loop in those)
    tail        a training step on a cached trunk: the last block at the classified position
                with keys and values at every position (before) vs re-associated
                (`shortcuts.block_at`, after); fp32 and bf16
    tail-onednn a cached fp32 training step: the last block's products at the classified
                position through F.linear (MKL on a CPU) vs oneDNN's linear, forward and
                backward (`shortcuts.linear_at`)
    attention   a bf16 training step with every layer trainable: PyTorch's CPU flash attention
                kernel vs its math backend (`shortcuts.attention_backend`: on a CPU without AMX)
    malloc      a cached training step (fp32, bf16, as finetune.py takes it): glibc's default
                malloc (fresh mmap and page faults for every step's gradients and bf16 weight
                casts) vs freed memory kept for reuse (`shortcuts.keep_freed_memory`)
    adamw       the optimizer's step over the chapter's trainable set: a loop over tensors
                (foreach) vs one fused kernel
    inference   evaluate.py classifying 8 texts: the model as written vs its inference
                shortcuts (FrozenBlocks, the last block at the classified position)
    huge-pages  a cached training step as finetune.py takes it, and a fill of 16: torch's large
                tensors on 4 KiB pages vs on transparent huge pages (`shortcuts.use_huge_pages`);
                each side in a fresh process (torch reads the switch once), in turn

The table of all of them is printed at the end of the module and written to bench-levers.md
(not in the smoke pass). No timing is asserted.
"""

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import gpt
import shortcuts

LEVER_ROUNDS = 5  # timed pairs per lever on the CPU, after one warm-up pair


@pytest.fixture(scope="module")
def lever_table(sizes):
    """Rows of the levers' table, printed and written when the module ends."""
    rows = []
    yield rows
    if not rows:
        return
    head = ("lever", "precision", "before ms", "after ms", "before/after (median, min-max)",
            "pairs")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(str(r[k]) for k in ("lever", "precision", "before", "after",
                                                    "ratio", "pairs")))
    text = "\n".join(f"| {line} |" for line in lines)
    print("\n\nSpeed levers, before/after, side by side:\n" + text)
    if not sizes.tiny:
        Path("bench-levers.md").write_text(text + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def gpt_small(sizes):
    torch.manual_seed(123)
    model = gpt.GPTModel(sizes.cfg)
    torch.manual_seed(123)
    return gpt.setup_classifier(model).eval()


def paired(before, after, rounds, per=1):
    """Time `before()` and `after()` alternately: (before seconds, after seconds, ratios), each
    per call divided by `per` (e.g. examples), after one untimed warm-up of each."""
    before(), after()
    a, b = [], []
    for i in range(rounds):
        for f, out in ((before, a), (after, b)) if i % 2 == 0 else ((after, b), (before, a)):
            t = time.perf_counter()
            f()
            out.append((time.perf_counter() - t) / per)
    return a, b, [x / y for x, y in zip(a, b)]


def record(benchmark, lever_table, lever, precision, sizes, before, after, rounds, per=1):
    """Run the pairs under the benchmark (its own timing is the whole loop) and report them."""
    results = {}

    def run():
        results["a"], results["b"], results["r"] = paired(before, after, rounds, per)

    benchmark.group = "levers"
    benchmark.pedantic(run, rounds=1, iterations=1)
    a, b, r = results["a"], results["b"], results["r"]
    row = {"lever": lever, "precision": precision,
           "before": f"{statistics.median(a) * 1e3:.1f}",
           "after": f"{statistics.median(b) * 1e3:.1f}",
           "ratio": f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})",
           "pairs": len(r)}
    benchmark.extra_info.update(lever=lever, precision=precision, tiny=sizes.tiny,
                                before_s=a, after_s=b, ratios=r,
                                ratio_median=statistics.median(r),
                                threads=torch.get_num_threads(), torch=torch.__version__)
    lever_table.append(row)
    print(f"\n{lever} ({precision}): before {row['before']} ms, after {row['after']} ms, "
          f"before/after {row['ratio']} over {row['pairs']} pairs", flush=True)
    return row


def rounds_of(sizes, config=None):
    """Timed pairs: one in the smoke pass, else --bench-rounds or LEVER_ROUNDS."""
    given = config.getoption("bench_rounds") if config is not None else None
    return 1 if sizes.tiny else given or LEVER_ROUNDS


def ids_of(token_data, n, sizes):
    ids = token_data["train"][0]
    reps = -(-n // len(ids))
    return ids.repeat(reps, 1)[:n, :sizes.tokens]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lever", ["prepared", "onednn"])
def test_fill_prepared_blocks(benchmark, lever_table, gpt_small, token_data, sizes, precision,
                              lever, pytestconfig):
    """A fill of one batch of shortcuts.FILL_BATCH examples. `prepared`: the frozen blocks as
    written (under bf16 autocast, which casts the fp32 weights on every call) vs `FrozenBlock`s
    (prepared once per run: weights cast once, Q/K/V in one product, oneDNN's fused GELU and
    adds). `onednn`: FrozenBlocks without oneDNN's linear vs with it."""
    if lever == "onednn" and \
            shortcuts.onednn_linear(gpt.PRECISIONS[precision] or torch.float32) is None:
        pytest.skip(f"no working oneDNN linear for {precision} in this torch on this CPU")
    x = ids_of(token_data, sizes.fill_batch, sizes)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    before = dict(prepare=False) if lever == "prepared" else dict(onednn=False)
    with torch.no_grad(), amp:  # prepare both once (as a run does, on its first fill)
        for kw in (before, {}):
            shortcuts.TrunkCache(gpt_small, **kw).compute(x[:1])

    def fill(**kw):
        def go():
            trunk = shortcuts.TrunkCache(gpt_small, **kw)  # a fresh, empty cache
            with torch.no_grad(), amp:
                trunk(x)
        return go

    what = ("frozen blocks prepared once (FrozenBlock)" if lever == "prepared"
            else "FrozenBlock's products through oneDNN (fused GELU, adds)")
    record(benchmark, lever_table, f"fill: {what}, per batch of {sizes.fill_batch}", precision,
           sizes, fill(**before), fill(), rounds_of(sizes, pytestconfig))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("other", [8, 32])
def test_fill_batch_size(benchmark, lever_table, gpt_small, token_data, sizes, precision, other):
    """A fill, per example, in batches of `other` (the loop's 8, or 32) vs shortcuts.FILL_BATCH
    (ms per example). The smoke pass scales the three down to the loop's batch, x 1/2/4."""
    chosen = shortcuts.FILL_BATCH
    if sizes.tiny:
        chosen, other = 2 * sizes.batch, sizes.batch * other // 8
    big = 2 * max(chosen, other)
    x = ids_of(token_data, big, sizes)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def fill(batch):
        def go():
            trunk = shortcuts.TrunkCache(gpt_small)
            with torch.no_grad(), amp:
                for i in range(0, big, batch):
                    trunk.compute(x[i:i + batch])
        return go

    record(benchmark, lever_table, f"fill: batches of {chosen} instead of {other} "
           "(per example)", precision, sizes, fill(other), fill(chosen),
           min(3, rounds_of(sizes)), per=big)


def cached_tail(gpt_small, token_data, sizes):
    """A training copy of the model, an empty trunk cache over it, one batch (ids, labels) and
    the chapter's AdamW (fused): the set-up of the cached-step levers."""
    model = copy.deepcopy(gpt_small).train()
    x = ids_of(token_data, sizes.batch, sizes)
    y = token_data["train"][1][:sizes.batch]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)
    return model, shortcuts.TrunkCache(model), x, y, opt


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tail_reassociated(benchmark, lever_table, gpt_small, token_data, sizes, precision,
                           pytestconfig):
    """A training step on a cached trunk (last block, final norm, head; AdamW), the last block
    at the classified position with keys and values at every position vs `shortcuts.block_at`."""
    model, trunk, x, y, opt = cached_tail(gpt_small, token_data, sizes)
    with torch.no_grad():
        h = trunk(x)
    block, pos = model.trf_blocks[-1], gpt.token_positions(x)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step(last):
        def go():
            opt.zero_grad(set_to_none=True)
            with amp:
                logits = model.out_head(model.final_norm(last(h)))
            F.cross_entropy(logits.float(), y).backward()
            opt.step()
        return go

    record(benchmark, lever_table, "step: last block re-associated (cached trunk)", precision,
           sizes, step(lambda h: block(h, query_pos=pos)[:, 0]),
           step(lambda h: shortcuts.block_at(block, h, pos)), rounds_of(sizes, pytestconfig))


def test_tail_onednn(benchmark, lever_table, gpt_small, token_data, sizes, pytestconfig):
    """A cached fp32 training step as finetune.py takes it (trunk cache, `shortcuts.block_at`,
    fused AdamW, freed memory kept), the last block's products at the classified position
    through F.linear (MKL) vs through oneDNN's linear, forward and backward
    (`shortcuts.linear_at`)."""
    if shortcuts.onednn_linear(torch.float32) is None:
        pytest.skip("no working oneDNN linear for fp32 in this torch on this CPU")
    shortcuts.keep_freed_memory()  # as finetune.py's step runs
    model, trunk, x, y, opt = cached_tail(gpt_small, token_data, sizes)
    with torch.no_grad():
        trunk(x)  # filled: the steps read the cache
    block, pos = model.trf_blocks[-1], gpt.token_positions(x)
    n = 1 if sizes.tiny else 5

    def steps(onednn):
        def go():
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                last = shortcuts.block_at(block, trunk(x), pos, onednn=onednn)
                F.cross_entropy(model.out_head(model.final_norm(last)), y).backward()
                opt.step()
        return go

    record(benchmark, lever_table, "step: the last block's products through oneDNN (cached "
           "trunk)", "fp32", sizes, steps(False), steps(True), rounds_of(sizes, pytestconfig),
           per=n)


def test_math_attention_training(benchmark, lever_table, gpt_small, token_data, sizes,
                                 monkeypatch, pytestconfig):
    """A bf16 training step with every layer trainable (no trunk to cache): PyTorch's CPU flash
    attention kernel vs its math backend (`shortcuts.attention_backend`, taken on a CPU
    without AMX)."""
    model = copy.deepcopy(gpt_small)
    gpt.setup_classifier(model, trainable="all")
    model.train()
    x = ids_of(token_data, sizes.batch, sizes)
    y = token_data["train"][1][:sizes.batch]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)

    def step(amx):
        def go():
            monkeypatch.setattr(shortcuts, "HAS_AMX", amx)  # True: PyTorch's own choice (flash)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = shortcuts.classify_logits(model, x, tail=True)
            F.cross_entropy(logits.float(), y).backward()
            opt.step()
        return go

    record(benchmark, lever_table, "step, all layers trainable: math attention instead of the "
           "CPU flash kernel", "bf16", sizes, step(True), step(False),
           rounds_of(sizes, pytestconfig))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_shortcuts(benchmark, lever_table, gpt_small, token_data, sizes, precision,
                             pytestconfig):
    """evaluate.py classifying a batch of 8 texts (no gradient): the model as written vs its
    inference shortcuts (`evaluate.inference_classifier`: the blocks before the last through
    FrozenBlocks, the last at the classified position)."""
    x = ids_of(token_data, sizes.batch, sizes)
    dtype = gpt.PRECISIONS[precision]

    def classify(use_shortcuts):
        classifier = evaluate.inference_classifier(gpt_small, {}, dtype, use_shortcuts)

        def go():
            with torch.no_grad():
                classifier(x)
        return go

    record(benchmark, lever_table, "classify 8 texts (evaluate.py, serving): inference "
           "shortcuts", precision, sizes, classify(False), classify(True),
           rounds_of(sizes, pytestconfig))


def test_fused_adamw(benchmark, lever_table, gpt_small, sizes, pytestconfig):
    """AdamW's step over the chapter's trainable set (last block, final norm, head)."""
    model = copy.deepcopy(gpt_small)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    loop = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1, foreach=True)
    fused = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1, fused=True)
    record(benchmark, lever_table, "AdamW: one fused kernel (last block trainable)", "fp32",
           sizes, loop.step, fused.step, rounds_of(sizes, pytestconfig))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_keep_freed_memory(benchmark, lever_table, gpt_small, token_data, sizes, precision,
                           pytestconfig):
    """A cached training step as finetune.py takes it (zero_grad to None, loss, backward, fused
    AdamW): glibc's default malloc vs `shortcuts.keep_freed_memory`, 5 steps per timed call
    (each call switches it first; ms per step)."""
    if not shortcuts.keep_freed_memory(False):
        pytest.skip("not glibc: mallopt is not there")
    model = copy.deepcopy(gpt_small).train()
    trunk = shortcuts.TrunkCache(model)
    classifier = gpt.Classifier(model, autocast_dtype=gpt.PRECISIONS[precision],
                                shortcuts=shortcuts.Shortcuts(trunk=trunk))
    x = ids_of(token_data, sizes.batch, sizes)
    y = token_data["train"][1][:sizes.batch]
    with torch.no_grad():
        classifier(x)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)

    def one():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(classifier(x), y).backward()
        opt.step()

    n = 1 if sizes.tiny else 5

    def steps(keep):
        def go():
            shortcuts.keep_freed_memory(keep)
            for _ in range(n):
                one()
        return go

    try:
        record(benchmark, lever_table, "step: freed memory kept for reuse (glibc malloc)",
               precision, sizes, steps(False), steps(True), rounds_of(sizes, pytestconfig), per=n)
    finally:
        shortcuts.keep_freed_memory(True)


# One side of the huge-pages pair, in a fresh process: a cached training step as finetune.py
# takes it (finetune.build_classifier and build_optimizer: trunk cache, block_at, fused AdamW,
# glibc's freed memory kept) and a trunk fill, each the median of its rounds, in ms.
_HUGE_PAGES_SIDE = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import finetune, gpt, shortcuts
spec = json.loads(sys.argv[2])
torch.set_num_threads(spec["threads"])
torch.manual_seed(123)
model = gpt.GPTModel(gpt.GPTConfig(**spec["cfg"]))
torch.manual_seed(123)
gpt.setup_classifier(model)
cfg = finetune.TrainConfig(shortcuts=True, precision=spec["precision"], device="cpu")
dev = torch.device("cpu")
classifier, _ = finetune.build_classifier(model, cfg, dev)
opt = finetune.build_optimizer(model, cfg, dev)
gen = torch.Generator().manual_seed(0)
fill_ids = torch.randint(0, spec["cfg"]["vocab_size"], (spec["fill"], spec["tokens"]),
                         generator=gen)
x, y = fill_ids[:spec["batch"]], torch.randint(0, 2, (spec["batch"],), generator=gen)

def fill():
    trunk = shortcuts.TrunkCache(model)
    with torch.no_grad(), classifier.autocast(dev):
        trunk(fill_ids)

def step():
    opt.zero_grad(set_to_none=True)
    finetune.calc_loss_batch(x, y, classifier, dev).backward()
    opt.step()

classifier.train()
with torch.no_grad():
    classifier(x)
out = {}
for name, f, n in (("fill", fill, spec["fills"]), ("step", step, spec["steps"])):
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    out[name] = statistics.median(times)
out["huge_kb"] = int([line.split()[1] for line in open("/proc/self/smaps_rollup")
                      if line.startswith("AnonHugePages")][0])
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's huge pages: Linux")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_huge_pages(benchmark, lever_table, sizes, precision, pytestconfig):
    """A cached training step (30 rounds' median) and a fill of shortcuts.FILL_BATCH examples
    (3 rounds' median), each side in a fresh process in turn (A B B A ...): torch's tensors on
    4 KiB pages (THP_MEM_ALLOC_ENABLE=0) vs on transparent huge pages
    (`shortcuts.use_huge_pages`, the default). Two rows: the step, the fill."""
    if sizes.tiny and precision != "fp32":
        pytest.skip("the smoke pass runs one precision's pair (each side starts a process)")
    cfg = sizes.cfg
    spec = json.dumps({"cfg": {k: getattr(cfg, k) for k in (
        "vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
        "qkv_bias")}, "precision": precision, "threads": torch.get_num_threads(),
        "batch": sizes.batch, "tokens": sizes.tokens, "fill": sizes.fill_batch,
        "steps": 1 if sizes.tiny else 30, "fills": 1 if sizes.tiny else 3})
    root = str(Path(__file__).resolve().parents[1])
    n = rounds_of(sizes, pytestconfig)
    sides = {"before": [], "after": []}

    def side(thp, out):
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
        run = subprocess.run([sys.executable, "-c", _HUGE_PAGES_SIDE, root, spec], env=env,
                             check=True, capture_output=True, text=True, timeout=900)
        out.append(json.loads(run.stdout.splitlines()[-1]))

    def run():
        for i in range(n):
            order = (("0", "before"), ("1", "after"))
            for thp, name in (order if i % 2 == 0 else order[::-1]):
                side(thp, sides[name])

    benchmark.group = "levers"
    benchmark.pedantic(run, rounds=1, iterations=1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for kind, what in (("step", "cached step"), ("fill", f"fill of {sizes.fill_batch}")):
        a = [r[kind] for r in sides["before"]]
        b = [r[kind] for r in sides["after"]]
        r = [x / y for x, y in zip(a, b)]
        row = {"lever": f"{what}: transparent huge pages (fresh processes, in turn)",
               "precision": precision, "before": f"{statistics.median(a) * 1e3:.1f}",
               "after": f"{statistics.median(b) * 1e3:.1f}",
               "ratio": f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})",
               "pairs": len(r)}
        lever_table.append(row)
        benchmark.extra_info[kind] = dict(before_s=a, after_s=b, ratios=r, load_end=load,
                                          huge_kb_after=[s["huge_kb"] for s in sides["after"]])
        print(f"\n{row['lever']} ({precision}): before {row['before']} ms, after "
              f"{row['after']} ms, before/after {row['ratio']} over {row['pairs']} pairs, "
              f"load {load}", flush=True)
