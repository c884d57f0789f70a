"""Issue 28 end to end, on tiny runs: a default run shows the data check, the calibration, the
scores beyond accuracy and the baseline, and leaves them in its folder; --target chooses a
threshold that evaluate.py and the server use; --check-data trains nothing; bad input is one
error line."""

import csv
import io
import json
import sys
import threading
import urllib.request

import pytest

import ddp
import evaluate
import finetune
import serve
from reference import CHAPTER_LINE


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
