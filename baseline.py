"""A baseline beside the model: word TF-IDF with multinomial logistic regression, trained on the
run's own training split, so that a user sees what fine-tuning GPT-2 adds (on the chapter's
SMS split it scores about as well). Written with numpy alone; deterministic, drawing no random
number (the weights start at zero and L-BFGS has no randomness), so it touches nothing of the
run's seeded draws; 0.1 s on the SMS split.

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


def lbfgs(f, x, max_iter=500, history=20, gtol=1e-8):
    """The minimum of a smooth convex `f` (x -> (value, gradient)) from `x`, by L-BFGS: the
    two-loop recursion over the last `history` steps, then a backtracking (Armijo) line search.
    Written out because torch's L-BFGS imports torch._dynamo on first use (some 2.7 s)."""
    fx, g = f(x)
    steps = []  # (s, y, 1 / y.s) of the last steps
    for _ in range(max_iter):
        if np.abs(g).max() < gtol:
            break
        q, alphas = g.copy(), []
        for s, y, rho in reversed(steps):
            a = rho * (s @ q)
            q -= a * y
            alphas.append(a)
        if steps:  # the usual scaling of the first inverse Hessian: s.y / y.y
            s, y, _ = steps[-1]
            q *= (s @ y) / (y @ y)
        for (s, y, rho), a in zip(steps, reversed(alphas)):
            q += s * (a - rho * (y @ q))
        d = -q
        slope = g @ d
        if slope >= 0:  # not a descent direction (rounding): a gradient step instead
            d, slope, steps = -g, -(g @ g), []
        t = 1.0 if steps else min(1.0, 1 / np.abs(g).sum())
        while True:
            x_new = x + t * d
            f_new, g_new = f(x_new)
            if f_new <= fx + 1e-4 * t * slope or t < 1e-12:
                break
            t /= 2
        s, y = x_new - x, g_new - g
        if s @ y > 1e-16:
            steps = (steps + [(s, y, 1 / (s @ y))])[-history:]
        done = fx - f_new <= 1e-14 * max(1.0, abs(fx))
        x, fx, g = x_new, f_new, g_new
        if done:
            break
    return x


def fit_logistic(x, labels, n_classes, c=C):
    """(W (V, C), b (C,)) minimising mean cross-entropy + ||W||^2 / (2 c n) by L-BFGS from
    zero. `x`: Sparse (N, V) features; `labels`: (N,) class ids. The gradient is written out,
    X^T (P - Y) / n + W / (c n), each product a pass over the nonzero entries alone."""
    y = np.asarray(labels, dtype=np.int64)
    n, v = max(len(y), 1), x.shape[1]
    onehot = np.eye(n_classes)[y]
    penalty = 1 / (2 * c * n)

    def f(theta):
        w, b = theta[:v * n_classes].reshape(v, n_classes), theta[v * n_classes:]
        z = x @ w + b
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        g = (np.exp(logp) - onehot) / n
        grad = np.concatenate([(x.t_matmul(g) + 2 * penalty * w).ravel(), g.sum(axis=0)])
        return -(logp * onehot).sum() / n + penalty * (w * w).sum(), grad
    theta = lbfgs(f, np.zeros(v * n_classes + n_classes))
    return theta[:v * n_classes].reshape(v, n_classes), theta[v * n_classes:]


def predict(x, w, b):
    """Class ids of the Sparse (N, V) features."""
    return (x @ w + b).argmax(axis=1).tolist()


def run(splits, class_names, score):
    """The baseline trained on splits["train"] ((label id, text) rows) and scored on each other
    split by `score` (labels, predicted, class_names) -> dict (decisions.class_scores). Returns
    {"model", "features", "seconds", "splits": {name: scores}}: what metrics.json records."""
    start = time.perf_counter()
    train = splits["train"]
    texts, labels = [t for _, t in train], [y for y, _ in train]
    vocab, idf = fit_tfidf(texts)
    w, b = fit_logistic(tfidf(texts, vocab, idf), labels, len(class_names))
    scores = {}
    for name, rows in splits.items():
        if name != "train":
            predicted = predict(tfidf([t for _, t in rows], vocab, idf), w, b) if rows else []
            scores[name] = score([y for y, _ in rows], predicted, class_names)
    return {"model": NAME, "features": len(vocab), "seconds": time.perf_counter() - start,
            "splits": scores}


def comparison_line(result, model_scores, split="test"):
    """The log's line: the baseline's accuracy and macro-F1 on `split` beside the model's (no
    time in it, so that two equal runs print the same log; metrics.json keeps the time)."""
    b, m = result["splits"][split], model_scores
    return (f"Baseline ({NAME} on the same training split, {result['features']:,} words) on "
            f"the {split} split: accuracy {b['accuracy']*100:.2f}%, macro-F1 "
            f"{b['macro_f1']:.4f}; the fine-tuned model: accuracy {m['accuracy']*100:.2f}%, "
            f"macro-F1 {m['macro_f1']:.4f}")
