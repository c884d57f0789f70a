"""docs/python.md, run: every Python example on the page, in order, in one namespace, in a
folder holding the files it reads, so the page cannot go stale. The one line that names the
weights (GPT-2 small, a download) is pointed at the tiny checkpoint; the rest runs as written."""

import contextlib
import csv
import io
import json
import random
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PAGE = Path(__file__).resolve().parents[1] / "docs" / "python.md"
WEIGHTS_LINE = 'weights = "small"'


def blocks():
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)


def write_reviews(folder):
    rng = random.Random(0)
    words = {"pos": "good great lovely love fine", "neg": "bad awful hated poor dull"}
    with open(folder / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        for i in range(60):
            label = list(words)[i % 2]
            pool = words[label].split() + "the film it was so a".split()
            w.writerow([" ".join(rng.choice(pool) for _ in range(rng.randint(2, 9))), label])
    (folder / "new_reviews.csv").write_text("text\nwhat a lovely film\ndull and bad\n",
                                            encoding="utf-8")


def test_every_example_on_the_python_page_runs(tmp_path, monkeypatch, tiny_weights):
    code = blocks()
    assert len(code) >= 5
    assert sum(b.count(WEIGHTS_LINE) for b in code) == 1
    write_reviews(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in code:
            exec(compile(block.replace(WEIGHTS_LINE, f"weights = {str(tiny_weights)!r}"),
                         str(PAGE), "exec"), namespace)
    out = namespace["out"]
    assert out == Path("runs/reviews") and (tmp_path / out / "run.json").is_file()
    info = json.loads((tmp_path / out / "run.json").read_text())
    assert info["best_epoch"]["metric"] == "val_loss"
    assert len(namespace["history"]["val_accs"]) == 3
    df = namespace["df"]
    assert list(df.columns) == ["text", "predicted", "probability"] and len(df) == 2
    assert set(df["predicted"]) <= {"neg", "pos"}
    text = printed.getvalue()
    # nothing beyond what the command line prints, and what the examples print themselves
    assert "Saved the fine-tuned model to runs/reviews" in text
    assert "the run there has finished" in text.splitlines()[-1]
