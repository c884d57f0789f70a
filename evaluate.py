"""Use a fine-tuned run: accuracy on every split, or classify new text.

    python evaluate.py --run runs/20261127-101500 --all-splits
    python evaluate.py --run DIR --text "You are a winner you have been specially selected..."
    cat messages.txt | python evaluate.py --run DIR --stdin

A run trained on a GPU evaluates on a CPU (or anywhere else) with the same numbers.
"""

import argparse
import csv
import dataclasses
import html
import http.server
import io
import json
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

import data
import ddp
import gpt
import shortcuts


def select_device(name="auto"):
    """auto: cuda, then mps (only torch >= 2.9: older MPS gave wrong numbers), then cpu. An
    explicit mps on an older torch is refused for the same reason."""
    mps_new = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)
    if name == "auto":
        mps_ok = torch.backends.mps.is_available() and mps_new
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available here; use --device cpu (or auto)")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available here; use --device cpu (or auto)")
    elif name == "mps" and not mps_new:
        raise ValueError(f"--device mps needs torch 2.9 or newer (this is {torch.__version__}; "
                         "older MPS gave wrong numbers); upgrade torch (pip install -U torch), "
                         "or use --device cpu")
    return torch.device(name)


def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    """Share of examples whose argmax class is the label, over the first `num_batches` batches
    (the whole loader by default). `model` maps token ids (B, T) to class logits (B, C).
    Under torchrun each process classifies its share of each batch and the counts are added up."""
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = ddp.share(input_batch), ddp.share(target_batch)
        if len(target_batch) == 0:  # under torchrun: a short last batch left this process none
            continue
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            predicted_labels = torch.argmax(model(input_batch), dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    if ddp.world() > 1:
        correct_predictions, num_examples = ddp.sum_over_ranks(correct_predictions, num_examples)
    return correct_predictions / num_examples if num_examples else float("nan")


def predictions(data_loader, model, device):
    """(labels, predicted labels) over the whole loader, as two lists."""
    model.eval()
    labels, predicted = [], []
    with torch.no_grad():
        for input_batch, target_batch in data_loader:
            predicted += torch.argmax(model(input_batch.to(device)), dim=-1).tolist()
            labels += target_batch.tolist()
    return labels, predicted


def class_scores(labels, predicted, class_names):
    """Accuracy, macro- and weighted-F1, per-class precision / recall / F1 / support, and the
    N x N confusion matrix (rows: true class, columns: predicted class), as a dict."""
    n_classes = len(class_names)
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(labels, predicted):
        confusion[t][p] += 1
    per_class = {}
    for c, name in enumerate(class_names):
        tp = confusion[c][c]
        predicted_c = sum(row[c] for row in confusion)
        support = sum(confusion[c])
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": support}
    total = len(labels)
    seen = set(labels) | set(predicted)  # as scikit-learn: classes in truth or predictions
    present = [per_class[name] for c, name in enumerate(class_names) if c in seen]
    return {
        "examples": total,
        "accuracy": sum(confusion[c][c] for c in range(n_classes)) / total if total else 0.0,
        "macro_f1": sum(v["f1"] for v in present) / len(present) if present else 0.0,
        "weighted_f1": sum(v["f1"] * v["support"] for v in present) / total if total else 0.0,
        "per_class": per_class, "confusion": confusion}


class RunError(Exception):
    """A run folder that cannot be used; the message says why and what to do."""


# What run.json must hold (finetune.py writes them all; "data" is optional: older runs lack it).
RUN_KEYS = ("model", "num_classes", "class_names", "max_length", "pad_id", "padding",
            "token_position", "average_embeddings", "batch_size", "final_train_dropped")
ECHO_CHARS = 60  # how much of a text that was cut is echoed back


def load_run(run_dir, device):
    """(classifier, run info) from a finished run folder of finetune.py.

    The folder holds the whole model (model.safetensors) or only what training changed
    (trained.safetensors), which is laid over the base weights that run.json names, after
    checking by sha256 that they are the very ones the run started from."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        hint = ""
        if (run_dir.with_name(run_dir.name + ".unfinished") / "run.json").is_file():
            hint = (f"; {run_dir}.unfinished holds a finished run that a crash kept from being "
                    f"moved there: rename it to {run_dir}")
        raise RunError(f"--run {run_dir} is not a folder; pass a run folder made by "
                       f"finetune.py{hint}")
    if not (run_dir / "run.json").is_file():
        raise RunError(f"{run_dir} is not a finished run (no run.json): its training did not "
                       "finish; run finetune.py again or pass another --run")
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except ValueError as e:
        raise RunError(f"{run_dir / 'run.json'} is damaged ({e}); train the run again") from e
    missing = [k for k in RUN_KEYS if k not in info] if isinstance(info, dict) else ["model"]
    if not missing and isinstance(info["model"], dict):
        missing = [f"model.{f.name}" for f in dataclasses.fields(gpt.GPTConfig)
                   if f.name not in info["model"]]
    if not missing and isinstance(info.get("data"), dict):
        missing = [f"data.{k}" for k in ("path", "sha256") if k not in info["data"]]
    if missing:
        raise RunError(f"{run_dir / 'run.json'} has no {', '.join(map(repr, missing))} "
                       "(edited by hand?); put it back as finetune.py wrote it, or train the "
                       "run again")
    try:
        model = gpt.GPTModel(gpt.config_from_dict(info["model"]))
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{run_dir / 'run.json'} is damaged ({e}); train the run again") from e
    base = info.get("base")
    if base:
        try:
            gpt.load_base(model, base)
        except gpt.WeightsError as e:
            raise RunError(f"{run_dir} keeps only what training changed (trained.safetensors), "
                           f"but {e}; or train the run again, with --self-contained to keep "
                           "the whole model") from e
        flags = info["flags"]
        with torch.random.fork_rng(devices=[]):  # the head's (and LoRA's) draws are overwritten
            gpt.setup_classifier(model, info["num_classes"], flags["trainable_layers"],
                                 flags["lora_rank"], flags["lora_alpha"])
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {k for k in model.state_dict() if k in trained or k.startswith("out_head.")}
    else:
        gpt.add_classification_head(model, info["num_classes"])
        expected = set(model.state_dict())
    weights = run_dir / info.get("weights_file", "model.safetensors")
    try:
        state = gpt.read_tensors(weights, fix="train the run again")
    except gpt.WeightsError as e:
        raise RunError(str(e)) from e
    own = model.state_dict()
    missing, unexpected = expected - state.keys(), state.keys() - expected
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise RunError(f"the weights in {run_dir} do not fit its run.json: missing "
                       f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, wrong "
                       f"shape {sorted(wrong)[:3]}")
    model.load_state_dict(state, strict=not base)
    gpt.merge_lora(model)  # a no-op unless LoRA layers were put back over a base
    model.to(device).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(info.get("precision"))
    if dtype is torch.float16 and device.type != "cuda":
        dtype = torch.bfloat16  # fp16 autocast is a CUDA thing; bf16 has the range it lacks
    return inference_classifier(model, info, dtype), info


def inference_classifier(model, info, autocast_dtype=None, fast=True):
    """The classifier evaluate.py runs a trained model as, with the run's choices (`info`: its
    run.json). `fast`: for inference, the blocks before the last through FrozenBlocks
    (prepared once) and the last at the classified position only: the same numbers up to float
    rounding (off: the model as written, for the benchmarks' before)."""
    return gpt.Classifier(model, position=info.get("token_position", "last"),
                          average=info.get("average_embeddings", False),
                          pad_id=info.get("pad_id", data.PAD_ID), autocast_dtype=autocast_dtype,
                          shortcuts=shortcuts.for_inference(fast))


def text_loader(rows, info, tokenizer, batch_size=None):
    """A DataLoader over (label id, text) rows, encoded and padded as the run was trained."""
    ds = data.TextDataset(rows, tokenizer, info["max_length"], pad=info["padding"])
    batch_size = 1 if info["padding"] is False else batch_size or info["batch_size"]
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size,
        collate_fn=data.pad_batch if info["padding"] == "batch" else None)


def predict_proba(texts, classifier, info, device, tokenizer=None, batch_size=None):
    """Class probabilities of each text: a list of {class name: probability}, in class order.

    Texts are encoded, cut and padded as in training (the run's max_length and padding). This is
    the one classifying function: --text, --stdin, --predict and serving all call it."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i + 1} is empty; give a text to classify")
    tokenizer = tokenizer or data.get_tokenizer()
    names, out = info["class_names"], []
    classifier.eval()
    with torch.no_grad():
        for ids, _ in text_loader([(0, t) for t in texts], info, tokenizer, batch_size):
            probs = torch.softmax(classifier(ids.to(device)), dim=-1).cpu().tolist()
            out += [dict(zip(names, row)) for row in probs]
    return out


def top_k(probs, k=1):
    """The `k` most probable (class name, probability) pairs of one text, most probable first."""
    return sorted(probs.items(), key=lambda kv: -kv[1])[:k]


def classify(text, classifier, tokenizer, info, device):
    """(class name, its probability) for one text, encoded and padded as in training."""
    if not text.strip():
        raise ValueError("the text is empty; give a message to classify")
    [probs] = predict_proba([text], classifier, info, device, tokenizer)
    return top_k(probs)[0]


def scores_of(rows, classifier, info, device, tokenizer):
    """class_scores of the classifier over (label id, text) rows."""
    labels, predicted = predictions(text_loader(rows, info, tokenizer), classifier, device)
    return class_scores(labels, predicted, info["class_names"])


def run_data(info, data_path=None):
    """The run's own labelled data, split as finetune.py split it: the SMS data (see
    load_run_data), or the run's own files, read again from where run.json records them (with
    a warning on stderr where a file changed since)."""
    flags = info.get("flags", {})
    if not flags.get("train_file"):
        rows = load_run_data(info, data_path)
        return data.LabelledData(data.make_splits(rows), list(data.CLASS_NAMES))
    if data_path is not None:
        raise ValueError("--data is the SMS data; this run was trained on its own files "
                         f"({flags['train_file']}), which evaluate.py reads again")
    files = (info.get("data") or {}).get("files", {})
    flags = {**flags, **{flag: f["path"] for flag, f in files.items()}}
    for flag, f in files.items():
        if not Path(f["path"]).is_file():
            raise data.DataError(f"this run was trained on {f['path']}, which is no longer "
                                 "there; put it back to evaluate the run's splits, or score a "
                                 "file with --file")
        if data.file_source(f["path"])["sha256"] != f["sha256"]:
            print(f"warning: {f['path']} changed since this run was trained on it (its sha256 "
                  "differs), so the splits differ and these are not the run's scores",
                  file=sys.stderr)
    labelled = data.load_labelled(flags)
    if labelled.class_names != info["class_names"]:
        raise RunError(f"the run's data now has the classes {labelled.class_names}, the run "
                       f"was trained on {info['class_names']}; the files changed since")
    return labelled


def load_run_data(info, data_path=None):
    """The rows for --all-splits: `data_path`, else the data the run was trained on (run.json
    records its path and sha256). Warns on stderr when the data differs from the run's."""
    trained = info.get("data")  # absent in runs made before it was recorded
    if data_path is None and trained:
        if Path(trained["path"]).is_file():
            data_path = trained["path"]
        elif trained["sha256"] != data.SMS_SHA256:  # (the published data is the download)
            raise data.DataError(f"this run was trained on {trained['path']}, which is no "
                                 "longer there; pass --data PATH (the same data: sha256 "
                                 f"{trained['sha256']})")
    rows, source = data.load(data_path)
    if trained and source["sha256"] != trained["sha256"]:
        print(f"warning: {source['path']} is not the data this run was trained on "
              f"({trained['path']}; the sha256 differs), so the splits differ and these are "
              "not the run's accuracies; pass --data with the run's data to get them",
              file=sys.stderr)
    elif not trained and (warning := data.unpublished_warning(rows, source)):
        print(warning, file=sys.stderr)
    return rows


def evaluate_splits(classifier, info, device, data_path=None):
    """class_scores over the whole of each of the run's splits ({split name: scores})."""
    splits = run_data(info, data_path).splits
    tokenizer = data.get_tokenizer()
    loaders = {}
    for name, rows in splits.items():
        if name == "train":  # the examples finetune.py's final pass covered
            dropped = set(info["final_train_dropped"])
            rows = [row for i, row in enumerate(rows) if i not in dropped]
        loaders[name] = text_loader(rows, info, tokenizer)
    results = {}
    total = sum(len(loader) for loader in loaders.values())
    with data.progress(total=total, desc="Evaluating every split", unit="batch") as bar:
        for name, loader in loaders.items():
            labels, predicted = predictions(data.Ticking(loader, bar), classifier, device)
            results[name] = class_scores(labels, predicted, info["class_names"])
    return results


def read_stdin():
    """The non-blank lines of standard input, read as UTF-8 (anything else is refused with the
    byte it stumbled on)."""
    if sys.stdin.isatty():
        print("Reading messages from standard input, one per line; end with Ctrl-D.",
              file=sys.stderr)
    buffer = getattr(sys.stdin, "buffer", None)
    text = data.decode_utf8(buffer.read(), "standard input") if buffer else sys.stdin.read()
    lines = [line.rstrip("\n") for line in io.StringIO(text, newline=None) if line.strip()]
    if not lines:
        raise ValueError("standard input held no text; pipe in the messages to classify, one "
                         "per line")
    return lines


def echo(text, tokenizer, info, context_length):
    """The text as echoed after its label: whole, or, where it was cut to the run's length, a
    short prefix and how much of it was classified."""
    max_length = min(info["max_length"], context_length)
    n = len(tokenizer.encode_ordinary(text))
    if n <= max_length:
        return text
    prefix = text[:ECHO_CHARS].rstrip() + "..." if len(text) > ECHO_CHARS else text
    return f"{prefix}  [cut: only its first {max_length} of {n:,} tokens were classified]"


def run_columns(info, args):
    """(format, text column, label column) for a file given to this run: the flags given here,
    else the run's own."""
    flags = info.get("flags", {})
    return (args.format, args.text_column or flags.get("text_column") or "text",
            args.label_column or flags.get("label_column") or "label")


def evaluate_file(path, classifier, info, device, args):
    """class_scores over a labelled file, read with the run's columns and format rules."""
    fmt, text_column, label_column = run_columns(info, args)
    records = data.read_records(path, fmt, text_column, label_column)
    ids = {name: i for i, name in enumerate(info["class_names"])}
    rows = []
    for r in records:
        label = r.label
        if label not in ids and data._is_int(label) and str(int(label)) in ids:
            label = str(int(label))
        if label not in ids:
            raise data.DataError(
                f"{path} {r.where} {r.row}: the label {r.label!r} is not a class of the run "
                f"({', '.join(map(repr, info['class_names']))}); fix the label")
        rows.append((ids[label], r.text))
    return scores_of(rows, classifier, info, device, data.get_tokenizer())


SPLIT_TITLES = {"train": "Training", "validation": "Validation", "test": "Test"}


def print_scores(results, class_names):
    """Accuracy lines (finetune.py's, for the run's splits), then per split: macro- and
    weighted-F1, per-class precision / recall / F1 / support and the confusion matrix."""
    for name, r in results.items():
        print(f"{SPLIT_TITLES.get(name, name)} accuracy: {r['accuracy']*100:.2f}%")
    print()
    width = max(16, *(len(n) + 2 for n in results))
    print(f"{'split':<{width}} {'accuracy':>9} {'macro-F1':>9} {'weighted-F1':>12} "
          f"{'examples':>9}")
    for name, r in results.items():
        print(f"{name:<{width}} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} "
              f"{r['weighted_f1']:>12.4f} {r['examples']:>9}")
    cw = max(10, *(len(c) + 2 for c in class_names))
    for name, r in results.items():
        print()
        print(f"{name}: per class")
        print(f"{'class':<{cw}} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}")
        for c in class_names:
            v = r["per_class"][c]
            print(f"{c:<{cw}} {v['precision']:>9.4f} {v['recall']:>7.4f} {v['f1']:>7.4f} "
                  f"{v['support']:>8}")
        print(f"{name}: confusion (rows: true class, columns: predicted class)")
        print(f"{'':<{cw}}" + "".join(f" {c:>{cw}}" for c in class_names))
        for c, row in zip(class_names, r["confusion"]):
            print(f"{c:<{cw}}" + "".join(f" {v:>{cw}}" for v in row))


def write_predictions(path, out_path, classifier, info, device, args):
    """For each row of `path`: its row id, the predicted class name and one probability column
    per class name, written to `out_path` (.csv or .jsonl by its extension), atomically."""
    fmt, text_column, _ = run_columns(info, args)
    out_fmt = data.file_format(out_path)
    if out_fmt == "tsv":
        raise ValueError(f"--output {out_path}: write predictions to a .csv or .jsonl file")
    if Path(out_path).resolve() == Path(path).resolve():
        raise ValueError("--output is the --predict file itself; name another file")
    if Path(out_path).exists() and not args.overwrite:
        raise ValueError(f"--output {out_path} exists; pass --overwrite to replace it, or name "
                         "another file")
    records = data.read_records(path, fmt, text_column, labelled=False)
    probs = []
    texts = [r.text for r in records]
    step = 256
    for i in range(0, len(texts), step):  # a bounded batch of texts at a time
        probs += predict_proba(texts[i:i + step], classifier, info, device)
    names = info["class_names"]
    buf = io.StringIO(newline="")
    if out_fmt == "jsonl":
        for r, p in zip(records, probs):
            buf.write(json.dumps({r.where: r.row, "predicted": top_k(p)[0][0],
                                  "probabilities": p}, ensure_ascii=False) + "\n")
    else:
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([records[0].where, "predicted", *names])
        for r, p in zip(records, probs):
            writer.writerow([r.row, top_k(p)[0][0], *(f"{p[n]:.6f}" for n in names)])
    data.write_atomic(out_path, buf.getvalue().encode("utf-8"))
    return len(records)


def latest_run(root="runs"):
    """The most recently finished run folder under `root` (by its run.json's time)."""
    finished = sorted(Path(root).glob("*/run.json"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not finished:
        raise RunError(f"no finished run under {root}/; train one with python finetune.py, or "
                       "pass --run DIR")
    return finished[-1].parent


# ----------------------------------------------------------------------------- serving a run
# `--serve`: a page to try the run by hand and a JSON API for programs, on the standard
# library's threaded HTTP server. One request classifies up to MAX_TEXTS texts; its body may be
# up to MAX_BODY bytes. The model runs under inference_mode, one request at a time (a lock).

MAX_TEXTS = 64
MAX_BODY = 1 << 20  # 1 MiB
PAGE = Path(__file__).resolve().with_name("serve.html")


def class_probabilities(texts, classifier, tokenizer, info, device, lock=None):
    """(predict_proba's {class: probability} per text, truncated flags): a text is `truncated`
    when it has more tokens than the run's max_length, so that only its beginning was classified,
    as in training. `lock`, if given, is held around the model's work. A text the tokenizer
    refuses raises ValueError naming it as texts[i]."""
    max_length = min(info["max_length"], classifier.gpt.cfg.context_length)
    truncated = []
    for i, text in enumerate(texts):
        try:
            truncated.append(len(data.encode(text, tokenizer, pad=False)) > max_length)
        except ValueError as e:  # e.g. tiktoken refuses "<|endoftext|>" inside a text
            raise ValueError(f"texts[{i}] cannot be tokenized: {str(e).splitlines()[0]}") from e
    with lock or nullcontext(), torch.inference_mode():
        probs = predict_proba(texts, classifier, info, device, tokenizer, batch_size=32)
    return probs, truncated


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}; the server goes on."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.headers = status, dict(headers)


def parse_texts(body):
    """The texts of a /classify body, or a RequestError that says what to send instead."""
    usage = 'send {"texts": ["a message", ...]}'
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, f"the body is not UTF-8 text; {usage}") from None
    except ValueError as e:
        raise RequestError(400, f"the body is not valid JSON ({e}); {usage}") from None
    if not isinstance(request, dict) or "texts" not in request:
        raise RequestError(400, f'the body has no "texts"; {usage}')
    texts = request["texts"]
    if not isinstance(texts, list):
        raise RequestError(400, f'"texts" must be a list of strings; {usage}')
    if not texts:
        raise RequestError(400, f'"texts" is empty; {usage}')
    if len(texts) > MAX_TEXTS:
        raise RequestError(400, f'{len(texts)} texts is more than the {MAX_TEXTS} one request '
                           "may hold; split them over several requests")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"texts[{i}] is not a string; {usage}")
        if not text.strip():
            raise RequestError(400, f"texts[{i}] is empty; give a message to classify")
    return texts


class ServeHandler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), GET /health, POST /classify; everything else a JSON 404 or 405."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client may send many requests on one connection
    server_version = "gpt2-classify"
    timeout = 60  # seconds a silent client may hold its connection (and a thread)

    def do_GET(self):  # noqa: N802 (the names http.server calls)
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def do_PUT(self):  # noqa: N802
        self._route("PUT")

    def do_DELETE(self):  # noqa: N802
        self._route("DELETE")

    def _route(self, method):
        routes = {"/": ("GET", self._page), "/health": ("GET", self._health),
                  "/classify": ("POST", self._classify)}
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        try:
            if path not in routes:
                self._drain()
                raise RequestError(404, f"there is no {path}; try GET /, GET /health or "
                                   "POST /classify")
            allowed, answer = routes[path]
            if method != allowed:
                self._drain()
                raise RequestError(405, f"{path} takes {allowed}, not {method}",
                                   {"Allow": allowed})
            answer()
        except RequestError as e:
            self._send_json(e.status, {"error": str(e)}, e.headers)
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True
        except Exception as e:  # a bug, not the client's fault: say so and keep serving
            self.log_error("error on %s %s: %r", method, path, e)
            self._send_json(500, {"error": f"the server failed on this request ({e!r})"})

    def _drain(self):
        """Read and drop a body sent with a request that will not use it, so the connection
        stays in step (up to MAX_BODY; more and the connection is closed after the answer)."""
        length = self._content_length(required=False)
        if length > MAX_BODY:
            self.close_connection = True
        else:
            self.rfile.read(length)

    def _content_length(self, required=True):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        value = self.headers.get("Content-Length")
        if value is None:
            if required:
                self.close_connection = True
                raise RequestError(411, 'send a body with a Content-Length: {"texts": [...]}')
            return 0
        if not value.isdigit():
            self.close_connection = True
            raise RequestError(400, f"Content-Length {value!r} is not a byte count")
        return int(value)

    def _page(self):
        self._send(200, self.server.page, "text/html; charset=utf-8")

    def _health(self):
        self._send_json(200, {"status": "ok", **self.server.about})

    def _classify(self):
        length = self._content_length()
        if length > MAX_BODY:
            # Read what was sent (within reason) so that the client sees the answer rather than
            # a reset connection, then close.
            self.close_connection = True
            while 0 < length <= 16 * MAX_BODY:
                chunk = self.rfile.read(min(length, 1 << 16))
                length = length - len(chunk) if chunk else 0
            raise RequestError(413, f"the body is over {MAX_BODY} bytes; send fewer or shorter "
                               "texts per request")
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, "the body ended before its Content-Length")
        texts = parse_texts(body)
        srv = self.server
        try:
            probs, truncated = class_probabilities(texts, srv.classifier, srv.tokenizer,
                                                   srv.info, srv.device, lock=srv.model_lock)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        self._send_json(200, {"predictions": [
            {"label": top_k(p)[0][0], "probabilities": p, "truncated": cut}
            for p, cut in zip(probs, truncated)]})

    def _send_json(self, status, obj, headers=()):
        self._send(status, json.dumps(obj).encode() + b"\n", "application/json", headers)

    def _send(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in dict(headers).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        if self.server.log:
            super().log_message(format, *args)


def make_server(classifier, info, device, run_name, host="127.0.0.1", port=8000, log=True):
    """A ThreadingHTTPServer serving one run (not started: call its serve_forever)."""
    server = http.server.ThreadingHTTPServer((host, port), ServeHandler)
    server.daemon_threads = True
    server.classifier, server.info, server.device, server.log = classifier, info, device, log
    server.tokenizer, server.model_lock = data.get_tokenizer(), threading.Lock()
    server.about = {"run": run_name, "classes": list(info["class_names"]),
                    "device": str(device), "max_length": info["max_length"],
                    "max_texts": MAX_TEXTS, "max_body_bytes": MAX_BODY}
    fill = {"run": run_name, "classes": ", ".join(info["class_names"]), "device": str(device),
            "max_length": str(info["max_length"])}
    page = PAGE.read_text(encoding="utf-8")
    for key, value in fill.items():
        page = page.replace("{{" + key + "}}", html.escape(value))
    server.page = page.encode()
    return server


def serve(run_dir, classifier, info, device, host="127.0.0.1", port=8000):
    """Serve until Ctrl-C, then close the socket and return."""
    try:
        server = make_server(classifier, info, device, Path(run_dir).resolve().name, host, port)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another "
                         "--port (0 picks a free one) or --host") from e
    shown = f"[{server.server_address[0]}]" if ":" in server.server_address[0] else \
        server.server_address[0]
    print(f"Serving {run_dir} (classes: {', '.join(info['class_names'])}; device: {device}) "
          f"at http://{shown}:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Stopped.", flush=True)
    finally:
        server.server_close()


def main(argv=None):
    p = argparse.ArgumentParser(description="Scores of a fine-tuned run on its splits or on a "
                                "labelled file, or its classes for new texts.")
    p.add_argument("--run", metavar="DIR", help="a run folder of finetune.py (default: the most "
                   "recent finished run under runs/)")
    p.add_argument("--data", metavar="PATH", help="the raw SMSSpamCollection file or its zip "
                   "for --all-splits of a run on the SMS data (default: the data the run was "
                   "trained on, as run.json records it)")
    p.add_argument("--all-splits", action="store_true",
                   help="print accuracy, macro- and weighted-F1, per-class precision / recall / "
                   "F1 and the confusion matrix on the run's own train, validation and test")
    p.add_argument("--file", metavar="FILE", action="append", default=[],
                   help="the same scores on a labelled .csv/.tsv/.jsonl file (the run's "
                   "columns; repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write those scores to PATH as JSON")
    p.add_argument("--predict", metavar="FILE", help="classify every row of FILE (its text "
                   "column; labels not needed) and write the results to --output")
    p.add_argument("--output", metavar="PATH", help="where --predict writes: .csv or .jsonl, "
                   "one row per input row: its row id, the predicted class, one probability "
                   "per class")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="a text to classify (repeat for more)")
    p.add_argument("--stdin", action="store_true",
                   help="classify each line of standard input (blank lines are skipped)")
    p.add_argument("--top-k", type=int, default=1, metavar="N",
                   help="for --text and --stdin, print the N most probable classes (default: 1)")
    p.add_argument("--format", choices=data.FORMATS,
                   help="the format of --file and --predict (default: from the extension)")
    p.add_argument("--text-column", metavar="NAME", help="the text column of --file and "
                   "--predict (default: the run's)")
    p.add_argument("--label-column", metavar="NAME", help="the label column of --file "
                   "(default: the run's)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to run (default: cpu)")
    p.add_argument("--serve", action="store_true",
                   help="serve the run: a web page at / and a JSON API at /classify, until Ctrl-C")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address --serve listens on (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 for every network the machine is on)")
    p.add_argument("--port", type=int, default=8000,
                   help="the port --serve listens on (default: 8000; 0 picks a free one)")
    args = p.parse_args(argv)
    if not (args.all_splits or args.file or args.predict or args.text or args.stdin
            or args.serve):
        p.error("say what to do: --all-splits, --file FILE, --predict FILE, --text TEXT, --stdin "
                "or --serve")
    if args.serve and (args.all_splits or args.file or args.predict or args.text or args.stdin):
        p.error("--serve runs alone: leave out --all-splits, --file, --predict, --text and "
                "--stdin")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a port; give 0 to 65535 (0 picks a free one)")
    try:
        if any(not t.strip() for t in args.text):
            raise ValueError("a --text is empty; give a message to classify")
        if args.top_k < 1:
            raise ValueError("--top-k must be 1 or more")
        if args.predict and not args.output:
            raise ValueError("--predict needs --output PATH (.csv or .jsonl) to write to")
        if args.output and not args.predict:
            raise ValueError("--output is where --predict writes; give --predict FILE too")
        if args.json and not (args.all_splits or args.file):
            raise ValueError("--json writes the scores of --all-splits or --file; ask for one")
        texts = list(args.text) + (read_stdin() if args.stdin else [])
        if args.run is None:
            args.run = latest_run()
            print(f"Using the most recent finished run: {args.run}", file=sys.stderr)
        device = select_device(args.device)
        classifier, info = load_run(args.run, device)
        if args.serve:
            return serve(args.run, classifier, info, device, args.host, args.port)
        names = info["class_names"]
        report = {}
        if args.all_splits:
            report["splits"] = evaluate_splits(classifier, info, device, args.data)
            print_scores(report["splits"], names)
        for path in args.file:
            scores = evaluate_file(path, classifier, info, device, args)
            report.setdefault("files", {})[str(path)] = scores
            if args.all_splits or len(args.file) > 1:
                print()
            print(f"{path}: {scores['examples']} rows")
            print_scores({Path(path).name: scores}, names)
        if args.json:
            data.write_json(args.json, {"run": str(args.run), "class_names": names, **report})
        if args.predict:
            n = write_predictions(args.predict, args.output, classifier, info, device, args)
            print(f"Wrote {n} predictions to {args.output}")
        tokenizer = data.get_tokenizer()
        width = max(8, *(len(n) for n in names))
        for text, probs in zip(texts, predict_proba(texts, classifier, info, device, tokenizer)
                               if texts else []):
            shown = "  ".join(f"{name:<{width}}  {prob:.4f}"
                              for name, prob in top_k(probs, args.top_k))
            print(f"{shown}  {echo(text, tokenizer, info, classifier.gpt.cfg.context_length)}")
    except (ValueError, RunError, data.DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a file that cannot be read or written: one line, naming it
        sys.exit(f"error: {data.describe_os_error(e)}")


if __name__ == "__main__":
    main()
