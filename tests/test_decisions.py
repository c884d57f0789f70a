"""decisions.py: scores beyond accuracy, the temperature, the operating point; and in whole runs.
"""

import csv
import io
import json
import math
import sys
import threading
import types
import urllib.request

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import ddp
import decisions
import evaluate
import finetune
import gpt
import serve
from reference import CHAPTER_LINE


# ------------------------------------------------------------- the functions, with known answers

def test_auc_of_a_perfect_a_random_and_an_inverted_scorer():
    rng = np.random.RandomState(0)
    y = rng.rand(20000) < 0.4
    assert decisions.roc_auc(y, y + 0.0) == 1.0
    assert decisions.roc_auc(y, -(y + 0.0)) == 0.0
    assert decisions.average_precision(y, y + 0.0) == 1.0
    random = rng.rand(len(y))
    assert decisions.roc_auc(y, random) == pytest.approx(0.5, abs=0.01)
    # a random scorer's average precision is the share of positives
    assert decisions.average_precision(y, random) == pytest.approx(y.mean(), abs=0.01)
    assert decisions.roc_auc(y, np.zeros(len(y))) == 0.5  # all tied: half
    assert decisions.roc_auc(np.ones(5, bool), np.arange(5.0)) is None  # one class only


def test_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 1+1+0+1 of 4
    assert decisions.roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == 0.75
    # precision at the positives: 1/1, then 2/3; recall steps 0.5 each
    assert decisions.average_precision([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == \
        pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_mcc_and_balanced_accuracy_by_hand():
    labels, predicted = [0, 0, 0, 1], [0, 0, 1, 1]  # tp 1, tn 2, fp 1, fn 0
    assert decisions.matthews(labels, predicted, 2) == pytest.approx(
        (1 * 2 - 1 * 0) / math.sqrt(2 * 1 * 3 * 2))
    assert decisions.balanced_accuracy(labels, predicted, 2) == pytest.approx((2 / 3 + 1) / 2)
    assert decisions.matthews([0, 0], [0, 0], 2) == 0.0  # undefined: 0, as scikit-learn


def test_ece_of_a_calibrated_and_an_over_confident_scorer():
    rng = np.random.RandomState(1)
    n = 50000
    confidence = rng.uniform(0.5, 1.0, n)
    right = rng.rand(n) < confidence  # right as often as it says: calibrated
    labels = np.where(right, 0, 1)
    probs = np.stack([confidence, 1 - confidence], 1)
    assert decisions.ece(probs, labels) < 0.01
    # says 0.99 and is right 70% of the time: the gap is 0.29
    right = rng.rand(n) < 0.7
    probs = np.tile([0.99, 0.01], (n, 1))
    assert decisions.ece(probs, np.where(right, 0, 1)) == pytest.approx(0.29, abs=0.01)


def test_ece_by_hand_uses_15_equal_width_bins():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    # bin (14/15, 1]: confidence 0.95, accuracy 0.5; bin (8/15, 9/15]: 0.55 and 1.0
    assert decisions.ece(probs, labels) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    table = decisions.reliability(probs, labels)
    assert len(table) == 15 and [b["count"] for b in table if b["count"]] == [2, 2]


def synthetic(n=20000, classes=4, seed=2):
    """Logits whose softmax is the true probability of each label."""
    rng = np.random.RandomState(seed)
    z = rng.normal(0, 2, (n, classes))
    p = decisions.probabilities(z)
    labels = (rng.rand(n, 1) > np.cumsum(p, 1)).sum(1)
    return z, labels


@pytest.mark.parametrize("true_t", [2.5, 0.5, 1.0])
def test_a_known_temperature_is_recovered_within_5_percent(true_t):
    z, labels = synthetic()
    # a model whose logits are the true ones times T: over-confident for T > 1
    fitted = decisions.fit_temperature(z * true_t, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    cal = decisions.calibration(z * true_t, labels)
    assert cal["temperature"] == fitted
    if true_t != 1.0:
        assert cal["val_ece_after"] < cal["val_ece_before"]
        assert cal["val_log_loss_after"] < cal["val_log_loss_before"]


def test_fitting_is_deterministic_and_draws_no_random_number():
    z, labels = synthetic(n=500)
    state, np_state = torch.get_rng_state(), np.random.get_state()
    assert decisions.fit_temperature(z * 3, labels) == decisions.fit_temperature(z * 3, labels)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 100), st.integers(2, 6))
def test_the_temperature_leaves_argmax_and_so_accuracy_as_it_was(seed, t, classes):
    rng = np.random.RandomState(seed)
    z = rng.normal(0, 5, (64, classes))
    labels = rng.randint(0, classes, 64)
    assert np.array_equal(decisions.probabilities(z, t).argmax(1), z.argmax(1))
    a = decisions.probability_scores(z, labels)
    b = decisions.probability_scores(z, labels, t)
    assert (a["mcc"], a["balanced_accuracy"]) == (b["mcc"], b["balanced_accuracy"])
    if classes == 2:  # a monotone map of the score: the same ranking
        assert a["roc_auc"] == b["roc_auc"] and a["pr_auc"] == b["pr_auc"]


def test_scores_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.RandomState(3)
    for classes in (2, 3, 5):
        z = rng.normal(0, 2, (400, classes))
        labels = (z + rng.normal(0, 3, z.shape)).argmax(1)
        s = decisions.probability_scores(z, labels)
        p = decisions.probabilities(z)
        if classes == 2:
            auc = sk.roc_auc_score(labels, p[:, 1])
            ap = sk.average_precision_score(labels, p[:, 1])
        else:
            auc = sk.roc_auc_score(labels, p, multi_class="ovr", average="macro")
            ap = np.mean([sk.average_precision_score(labels == k, p[:, k])
                          for k in range(classes)])
        assert s["roc_auc"] == pytest.approx(auc)
        assert s["pr_auc"] == pytest.approx(ap)
        assert s["mcc"] == pytest.approx(sk.matthews_corrcoef(labels, z.argmax(1)))
        assert s["balanced_accuracy"] == pytest.approx(
            sk.balanced_accuracy_score(labels, z.argmax(1)))
        assert s["log_loss"] == pytest.approx(sk.log_loss(labels, p))


def test_class_scores_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.RandomState(4)
    labels, predicted = rng.randint(0, 4, 300), rng.randint(0, 4, 300)
    s = decisions.class_scores(labels, predicted, ["a", "b", "c", "d"])
    assert s["accuracy"] == pytest.approx(sk.accuracy_score(labels, predicted))
    assert s["macro_f1"] == pytest.approx(sk.f1_score(labels, predicted, average="macro"))
    assert s["weighted_f1"] == pytest.approx(sk.f1_score(labels, predicted, average="weighted"))
    assert s["confusion"] == sk.confusion_matrix(labels, predicted).tolist()


# ------------------------------------------------------------------------- the operating point

def brute_force(scores, is_pos, metric, value):
    """The best rates over every threshold at a score (and above all): what choose must match."""
    best = None
    for t in sorted(set(scores)) + [2.0]:
        r = decisions.rates(scores, is_pos, t)
        ok = {"precision": r["precision"] is not None and r["precision"] >= value - 1e-12,
              "recall": r["recall"] >= value - 1e-12,
              "fpr": r["fpr"] <= value + 1e-12}[metric]
        if not ok:
            continue
        key = (-r["fp"],) if metric == "recall" else (r["tp"], -r["fp"])
        if best is None or key > best[0]:
            best = (key, r)
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=2, max_size=60),
       st.sampled_from(["precision", "recall", "fpr"]), st.floats(0.05, 1.0))
def test_the_threshold_meets_its_target_on_validation_with_the_most_use(rows, metric, value):
    scores = np.array([s / 20 for s, _ in rows])
    is_pos = np.array([p for _, p in rows])
    if not is_pos.any() or is_pos.all():
        return
    chosen = decisions.choose_threshold(scores, is_pos, metric, value)
    r = chosen["validation"]
    assert r == decisions.rates(scores, is_pos, chosen["threshold"])
    best = brute_force(scores, is_pos, metric, value)
    assert chosen["met"] == (best is not None)
    if chosen["met"]:
        got = {"precision": r["precision"], "recall": r["recall"], "fpr": r["fpr"]}[metric]
        assert got >= value - 1e-12 if metric != "fpr" else got <= value + 1e-12
        if metric == "recall":
            assert r["fp"] == best[1]["fp"]
        else:
            assert r["tp"] == best[1]["tp"]
    # halfway between scores: no validation score sits on the threshold (but 0, the lowest)
    assert chosen["threshold"] == 0 or not np.any(scores == chosen["threshold"])


def test_a_precision_target_on_separable_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    is_pos = np.array([0, 0, 1, 0, 1, 1, 1], bool)
    chosen = decisions.choose_threshold(scores, is_pos, "precision", 0.99)
    assert chosen["met"] and chosen["threshold"] == pytest.approx(0.65)
    assert chosen["validation"]["recall"] == 0.75
    chosen = decisions.choose_threshold(scores, is_pos, "recall", 1.0)
    assert chosen["threshold"] == pytest.approx(0.25)
    chosen = decisions.choose_threshold(scores, is_pos, "fpr", 0.34)
    assert chosen["threshold"] == pytest.approx(0.25) and chosen["validation"]["fpr"] == 1 / 3


def test_an_unreachable_target_says_the_best_it_reaches():
    z = np.array([[0.0, 1.0], [0.0, 0.9], [0.0, -1.0]])  # the top score is a negative
    labels = np.array([0, 1, 1])
    decision, lines = decisions.operating_point("precision=0.99", 1, ["ham", "spam"], z, labels)
    assert decision is None and len(lines) == 1
    assert lines[0].startswith("warning: --target precision=0.99 cannot be met") and \
        "0.667" in lines[0]


def test_the_operating_point_is_chosen_on_validation_and_reported_on_test():
    z, labels = synthetic(n=4000, classes=2, seed=5)
    test = synthetic(n=2000, classes=2, seed=6)
    decision, lines = decisions.operating_point("precision=0.95", 1, ["ham", "spam"], z,
                                                labels, 1.0, test)
    assert decision["validation"]["precision"] >= 0.95
    assert set(decision) >= {"positive_class", "threshold", "target", "validation", "test"}
    assert decision["positive_class"] == "spam" and decision["target"] == "precision=0.95"
    assert decision["test"] == decisions.rates(decisions.probabilities(test[0])[:, 1],
                                               test[1] == 1, decision["threshold"])
    assert len(lines) == 2 and not any(CHAPTER_LINE.match(line) for line in lines)


@pytest.mark.parametrize("spec, said", [
    ("precision", "unknown metric"), ("accuracy=0.9", "unknown metric 'accuracy'"),
    ("recall=0", "outside (0, 1]"), ("fpr=1.5", "outside (0, 1]"), ("recall=-0.1", "outside"),
    ("precision=high", "not a number"), ("recall=nan", "outside")])
def test_a_bad_target_says_what_works(spec, said):
    with pytest.raises(ValueError, match="precision=X, recall=X or fpr=X") as e:
        decisions.parse_target(spec)
    assert said in str(e.value)


def test_the_positive_class():
    assert decisions.positive_index(["not spam", "spam"]) == 1
    assert decisions.positive_index(["neg", "neu", "pos"], "POS") == 2
    with pytest.raises(ValueError, match="--positive-class NAME"):
        decisions.positive_index(["neg", "neu", "pos"], None, "recall=0.9")
    with pytest.raises(ValueError, match="give one of neg, pos"):
        decisions.positive_index(["neg", "pos"], "spam")


def test_too_few_positives_to_choose_from():
    with pytest.raises(ValueError, match="has 0 positive examples"):
        decisions.check_support([0, 0, 0], 1, "precision")
    with pytest.raises(ValueError, match="has 0 negative examples"):
        decisions.check_support([1, 1], 1, "fpr")
    assert decisions.check_support([1] * 5 + [0] * 50, 1, "recall").startswith(
        "warning: the validation split has only 5 positive examples")
    assert decisions.check_support([1] * 50 + [0] * 50, 1, "recall") is None


def test_decide_uses_the_threshold_and_else_the_likeliest_other_class():
    decision = {"positive_class": "b", "threshold": 0.2}
    names = ["a", "b", "c"]
    assert decisions.decide({"a": 0.5, "b": 0.25, "c": 0.25}, names, decision) == "b"
    assert decisions.decide({"a": 0.3, "b": 0.1, "c": 0.6}, names, decision) == "c"
    assert decisions.decide({"a": 0.3, "b": 0.1, "c": 0.6}, names, None) == "c"


# ----------------------------------------------------------------------------- a model's pass

def test_split_logits_are_the_classifiers_and_draw_nothing():
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=50257, context_length=32, emb_dim=16,
                                       n_heads=2, n_layers=1))
    gpt.add_classification_head(model, 2)
    classifier = gpt.Classifier(model.eval())
    rows = [(i % 2, f"text number {i} " * (i % 4 + 1)) for i in range(11)]
    ds = data.TextDataset(rows, data.get_tokenizer())
    state = torch.get_rng_state()
    logits, labels = decisions.split_logits(classifier, ds, torch.device("cpu"), batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        expected = classifier(torch.stack([ds[i][0] for i in range(len(ds))]))
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [y for y, _ in rows]


def test_the_reliability_diagram_is_written(tmp_path):
    z, labels = synthetic(n=300)
    written = decisions.plot_reliability(z * 3, labels, 3.0, tmp_path)
    assert written == ["reliability-plot.pdf", "reliability-plot.png"]
    assert (tmp_path / "reliability-plot.png").read_bytes()[:4] == b"\x89PNG"


def test_the_score_table_is_no_chapter_line():
    z, labels = synthetic(n=200, classes=2)
    s = decisions.probability_scores(z, labels)
    lines = decisions.score_table({"train": s, "validation": s, "test": s}, True)
    assert len(lines) == 3 and not any(CHAPTER_LINE.match(line) for line in lines)
    assert lines[0].startswith("Scores on train (calibrated probabilities): ROC-AUC ") and \
        "log loss" in lines[0] and "ECE (15 bins)" in lines[0]
    assert decisions.calibration_line(decisions.calibration(z, labels)).startswith(
        "Calibration: temperature")


def test_assess_after_training_draws_nothing_and_keeps_argmax():
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=50257, context_length=32, emb_dim=16,
                                       n_heads=2, n_layers=1))
    gpt.add_classification_head(model, 2)
    classifier = gpt.Classifier(model.eval())
    tok = data.get_tokenizer()
    rows = [(i % 2, f"{'win cash' if i % 2 else 'see you'} {i}") for i in range(90)]
    rows_of = {"train": rows[:50], "validation": rows[50:70], "test": rows[70:]}.items()
    train = data.TextDataset(rows[:50], tok)
    datasets = {"train": train,
                "validation": data.TextDataset(rows[50:70], tok, train.max_length),
                "test": data.TextDataset(rows[70:], tok, train.max_length)}
    state = torch.get_rng_state()
    record, lines = decisions.assess(classifier, datasets, ["ham", "spam"], torch.device("cpu"),
                                     "recall=0.5", 1, leave_out={"train": [0, 1, 2]},
                                     baseline_splits={n: ds_rows for n, ds_rows in rows_of})
    assert torch.equal(torch.get_rng_state(), state)
    assert set(record["scores"]) == {"train", "validation", "test"}
    assert record["scores"]["train"]["examples"] == 47
    z, y = record["logits"]["validation"]
    assert record["calibration"]["temperature"] == decisions.fit_temperature(z, y)
    assert record["decision"]["validation"]["recall"] >= 0.5
    assert "test" in record["decision"]
    assert lines[0].startswith("Calibration: temperature")
    assert lines[-1].startswith("Baseline (word TF-IDF + logistic regression")
    assert record["baseline"]["splits"]["test"]["examples"] == 20
    assert not any(CHAPTER_LINE.match(line) for line in lines)
    assert set(decisions.measured(record)) == {"scores", "baseline"}
    assert set(decisions.decided(record)) == {"calibration", "decision"}


def test_check_target_before_training():
    warned = []

    def check(target, positive, names, labels):
        cfg = types.SimpleNamespace(target=target, positive_class=positive)
        labelled = data.LabelledData({"validation": [(y, "t") for y in labels]}, names)
        return decisions.check_target(cfg, labelled, warned.append)
    assert check(None, None, ["a", "b"], [0, 1]) is None
    assert check("precision=0.9", None, ["a", "b"], [0, 1] * 30) == 1
    assert warned == []
    assert check("recall=0.9", "A", ["a", "b"], [0, 1] * 5) == 0
    assert len(warned) == 1 and warned[0].startswith("warning: the validation split has only 5")
    with pytest.raises(ValueError, match="--positive-class NAME"):
        check("precision=0.9", None, ["a", "b", "c"], [0, 1, 2])
    with pytest.raises(ValueError, match="not a class of the run"):
        check(None, "d", ["a", "b", "c"], [0, 1, 2])
    with pytest.raises(ValueError, match="has 0 positive"):
        check("recall=0.9", "c", ["a", "b", "c"], [0, 1, 1])


def test_explain_says_what_a_run_gives():
    assert decisions.explain({}) is None
    line = decisions.explain({"calibration": {"temperature": 1.5}, "decision": {
        "positive_class": "Spam", "threshold": 0.8, "target": "precision=0.99"}})
    assert line.startswith("Probabilities calibrated by the run's temperature 1.500") and \
        "decisions: Spam where its probability is at or above the threshold 0.8000" in line


# --------------------------------------------------------------------------------- in whole runs

def train(args, capsys=None):
    """finetune.main(args), its printed log returned."""
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        finetune.main(args)
    return buf.getvalue()


@pytest.fixture(scope="module")
def target_run(tmp_path_factory, tiny_weights, small_raw_path):
    """A tiny run on a small SMS file with --target recall=0.9: (folder, log)."""
    out = tmp_path_factory.mktemp("decisions") / "run"
    log = train(["--weights", str(tiny_weights), "--data", str(small_raw_path),
                 "--output-dir", str(out), "--epochs", "1", "--max-steps", "4",
                 "--no-initial-eval", "--target", "recall=0.9"])
    return out, log


def test_a_run_shows_the_data_check_calibration_scores_and_baseline(target_run):
    out, log = target_run
    lines = log.splitlines()
    assert any(line.startswith("Data check: ") for line in lines)
    assert any(line.startswith("Calibration: temperature ") for line in lines)
    assert any(line.startswith("Scores on test (calibrated probabilities): ROC-AUC ")
               for line in lines)
    assert any(line.startswith("Baseline (word TF-IDF + logistic regression") for line in lines)
    assert any(line.startswith("Decision threshold for --target recall=0.9 on spam") for line in
               lines)
    # after the chapter's last line, before the run folder's
    last_chapter = max(i for i, line in enumerate(lines) if CHAPTER_LINE.match(line))
    assert lines[last_chapter].startswith("Test accuracy: ")
    assert all(i > last_chapter for i, line in enumerate(lines)
               if line.startswith(("Calibration:", "Baseline (", "Decision threshold")))
    assert lines[-1].startswith("Saved the fine-tuned model to ")


def test_the_run_folder_holds_them(target_run):
    out, _ = target_run
    info = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    check = json.loads((out / "data-check.json").read_text())
    assert {"data-check.json", "reliability-plot.png", "reliability-plot.pdf"} <= \
        set(info["files"])
    assert check["splits"]["train"]["examples"] == 168 and "train/test" in check["leaks"]
    cal = info["calibration"]
    assert cal["temperature"] > 0 and {"val_ece_before", "val_ece_after"} <= set(cal)
    d = info["decision"]
    assert d["positive_class"] == "spam" and d["target"] == "recall=0.9"
    assert 0 <= d["threshold"] <= 1 and d["validation"]["recall"] >= 0.9
    assert "test" in d
    for split in ("train", "validation", "test"):
        s = metrics["scores"][split]
        assert {"roc_auc", "pr_auc", "mcc", "balanced_accuracy", "log_loss", "ece"} <= set(s)
    b = metrics["baseline"]
    assert b["model"] == "word TF-IDF + logistic regression" and "test" in b["splits"]


def run_evaluate(args):
    buf, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        mp.setattr(sys, "stderr", err)
        evaluate.main(args)
    return buf.getvalue(), err.getvalue()


def test_evaluate_all_splits_shows_the_scores_threshold_and_baseline(target_run):
    out, log = target_run
    printed, _ = run_evaluate(["--run", str(out), "--all-splits"])
    # the same accuracies as the run printed: the temperature changes no argmax
    assert [x for x in printed.splitlines() if CHAPTER_LINE.match(x)] == \
        [x for x in log.splitlines() if CHAPTER_LINE.match(x)][-3:]
    assert "Scores on test (calibrated probabilities): ROC-AUC " in printed
    assert "At the decision threshold" in printed
    assert "Baseline (word TF-IDF + logistic regression" in printed
    info = json.loads((out / "run.json").read_text())
    # the test split's rates at the threshold are the ones the run recorded
    r = info["decision"]["test"]
    assert f"{r['tp']} true and {r['fp']} false positives" in printed


def test_predict_writes_a_decision_column_and_text_uses_it(target_run, tmp_path):
    out, _ = target_run
    src = tmp_path / "new.csv"
    src.write_text("text\nWIN cash prize now\nsee you at home\n", encoding="utf-8")
    dest = tmp_path / "pred.csv"
    _, err = run_evaluate(["--run", str(out), "--predict", str(src), "--output", str(dest)])
    rows = list(csv.DictReader(dest.open(encoding="utf-8")))
    info = json.loads((out / "run.json").read_text())
    t = info["decision"]["threshold"]
    for row in rows:
        assert row["decision"] == ("spam" if float(row["spam"]) >= t else "not spam")
    assert "calibrated" in err
    printed, err = run_evaluate(["--run", str(out), "--text", "WIN cash prize now"])
    assert "threshold" in err


def test_the_servers_answer_is_calibrated(target_run):
    out, _ = target_run
    device = ddp.select_device("cpu")
    classifier, info = evaluate.load_run(out, device)
    srv = serve.make_server(classifier, info, device, out.name, port=0, log=False,
                            predict=evaluate.predict_proba)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{srv.server_address[1]}/classify",
            data=json.dumps({"texts": ["WIN cash prize now"]}).encode(),
            headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
    [p] = answer["predictions"]
    assert answer["calibrated"] == {"temperature": info["calibration"]["temperature"]}
    assert answer["decision"]["threshold"] == info["decision"]["threshold"]
    [want] = evaluate.predict_proba(["WIN cash prize now"], classifier, info, device)
    assert p["probabilities"] == pytest.approx(want, abs=1e-6)
    assert p["label"] == ("spam" if want["spam"] >= info["decision"]["threshold"] else
                          "not spam")


def test_check_data_alone_prints_the_report_and_trains_nothing(small_raw_path, tmp_path):
    out = tmp_path / "never"
    log = train(["--check-data", "--data", str(small_raw_path), "--weights", "random",
                 "--output-dir", str(out)])
    assert "Data check (texts compared with whitespace collapsed, case folded):" in log
    assert "train/test:" in log and not out.exists()
    assert not any(CHAPTER_LINE.match(line) for line in log.splitlines())


def own_file(path, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def test_dedup_drops_duplicates_before_the_split_and_names_conflicts(tmp_path):
    rows = [(f"text number {i}", "a" if i % 2 else "b") for i in range(40)]
    rows += [("text number 1", "a"), ("TEXT  number 1", "a"), ("text number 3", "b")]
    f = own_file(tmp_path / "own.csv", rows)
    log = train(["--check-data", "--train-file", str(f), "--weights", "random"])
    assert "under two labels" in log and "rows" in log
    log = train(["--check-data", "--train-file", str(f), "--weights", "random", "--dedup"])
    assert "--dedup dropped 2 exact duplicates" in log


@pytest.mark.parametrize("args, said", [
    (["--target", "accuracy=0.9"], "unknown metric 'accuracy'"),
    (["--target", "precision=1.5"], "outside (0, 1]"),
    (["--target", "precision=0"], "outside (0, 1]"),
    (["--positive-class", "spam"], "--positive-class goes with --target"),
])
def test_bad_decision_flags_are_one_error_line(args, said, small_raw_path, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data", str(small_raw_path), "--weights", "random",
                       "--output-dir", str(out), *args])
    assert str(e.value).startswith("error: ") and said in str(e.value)
    assert "\n" not in str(e.value) and not out.exists()


def test_a_target_on_three_classes_needs_the_positive_class(tmp_path):
    f = own_file(tmp_path / "three.csv", [(f"t {i}", "xyz"[i % 3]) for i in range(60)])
    with pytest.raises(SystemExit) as e:
        finetune.main(["--train-file", str(f), "--weights", "random", "--target", "recall=0.9",
                       "--output-dir", str(tmp_path / "never")])
    assert "--positive-class NAME" in str(e.value) and not (tmp_path / "never").exists()
    with pytest.raises(SystemExit) as e:
        finetune.main(["--train-file", str(f), "--weights", "random", "--target", "recall=0.9",
                       "--positive-class", "w", "--output-dir", str(tmp_path / "never")])
    assert "not a class of the run; give one of x, y, z" in str(e.value)


def test_few_or_no_positives_in_validation(target_run, tmp_path):
    _, log = target_run  # the small file's validation split holds 12 spam
    assert "warning: the validation split has only 12 positive examples" in log
    train_rows = [(f"text {i}", "ab"[i % 2]) for i in range(40)]
    f = own_file(tmp_path / "train.csv", train_rows)
    v = own_file(tmp_path / "val.csv", [(f"other {i}", "a") for i in range(5)])
    with pytest.raises(SystemExit) as e:
        finetune.main(["--train-file", str(f), "--val-file", str(v), "--weights", "random",
                       "--target", "precision=0.9", "--output-dir", str(tmp_path / "never")])
    assert str(e.value).startswith("error: --target precision=0.9: the validation split has 0 "
                                   "positive examples")
    assert not (tmp_path / "never").exists()
