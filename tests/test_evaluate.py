"""evaluate.py: scores, predictions and the class of new texts from a finished run.
"""

import csv
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import data
import evaluate
import finetune
from conftest import OWN_LABELS


# ----------------------------------------------------------------------------------- predictions

CPU = torch.device("cpu")


def test_predict_writes_the_probability_columns_in_the_runs_class_order(own_run, tmp_path):
    """--predict's columns (and a .jsonl row's probabilities) follow the run's class order
    (here --labels neutral,pos,neg), not the names sorted; each column holds its class's
    probability."""
    info = json.loads((own_run["run"] / "run.json").read_text())
    assert info["class_names"] == list(OWN_LABELS) != sorted(OWN_LABELS)
    classifier, info = evaluate.load_run(own_run["run"], CPU)
    texts = own_run["new"].read_text().splitlines()[1:]
    probs = evaluate.predict_proba(texts, classifier, info, CPU)
    out = tmp_path / "p.csv"
    evaluate.main(["--run", str(own_run["run"]), "--predict", str(own_run["new"]),
                   "--output", str(out)])
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][2:] == list(OWN_LABELS)
    for row, p in zip(rows[1:], probs, strict=True):
        assert [float(x) for x in row[2:]] == pytest.approx(
            [p[c] for c in OWN_LABELS], abs=1e-6)
        assert row[1] == max(p, key=p.get)
    out = tmp_path / "p.jsonl"
    evaluate.main(["--run", str(own_run["run"]), "--predict", str(own_run["new"]),
                   "--output", str(out)])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(g["probabilities"]) for g in got] == [list(OWN_LABELS)] * len(texts)
    for g, p in zip(got, probs, strict=True):
        assert g["probabilities"] == pytest.approx(p, abs=1e-6)


def test_predictions_batch_texts_of_similar_length_and_come_back_in_order(own_run, sms_run):
    """A run padded per batch and read at the last real token (own files' default) gives each
    text the logits it has alone, whatever shares its batch: predict_proba batches the texts
    shortest first, and hands the probabilities back in the texts' order. The chapter's rule
    (fixed padding, the last position) keeps the texts' order."""
    classifier, info = evaluate.load_run(own_run["run"], CPU)
    assert evaluate.batch_independent(info)
    texts = [" ".join(["good"] * n) + f" day {n}" for n in (6, 1, 9, 2, 5, 1, 3, 2, 4, 1, 2)]
    batches = []
    forward = classifier.forward

    def recording(ids):
        batches.append(ids.clone())
        return forward(ids)
    classifier.forward = recording
    probs = evaluate.predict_proba(texts, classifier, info, CPU)
    alone = [evaluate.predict_proba([t], classifier, info, CPU)[0] for t in texts]
    assert [list(p) for p in probs] == [list(OWN_LABELS)] * len(texts)
    for p, q in zip(probs, alone, strict=True):
        assert [p[c] for c in OWN_LABELS] == pytest.approx([q[c] for c in OWN_LABELS], abs=1e-5)
    lengths = [int((b != info["pad_id"]).sum(dim=1).max()) for b in batches[:-len(texts)]]
    widths = [b.shape[1] for b in batches[:-len(texts)]]
    assert widths == sorted(widths) and widths == lengths  # each batch as long as its longest

    sms_classifier, sms_info = evaluate.load_run(sms_run, CPU)
    assert not evaluate.batch_independent(sms_info)  # the last position of a padded text
    batches.clear()
    sms_forward = sms_classifier.forward
    sms_classifier.forward = lambda ids: batches.append(ids.clone()) or sms_forward(ids)
    evaluate.predict_proba(texts, sms_classifier, sms_info, CPU)
    first = [row[row != sms_info["pad_id"]].tolist() for row in batches[0]]
    assert first == [data.get_tokenizer().encode_ordinary(t) for t in texts[:len(first)]]


# ------------------------------------------------------------------------------------ the scores

NAMES = ["a", "b", "c", "d"]  # "d": in neither the truth nor the predictions
TRUTH = [0, 0, 0, 0, 1, 1, 2, 2, 2]
PREDICTED = [0, 0, 1, 2, 1, 1, 0, 0, 2]
# rows: true class, columns: predicted class
CONFUSION = [[2, 1, 1, 0],
             [0, 2, 0, 0],
             [2, 0, 1, 0],
             [0, 0, 0, 0]]
# a: tp 2 of 4 predicted a, of 4 true a         -> P 1/2, R 1/2, F1 1/2
# b: tp 2 of 3 predicted b, of 2 true b         -> P 2/3, R 1,   F1 2*(2/3)/(5/3) = 4/5
# c: tp 1 of 2 predicted c, of 3 true c         -> P 1/2, R 1/3, F1 2*(1/6)/(5/6) = 2/5
# d: nothing                                    -> 0, 0, 0, support 0
PER_CLASS = {"a": (1 / 2, 1 / 2, 1 / 2, 4), "b": (2 / 3, 1.0, 4 / 5, 2),
             "c": (1 / 2, 1 / 3, 2 / 5, 3), "d": (0.0, 0.0, 0.0, 0)}
ACCURACY = 5 / 9
MACRO_F1 = (1 / 2 + 4 / 5 + 2 / 5) / 3  # over a, b, c: d is in neither truth nor predictions
WEIGHTED_F1 = (1 / 2 * 4 + 4 / 5 * 2 + 2 / 5 * 3) / 9


def test_class_scores_of_a_known_asymmetric_prediction():
    s = evaluate.class_scores(TRUTH, PREDICTED, NAMES)
    assert s["confusion"] == CONFUSION
    assert s["examples"] == 9
    assert s["accuracy"] == pytest.approx(ACCURACY)
    for name, (p, r, f1, support) in PER_CLASS.items():
        v = s["per_class"][name]
        assert (v["precision"], v["recall"], v["f1"]) == pytest.approx((p, r, f1)), name
        assert v["support"] == support, name
    assert list(s["per_class"]) == NAMES
    assert s["macro_f1"] == pytest.approx(MACRO_F1)
    assert s["weighted_f1"] == pytest.approx(WEIGHTED_F1)


def test_a_class_only_predicted_or_only_true_counts_in_the_macro_average():
    # d is predicted once but never true; c is true once but never predicted.
    truth = [0, 0, 1, 2]
    predicted = [0, 3, 1, 1]
    s = evaluate.class_scores(truth, predicted, NAMES)
    assert s["confusion"] == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    # a: P 1/1, R 1/2, F1 2/3; b: P 1/2, R 1, F1 2/3; c: 0 (never predicted); d: 0 (never true)
    pc = s["per_class"]
    assert (pc["a"]["precision"], pc["a"]["recall"]) == pytest.approx((1.0, 0.5))
    assert (pc["b"]["precision"], pc["b"]["recall"]) == pytest.approx((0.5, 1.0))
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert s["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)  # all four classes
    assert s["weighted_f1"] == pytest.approx((2 / 3 * 2 + 2 / 3 * 1 + 0 * 1) / 4)
    assert s["accuracy"] == pytest.approx(2 / 4)


def test_no_examples_give_zeros_not_an_error():
    s = evaluate.class_scores([], [], ["x", "y"])
    assert (s["examples"], s["accuracy"], s["macro_f1"], s["weighted_f1"]) == (0, 0.0, 0.0, 0.0)
    assert s["confusion"] == [[0, 0], [0, 0]]


def test_labels_and_logits_come_in_loader_order():
    logits = torch.tensor([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    batches = [(torch.tensor([[0], [1]]), torch.tensor([2, 0])),
               (torch.tensor([[2], [3]]), torch.tensor([2, 2]))]

    class Lookup(torch.nn.Module):  # logits by the example's index
        def forward(self, ids):
            return logits[ids[:, 0]]

    labels, logits = evaluate.labels_and_logits(batches, Lookup(), CPU)
    labels, predicted = labels.tolist(), logits.argmax(axis=1).tolist()
    assert labels == [2, 0, 2, 2] and predicted == [1, 0, 2, 1]


def test_printed_scores_put_true_classes_in_rows_and_precision_before_recall(capsys):
    s = evaluate.class_scores(TRUTH, PREDICTED, NAMES)
    evaluate.print_scores({"test": s}, NAMES)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Test accuracy: {ACCURACY * 100:.2f}%"
    summary = next(line.split() for line in out if line.startswith("test "))
    assert summary == ["test", f"{ACCURACY:.4f}", f"{MACRO_F1:.4f}", f"{WEIGHTED_F1:.4f}", "9"]
    head = out.index("test: per class")
    assert out[head + 1].split() == ["class", "precision", "recall", "F1", "support"]
    for line, (name, (p, r, f1, support)) in zip(out[head + 2:head + 6], PER_CLASS.items()):
        assert line.split() == [name, f"{p:.4f}", f"{r:.4f}", f"{f1:.4f}", str(support)]
    at = out.index("test: confusion (rows: true class, columns: predicted class)")
    assert out[at + 1].split() == NAMES
    rows = [line.split() for line in out[at + 2:at + 6]]
    assert rows == [[name, *map(str, row)] for name, row in zip(NAMES, CONFUSION)]


# ----------------------------------------------------------------------------- class weights

class BiasOnly(torch.nn.Module):
    """Two class logits that are a bias alone: the gradient of a batch's loss is worked out by
    hand (at zero bias each class has probability 1/2)."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))

    def forward(self, ids):
        return self.bias.expand(ids.shape[0], 2)


def one_step(weight, capsys):
    """The bias after finetune.train_classifier_simple's one SGD step (lr 1) on one batch: 3 of
    class 0, 1 of 1."""
    loader = DataLoader(TensorDataset(torch.zeros(4, 1, dtype=torch.long),
                                      torch.tensor([0, 0, 0, 1])), batch_size=4)
    model = BiasOnly()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = finetune.TrainConfig(epochs=1, max_steps=1, eval_freq=1, eval_iter=1)
    history = finetune.train_classifier_simple(model, {"train": loader, "validation": loader},
                                               optimizer, cfg, CPU, class_weights=weight)
    capsys.readouterr()
    return model.bias.detach().tolist(), history


def test_class_weights_reach_the_step_the_optimizer_takes(capsys):
    # Unweighted: the mean of (p - onehot) = (3 [1/2, -1/2] + [-1/2, 1/2]) / 4 = [1/4, -1/4];
    # a step of lr 1 moves the bias by minus that, towards the majority class 0.
    plain, plain_history = one_step(None, capsys)
    assert plain == pytest.approx([0.25, -0.25])
    # Weights 1, 9: (3 * 1 [1/2, -1/2] + 9 [-1/2, 1/2]) / (3 + 9) = [-1/4, 1/4]: the step now
    # moves towards class 1, the other way round.
    weighted, weighted_history = one_step(torch.tensor([1.0, 9.0]), capsys)
    assert weighted == pytest.approx([-0.25, 0.25])
    # The loss printed after the step is weighted the same way (evaluated at the new bias).
    for bias, history, w in ((plain, plain_history, None),
                             (weighted, weighted_history, torch.tensor([1.0, 9.0]))):
        logits = torch.tensor(bias).expand(4, 2)
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0, 1]),
                                                     weight=w)
        assert history["train_losses"] == pytest.approx([float(expected)])


def test_balanced_weights_by_hand():
    # 7 of class 0, 2 of class 1, 1 of class 2: n / (C n_c) = 10/21, 10/6, 10/3
    labels = [0] * 7 + [1] * 2 + [2]
    w = finetune.class_weights("balanced", labels, ["x", "y", "z"])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([10 / 21, 10 / 6, 10 / 3])
    # every class weighs the same in total: n_c * w_c = n / C
    assert [labels.count(c) * w[c].item() for c in range(3)] == pytest.approx([10 / 3] * 3)
    assert re.search("one per class", str(pytest.raises(
        ValueError, finetune.class_weights, "1,2", labels, ["x", "y", "z"]).value))
