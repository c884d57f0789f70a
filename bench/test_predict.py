"""Predictions side by side (issue 30, item 4): the same texts classified by `evaluate.py
--predict` (ours), by transformers' pipeline on the run's `--export hf`, by onnxruntime on its
`--export onnx`, and by the server (`evaluate.py --serve`) with 1 and 4 clients, on the same
weights, in one process.

    SMS_SPAM_DATA=/path/SMSSpamCollection python -m pytest bench/test_predict.py --benchmark-only -s
    python -m pytest -q bench/test_predict.py --benchmark-disable   # smoke pass (tiny, untimed)

The texts: the first 2,000 messages of the SMS Spam Collection ($SMS_SPAM_DATA, else
shared/data/SMSSpamCollection beside the repository or above it; skipped, saying so, where it
is absent). The model: GPT-2 small with random weights (speed does not depend on the values),
two real runs of finetune.py (`--weights random`, one step), one per padding:

    fixed     the chapter's rule: the last position after padding every text to max_length
              (120); transformers as the card says, padding="max_length", truncation=True
    pertext   `--token-position flexible --context-length batch`: each batch padded to its own
              longest text, the last real token read; transformers with truncation=True, whose
              pipeline pads each batch to its longest text the same way

Each predictor is what a user runs:

    ours          evaluate.predict_proba over the texts in slices of 256, as write_predictions
                  (--predict) calls it, in the run's batch size (8; pertext: each slice's texts
                  batched shortest first, evaluate.batch_independent); bf16: the same weights
                  under bf16 autocast, as a bf16 run is loaded (evaluate.inference_classifier)
    transformers  pipeline("text-classification", model=EXPORT, <the card's arguments>)
                  called with top_k=None and batch_size=8; bf16: dtype=torch.bfloat16
    onnxruntime   the .onnx in an InferenceSession (CPU), fed the batches ours makes
                  (evaluate.text_loader: for pertext, texts of similar length batched
                  together), softmax in torch; fp32 only (the export is fp32)
    server-1c/4c  fixed fp32 only: POST /classify with 8 texts a request, from 1 client and from
                  4 at once (bench/test_serve.py's client), against serve.make_server over the
                  same classifier

Before timing, the probabilities of every fp32 predictor must be within 1e-4 of ours on the
first texts (the same work is compared); the bf16 ones' distance is recorded. Then the texts
are cut into ROUNDS slices and each slice goes through every predictor in turn (the order
rotated each round), so that they all share the machine's load at that moment; every figure is
the median over the rounds of the per-slice figure: texts/s per predictor, and the ratio of
ours to each other predictor within the same round. The table goes to the terminal and to
bench-predict.md (not in the smoke pass), with the CPU and the load average. No timing is
asserted.

$BENCH_PREDICT_DIR keeps the runs and exports (made there once, reused after); otherwise a
temporary folder is used.
"""

import contextlib
import inspect
import io
import os
import random
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

import data
import ddp
import evaluate
import export
import finetune
import serve

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from test_serve import _client  # noqa: E402  (bench/test_serve.py's keep-alive client)

CPU = torch.device("cpu")
TEXTS = 2000
ROUNDS = 8  # slices of 250 texts
CHECK = 32  # texts on which the probabilities are compared first
TOLERANCE = 1e-4  # fp32: the largest difference in a probability between two predictors
SLICE = 256  # evaluate.write_predictions' step
MODES = {"fixed": [], "pertext": ["--token-position", "flexible", "--context-length", "batch"]}


# ----------------------------------------------------------------------------- texts and runs

def sms_path():
    """$SMS_SPAM_DATA, else shared/data/SMSSpamCollection beside the repository or above it."""
    given = os.environ.get("SMS_SPAM_DATA")
    if given:
        if not Path(given).is_file():
            raise pytest.UsageError(f"SMS_SPAM_DATA={given} is not a file")
        return Path(given)
    for folder in Path(__file__).resolve().parents[1:]:
        path = folder / "shared/data/SMSSpamCollection"
        if path.is_file():
            return path
    return None


def tiny_sms(folder):
    """A small SMS-format file (300 messages of 3 to 40 words) for the smoke pass's runs."""
    rng = random.Random(0)
    ham = "ok see you at home later then call me when you get this lol dinner".split()
    spam = "free win prize cash claim now call txt urgent award guaranteed".split()
    lines = []
    for i in range(300):
        label, words = ("spam", spam) if i % 5 in (1, 3) else ("ham", ham)
        text = " ".join(rng.choice(words + ham) for _ in range(rng.randint(3, 40)))
        lines.append(f"{label}\t{text.capitalize()} {i}")
    path = folder / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def texts(sizes, tmp_path_factory):
    """(the texts classified, the data the runs train on)."""
    if sizes.tiny:
        path = tiny_sms(tmp_path_factory.mktemp("sms"))
        return [t for _, t in data.load_rows(path)][:12], path
    path = sms_path()
    if path is None:
        pytest.skip("no SMS Spam Collection: set SMS_SPAM_DATA to the raw SMSSpamCollection "
                    "file (the benchmark classifies its first 2,000 messages)")
    return [t for _, t in data.load_rows(path)][:TEXTS], path


def quiet(f, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return f(*args)


@pytest.fixture(scope="module")
def runs(sizes, texts, tmp_path_factory):
    """mode -> (run folder, its --export hf folder, its --export onnx file or None)."""
    keep = os.environ.get("BENCH_PREDICT_DIR")
    root = Path(keep) / ("tiny" if sizes.tiny else "small") if keep else \
        tmp_path_factory.mktemp("predict-runs")
    root.mkdir(parents=True, exist_ok=True)
    if sizes.tiny:  # a tiny checkpoint of GPT-2's vocabulary, as tests/conftest.py makes one
        weights = root / "tiny-gpt2"
        if not (weights / "model.safetensors").is_file():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                              vocab_size=50257)
                transformers.GPT2LMHeadModel(cfg).save_pretrained(weights)
    else:
        weights = "random"
    try:
        import onnxruntime  # noqa: F401
        has_onnx = True
    except ImportError:
        has_onnx = False
    out = {}
    for mode, flags in MODES.items():
        run, hf, onnx = root / mode, root / f"{mode}-hf", root / f"{mode}.onnx"
        if not (run / "run.json").is_file():
            quiet(finetune.main, ["--weights", str(weights), "--data", str(texts[1]),
                                  "--max-steps", "1", "--epochs", "1", "--no-initial-eval",
                                  "--final-splits", "validation", *flags,
                                  "--output-dir", str(run)])
        if not (hf / "config.json").is_file():
            quiet(evaluate.main, ["--run", str(run), "--export", "hf", str(hf), "--overwrite"])
        if has_onnx and not onnx.is_file():
            quiet(evaluate.main, ["--run", str(run), "--export", "onnx", str(onnx)])
        out[mode] = run, hf, onnx if has_onnx else None
    return out


# ----------------------------------------------------------------------------- the predictors

def ours(classifier, info):
    def predict(batch_texts):
        probs = []
        for i in range(0, len(batch_texts), SLICE):  # as write_predictions calls it
            probs += evaluate.predict_proba(batch_texts[i:i + SLICE], classifier, info, CPU)
        return probs
    return predict


def hf_pipeline(folder, info, dtype):
    kwargs = export.position_rule(info)[1]  # what the card tells a user to pass
    key = "dtype" if "dtype" in inspect.signature(transformers.pipeline).parameters \
        else "torch_dtype"  # transformers 4 names it torch_dtype
    pipe = transformers.pipeline("text-classification", model=str(folder), device="cpu",
                                 **{key: dtype}, **kwargs)
    batch = info["batch_size"] if info["padding"] is not False else 1

    def predict(batch_texts):
        return [{d["label"]: d["score"] for d in row}
                for row in pipe(batch_texts, batch_size=batch, top_k=None)]
    return predict


def onnx_runtime(path, info):
    import onnxruntime as ort
    options = ort.SessionOptions()
    # Its threads would otherwise spin on the cores after each call, slowing whatever runs next
    # (here the other predictors, interleaved) while they spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tokenizer, names = data.get_tokenizer(), info["class_names"]

    def predict(batch_texts):
        out = []
        loader = evaluate.text_loader([(0, t) for t in batch_texts], info, tokenizer,
                                      by_length=evaluate.batch_independent(info))
        for ids, _ in loader:
            logits = session.run(None, {"input_ids": ids.numpy()})[0]
            probs = torch.softmax(torch.from_numpy(logits), dim=-1).tolist()
            out += [dict(zip(names, row)) for row in probs]
        order = loader.sampler if evaluate.batch_independent(info) else range(len(out))
        return [probs for _, probs in sorted(zip(order, out), key=lambda pair: pair[0])]
    return predict


@contextlib.contextmanager
def served(classifier, info):
    """The server over `classifier` on 127.0.0.1 (a free port), as `evaluate.py --serve` runs."""
    server = serve.make_server(classifier, info, CPU, "bench-predict", port=0, log=False,
                               predict=evaluate.predict_proba)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def server_clients(port, clients, per_request):
    """Send the texts in requests of `per_request` from `clients` threads at once, each taking
    every clients-th request; returns None (the server's probabilities are ours)."""
    def predict(batch_texts):
        requests = [batch_texts[i:i + per_request]
                    for i in range(0, len(batch_texts), per_request)]
        latencies, failed = [], []

        def client(k):
            try:
                for req in requests[k::clients]:
                    _client(port, req, 1, latencies)
            except Exception as e:  # noqa: BLE001  (reported below, in the main thread)
                failed.append(e)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=3600)
        assert not failed and len(latencies) == len(requests), failed
    return predict


# ----------------------------------------------------------------------------- measuring

def largest_gap(a, b):
    assert len(a) == len(b) and all(sorted(p) == sorted(q) for p, q in zip(a, b))
    return max(abs(p[c] - q[c]) for p, q in zip(a, b) for c in p)


def interleaved(predictors, texts, rounds):
    """{name: [seconds of each round]}: the texts in `rounds` slices, each slice through every
    predictor in turn, the order rotated each round."""
    names = list(predictors)
    seconds = {n: [] for n in names}
    bounds = [len(texts) * i // rounds for i in range(rounds + 1)]
    for r in range(rounds):
        chunk = texts[bounds[r]:bounds[r + 1]]
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            predictors[n](chunk)
            seconds[n].append(time.perf_counter() - start)
        print(f"\n  round {r + 1}/{rounds}, {len(chunk)} texts: " + ", ".join(
            f"{n} {len(chunk) / seconds[n][-1]:.2f}/s" for n in names)
            + f"; load {load_line()[0]}", end="", flush=True)
    return seconds, [bounds[r + 1] - bounds[r] for r in range(rounds)]


def load_line():
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return ["?"] * 3


@pytest.fixture(scope="module")
def predict_table(sizes):
    """Rows of the side-by-side table, printed and written when the module ends."""
    rows = []
    yield rows
    if not rows:
        return
    head = ("padding", "precision", "predictor", "texts/s (median, min-max)",
            "ours / it (median, min-max)", "rounds x texts", "largest gap to ours", "load")
    lines = [head, ["---"] * len(head), *rows]
    cpu = ddp.device_name(CPU)
    text = (f"CPU: {cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch "
            f"threads; torch {torch.__version__}, transformers {transformers.__version__}"
            + (" (SMOKE PASS: tiny model, not a measurement)" if sizes.tiny else "") + "\n\n"
            + "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines))
    print("\n\nPredictions side by side:\n" + text)
    if not sizes.tiny:
        Path("bench-predict.md").write_text(text + "\n", encoding="utf-8")


CASES = [("fixed", "fp32"), ("fixed", "bf16"), ("pertext", "fp32"), ("pertext", "bf16")]


@pytest.mark.parametrize("mode, precision", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_predictions_side_by_side(benchmark, runs, texts, sizes, predict_table, mode,
                                  precision, pytestconfig):
    run, hf, onnx = runs[mode]
    texts = texts[0]
    classifier, info = evaluate.load_run(run, CPU)  # an fp32 run: fp32 classifier
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    mine = evaluate.inference_classifier(classifier.gpt, info, torch.bfloat16) if bf16 \
        else classifier
    predictors = {"ours": ours(mine, info), "transformers": hf_pipeline(hf, info, dtype)}
    if onnx is not None and not bf16:
        predictors["onnxruntime"] = onnx_runtime(onnx, info)

    # The same work: every predictor's probabilities against ours in fp32, on the first texts.
    sample = texts[:CHECK]
    reference = ours(classifier, info)(sample)
    gaps = {n: largest_gap(reference, p(sample)) for n, p in predictors.items()}
    if not bf16:
        assert all(g <= TOLERANCE for g in gaps.values()), gaps

    with contextlib.ExitStack() as stack:
        if mode == "fixed" and not bf16:
            port = stack.enter_context(served(classifier, info))
            for clients in (1, 4):
                predictors[f"server-{clients}c"] = server_clients(port, clients,
                                                                  info["batch_size"])
            predictors["server-1c"](sample[:info["batch_size"]])  # warm: the first request
        given = pytestconfig.getoption("bench_rounds")
        rounds = 1 if sizes.tiny else given or ROUNDS
        result = {}
        load_start = load_line()

        def run_all():
            result["s"], result["n"] = interleaved(predictors, texts, rounds)

        benchmark.group = "predictions side by side"
        benchmark.pedantic(run_all, rounds=1, iterations=1)
        load_end = load_line()
    seconds, counts = result["s"], result["n"]
    rates = {n: [c / s for c, s in zip(counts, secs)] for n, secs in seconds.items()}
    load = f"{load_start[0]} -> {load_end[0]}"
    summary = {}
    for n, r in rates.items():
        ratios = [a / b for a, b in zip(rates["ours"], r)]  # ours' texts/s over its, per round
        summary[n] = {"texts_per_s": r, "texts_per_s_median": statistics.median(r),
                      "texts_per_s_overall": sum(counts) / sum(seconds[n]),
                      "ours_over_it": ratios, "ours_over_it_median": statistics.median(ratios)}
        predict_table.append([
            mode, precision, n,
            f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})",
            "1.00x" if n == "ours" else
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
            f"{len(counts)} x {counts[0]}",
            "-" if n.startswith("server") else
            ("0" if n == "ours" and not bf16 else f"{gaps[n]:.1e}"),
            load])
    benchmark.extra_info.update(
        mode=mode, precision=precision, texts=len(texts), rounds=len(counts),
        batch_size=info["batch_size"], padding=info["padding"],
        token_position=info["token_position"], gaps_to_ours_fp32=gaps,
        cpu=ddp.device_name(CPU), threads=torch.get_num_threads(), load_start=load_start,
        load_end=load_end, torch=torch.__version__, transformers=transformers.__version__,
        tiny=sizes.tiny, predictors=summary)
    print(f"\n{mode} {precision}: " + ", ".join(
        f"{n} {v['texts_per_s_median']:.2f} texts/s (ours/it {v['ours_over_it_median']:.2f}x)"
        for n, v in summary.items()) + f"; load {load}", flush=True)
