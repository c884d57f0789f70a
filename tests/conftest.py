"""Shared fixtures: the real raw data file, a tiny Hugging Face GPT-2, and a local HTTP server.

Everything here is offline and quick: the HTTP server listens on 127.0.0.1 only, and the
Hugging Face model has 2 layers of width 32.
"""

import http.server
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

# One thread per process, in the tests and in every process they start: setup.cfg runs the suite
# on all cores (pytest-xdist), and on 2 cores a process with 2 threads beside another worker has
# its threads wait for each other. The models here are tiny, so one thread loses nothing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ctrl-C in every process the tests start, however the suite was launched: a shell without job
# control starts a command put in the background (`&`) with SIGINT ignored, every child inherits
# that, and a Python started so never raises KeyboardInterrupt (the serving tests' Ctrl-C then
# waits in vain). A handled signal is reset to its default in each child, which then has Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402 (after the variable, which torch reads when it loads)
import torch  # noqa: E402

# The real data: $SMS_SPAM_DATA (as the benchmarks read it), else a copy beside the repository.
DEFAULT_RAW_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "SMSSpamCollection"


def raw_data_path():
    """Where the real SMS Spam Collection is looked for, and whether the place was asked for."""
    given = os.environ.get("SMS_SPAM_DATA")
    return (Path(given), True) if given else (DEFAULT_RAW_PATH, False)


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>", or "max <period>"


def pytest_xdist_auto_num_workers(config):
    """How many workers setup.cfg's `-n auto` starts: one per core this process may use (its CPU
    affinity, and a cgroup's CPU quota where one is set), at most 8, since every worker loads
    torch and transformers. PYTEST_XDIST_AUTO_NUM_WORKERS, where set, decides instead."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own rule reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(cores, 8))


def pytest_configure(config):
    """tests/ holds no benchmarks (bench/ does): pytest-benchmark is off here from the start,
    rather than turned off by pytest-xdist's workers with a warning on every run."""
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def raw_path():
    """The real SMS Spam Collection (never committed). Missing: the tests that need it skip,
    saying how to provide it; in CI (CI=true), or where SMS_SPAM_DATA names a missing file, the
    run fails instead, so that those checks are never skipped silently."""
    path, asked = raw_data_path()
    if path.is_file():
        return path
    how = ("set SMS_SPAM_DATA to the raw SMSSpamCollection file (from the UCI zip: "
           "python data.py --output-dir DIR downloads it into the cache)")
    if asked:
        pytest.fail(f"SMS_SPAM_DATA={path} is not a file; {how}", pytrace=False)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI: the real SMS Spam Collection is missing; {how}", pytrace=False)
    pytest.skip(f"needs the real SMS Spam Collection: {how}")


@pytest.fixture(scope="session")
def small_raw_path(tmp_path_factory):
    """A small SMS Spam Collection: 180 ham and 120 spam texts of 3 to 40 words, so that the
    balanced split holds 168 / 24 / 48 examples (21 training batches of 8)."""
    rng = random.Random(0)
    ham = "ok see you at home later then call me when you get this lol dinner".split()
    spam = "free win prize cash claim now call txt urgent award guaranteed".split()
    lines = []
    for i in range(300):
        label, words = ("spam", spam) if i % 5 in (1, 3) else ("ham", ham)
        text = " ".join(rng.choice(words + ham) for _ in range(rng.randint(3, 40)))
        lines.append(f"{label}\t{text.capitalize()} {i}")
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The models here are tiny: thread start-up and hand-over cost more than the arithmetic,
    and on a busy machine several intra-op threads make a 10 ms test take half a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests seed torch and may change the default dtype; leave both as they were."""
    dtype, rng = torch.get_default_dtype(), torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)


# ----------------------------------------------------------------------------- Hugging Face

@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny Hugging Face GPT-2 checkpoint with GPT-2's real vocabulary size, so that whole
    finetune.py runs on the real data take seconds."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                     vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """(folder, model): a tiny randomly initialised GPT2LMHeadModel saved in Hugging Face format.

    Every parameter gets random noise on top of the library's initialisation, so the layer-norm
    scales and shifts and all biases differ from 1 and 0 and a mix-up among them shows in the
    logits. The model is in eval mode; the folder holds config.json and model.safetensors.
    """
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(20240601)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     vocab_size=100, bos_token_id=99, eos_token_id=99)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder, model.eval()


# ----------------------------------------------------------------------------- HTTP server

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the name http.server calls)
        srv = self.server
        srv.requests.append(self.path)
        srv.times.append(time.monotonic())
        status, body, length, chunked_cut = srv.routes.get(self.path, (404, b"not found",
                                                                       None, False))
        self.send_response(status)
        self.send_header("Connection", "close")
        if chunked_cut:  # one chunk, then the connection drops before the final empty chunk
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep the test output clean
        pass


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 serving whatever each test puts in it.

    `serve(path, body, status=200, length=None, chunked_cut=False)`: answer GET `path` with
    `body`; `length` is the Content-Length to claim (a lie when it is not len(body): the server
    then closes the connection early, a truncated transfer); `chunked_cut` sends the body as one
    chunk of a chunked response and drops the connection before the end. Unknown paths get 404.
    `requests` lists the paths asked for, in order; `times` when each was asked (monotonic).
    """

    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.routes, self.httpd.requests, self.httpd.times = {}, [], []
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def requests(self):
        return self.httpd.requests

    @property
    def times(self):
        return self.httpd.times

    def serve(self, path, body, status=200, length=None, chunked_cut=False):
        self.httpd.routes[path] = (status, body, length, chunked_cut)
        return self.url(path)

    def url(self, path):
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def http_server():
    server = LocalServer()
    yield server
    server.close()


@pytest.fixture
def closed_url():
    """A URL on a local port nobody listens on: every request is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/SMSSpamCollection.zip"


# ----------------------------------------------------------------------------- tiny runs

def tiny_run(out, *args, weights=None, data=None):
    """finetune.main on the tiny GPT-2 in this process, its printout captured; returns the
    printout. `weights`/`data`: the tiny checkpoint and a raw SMS file (or None: the args say)."""
    import contextlib
    import io

    import finetune
    given = [*(["--weights", weights] if weights else []), *(["--data", data] if data else []),
             "--output-dir", out, *args]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        finetune.main([str(a) for a in given])
    return buf.getvalue()


def error_line(excinfo):
    """The message of a SystemExit caught by pytest.raises: one line, starting `error: `."""
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in message
    return message


def one_error_line(main, args, capsys=None):
    """The one `error: ...` line that `main(args)` exits with (`main`: a module's main, or the
    module itself): no traceback, no second line (and, given capsys, nothing else printed to
    stderr)."""
    main = getattr(main, "main", main)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    message = error_line(e)
    if capsys is not None:
        out = capsys.readouterr()
        assert "Traceback" not in out.err + out.out, out.err
    return message


OWN_WORDS = {"pos": "good great fine love nice", "neg": "bad awful hate poor sad",
             "neutral": "table chair paper river cloud"}
OWN_LABELS = ("neutral", "pos", "neg")  # --labels: the run's class order, not the sorted one


def write_own_csv(path, n, seed=0):
    """A .csv of `n` rows (text, label) in OWN_WORDS's 3 classes, texts of 2 to 12 words."""
    import csv
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        for i in range(n):
            label = list(OWN_WORDS)[i % 3]
            pool = OWN_WORDS[label].split() + "the a it was so".split()
            w.writerow([" ".join(rng.choice(pool) for _ in range(rng.randint(2, 12))), label])
    return path


@pytest.fixture(scope="session")
def sms_run(tmp_path_factory, tiny_weights, small_raw_path):
    """A finished tiny run on the small SMS file (3 steps): copy it (shutil.copytree into
    tmp_path) before changing it."""
    out = tmp_path_factory.mktemp("sms-run") / "tiny-run"
    tiny_run(out, "--device", "cpu", "--epochs", "1", "--max-steps", "3", "--no-initial-eval",
             weights=tiny_weights, data=small_raw_path)
    return out


@pytest.fixture(scope="session")
def own_run(tmp_path_factory, tiny_weights):
    """A finished tiny run on own files: 3 classes in --labels order (OWN_LABELS, not sorted);
    {"run", "train", "new" (a .csv of texts alone)}. Copy the run before changing it."""
    folder = tmp_path_factory.mktemp("own-run")
    train = write_own_csv(folder / "train.csv", 60)
    new = folder / "new.csv"
    new.write_text("text\n" + "".join(f"{w} day\n" for w in ("good", "awful", "table", "fine")))
    tiny_run(folder / "run", "--train-file", train, "--labels", ",".join(OWN_LABELS),
             "--device", "cpu", "--epochs", "1", "--max-steps", "3", "--no-initial-eval",
             weights=tiny_weights)
    return {"run": folder / "run", "train": train, "new": new}
