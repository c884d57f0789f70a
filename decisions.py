"""Decisions a practitioner can trust, from a run's class logits: scores that look past accuracy,
probabilities calibrated by one temperature, and a decision threshold chosen for a target error
rate. Pure functions over numpy arrays (and one pass of a classifier over a dataset); finetune.py
calls them after training, evaluate.py and serve.py use what they saved in run.json.

    python finetune.py --weights random --data SMSSpamCollection --target precision=0.99

- scores: accuracy, macro- and weighted-F1, per-class precision / recall / F1 and the confusion
  matrix (`class_scores`); ROC-AUC, PR-AUC (average precision), Matthews correlation, balanced
  accuracy, log loss and the expected calibration error over 15 equal-width bins
  (`probability_scores`; for more than two classes, one-vs-rest macro averages of the AUCs);
- calibration: one temperature T fitted on the validation split by minimising its log loss
  (`fit_temperature`); calibrated probabilities are softmax(logits / T), whose argmax, and so
  every accuracy, is the logits' own; a reliability diagram (`plot_reliability`);
- an operating point: `--target precision=0.99` (or recall=, fpr=) on one positive class, the
  threshold chosen on the validation split alone (`choose_threshold`) and reported on the test
  split, which never chooses.
docs/decisions.md says what each means for a user, with figures measured on the SMS data.
"""

import io
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

import baseline
import data
import files

N_BINS = 15  # the expected calibration error's equal-width confidence bins
TARGETS = {"precision": "precision", "recall": "recall", "fpr": "false positive rate"}
# Fewer validation examples than this behind a target's rate: the threshold is a rough guide.
MIN_SUPPORT = 30
# The temperature is searched in [1/100, 100]: beyond, the probabilities are all 1/C or all 0/1.
T_RANGE = (0.01, 100.0)


# ------------------------------------------------------------------------ logits and probabilities

def log_softmax(logits, temperature=1.0):
    """log softmax(logits / temperature) in float64, row by row. `logits`: (N, C)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def probabilities(logits, temperature=1.0):
    """softmax(logits / temperature): (N, C) class probabilities, each row summing to 1."""
    return np.exp(log_softmax(logits, temperature))


def split_logits(classifier, dataset, device, batch_size=64, leave_out=()):
    """(logits (N, C) float64, labels (N,)) of a data.TextDataset, in its order, without the
    indices in `leave_out`. Batches are made here, not by a DataLoader, whose every iteration
    draws a seed from torch's global RNG: this pass draws nothing. `classifier` maps token ids
    (B, T) to class logits (B, C)."""
    if dataset.pad is False:
        batch_size = 1  # texts of their own lengths
    leave_out = set(leave_out)
    order = [i for i in range(len(dataset)) if i not in leave_out]
    classifier.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            items = [dataset[i] for i in order[start:start + batch_size]]
            ids = data.pad_batch(items)[0] if dataset.pad == "batch" else \
                torch.stack([x for x, _ in items])
            logits.append(classifier(ids.to(device)).float().cpu().numpy())
    n_classes = logits[0].shape[1] if logits else 0
    return (np.concatenate(logits).astype(np.float64) if logits else np.zeros((0, n_classes)),
            np.asarray([dataset.labels[i] for i in order], dtype=np.int64))


# ------------------------------------------------------------------------------------- the scores

def confusion_matrix(labels, predicted, n_classes):
    """N x N counts (rows: true class, columns: predicted class), as lists."""
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(labels, predicted):
        confusion[int(t)][int(p)] += 1
    return confusion


def class_scores(labels, predicted, class_names):
    """Accuracy, macro- and weighted-F1, per-class precision / recall / F1 / support, and the
    N x N confusion matrix (rows: true class, columns: predicted class), as a dict."""
    n_classes = len(class_names)
    confusion = confusion_matrix(labels, predicted, n_classes)
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
    seen = set(map(int, labels)) | set(map(int, predicted))  # as scikit-learn: truth or predicted
    present = [per_class[name] for c, name in enumerate(class_names) if c in seen]
    return {
        "examples": total,
        "accuracy": sum(confusion[c][c] for c in range(n_classes)) / total if total else 0.0,
        "macro_f1": sum(v["f1"] for v in present) / len(present) if present else 0.0,
        "weighted_f1": sum(v["f1"] * v["support"] for v in present) / total if total else 0.0,
        "per_class": per_class, "confusion": confusion}


def _ranks(x):
    """1-based ranks of `x`, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2
    return ranks


def roc_auc(is_positive, scores):
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative (ties count half). None where either kind is missing."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(is_positive, scores):
    """Area under the precision-recall curve as average precision: the precision at each
    distinct score, weighted by the recall it adds (scikit-learn's definition). None without a
    positive."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    if n_pos == 0:
        return None
    tp, fp, _ = _cumulative(is_positive, np.asarray(scores, dtype=np.float64))
    recall = tp / n_pos
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def matthews(labels, predicted, n_classes):
    """Matthews correlation coefficient (its multi-class form): 1 perfect, 0 no better than
    chance, -1 always wrong; 0 where it is undefined (one class only)."""
    c = np.asarray(confusion_matrix(labels, predicted, n_classes), dtype=np.float64)
    t, p, s = c.sum(axis=1), c.sum(axis=0), c.sum()
    den = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((np.trace(c) * s - t @ p) / den) if den else 0.0


def balanced_accuracy(labels, predicted, n_classes):
    """The mean of each class's recall, over the classes the labels hold."""
    c = confusion_matrix(labels, predicted, n_classes)
    recalls = [c[k][k] / sum(c[k]) for k in range(n_classes) if sum(c[k])]
    return float(np.mean(recalls)) if recalls else 0.0


def log_loss(log_probs, labels):
    """Mean negative log probability of the true class. `log_probs`: (N, C)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return None
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def reliability(probs, labels, n_bins=N_BINS):
    """The reliability table: per equal-width bin of confidence (the top class's probability),
    {lo, hi, count, confidence (mean), accuracy (share right)}; empty bins have count 0."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    right = probs.argmax(axis=1) == labels if len(probs) else np.zeros(0, dtype=bool)
    # bin k holds confidences in (k/n, (k+1)/n]: the usual convention (Guo et al., 2017)
    which = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    table = []
    for k in range(n_bins):
        inside = which == k
        n = int(inside.sum())
        table.append({"lo": k / n_bins, "hi": (k + 1) / n_bins, "count": n,
                      "confidence": float(confidence[inside].mean()) if n else None,
                      "accuracy": float(right[inside].mean()) if n else None})
    return table


def ece(probs, labels, n_bins=N_BINS):
    """Expected calibration error: the mean gap between confidence and accuracy over equal-width
    confidence bins, each weighted by its share of the examples. None for no examples."""
    n = len(labels)
    if n == 0:
        return None
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability(probs, labels, n_bins) if b["count"]))


def _macro(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def probability_scores(logits, labels, temperature=1.0):
    """The scores beyond accuracy of one split, from its logits (N, C) and labels (N,):
    roc_auc and pr_auc (binary: of the second class; more classes: one-vs-rest macro averages
    over the classes whose AUC is defined), mcc, balanced_accuracy, and the log loss and ECE of
    softmax(logits / temperature). A score that is undefined (one class only) is None."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = logits.shape[1]
    logp = log_softmax(logits, temperature)
    probs = np.exp(logp)
    predicted = logits.argmax(axis=1)
    # Ranked by log-odds (binary) or log probability: a probability rounds to 1.0 in float64
    # beyond a logit gap of 37, which would tie the surest examples.
    if n_classes == 2:
        odds = logits[:, 1] - logits[:, 0]
        auc, ap = roc_auc(labels == 1, odds), average_precision(labels == 1, odds)
    else:
        auc = _macro(roc_auc(labels == k, logp[:, k]) for k in range(n_classes))
        ap = _macro(average_precision(labels == k, logp[:, k]) for k in range(n_classes))
    return {"examples": len(labels), "roc_auc": auc, "pr_auc": ap,
            "mcc": matthews(labels, predicted, n_classes),
            "balanced_accuracy": balanced_accuracy(labels, predicted, n_classes),
            "log_loss": log_loss(logp, labels), "ece": ece(probs, labels)}


# ------------------------------------------------------------------------------------ calibration

def nll(logits, labels, temperature):
    """The log loss of softmax(logits / temperature)."""
    return log_loss(log_softmax(logits, temperature), labels)


def fit_temperature(logits, labels, iterations=80):
    """The temperature T in T_RANGE that minimises the log loss of softmax(logits / T): a
    golden-section search on log T (the loss is convex in 1/T, so it has one minimum there).
    Deterministic, and draws no random number. None for no examples."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return None
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(iterations):  # each step keeps 0.618 of the bracket: 80 steps reach 1e-16
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def calibration(val_logits, val_labels):
    """What run.json records of the calibration fitted on the validation split: the temperature,
    the split's ECE and log loss before and after. None where the split is empty."""
    t = fit_temperature(val_logits, val_labels)
    if t is None:
        return None
    return {"temperature": t, "fitted_on": "validation", "examples": len(val_labels),
            "val_ece_before": ece(probabilities(val_logits), val_labels),
            "val_ece_after": ece(probabilities(val_logits, t), val_labels),
            "val_log_loss_before": nll(val_logits, val_labels, 1.0),
            "val_log_loss_after": nll(val_logits, val_labels, t), "bins": N_BINS}


def calibration_line(cal):
    """The log's line about the calibration."""
    return (f"Calibration: temperature {cal['temperature']:.3f}, fitted on the validation split "
            f"({cal['examples']} examples): its ECE {cal['val_ece_before']:.4f} -> "
            f"{cal['val_ece_after']:.4f}, log loss {cal['val_log_loss_before']:.4f} -> "
            f"{cal['val_log_loss_after']:.4f}; evaluate.py and the server give calibrated "
            "probabilities")


def plot_reliability(val_logits, val_labels, temperature, out_dir):
    """The validation split's reliability diagram, before and after calibration, saved as
    reliability-plot.pdf and .png in `out_dir`. Returns the names of the files written."""
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="gray", label="perfectly calibrated")
    for t, name, marker in ((1.0, "before", "o"), (temperature, "after", "s")):
        probs = probabilities(val_logits, t)
        table = [b for b in reliability(probs, val_labels) if b["count"]]
        ax.plot([b["confidence"] for b in table], [b["accuracy"] for b in table],
                marker=marker, label=f"{name} (T={t:.2f}, ECE {ece(probs, val_labels):.3f})")
    ax.set_xlabel("Confidence (probability of the predicted class)")
    ax.set_ylabel("Accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Validation split, {N_BINS} bins", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = []
    for ext in ("pdf", "png"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext)
        files.write_atomic(Path(out_dir) / f"reliability-plot.{ext}", buf.getvalue())
        written.append(f"reliability-plot.{ext}")
    return written


# -------------------------------------------------------------------------- the operating point

def parse_target(spec):
    """--target METRIC=X as (metric, X); ValueError saying what works."""
    works = ("give precision=X, recall=X or fpr=X (the false positive rate) with X in (0, 1], "
             "such as --target precision=0.99")
    metric, sep, value = str(spec).partition("=")
    metric = metric.strip().lower()
    if not sep or metric not in TARGETS:
        raise ValueError(f"--target {spec}: unknown metric {metric!r}; {works}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"--target {spec}: {value!r} is not a number; {works}") from None
    if not 0 < x <= 1:
        raise ValueError(f"--target {spec}: {value} is outside (0, 1]; {works}")
    return metric, x


def positive_index(class_names, positive=None, target=None):
    """The positive class's index: `positive` (a class name, any case) where given, else the
    second class (the SMS data's spam) of a binary run. ValueError where a run of more classes
    has a --target but no --positive-class, or the name is not a class."""
    if positive is not None:
        folded = [c.casefold() for c in class_names]
        if str(positive).casefold() not in folded:
            raise ValueError(f"--positive-class {positive}: not a class of the run; give one of "
                             + ", ".join(class_names))
        return folded.index(str(positive).casefold())
    if len(class_names) != 2:
        raise ValueError(f"--target {target} chooses a threshold on one class's probability, and "
                         f"this run has {len(class_names)} classes ({', '.join(class_names)}); "
                         "name it with --positive-class NAME (its decision is then that class "
                         "or the likeliest other)")
    return 1


def check_support(labels, positive, metric, split="validation", target=None):
    """Whether the split can choose a threshold: ValueError where it has no positive (for fpr:
    no negative); a warning line where the rate rests on fewer than MIN_SUPPORT examples, else
    None."""
    labels = np.asarray(labels)
    n_pos, n_neg = int((labels == positive).sum()), int((labels != positive).sum())
    kind, n = ("negative", n_neg) if metric == "fpr" else ("positive", n_pos)
    if n_pos == 0 or n == 0:
        raise ValueError(f"--target {target or metric}: the {split} split has {n} {kind} example"
                         f"{'s' * (n != 1)}, so no threshold can be chosen on it; give a "
                         "validation split with both kinds (--val-file, or a larger --val-frac)")
    if n < MIN_SUPPORT:
        return (f"warning: the {split} split has only {n} {kind} examples, so the threshold's "
                f"{TARGETS[metric]} rests on few of them and may differ on new data; a larger "
                "validation split makes it firmer")
    return None


def rates(scores, is_positive, threshold):
    """What deciding `positive` where score >= threshold gives: counts and precision, recall,
    fpr and accuracy (None where undefined, such as precision with no positive decision)."""
    scores, is_positive = np.asarray(scores), np.asarray(is_positive, dtype=bool)
    decided = scores >= threshold
    tp, fp = int((decided & is_positive).sum()), int((decided & ~is_positive).sum())
    fn, tn = int((~decided & is_positive).sum()), int((~decided & ~is_positive).sum())
    n = tp + fp + fn + tn
    return {"precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "fpr": fp / (fp + tn) if fp + tn else None,
            "accuracy": (tp + tn) / n if n else None,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _cumulative(is_positive, scores):
    """(tp, fp, distinct scores) at each distinct score, highest first: deciding positive at
    score >= s_k gives tp[k] true and fp[k] false positives."""
    order = np.argsort(-scores, kind="mergesort")
    s, pos = scores[order], is_positive[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last example of each run of equal scores
    tp, fp = np.cumsum(pos)[last], np.cumsum(~pos)[last]
    return tp.astype(np.float64), fp.astype(np.float64), s[last]


def choose_threshold(scores, is_positive, metric, value):
    """The threshold on `scores` (the positive class's probabilities on the validation split)
    that meets `metric` (precision or recall at least `value`, fpr at most `value`) with the
    most use: for precision and fpr the most positives found, for recall the fewest false
    alarms. The threshold lies halfway between the chosen score and the next lower one, so a
    recomputed probability rounded differently decides the same.

    Returns {"threshold", "met", "validation": rates there}; where nothing meets the target,
    "met" is False and the threshold is the one nearest it (the best precision, say)."""
    scores = np.asarray(scores, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    tp, fp, s = _cumulative(is_positive, scores)
    precision = tp / (tp + fp)
    recall = tp / max(n_pos, 1)
    fpr = fp / max(n_neg, 1)
    k = None  # index into s; -1: above every score (nothing decided positive)
    if metric == "precision":
        ok = np.flatnonzero(precision >= value - 1e-12)
        if len(ok):
            k = int(ok[np.argmax(recall[ok])])  # the first (highest) of the best recall
        met = k is not None
        if not met:
            k = int(np.argmax(precision))
    elif metric == "recall":
        ok = np.flatnonzero(recall >= value - 1e-12)
        met = len(ok) > 0
        k = int(ok[0]) if met else len(s) - 1
    else:  # fpr: rises with k; the last k at or under the target finds the most positives
        ok = np.flatnonzero(fpr <= value + 1e-12)
        met = True
        k = int(ok[-1]) if len(ok) else -1
    if k == -1:
        top = s[0] if len(s) else 0.0
        threshold = (top + 1) / 2 if top < 1 else math.nextafter(1.0, 2.0)
    else:
        below = s[k + 1] if k + 1 < len(s) else 0.0
        threshold = float((s[k] + below) / 2)
    return {"threshold": float(threshold), "met": bool(met),
            "validation": rates(scores, is_positive, threshold)}


def _shown(r):
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"
    return (f"precision {f(r['precision'])}, recall {f(r['recall'])}, FPR {f(r['fpr'])} "
            f"({r['tp']} true and {r['fp']} false positives, {r['fn']} missed)")


def operating_point(target, positive, class_names, val_logits, val_labels, temperature=1.0,
                    test=None):
    """--target on the validation split: (run.json's "decision" or None, the log's lines).
    `positive`: the positive class's index; `test`: (logits, labels) of the test split, which is
    only reported, never used to choose. Where the validation split cannot meet the target, one
    warning line with the best it reaches, and no decision (argmax stays the rule)."""
    metric, value = parse_target(target)
    name = class_names[positive]
    scores = probabilities(val_logits, temperature)[:, positive]
    chosen = choose_threshold(scores, np.asarray(val_labels) == positive, metric, value)
    if not chosen["met"]:
        best = chosen["validation"]
        return None, [f"warning: --target {target} cannot be met on the validation split: the "
                      f"best {TARGETS[metric]} it reaches for {name} is "
                      f"{best[metric] if best[metric] is not None else 0:.3f} (threshold "
                      f"{chosen['threshold']:.4f}: {_shown(best)}); no threshold saved, "
                      "decisions stay at the most probable class"]
    decision = {"positive_class": name, "threshold": chosen["threshold"], "target": target,
                "metric": metric, "value": value, "calibrated": temperature != 1.0,
                "validation": chosen["validation"]}
    lines = [f"Decision threshold for --target {target} on {name}: its calibrated probability "
             f"at or above {chosen['threshold']:.4f}, chosen on the validation split "
             f"({_shown(chosen['validation'])})"]
    if test is not None and len(test[1]):
        t_scores = probabilities(test[0], temperature)[:, positive]
        decision["test"] = rates(t_scores, np.asarray(test[1]) == positive, chosen["threshold"])
        lines.append(f"  the same threshold on the test split (which never chooses): "
                     f"{_shown(decision['test'])}")
    return decision, lines


def temperature_of(info):
    """The temperature the run's probabilities are divided by (run.json's calibration), 1.0
    where none was fitted."""
    t = (info.get("calibration") or {}).get("temperature", 1.0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise files.RunError(f"run.json's calibration.temperature is {t!r}, not a positive "
                             "number; put it back as it was written, or calibrate again")
    return float(t)


def rule_of(info):
    """run.json's decision rule ({positive_class, threshold, ...}), checked; None if none."""
    d = info.get("decision")
    if not d:
        return None
    if d.get("positive_class") not in info["class_names"] or \
            not isinstance(d.get("threshold"), (int, float)) or not 0 <= d["threshold"] <= 1:
        raise files.RunError(f"run.json's decision {d!r} names no class of the run or no "
                             "threshold between 0 and 1; put it back as it was written")
    return d


# ----------------------------------------------------------------------------- Hugging Face tensors


def decide(probs, class_names, decision):
    """The decision for one text's {class: probability} (calibrated): argmax without a
    decision; with one, its positive class where that probability is at or above the
    threshold, else the likeliest other class."""
    if not decision:
        return max(probs, key=probs.get)
    positive = decision["positive_class"]
    if probs[positive] >= decision["threshold"]:
        return positive
    return max((c for c in class_names if c != positive), key=probs.get)


def at_threshold(logits, labels, class_names, decision, temperature=1.0):
    """The positive class's rates on one split at the decision's threshold and at argmax:
    {"threshold": rates, "argmax": rates}."""
    k = class_names.index(decision["positive_class"])
    logits, is_pos = np.asarray(logits), np.asarray(labels) == k
    return {"threshold": rates(probabilities(logits, temperature)[:, k], is_pos,
                               decision["threshold"]),
            "argmax": rates((logits.argmax(axis=1) == k).astype(np.float64), is_pos, 0.5)}


def explain(info):
    """What a run's probabilities and decisions are, in one line for stderr (None for a run
    with neither a temperature nor a threshold: its softmax and argmax, as ever)."""
    cal, decision = info.get("calibration"), info.get("decision")
    parts = []
    if cal:
        parts.append(f"probabilities calibrated by the run's temperature "
                     f"{cal['temperature']:.3f} (fitted on its validation split)")
    if decision:
        parts.append(f"decisions: {decision['positive_class']} where its probability is at or "
                     f"above the threshold {decision['threshold']:.4f} (--target "
                     f"{decision['target']}), else the likeliest other class")
    line = "; ".join(parts)
    return line[:1].upper() + line[1:] if parts else None


# ---------------------------------------------------------------------------- printed summaries

def threshold_table(per_split, decision):
    """Lines: each split's rates at the threshold beside argmax's (`per_split`: {split:
    at_threshold})."""
    width = max(12, *(len(n) + 2 for n in per_split))
    lines = [f"At the decision threshold ({decision['positive_class']} at or above "
             f"{decision['threshold']:.4f}, --target {decision['target']}), beside argmax:"]
    for name, r in per_split.items():
        for rule in ("argmax", "threshold"):
            lines.append(f"{name if rule == 'argmax' else '':<{width}} {rule:<10} "
                         f"{_shown(r[rule])}")
    return lines


SCORE_COLUMNS = (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("mcc", "MCC"),
                 ("balanced_accuracy", "balanced accuracy"), ("log_loss", "log loss"),
                 ("ece", f"ECE ({N_BINS} bins)"))


def score_table(scores, calibrated):
    """Lines: the probability scores of each split, one line per split. (Each names the log
    loss: like the chapter's losses, its figures may differ in the last digit between runs
    computed with other kernels.)"""
    kind = "calibrated" if calibrated else "uncalibrated"
    return [f"Scores on {name} ({kind} probabilities): " + ", ".join(
        f"{title} {'n/a' if s[key] is None else format(s[key], '.4f')}"
        for key, title in SCORE_COLUMNS) for name, s in scores.items()]


# ---------------------------------------------------------------------------- after training

def check_target(cfg, labelled, warn=print):
    """--target and --positive-class (`cfg`'s) against the run's classes and validation split
    (`labelled`: a data.LabelledData), before anything is trained: the positive class's index
    (None without a target); a warning where the split has few examples for it goes to `warn`.
    ValueError where they cannot work."""
    target, positive, class_names = cfg.target, cfg.positive_class, labelled.class_names
    if target is None:
        if positive is not None:
            positive_index(class_names, positive)  # a wrong name is refused all the same
        return None
    metric, _ = parse_target(target)
    k = positive_index(class_names, positive, target)
    warning = check_support([y for y, _ in labelled.splits["validation"]], k, metric,
                            target=target)
    if warning:
        warn(warning)
    return k


def assess(classifier, datasets, class_names, device, target=None, positive=None, names=None,
           leave_out=None, baseline_splits=None):
    """After training, on the splits of `datasets` (data.TextDatasets) in `names` (default:
    all) and the validation split: the logits, the temperature fitted on the validation split,
    the scores beyond accuracy under it, with `target` the operating point for the positive
    class (index `positive`), and given `baseline_splits` (the run's rows) the baseline beside
    the model. `leave_out`: {split: indices} to leave out (the training examples the chapter's
    final pass drops). Draws no random number.

    Returns (record, lines): record = {"calibration" (None without a validation split),
    "decision" (None without a target, or where it cannot be met), "scores": {split: ...},
    "logits": {split: (logits, labels)}, and "baseline" where it ran}; lines for the log."""
    leave_out = leave_out or {}
    logits = {name: split_logits(classifier, ds, device, leave_out=leave_out.get(name, ()))
              for name, ds in datasets.items()
              if names is None or name in names or name == "validation"}
    val = logits.get("validation")
    cal = calibration(*val) if val is not None and len(val[1]) else None
    t = cal["temperature"] if cal else 1.0
    scores = {}
    for name, (z, y) in logits.items():
        if not len(y):
            continue
        scores[name] = {**probability_scores(z, y, t), "calibrated": cal is not None,
                        "uncalibrated": {"log_loss": nll(z, y, 1.0),
                                         "ece": ece(probabilities(z), y)}}
    lines = [calibration_line(cal)] if cal else []
    lines += score_table(scores, cal is not None)
    decision = None
    if target is not None and val is not None:
        decision, more = operating_point(target, positive, class_names, *val, t,
                                         logits.get("test"))
        lines += more
    record = {"calibration": cal, "decision": decision, "scores": scores, "logits": logits}
    if baseline_splits is not None:  # a word TF-IDF on the same split: what does GPT-2 add?
        record["baseline"] = result = baseline.run(baseline_splits, class_names, class_scores)
        split = "test" if "test" in logits and "test" in result["splits"] else "validation"
        z, y = logits[split]
        lines.append(baseline.comparison_line(result, class_scores(
            y.tolist(), z.argmax(axis=1).tolist(), class_names), split))
    return record, lines


def after_training(classifier, datasets, device, cfg, labelled, positive, names, dropped,
                   report, say=print):
    """finetune.py's step 6b: `assess` with the run's settings (`cfg`: --target, the baseline
    unless --no-baseline) on the splits of the final pass (`names`) and validation, leaving out
    the training examples the chapter's pass `dropped`, its lines to `say`. On the Classifier
    under DDP where `classifier` is one, so that no collective runs (rank 0 alone calls it).
    Returns the record, with the data check's `report` in it (for data-check.json)."""
    record, lines = assess(getattr(classifier, "module", classifier), datasets,
                           labelled.class_names, device, cfg.target, positive, names,
                           {"train": dropped}, labelled.splits if cfg.baseline else None)
    say("\n".join(lines))
    return {**record, "data_check": report}


def measured(record):
    """What metrics.json keeps of assess's record: the scores, and the baseline's."""
    return {k: record[k] for k in ("scores", "baseline") if k in record}


def decided(record):
    """What run.json keeps of assess's record: the calibration and the decision, where made
    (evaluate.py and the server read them)."""
    return {k: record[k] for k in ("calibration", "decision") if record.get(k)}


def write_files(record, out_dir):
    """The run folder's data-check.json (the record's data check) and, where a temperature was
    fitted, its reliability diagram. Returns the names of the files written."""
    files.write_json(Path(out_dir) / "data-check.json", record["data_check"])
    cal = record["calibration"]
    if not cal:
        return ["data-check.json"]
    return ["data-check.json", *plot_reliability(*record["logits"]["validation"],
                                                 cal["temperature"], out_dir)]
