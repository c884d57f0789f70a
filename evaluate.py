"""Use a fine-tuned run: its scores (accuracy, F1, per-class precision and recall, the
confusion matrix) on its splits or on a labelled file, predictions for a file, the class of new
texts (`classify_review`, the chapter's section 6.8), and serving it over HTTP.

    python evaluate.py --run runs/20261127-101500 --all-splits
    python evaluate.py --run DIR --text "You are a winner you have been specially selected..."
    python evaluate.py --run DIR --predict new.csv --output predictions.csv
    cat messages.txt | python evaluate.py --run DIR --stdin
    python evaluate.py --run DIR --serve     # a page and a JSON API: serve.py
    python evaluate.py --run DIR --export hf exported/   # or onnx model.onnx: export.py

A run trained on a GPU evaluates on a CPU (or anywhere else) with the same numbers.
"""

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

import baseline
import data
import ddp
import decisions
import export
import files
import gpt
import serve
import shortcuts
import tables
from decisions import class_scores  # (finetune.py's baseline line uses it too)


def labels_and_logits(data_loader, model, device):
    """(labels (N,), logits (N, C) float64) over the whole loader, as numpy arrays."""
    model.eval()
    labels, logits = [], []
    with torch.no_grad():
        for input_batch, target_batch in data_loader:
            logits.append(model(input_batch.to(device)).float().cpu().numpy())
            labels += target_batch.tolist()
    return (np.asarray(labels, dtype=np.int64),
            np.concatenate(logits).astype(np.float64) if logits else np.zeros((0, 1)))


def split_scores(labels, logits, info):
    """class_scores of the argmax (which no temperature changes), with the scores beyond
    accuracy under the run's temperature ("scores") and, where the run has a decision, the
    positive class's rates at its threshold beside argmax's ("decision")."""
    names = info["class_names"]
    if not len(labels):
        return class_scores([], [], names)
    result = class_scores(labels.tolist(), logits.argmax(axis=1).tolist(), names)
    t = decisions.temperature_of(info)
    result["scores"] = decisions.probability_scores(logits, labels, t)
    if info.get("decision"):
        result["decision"] = decisions.at_threshold(logits, labels, names, info["decision"], t)
    return result


ECHO_CHARS = 60  # how much of a text that was cut is echoed back


def load_run(run_dir, device):
    """(classifier, run info) from a finished run folder of finetune.py.

    The folder holds the whole model (model.safetensors) or only what training changed
    (trained.safetensors), which is laid over the base weights that run.json names, after
    checking by sha256 that they are the very ones the run started from."""
    run_dir = Path(run_dir)
    info = files.read_run_info(run_dir, [f.name for f in dataclasses.fields(gpt.GPTConfig)])
    check_run_choices(info, run_dir / "run.json")
    try:
        model = gpt.GPTModel(gpt.config_from_dict(info["model"]))
    except (ValueError, KeyError, TypeError) as e:
        raise files.RunError(f"{run_dir / 'run.json'} is damaged ({e}); train the run again") from e
    base = info.get("base")
    if base:
        try:
            gpt.load_base(model, base)
        except gpt.WeightsError as e:
            raise files.RunError(f"{run_dir} keeps only what training changed "
                                 f"(trained.safetensors), but {e}; or train the run again, "
                                 "with --self-contained to keep the whole model") from e
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
    files.check_belongs(run_dir, info, weights)
    try:
        state = gpt.read_tensors(weights, fix="train the run again")
    except gpt.WeightsError as e:
        raise files.RunError(str(e)) from e
    own = model.state_dict()
    missing, unexpected = expected - state.keys(), state.keys() - expected
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise files.RunError(f"the weights in {run_dir} do not fit its run.json: missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, "
                             f"wrong shape {sorted(wrong)[:3]}")
    model.load_state_dict(state, strict=not base)
    gpt.merge_lora(model)  # a no-op unless LoRA layers were put back over a base
    model.to(device).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(info.get("precision"))
    if dtype is torch.float16 and device.type != "cuda":
        dtype = torch.bfloat16  # fp16 autocast is a CUDA thing; bf16 has the range it lacks
    return inference_classifier(model, info, dtype), info


def check_run_choices(info, where):
    """Refuse a run.json (`where`) whose token position or padding is unknown, or whose two
    contradict each other as finetune.py's check_config refuses them on the command line."""
    position, padding = info["token_position"], info["padding"]
    fix = "put it back as finetune.py wrote it, or train the run again"
    if position not in ("last", "first", "flexible"):
        raise files.RunError(f"{where}: token_position {position!r} is not last, first or "
                             f"flexible; {fix}")
    if padding not in (True, False, "batch"):
        raise files.RunError(f"{where}: padding {padding!r} is not true, false or \"batch\"; "
                             f"{fix}")
    if padding == "batch" and (info["average_embeddings"] or position == "last"):
        what = "average_embeddings true" if info["average_embeddings"] else \
            'token_position "last"'
        raise files.RunError(f"{where}: padding \"batch\" pads each batch only to its own "
                             f"longest text, so {what} would depend on the batch (finetune.py "
                             f"refuses the pair); {fix}")


def inference_classifier(model, info, autocast_dtype=None, use_shortcuts=True):
    """The classifier evaluate.py runs a trained model as, with the run's choices (`info`: its
    run.json). `use_shortcuts`: for inference, the blocks before the last through FrozenBlocks
    (prepared once) and the last at the classified position only: the same numbers up to float
    rounding (off: the model as written, for the benchmarks' before)."""
    return gpt.Classifier(model, position=info.get("token_position", "last"),
                          average=info.get("average_embeddings", False),
                          pad_id=info.get("pad_id", data.PAD_ID), autocast_dtype=autocast_dtype,
                          shortcuts=shortcuts.for_inference(use_shortcuts))


def batch_independent(info):
    """Whether each text's logits are its own whatever texts share its batch: per-batch padding
    (`--context-length batch`) classified at the last real token or the first, not averaged over
    the positions. Such a run's texts can be batched in any order."""
    return (info["padding"] == "batch" and not info.get("average_embeddings", False)
            and info.get("token_position", "last") in ("flexible", "first"))


def text_loader(rows, info, tokenizer, batch_size=None, by_length=False):
    """A DataLoader over (label id, text) rows, encoded and padded as the run was trained.
    `by_length`: the rows shortest first (the loader's `sampler` lists their order), so that
    each batch is padded only to lengths near its own; for batch_independent runs only."""
    ds = data.TextDataset(rows, tokenizer, info["max_length"], pad=info["padding"])
    batch_size = 1 if info["padding"] is False else batch_size or info["batch_size"]
    order = sorted(range(len(ds)), key=ds.lengths().__getitem__) if by_length else None
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=order,
        collate_fn=data.pad_batch if info["padding"] == "batch" else None)


def predict_proba(texts, classifier, info, device, tokenizer=None, batch_size=None):
    """Class probabilities of each text: a list of {class name: probability}, in class order.

    Texts are encoded, cut and padded as in training (the run's max_length and padding), and
    the probabilities calibrated by the run's temperature where it has one. This is the one
    classifying function: --text, --stdin, --predict and serving all call it. A single string
    is one text (a list of one comes back), never a list of its characters."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i + 1} is {type(text).__name__} {text!r}, not a string; "
                             "give a list of texts")
        if not text.strip():
            raise ValueError(f"text {i + 1} is empty; give a text to classify")
    tokenizer = tokenizer or data.get_tokenizer()
    names, out = info["class_names"], []
    # Where a text's logits do not depend on its batch, batches of texts of similar length: on
    # short texts of mixed lengths (the SMS data) about half the padded tokens, the same numbers
    # up to float rounding. The probabilities come back in the texts' order.
    by_length = batch_independent(info)
    loader = text_loader([(0, t) for t in texts], info, tokenizer, batch_size, by_length)
    classifier.eval()
    with torch.no_grad():
        for ids, _ in loader:
            logits = classifier(ids.to(device))
            if "calibration" in info:  # the run's temperature: the same argmax, truer odds
                logits = logits.float() / decisions.temperature_of(info)
            probs = torch.softmax(logits, dim=-1).cpu().tolist()
            out += [dict(zip(names, row)) for row in probs]
    if by_length:  # back in the texts' order
        back = [None] * len(out)
        for i, probs in zip(loader.sampler, out):
            back[i] = probs
        out = back
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


def classify_review(text, classifier, tokenizer, device, info):
    """The chapter's `classify_review` (section 6.8): the class name of one text ("spam" or
    "not spam" for the chapter's run), encoded, cut and padded as the run was trained."""
    return classify(text, classifier, tokenizer, info, device)[0]


def scores_of(rows, classifier, info, device, tokenizer):
    """split_scores of the classifier over (label id, text) rows."""
    return split_scores(*labels_and_logits(text_loader(rows, info, tokenizer), classifier,
                                           device), info)


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
    own_files = (info.get("data") or {}).get("files", {})
    flags = {**flags, **{flag: f["path"] for flag, f in own_files.items()}}
    for flag, f in own_files.items():
        if not Path(f["path"]).is_file():
            raise data.DataError(f"this run was trained on {f['path']}, which is no longer "
                                 "there; put it back to evaluate the run's splits, or score a "
                                 "file with --file")
        if tables.file_source(f["path"])["sha256"] != f["sha256"]:
            print(f"warning: {f['path']} changed since this run was trained on it (its sha256 "
                  "differs), so the splits differ and these are not the run's scores",
                  file=sys.stderr)
    labelled = tables.load_labelled(flags)
    if labelled.class_names != info["class_names"]:
        raise files.RunError(f"the run's data now has the classes {labelled.class_names}, the "
                             f"run was trained on {info['class_names']}; the files changed "
                             "since")
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


def evaluate_splits(classifier, info, device, data_path=None, splits=None):
    """split_scores over the whole of each of the run's splits ({split name: scores});
    `splits`: the run's rows where the caller has read them already (run_data)."""
    splits = splits or run_data(info, data_path).splits
    tokenizer = data.get_tokenizer()
    loaders = {}
    for name, rows in splits.items():
        if name == "train":  # the examples finetune.py's final pass covered
            dropped = set(info["final_train_dropped"])
            rows = [row for i, row in enumerate(rows) if i not in dropped]
        loaders[name] = text_loader(rows, info, tokenizer)
    results = {}
    total = sum(len(loader) for loader in loaders.values())
    with files.progress(total=total, desc="Evaluating every split", unit="batch") as bar:
        for name, loader in loaders.items():
            results[name] = split_scores(*labels_and_logits(files.Ticking(loader, bar),
                                                            classifier, device), info)
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
    records = tables.read_records(path, fmt, text_column, label_column, label_fix=(
        f"a file without labels is classified with --predict {path} --output OUT; or pass "
        "--label-column NAME if its labels are in another column"))
    names = info["class_names"]
    labels = tables.file_labels(names, info.get("flags", {}).get("label_names"))
    rows = []
    for r in records:  # a label as the file holds it (0), or the name --label-names gave it
        label = r.label if r.label in names else tables.match_label(r.label, labels)
        if label is None:
            raise tables.unknown_label(path, r, labels, "is not a class of the run",
                                       "fix the label")
        rows.append((names.index(label) if label in names else labels.index(label), r.text))
    return scores_of(rows, classifier, info, device, data.get_tokenizer())


MAX_MATRIX = 20  # classes up to which the confusion matrix is printed (--json always has it)


def print_scores(results, class_names):
    """Accuracy lines (finetune.py's, for the run's splits), then per split: macro- and
    weighted-F1, per-class precision / recall / F1 / support and the confusion matrix."""
    for name, r in results.items():
        print(f"{data.SPLIT_TITLES.get(name, name)} accuracy: {r['accuracy']*100:.2f}%")
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
        if len(class_names) > MAX_MATRIX:
            print(f"{name}: confusion matrix not printed ({len(class_names)} classes, over "
                  f"{MAX_MATRIX}); --json PATH writes it whole")
            continue
        print(f"{name}: confusion (rows: true class, columns: predicted class)")
        print(f"{'':<{cw}}" + "".join(f" {c:>{cw}}" for c in class_names))
        for c, row in zip(class_names, r["confusion"]):
            print(f"{c:<{cw}}" + "".join(f" {v:>{cw}}" for v in row))


def print_decisions(results, info, measured=None):
    """After print_scores: the scores beyond accuracy, the rates at the run's threshold beside
    argmax's, and the baseline's line (`measured`: baseline.run's result)."""
    scored = {name: r["scores"] for name, r in results.items() if "scores" in r}
    if scored:
        print()
        print("\n".join(decisions.score_table(scored, "calibration" in info)))
    if info.get("decision"):
        print("\n".join(decisions.threshold_table(
            {name: r["decision"] for name, r in results.items() if "decision" in r},
            info["decision"])))
    if measured:
        split = "test" if "test" in measured["splits"] else "validation"
        print(baseline.comparison_line(measured, results[split], split))


def output_format(out_path):
    """csv, tsv or jsonl: the format --predict writes, from --output's extension."""
    ext = Path(out_path).suffix.lower().lstrip(".")
    if ext not in tables.FORMATS:
        raise ValueError(f"--output {out_path}: the extension sets what --predict writes; name "
                         "it .csv, .tsv or .jsonl")
    return ext


def write_predictions(path, out_path, classifier, info, device, args):
    """For each row of `path`: its row id, the predicted class name (with the run's --target,
    the decision at its threshold beside it) and one probability column per class name, written
    to `out_path` (.csv, .tsv or .jsonl by its extension), atomically."""
    fmt, text_column, _ = run_columns(info, args)
    out_fmt = output_format(out_path)
    if out_fmt == "tsv" and any(set(n) & set("\t\r\n") for n in info["class_names"]):
        raise ValueError(f"--output {out_path}: a class name holds a tab or a line break, which "
                         "a .tsv row cannot; write .csv or .jsonl")
    if Path(out_path).resolve() == Path(path).resolve():
        raise ValueError("--output is the --predict file itself; name another file")
    if Path(out_path).exists() and not args.overwrite:
        raise ValueError(f"--output {out_path} exists; pass --overwrite to replace it, or name "
                         "another file")
    records = tables.read_records(path, fmt, text_column, labelled=False)
    probs = []
    texts = [r.text for r in records]
    step = 256
    for i in range(0, len(texts), step):  # a bounded batch of texts at a time
        probs += predict_proba(texts[i:i + step], classifier, info, device)
    names, decision = info["class_names"], info.get("decision")
    decided = [[decisions.decide(p, names, decision)] if decision else [] for p in probs]
    buf = io.StringIO(newline="")
    if out_fmt == "jsonl":
        for r, p, d in zip(records, probs, decided):
            buf.write(json.dumps({r.where: r.row, "predicted": top_k(p)[0][0],
                                  **({"decision": d[0]} if d else {}),
                                  "probabilities": p}, ensure_ascii=False) + "\n")
    else:
        tsv = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None}  # as read
        writer = csv.writer(buf, lineterminator="\n", **(tsv if out_fmt == "tsv" else {}))
        writer.writerow([records[0].where, "predicted", *(["decision"] if decision else []),
                         *names])
        for r, p, d in zip(records, probs, decided):
            writer.writerow([r.row, top_k(p)[0][0], *d, *(f"{p[n]:.6f}" for n in names)])
    files.write_atomic(out_path, buf.getvalue().encode("utf-8"))
    return len(records)


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
    p.add_argument("--output", metavar="PATH", help="where --predict writes: .csv, .tsv or "
                   ".jsonl, one row per input row: its row id, the predicted class, one "
                   "probability per class")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output, or "
                   "an earlier export in --export's OUT")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="a text to classify (repeat for more)")
    p.add_argument("--stdin", action="store_true",
                   help="classify each line of standard input (blank lines are skipped)")
    p.add_argument("--top-k", type=int, default=1, metavar="N",
                   help="for --text and --stdin, print the N most probable classes (default: 1)")
    p.add_argument("--format", choices=tables.FORMATS,
                   help="the format of --file and --predict (default: from the extension)")
    p.add_argument("--text-column", metavar="NAME", help="the text column of --file and "
                   "--predict (default: the run's)")
    p.add_argument("--label-column", metavar="NAME", help="the label column of --file "
                   "(default: the run's)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to run (default: cpu)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="with --all-splits, skip the baseline (word TF-IDF + logistic "
                   "regression, trained again on the run's training split)")
    p.add_argument("--export", nargs=2, metavar=("hf|onnx", "OUT"),
                   help="write the run for other tools: hf, a folder OUT that transformers "
                   "loads (GPT2ForSequenceClassification, tokenizer, model card); onnx, a file "
                   "OUT.onnx (needs pip install -e \".[export]\"); on the CPU, in fp32")
    serve.add_arguments(p)
    args = p.parse_args(argv)
    if not (args.all_splits or args.file or args.predict or args.text or args.stdin
            or args.serve or args.export):
        p.error("say what to do: --all-splits, --file FILE, --predict FILE, --text TEXT, --stdin, "
                "--serve or --export hf|onnx OUT")
    others = args.all_splits or args.file or args.predict or args.text or args.stdin
    if args.serve and (others or args.export):
        p.error("--serve runs alone: leave out --all-splits, --file, --predict, --text, --stdin "
                "and --export")
    if args.export and others:
        p.error("--export runs alone: leave out --all-splits, --file, --predict, --text and "
                "--stdin")
    try:
        if any(not t.strip() for t in args.text):
            raise ValueError("a --text is empty; give a message to classify")
        if args.top_k < 1:
            raise ValueError("--top-k must be 1 or more")
        if args.predict and not args.output:
            raise ValueError("--predict needs --output PATH (.csv, .tsv or .jsonl) to write to")
        if args.output and not args.predict:
            raise ValueError("--output is where --predict writes; give --predict FILE too")
        if args.output:
            output_format(args.output)
        if args.json and not (args.all_splits or args.file):
            raise ValueError("--json writes the scores of --all-splits or --file; ask for one")
        texts = list(args.text) + (read_stdin() if args.stdin else [])
        serving = serve.settings(args) if args.serve else None
        if args.run is None:
            args.run = files.latest_run()
            print(f"Using the most recent finished run: {args.run}", file=sys.stderr)
        if args.export:  # on the CPU, in fp32, whatever the run trained on
            export.check_target(*args.export, args.overwrite)
            classifier, info = load_run(args.run, torch.device("cpu"))
            return export.export(args.export[0], args.run, classifier, info, args.export[1],
                                 args.overwrite)
        device = ddp.select_device(args.device)
        classifier, info = load_run(args.run, device)
        if args.serve:
            return serve.serve(args.run, classifier, info, device, predict_proba, serving)
        names = info["class_names"]
        report = {}
        if (args.predict or texts) and decisions.explain(info):
            print(decisions.explain(info), file=sys.stderr)
        if args.all_splits:
            splits = run_data(info, args.data).splits
            report["splits"] = evaluate_splits(classifier, info, device, splits=splits)
            print_scores(report["splits"], names)
            if args.baseline:
                report["baseline"] = baseline.run(splits, names, class_scores)
            print_decisions(report["splits"], info, report.get("baseline"))
        for path in args.file:
            scores = evaluate_file(path, classifier, info, device, args)
            report.setdefault("files", {})[str(path)] = scores
            if args.all_splits or len(args.file) > 1:
                print()
            print(f"{path}: {scores['examples']} rows")
            print_scores({Path(path).name: scores}, names)
            print_decisions({Path(path).name: scores}, info)
        if args.json:
            files.write_json(args.json, {"run": str(args.run), "class_names": names, **report})
        if args.predict:
            n = write_predictions(args.predict, args.output, classifier, info, device, args)
            print(f"Wrote {n} predictions to {args.output}")
        tokenizer = data.get_tokenizer()
        width = max(8, *(len(n) for n in names))
        for text, probs in zip(texts, predict_proba(texts, classifier, info, device, tokenizer)
                               if texts else []):
            shown = "  ".join(f"{name:<{width}}  {prob:.4f}"
                              for name, prob in top_k(probs, args.top_k))
            if info.get("decision"):  # the decision first, then the probabilities
                shown = f"{decisions.decide(probs, names, info['decision']):<{width}}  {shown}"
            print(f"{shown}  {echo(text, tokenizer, info, classifier.gpt.cfg.context_length)}")
    except (ValueError, files.RunError, data.DataError, gpt.WeightsError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a file that cannot be read or written: one line, naming it
        sys.exit(f"error: {files.describe_os_error(e)}")


if __name__ == "__main__":
    main()
