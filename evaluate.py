"""Use a fine-tuned run: accuracy on every split, or classify new text.

    python evaluate.py --run runs/20261127-101500 --all-splits
    python evaluate.py --run DIR --text "You are a winner you have been specially selected..."
    cat messages.txt | python evaluate.py --run DIR --stdin

A run trained on a GPU evaluates on a CPU (or anywhere else) with the same numbers.
"""

import argparse
import dataclasses
import io
import json
import sys
from pathlib import Path

import torch

import data
import gpt


def select_device(name="auto"):
    """auto: cuda, then mps (only torch >= 2.9: older MPS gave wrong numbers), then cpu."""
    mps_ok = torch.backends.mps.is_available() and \
        tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available here; use --device cpu (or auto)")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available here; use --device cpu (or auto)")
    return torch.device(name)


def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    """Share of examples whose argmax class is the label, over the first `num_batches` batches
    (the whole loader by default). `model` maps token ids (B, T) to class logits (B, C)."""
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            predicted_labels = torch.argmax(model(input_batch), dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
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


def spam_scores(labels, predicted, positive=1):
    """Precision, recall and F1 of the positive class, and the 2x2 confusion matrix."""
    confusion = [[0, 0], [0, 0]]  # rows: true label, columns: predicted label
    for t, p in zip(labels, predicted):
        confusion[t][p] += 1
    tp = confusion[positive][positive]
    fp = confusion[1 - positive][positive]
    fn = confusion[positive][1 - positive]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, confusion


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
    classifier = gpt.Classifier(model, position=info["token_position"],
                                average=info["average_embeddings"], pad_id=info["pad_id"],
                                autocast_dtype=dtype)
    return classifier, info


def classify(text, classifier, tokenizer, info, device):
    """(label name, its probability) for one text, encoded and padded as in training."""
    if not text.strip():
        raise ValueError("the text is empty; give a message to classify")
    max_length = min(info["max_length"], classifier.gpt.cfg.context_length)
    ids = data.encode(text, tokenizer, max_length, pad=info["padding"])
    with torch.no_grad():
        probs = torch.softmax(classifier(torch.tensor([ids], device=device)), dim=-1)[0]
    label = int(probs.argmax())
    return info["class_names"][label], float(probs[label])


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
    """Accuracy, spam precision/recall/F1 and confusion matrix over the whole of each split."""
    splits = data.make_splits(load_run_data(info, data_path))
    tokenizer = data.get_tokenizer()
    loaders = {}
    for name in data.SPLITS:
        rows = splits[name]
        if name == "train":  # the examples finetune.py's final pass covered
            dropped = set(info["final_train_dropped"])
            rows = [row for i, row in enumerate(rows) if i not in dropped]
        ds = data.SpamDataset(rows, tokenizer, info["max_length"], pad=info["padding"])
        loaders[name] = torch.utils.data.DataLoader(ds, batch_size=info["batch_size"])
    results = {}
    total = sum(len(loader) for loader in loaders.values())
    with data.progress(total=total, desc="Evaluating every split", unit="batch") as bar:
        for name, loader in loaders.items():
            labels, predicted = predictions(data.Ticking(loader, bar), classifier, device)
            accuracy = sum(t == p for t, p in zip(labels, predicted)) / len(labels)
            results[name] = (accuracy, *spam_scores(labels, predicted))
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
    n = len(tokenizer.encode(text))
    if n <= max_length:
        return text
    prefix = text[:ECHO_CHARS].rstrip() + "..." if len(text) > ECHO_CHARS else text
    return f"{prefix}  [cut: only its first {max_length} of {n:,} tokens were classified]"


def print_splits(results):
    for title, name in zip(("Training", "Validation", "Test"), data.SPLITS):
        print(f"{title} accuracy: {results[name][0]*100:.2f}%")
    print()
    print("Spam as the positive class:")
    print(f"{'split':<16} {'precision':>9} {'recall':>7} {'F1':>7}   confusion "
          "[[TN, FP], [FN, TP]]")
    for name in data.SPLITS:
        _, precision, recall, f1, m = results[name]
        print(f"{name:<16} {precision:>9.4f} {recall:>7.4f} {f1:>7.4f}   {m}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Accuracy of a fine-tuned run on every split, or "
                                "its label for new texts.")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder of finetune.py")
    p.add_argument("--data", metavar="PATH", help="the raw SMSSpamCollection file or its zip "
                   "for --all-splits (default: the data the run was trained on, as run.json "
                   "records it)")
    p.add_argument("--all-splits", action="store_true",
                   help="print accuracy, spam precision/recall/F1 and the confusion matrix on "
                   "train, validation and test")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="a message to classify (repeat for more)")
    p.add_argument("--stdin", action="store_true",
                   help="classify each line of standard input (blank lines are skipped)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to run (default: cpu)")
    args = p.parse_args(argv)
    if not (args.all_splits or args.text or args.stdin):
        p.error("say what to do: --all-splits, --text TEXT or --stdin")
    try:
        if any(not t.strip() for t in args.text):
            raise ValueError("a --text is empty; give a message to classify")
        texts = list(args.text) + (read_stdin() if args.stdin else [])
        device = select_device(args.device)
        classifier, info = load_run(args.run, device)
        if args.all_splits:
            print_splits(evaluate_splits(classifier, info, device, args.data))
        tokenizer = data.get_tokenizer()
        for text in texts:
            label, prob = classify(text, classifier, tokenizer, info, device)
            shown = echo(text, tokenizer, info, classifier.gpt.cfg.context_length)
            print(f"{label:<8}  {prob:.4f}  {shown}")
    except (ValueError, RunError, data.DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a file that cannot be read or written: one line, naming it
        sys.exit(f"error: {data.describe_os_error(e)}")


if __name__ == "__main__":
    main()
