"""experiments.py: the chapter's table as finetune.py runs, experiments.md, resuming, bad input.

The runs use a tiny Hugging Face GPT-2 (2 layers of width 32, GPT-2's real vocabulary size) as
`--weights DIR`, the real data, and a few training steps, so each row takes seconds.
"""

import json
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import config
import experiments
import finetune

# What each row changes in finetune.TrainConfig (with the default, pretrained, weights); every
# other field keeps finetune's default.
EXPECTED = {
    1: {},
    2: {"token_position": "first"},
    3: {"trainable_layers": "last_layer"},
    4: {"trainable_layers": "last_two_blocks"},
    5: {"trainable_layers": "all"},
    6: {"weights": "medium"},
    7: {"weights": "large"},
    8: {"weights": "xl"},
    9: {"weights": "xl", "trainable_layers": "all"},
    10: {"weights": "random", "trainable_layers": "all"},
    11: {"trainable_layers": "lora", "lora_rank": 16, "lora_alpha": 16.0},
    12: {"weights": "xl", "trainable_layers": "lora", "lora_rank": 16, "lora_alpha": 8.0},
    13: {"context_length": "model"},
    14: {"no_padding": True, "batch_size": 1},
    15: {"no_padding": True, "batch_size": 1, "accumulation_steps": 8},
    16: {"token_position": "flexible"},
    17: {"disable_causal_mask": True},
    18: {"ignore_index": 50256},
    19: {"average_embeddings": True},
}
RANDOM_WEIGHTS = {6: "random-medium", 7: "random-large", 8: "random-xl", 9: "random-xl",
                  12: "random-xl"}  # every other row: random (GPT-2 small's size)
CHANGES_THE_MODEL = {6, 7, 8, 9, 10, 12}


def argv(out, weights, raw_path, rows="1,2", *extra):
    return ["--rows", rows, "--weights", str(weights), "--data", str(raw_path),
            "--output-dir", str(out), "--device", "cpu", "--epochs", "1", "--max-steps", "2",
            *extra]


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory, tiny_weights, raw_path):
    """Rows 1 and 2 run once; tests that change the folder work on a copy."""
    out = tmp_path_factory.mktemp("experiments") / "out"
    with pytest.MonkeyPatch.context() as mp:
        import io
        import sys
        mp.setattr(sys, "stdout", io.StringIO())
        experiments.main(argv(out, tiny_weights, raw_path))
    return out


def table_rows(md):
    """{row number: its cells} of experiments.md's table."""
    rows = {}
    for line in md.splitlines():
        m = re.match(r"^\| (\d+) \|", line)
        if m:
            rows[int(m.group(1))] = [c.strip() for c in line.strip("|").split(" | ")]
    return rows


# ----------------------------------------------------------------------------- the table as data

def test_the_table_holds_the_chapters_19_rows():
    assert experiments.NUMBERS == tuple(range(1, 20))
    assert [row.number for row in experiments.ROWS] == list(range(1, 20))
    assert experiments.ROWS[0][3:] == (96.63, 99.33, 95.00, 0.28)
    assert experiments.ROWS[8][3:] == (100.00, 98.66, 98.67, 8.12)


# The chapter's experiments table (its closing section), transcribed: change, train, validation
# and test accuracy (%), training minutes on an A100.
CHAPTER_TABLE = """
| 1 | none (last token, last block trainable, padded to 120) | 96.63 | 99.33 | 95.00 | 0.28 min |
| 2 | first token instead of last | 78.46 | 80.54 | 75.00 | 0.28 |
| 3 | only the output layer trainable | 78.65 | 79.87 | 72.00 | 0.25 |
| 4 | last two blocks trainable | 98.85 | 98.66 | 98.33 | 0.33 |
| 5 | all layers trainable | 99.62 | 96.64 | 96.67 | 0.69 |
| 6 | medium (355M) | 87.50 | 91.28 | 84.67 | 0.75 |
| 7 | large (774M) | 99.52 | 98.66 | 96.67 | 1.50 |
| 8 | xl (1558M) | 99.81 | 99.81 | 98.33 | 2.83 |
| 9 | xl, all layers | 100.00 | 98.66 | 98.67 | 8.12 |
| 10 | random weights, all layers | 100.00 | 96.64 | 93.67 | 0.69 |
| 11 | LoRA rank 16, alpha 16 | 100.00 | 97.32 | 96.67 | 0.75 |
| 12 | xl, LoRA rank 16, alpha 8 | 100.00 | 98.66 | 98.33 | 5.79 |
| 13 | padded to the full context (1024) | 83.08 | 87.92 | 78.33 | 2.46 |
| 14 | no padding, batch size 1 | 100.00 | 98.66 | 98.00 | 1.75 |
| 15 | no padding, batch 1, gradient accumulation over 8 | 99.33 | 98.66 | 98.33 | 1.70 |
| 16 | padded, but classify from the last non-padding token | 99.42 | 98.66 | 98.33 | 0.30 |
| 17 | no causal mask | 99.23 | 98.66 | 95.33 | 0.29 |
| 18 | padding ignored in the loss (ignore_index 50256) | 96.63 | 99.33 | 95.00 | 0.28 |
| 19 | mean of all token outputs pooled into the classified position | 97.79 | 99.33 | 96.33 | 0.32 |
"""  # noqa: E501 (the table's rows as they are)


def test_the_table_matches_the_chapters():
    chapter_rows = re.findall(r"^\| (\d+) \| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                              r"([\d.]+)(?: min)? \|$", CHAPTER_TABLE, re.M)
    assert len(chapter_rows) == 19
    for row, (n, change, *figures) in zip(experiments.ROWS, chapter_rows):
        assert (row.number, row.change) == (int(n), change)
        assert (row.train, row.val, row.test, row.minutes) == tuple(map(float, figures))


@pytest.mark.parametrize("number", sorted(EXPECTED))
def test_each_row_maps_onto_finetune_flags(number):
    cfg = experiments.row_config(number)
    config.check_config(cfg)  # a setting finetune.py accepts
    default = finetune.TrainConfig()
    changed = {f.name: getattr(cfg, f.name) for f in fields(cfg)
               if getattr(cfg, f.name) != getattr(default, f.name)}
    expected = {k: v for k, v in EXPECTED[number].items() if v != getattr(default, k)}
    assert changed == expected
    for name, value in EXPECTED[number].items():
        assert getattr(cfg, name) == value


@pytest.mark.parametrize("number", sorted(EXPECTED))
def test_random_weights_replace_every_rows_weights(number):
    cfg = experiments.row_config(number, "random")
    assert cfg.weights == RANDOM_WEIGHTS.get(number, "random")
    pretrained = experiments.row_config(number)
    assert {**asdict(cfg), "weights": None} == {**asdict(pretrained), "weights": None}


@pytest.mark.parametrize("number", sorted(EXPECTED))
def test_a_weights_folder_is_used_for_every_row_that_keeps_the_model(number, tmp_path):
    if number in CHANGES_THE_MODEL:
        with pytest.raises(ValueError, match=f"row {number} needs"):
            experiments.row_config(number, str(tmp_path))
    else:
        assert experiments.row_config(number, str(tmp_path)).weights == str(tmp_path)


def test_command_line_shows_the_flags_that_differ_from_the_default():
    cfg = experiments.row_config(12, "random", ["--fast", "--precision", "bf16", "--device",
                                                "cpu", "--no-initial-eval", "--data", "x"])
    line = experiments.command_line(asdict(cfg))
    assert line == ("--weights random-xl --trainable-layers lora --lora-alpha 8 "
                    "--precision bf16")  # --fast: the default now
    assert experiments.command_line(asdict(experiments.row_config(1, "random", [
        "--no-shortcuts"]))) == "--weights random --no-shortcuts"
    assert not finetune.parse_args(["--no-fast"]).shortcuts
    assert finetune.parse_args(line.split()) == finetune.parse_args(
        ["--weights", "random-xl", "--trainable-layers", "lora", "--lora-rank", "16",
         "--lora-alpha", "8", "--fast", "--precision", "bf16"])  # reproduces the run
    assert experiments.command_line(asdict(experiments.row_config(1))) == ""
    assert experiments.command_line(asdict(experiments.row_config(15))) == \
        "--batch-size 1 --no-padding --accumulation-steps 8"


def test_parse_rows():
    assert experiments.parse_rows("1,2,10") == [1, 2, 10]
    assert experiments.parse_rows(" 10, 1 ,2,1") == [10, 1, 2]
    assert experiments.parse_rows("1-3,16") == [1, 2, 3, 16]
    assert experiments.parse_rows("all") == list(range(1, 20))
    assert experiments.parse_rows("ALL") == list(range(1, 20))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("rows, message", [
    ("", "--rows is empty"),
    ("  ", "--rows is empty"),
    ("1,,2", "empty entry"),
    ("0", "no row 0"),
    ("20", "no row 20"),
    ("1,25", "no row 25"),
    ("18-21", "no row 20"),
    ("abc", "'abc' is not a row number"),
    ("1.5", "not a row number"),
    ("5-3", "empty range"),
])
def test_bad_rows_give_one_clear_line(tmp_path, rows, message, capsys):
    with pytest.raises(SystemExit) as e:
        experiments.main(["--rows", rows, "--output-dir", str(tmp_path / "out")])
    assert str(e.value).startswith("error: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing started


def test_bad_weights_and_settings_give_one_clear_line(tmp_path, tiny_weights):
    out = str(tmp_path / "out")
    cases = [
        (["--rows", "1", "--weights", str(tmp_path / "nope")], "not pretrained, random, nor"),
        (["--rows", "1,6,10,12", "--weights", str(tiny_weights)], "rows 6, 10, 12 change"),
        (["--rows", "1", "--epochs", "0"], "--epochs must be 1 or more"),
        (["--rows", "1", "--max-steps", "0"], "--max-steps must be 1 or more"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            experiments.main(args + ["--output-dir", out])
        assert str(e.value).startswith("error: ") and message in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="^error: .*is a file"):
        experiments.main(["--rows", "1", "--output-dir", str(tmp_path / "file")])


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--rows", "--weights", "--device", "--data", "--output-dir", "--no-shortcuts",
                   "--precision", "--epochs", "--max-steps", "--rerun"):
        assert option in text


# ----------------------------------------------------------------------------- runs

@pytest.mark.slow
def test_two_rows_write_the_table(two_rows):
    md = (two_rows / "experiments.md").read_text()
    rows = table_rows(md)
    assert sorted(rows) == [1, 2]
    for n in (1, 2):
        cells = rows[n]
        row = experiments.ROWS[n - 1]
        metrics = json.loads((two_rows / f"row-{n:02d}" / "metrics.json").read_text())
        info = json.loads((two_rows / f"row-{n:02d}" / "run.json").read_text())
        acc = metrics["final_accuracy"]
        assert cells[0] == str(n) and cells[1] == row.change
        assert cells[3:6] == [f"{acc[s] * 100:.2f}" for s in ("train", "validation", "test")]
        assert cells[6] == f"{metrics['train_minutes']:.2f}"
        assert cells[7].startswith("cpu")
        assert cells[8] == f"{row.train:.2f} / {row.val:.2f} / {row.test:.2f}"
        assert cells[9] == f"{row.minutes:.2f}"
        # the settings column is the row's finetune.py command line, as run
        flags = cells[2].strip("`").split()
        assert "--epochs" in flags and "--max-steps" in flags
        again = finetune.parse_args(flags + ["--device", "cpu", "--no-initial-eval",
                                             "--data", info["flags"]["data"],
                                             "--output-dir", info["flags"]["output_dir"]])
        assert asdict(again) == info["flags"]
    assert rows[2][2].endswith("--token-position first`")
    assert "| # | change from the default | settings" in md
    assert "Random weights" not in md
    assert not list(two_rows.rglob("*.part"))


@pytest.fixture
def copy_of_two_rows(two_rows, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_rows, out)
    return out


@pytest.fixture
def counted_runs(monkeypatch):
    """finetune.run, counted: the row folders it is called for, in order."""
    calls, real = [], finetune.run

    def run(cfg):
        calls.append(Path(cfg.output_dir).name)
        return real(cfg)
    monkeypatch.setattr(finetune, "run", run)
    return calls


@pytest.mark.slow
def test_resuming_keeps_finished_rows(copy_of_two_rows, counted_runs, tiny_weights, raw_path,
                                      capsys):
    out = copy_of_two_rows

    def weights(n):  # the trained tensors (the file's header also holds the run's own id)
        return load_file(out / f"row-0{n}" / "trained.safetensors")
    before = {n: weights(n) for n in (1, 2)}
    experiments.main(argv(out, tiny_weights, raw_path, "1,2"))
    assert counted_runs == []
    assert "Row 1: finished" in capsys.readouterr().out
    assert sorted(table_rows((out / "experiments.md").read_text())) == [1, 2]

    # An unfinished row (no run.json: interrupted) is run again, the finished one kept.
    kept_run_json = (out / "row-01" / "run.json").read_text()
    (out / "row-02" / "run.json").unlink()
    experiments.main(argv(out, tiny_weights, raw_path, "1,2,3"))
    assert counted_runs == ["row-02", "row-03"]
    assert (out / "row-01" / "run.json").read_text() == kept_run_json
    for n in (1, 2):  # row 1 kept, row 2 trained again: the same numbers
        after = weights(n)
        assert after.keys() == before[n].keys()
        assert all(torch.equal(after[k], before[n][k]) for k in after)
    assert sorted(table_rows((out / "experiments.md").read_text())) == [1, 2, 3]


@pytest.mark.slow
def test_rerun_replaces_finished_rows(copy_of_two_rows, counted_runs, tiny_weights, raw_path):
    out = copy_of_two_rows
    experiments.main(argv(out, tiny_weights, raw_path, "2", "--rerun"))
    assert counted_runs == ["row-02"]
    assert (out / "row-02" / "run.json").is_file()


@pytest.mark.slow
def test_a_finished_row_with_other_settings_is_not_kept_silently(
        copy_of_two_rows, counted_runs, tiny_weights, raw_path):
    out = copy_of_two_rows
    with pytest.raises(SystemExit) as e:
        experiments.main(argv(out, tiny_weights, raw_path, "1", "--no-shortcuts"))
    message = str(e.value)
    assert message.startswith("error: row 1 ") and "other settings" in message
    assert "--rerun" in message and counted_runs == []


@pytest.mark.slow
def test_the_table_lists_rows_finished_earlier(copy_of_two_rows, counted_runs, monkeypatch):
    out = copy_of_two_rows
    monkeypatch.setattr(finetune, "run", lambda cfg: counted_runs.append(cfg.output_dir))
    experiments.main(["--rows", "5", "--output-dir", str(out), "--weights", "random"])
    rows = table_rows((out / "experiments.md").read_text())
    assert sorted(rows) == [1, 2, 5]
    assert rows[5][3] == "not run yet"  # the stand-in run left no run.json


def test_failed_rows_are_noted_and_the_others_still_run(tmp_path, monkeypatch):
    seen = []

    def run(cfg):
        seen.append(Path(cfg.output_dir).name)
        if cfg.token_position == "first":
            raise ValueError("no such thing")
    monkeypatch.setattr(finetune, "run", run)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        experiments.main(["--rows", "2,3", "--output-dir", str(out)])
    assert str(e.value) == "error: 1 of 2 rows failed: row 2: no such thing"
    assert seen == ["row-02", "row-03"]
    rows = table_rows((out / "experiments.md").read_text())
    assert rows[2][3] == "failed: no such thing" and rows[3][3] == "not run yet"


def test_an_interrupt_stops_with_the_table_written(tmp_path, monkeypatch):
    def run(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "run", run)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="interrupted; finished rows are kept"):
        experiments.main(["--rows", "1,2", "--output-dir", str(out)])
    assert sorted(table_rows((out / "experiments.md").read_text())) == [1, 2]


def fake_finished_row(out, number, weights, train=0.5):
    """A row folder as finetune.py leaves it, without training: run.json and metrics.json."""
    cfg = experiments.row_config(number, weights, ["--fast", "--device", "cpu"])
    folder = out / f"row-{number:02d}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "final_accuracy": {"train": train, "validation": 0.25, "test": 1.0},
        "train_minutes": 12.345, "device": "cpu", "device_name": "x86_64"}))
    (folder / "run.json").write_text(json.dumps({"flags": asdict(cfg)}))


def test_the_header_says_when_rows_used_random_weights(tmp_path):
    for n in (1, 6, 10):
        fake_finished_row(tmp_path, n, "random")
    md = experiments.table(tmp_path, [1, 6, 10])
    assert "**Random weights:** rows 1, 6 were trained from randomly initialised weights" in md
    rows = table_rows(md)
    assert rows[6][2] == "`--weights random-medium`"  # --fast: the default now
    assert rows[10][2] == "`--weights random --trainable-layers all`"
    assert rows[1][3:8] == ["50.00", "25.00", "100.00", "12.35", "cpu (x86_64)"]
    assert "Random weights" not in experiments.table(tmp_path / "empty", [1, 10])


def fake_run(calls):
    """A stand-in for finetune.run that leaves a finished row folder at once."""
    def run(cfg):
        calls.append(Path(cfg.output_dir).name)
        folder = Path(cfg.output_dir)
        assert not folder.is_symlink()  # never written through a link into another row
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({
            "final_accuracy": {"train": 0.5, "validation": 0.5, "test": len(calls) / 10},
            "train_minutes": 1.0, "device": "cpu", "device_name": "x86_64"}))
        (folder / "run.json").write_text(json.dumps({"flags": asdict(cfg)}))
        return folder
    return run


def test_rows_with_the_same_settings_share_one_run(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(finetune, "run", fake_run(calls))
    out = tmp_path / "out"
    # Under --weights random, rows 5 and 10 both train all layers of a random GPT-2 small.
    experiments.main(["--rows", "10,1,5", "--weights", "random", "--output-dir", str(out)])
    assert calls == ["row-10", "row-01"]
    assert (out / "row-05").is_symlink() and (out / "row-05" / "run.json").is_file()
    assert "Row 5: the same settings as row 10" in capsys.readouterr().out
    md = (out / "experiments.md").read_text()
    rows = table_rows(md)
    assert rows[5][2:8] == rows[10][2:8] and rows[5][5] == "10.00"
    assert "row 5 is row 10's run" in md

    experiments.main(["--rows", "5,10", "--weights", "random", "--output-dir", str(out)])
    assert calls == ["row-10", "row-01"]  # both finished: kept

    # --rerun trains a linked row itself (never through the link into the other row) ...
    experiments.main(["--rows", "5", "--weights", "random", "--output-dir", str(out),
                      "--rerun"])
    assert calls[2:] == ["row-05"] and not (out / "row-05").is_symlink()
    assert json.loads((out / "row-10" / "metrics.json").read_text())[
        "final_accuracy"]["test"] == 0.1
    assert "Shared runs" not in (out / "experiments.md").read_text()
    # ... and links only to a row it trained again itself; without --rerun, to any twin.
    shutil.rmtree(out / "row-10")
    experiments.main(["--rows", "10", "--weights", "random", "--output-dir", str(out),
                      "--rerun"])
    assert calls[3:] == ["row-10"] and not (out / "row-10").is_symlink()
    shutil.rmtree(out / "row-10")
    experiments.main(["--rows", "10", "--weights", "random", "--output-dir", str(out)])
    assert calls[4:] == [] and (out / "row-10").is_symlink()


def test_the_random_weights_note_names_one_row_in_the_singular(tmp_path):
    fake_finished_row(tmp_path, 2, "random")
    assert "**Random weights:** row 2 was trained" in experiments.table(tmp_path, [2])
