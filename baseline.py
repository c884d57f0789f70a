"""A baseline beside the model: word TF-IDF with multinomial logistic regression, trained on the
run's own training split, so that a user sees what fine-tuning GPT-2 adds (on the chapter's SMS
split it scores about as well). Written with numpy (torch's L-BFGS steps it); deterministic, drawing no
random number (the weights start at zero and L-BFGS has no randomness), so it touches nothing of
the run's seeded draws.

    python finetune.py --weights random --data SMSSpamCollection     # its line ends the run
    python finetune.py --no-baseline                                 # skip it

Words are scikit-learn's default (runs of two or more word characters, lowercased); the TF-IDF
is its default too (smoothed idf, ln((1 + n) / (1 + df)) + 1, each row scaled to unit length);
the regression minimises the mean cross-entropy plus ||W||^2 / (2 C n), scikit-learn's
LogisticRegression(C=1) objective divided by n (the intercept is not penalised).
"""

import re
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import decisions

WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern
MAX_FEATURES = 50_000  # the most frequent words kept (by how many training texts hold them)
C = 1.0  # inverse regularisation strength, as scikit-learn's LogisticRegression's default
NAME = "word TF-IDF + logistic regression"


def words(text):
    """The words of a text, lowercased: runs of two or more word characters."""
    return WORD.findall(text.lower())


def fit_tfidf(texts, max_features=MAX_FEATURES):
    """(vocabulary {word: column}, idf (V,)) of the training texts: the `max_features` words
    in the most texts (ties by the word), in alphabetical column order."""
    df = Counter(w for t in texts for w in set(words(t)))
    kept = sorted(df, key=lambda w: (-df[w], w))[:max_features]
    vocab = {w: j for j, w in enumerate(sorted(kept))}
    n = len(texts)
    idf = np.array([np.log((1 + n) / (1 + df[w])) + 1 for w in sorted(kept)])
    return vocab, idf


@dataclass
class Sparse:
    """An (N, V) matrix by its nonzero entries: row, column and value arrays (numpy)."""
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    shape: tuple

    def __matmul__(self, w):  # (N, V) @ (V, C): one bincount per column, O(nonzeros)
        return np.stack([np.bincount(self.rows, self.vals * w[self.cols, c],
                                     minlength=self.shape[0]) for c in range(w.shape[1])], 1)

    def t_matmul(self, g):  # (N, V)^T @ (N, C)
        return np.stack([np.bincount(self.cols, self.vals * g[self.rows, c],
                                     minlength=self.shape[1]) for c in range(g.shape[1])], 1)


def tfidf(texts, vocab, idf):
    """The texts' TF-IDF rows, sparse (N, V), each of unit length (a text without a known word
    stays all zero)."""
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        counts = Counter(vocab[w] for w in words(t) if w in vocab)
        js = np.array(sorted(counts), dtype=np.int64)
        v = np.array([counts[j] for j in js], dtype=np.float64) * idf[js]
        rows += [i] * len(js)
        cols += js.tolist()
        vals += (v / np.linalg.norm(v)).tolist() if len(v) else []
    return Sparse(np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64),
                  np.array(vals, dtype=np.float64), (len(texts), len(vocab)))


def fit_logistic(x, labels, n_classes, c=C, max_iter=300):
    """(W (V, C), b (C,)) minimising mean cross-entropy + ||W||^2 / (2 c n) by L-BFGS from
    zero. `x`: Sparse (N, V) features; `labels`: (N,) class ids. The gradient is written out,
    X^T (P - Y) / n + W / (c n), each product a pass over the nonzero entries alone."""
    y = np.asarray(labels, dtype=np.int64)
    n = max(len(y), 1)
    onehot = np.eye(n_classes)[y]
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64)
    b = torch.zeros(n_classes, dtype=torch.float64)
    penalty = 1 / (2 * c * n)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def loss():
        wn = w.numpy()
        z = x @ wn + b.numpy()
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        g = (np.exp(logp) - onehot) / n
        w.grad = torch.from_numpy(x.t_matmul(g) + 2 * penalty * wn)
        b.grad = torch.from_numpy(g.sum(axis=0))
        return torch.tensor(-(logp * onehot).sum() / n + penalty * (wn * wn).sum())
    with torch.no_grad():
        opt.step(loss)
    return w.numpy(), b.numpy()


def predict(x, w, b):
    """Class ids of the Sparse (N, V) features."""
    return (x @ w + b).argmax(axis=1).tolist()


def run(splits, class_names, evaluate_on=None):
    """The baseline trained on splits["train"] ((label id, text) rows) and scored on the
    splits named in `evaluate_on` (default: the others). Returns {"model", "features",
    "seconds", "splits": {name: decisions.class_scores}}: what metrics.json records."""
    start = time.perf_counter()
    train = splits["train"]
    texts, labels = [t for _, t in train], [y for y, _ in train]
    vocab, idf = fit_tfidf(texts)
    w, b = fit_logistic(tfidf(texts, vocab, idf), labels, len(class_names))
    scores = {}
    for name in evaluate_on or [n for n in splits if n != "train"]:
        rows = splits[name]
        predicted = predict(tfidf([t for _, t in rows], vocab, idf), w, b) if rows else []
        scores[name] = decisions.class_scores([y for y, _ in rows], predicted, class_names)
    return {"model": NAME, "features": len(vocab), "seconds": time.perf_counter() - start,
            "splits": scores}


def comparison_line(result, model_scores, split="test"):
    """The log's line: the baseline's accuracy and macro-F1 on `split` beside the model's."""
    b, m = result["splits"][split], model_scores
    return (f"Baseline ({NAME}, {result['features']:,} words, {result['seconds']:.1f} s) on "
            f"the {split} split: accuracy {b['accuracy']*100:.2f}%, macro-F1 "
            f"{b['macro_f1']:.4f}; the fine-tuned model: accuracy {m['accuracy']*100:.2f}%, "
            f"macro-F1 {m['macro_f1']:.4f}")
