"""evaluate.py: scores of a finished run, its classes for new texts, --predict's files."""

import csv
import json

import pytest
import torch

import evaluate
from conftest import OWN_LABELS

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
        assert [float(x) for x in row[2:]] == pytest.approx([p[c] for c in OWN_LABELS],
                                                             abs=1e-6)
        assert row[1] == max(p, key=p.get)
    out = tmp_path / "p.jsonl"
    evaluate.main(["--run", str(own_run["run"]), "--predict", str(own_run["new"]),
                   "--output", str(out)])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(g["probabilities"]) for g in got] == [list(OWN_LABELS)] * len(texts)
    for g, p in zip(got, probs, strict=True):
        assert g["probabilities"] == pytest.approx(p, abs=1e-6)
