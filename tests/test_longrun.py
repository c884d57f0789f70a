"""longrun.py: a run killed and resumed ends as the run never stopped; the best epoch and early
stopping; every misuse of --resume one error line.
"""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import config
import files
import finetune
import longrun
import reference
from conftest import one_error_line, write_own_csv


# --------------------------------------- killed and resumed runs, the best epoch, early stopping

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--epochs", "5", "--eval-freq", "10", "--device", "cpu"]

# Runs finetune.main in this process, killing it with SIGKILL right after its Nth checkpoint
# is written (KILL=after) or once the Nth has some bytes written (KILL=during).
KILLER = textwrap.dedent("""\
    import os, signal, sys
    from pathlib import Path

    import files
    import finetune

    at, how = int(os.environ["KILL_AT"]), os.environ["KILL"]
    real, count = files.write_atomic, [0]

    class Cut:  # a file whose writer is killed once it has written a little
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += self.f.write(b)
            if self.n > 4096:
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return len(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def write_atomic(path, data, sync=False):
        if Path(path).name != files.CHECKPOINT:
            return real(path, data, sync)
        count[0] += 1
        if count[0] == at and how == "during":
            return real(path, lambda f: data(Cut(f)), sync)
        real(path, data, sync)
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    files.write_atomic = write_atomic
    finetune.main(sys.argv[1:])
    """)


def killed_run(tmp_path, args, at, how="after"):
    """finetune.py in its own process, SIGKILLed at its `at`th checkpoint; returns its stdout."""
    script = tmp_path / "killed.py"
    script.write_text(KILLER)
    # The same thread count as the runs in this process: the promise is the same bits on the
    # same machine with the same threads (no kernel promises them across thread counts).
    env = {**os.environ, "KILL_AT": str(at), "KILL": how, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-u", str(script), *map(str, args)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    return done.stdout


def main_out(capsys, args):
    finetune.main(list(map(str, args)))
    return capsys.readouterr().out


def write_own_files(folder, seed=0):
    """train.csv (120 rows) and val.csv (30): conftest.write_own_csv's 3 classes, texts of 2 to
    12 words (per-batch padding: the own files' default)."""
    return [write_own_csv(folder / "train.csv", 120, seed),
            write_own_csv(folder / "val.csv", 30, seed + 1)]


def weights_of(run):
    info = json.loads((run / "run.json").read_text())
    return load_file(run / info["weights_file"])


def assert_same_run(resumed, whole):
    """Bit-identical weights, the same history and final accuracies."""
    a, b = weights_of(resumed), weights_of(whole)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((resumed / "metrics.json").read_text())
    mb = json.loads((whole / "metrics.json").read_text())
    assert ma["history"] == mb["history"]
    assert ma["final_accuracy"] == mb["final_accuracy"]
    assert not (resumed / files.CHECKPOINT).exists()  # a finished run keeps none
    assert not list(resumed.glob("*.part"))


def data_args(kind, tmp_path, small_raw_path, raw_path_fn):
    if kind == "sms":
        return ["--data", small_raw_path]
    if kind == "real-sms":
        return ["--data", raw_path_fn()]
    train, val = write_own_files(tmp_path)
    return ["--train-file", train, "--val-file", val, "--test-frac", "0.2"]


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory):
    """The uninterrupted run of each (data, flags), made once: some cases kill the same run at
    other points. Returns (its folder, what it printed)."""
    made = {}

    def whole(kind, extra, args, capsys):
        key = (kind, *extra)
        if key not in made:
            out = tmp_path_factory.mktemp("whole") / "run"
            made[key] = out, main_out(capsys, args + ["--output-dir", out])
        return made[key]
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("kind, extra, at, how", [
    ("sms", [], 2, "after"),
    ("sms", ["--no-shortcuts"], 2, "after"),
    ("own", [], 2, "after"),
    ("own", ["--no-shortcuts"], 2, "after"),
    # killed while writing the 3rd checkpoint: resumed from the 2nd
    ("sms", [], 3, "during"),
    # a checkpoint within an epoch (every 7 steps; 21 steps an epoch): killed after the 4th
    ("sms", ["--checkpoint-every", "7"], 4, "after"),
    ("own", ["--checkpoint-every", "5", "--trainable-layers", "lora"], 3, "after"),
    # with the best epoch kept and early stopping
    ("sms", ["--keep-best", "val_loss", "--early-stopping", "2", "--lr", "1e-3"], 2, "after"),
    ("real-sms", [], 2, "after"),
    # own files (per-batch padding) from two more kill points, and with batches grouped by
    # length: before the trunk cache was filled ahead in fixed groups, what a row's entry held
    # depended on the batch it was first read in, and these ended with other weights
    ("own", [], 3, "after"),
    ("own", ["--checkpoint-every", "4"], 5, "after"),
    ("own", ["--group-by-length"], 2, "after"),
], ids=["sms", "sms-no-shortcuts", "own", "own-no-shortcuts", "killed-while-writing",
        "within-an-epoch", "own-lora-within-an-epoch", "keep-best", "real-sms",
        "own-epoch-3", "own-within-an-epoch", "own-grouped"])
def test_a_run_killed_and_resumed_ends_as_the_run_never_stopped(
        tmp_path, capsys, tiny_weights, small_raw_path, request, whole_runs, kind, extra, at,
        how):
    args = ["--weights", tiny_weights, *data_args(
        kind, tmp_path, small_raw_path, lambda: request.getfixturevalue("raw_path")),
        *QUICK, *extra]
    whole, whole_out = whole_runs(kind, extra, args, capsys)

    run = tmp_path / "run"
    killed_out = killed_run(tmp_path, args + ["--output-dir", run], at, how)
    assert not (run / "run.json").exists() and (run / files.CHECKPOINT).is_file()
    # resumed with the whole command line again (the same flags are not a change)
    resumed_out = main_out(capsys, args + ["--output-dir", run, "--resume"])

    assert_same_run(run, whole)
    whole_lines = reference.chapter_lines(whole_out)
    # what was printed before the kill and after the resume: the uninterrupted run's lines
    kept = reference.chapter_lines(killed_out)
    steps = json.loads((whole / "metrics.json").read_text())["history"]
    if how == "during" or "--checkpoint-every" in extra:  # some lines came after the checkpoint
        kept = kept[:len(whole_lines) - len(reference.chapter_lines(resumed_out))]
    assert kept + reference.chapter_lines(resumed_out) == whole_lines
    assert resumed_out.startswith(f"Resumed {run} from its checkpoint (")
    # the log goes on from the checkpoint: its lines are the uninterrupted run's
    log = (run / "log.txt").read_text()
    assert reference.chapter_lines(log) == reference.chapter_lines(
        (whole / "log.txt").read_text())
    extra_lines = [line for line in whole_out.splitlines() if line.startswith(
        ("Whole validation", "Early stopping", "Kept the weights"))]
    assert [line for line in log.splitlines() if line in extra_lines] == extra_lines
    assert steps["steps"] > 0


@pytest.mark.slow
def test_the_checkpoint_holds_what_resuming_needs(tmp_path, capsys, tiny_weights,
                                                  small_raw_path):
    """After epoch 2 of 5 (killed there): the epoch, the trained tensors as they were, the
    optimizer's state, every generator's, and a log that ends with epoch 2's accuracies."""
    run = tmp_path / "run"
    killed_run(tmp_path, ["--weights", tiny_weights, "--data", small_raw_path, *QUICK,
                          "--output-dir", run], 2)
    ckpt = longrun.read_checkpoint(run / files.CHECKPOINT)
    assert ckpt["point"]["epoch"] == 2 and ckpt["point"]["batch"] == 0
    assert len(ckpt["history"]["train_accs"]) == 2 and ckpt["history"]["steps"] == 42
    assert set(ckpt["point"]["rng"]) >= {"torch", "python", "numpy"}
    assert ckpt["optimizer"]["state"] and ckpt["flags"]["epochs"] == 5
    assert set(ckpt["trained"]) >= {"out_head.weight", "out_head.bias", "final_norm.scale"}
    assert ckpt["log"].splitlines()[-1].startswith("Training accuracy: ")
    assert ckpt["log"] == (run / "log.txt").read_text()[:len(ckpt["log"])]


# ---------------------------------------------------------------------- the best epoch, early stop

def overfitting_files(folder):
    """Labels with no relation to the texts: a model that learns the training rows by heart
    gets worse on the validation rows."""
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    paths = []
    for name, n in (("train", 48), ("val", 24)):
        path = folder / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["text", "label"])
            for i in range(n):
                w.writerow([" ".join(rng.choice(words) for _ in range(6)), ["a", "b"][
                    rng.random() < 0.5]])
        paths.append(path)
    return paths


OVERFIT = ["--epochs", "8", "--lr", "3e-3", "--trainable-layers", "all", "--eval-freq", "100",
           "--device", "cpu", "--no-initial-eval", "--test-frac", "0"]
SCORE = r"Whole validation split \((\d+) examples\): loss (\d+\.\d{3}), accuracy (\d+\.\d\d)%"


def scores(out):
    import re
    return [(float(m[2]), float(m[3])) for m in re.finditer(SCORE, out)]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tiny_weights):
    folder = tmp_path_factory.mktemp("overfit")
    train, val = overfitting_files(folder)
    return folder, ["--weights", str(tiny_weights), "--train-file", str(train), "--val-file",
                    str(val), *OVERFIT]


@pytest.mark.slow
def test_keep_best_keeps_the_best_epochs_weights(overfit, capsys):
    folder, args = overfit
    plain = main_out(capsys, args + ["--output-dir", folder / "plain"])
    out = main_out(capsys, args + ["--output-dir", folder / "best", "--keep-best", "val_loss"])
    # scoring the whole validation split draws on a fork of the RNG: the run is the same run
    assert reference.chapter_lines(out)[:-3] == reference.chapter_lines(plain)[:-3]
    losses = [loss for loss, _ in scores(out)]
    assert len(losses) == 8
    best = losses.index(min(losses)) + 1
    assert best < 8, f"the data did not overfit: {losses}"  # else the test shows nothing
    assert f"Kept the weights of epoch {best}, the best validation loss ({min(losses):.3f})" \
        in out
    info = json.loads((folder / "best" / "run.json").read_text())
    assert info["best_epoch"]["epoch"] == best and info["best_epoch"]["metric"] == "val_loss"
    assert f"{info['best_epoch']['score']:.3f}" == f"{min(losses):.3f}"

    # the kept weights are those a run of `best` epochs ends with, bit for bit
    short = [a if a != "8" else str(best) for a in args]
    main_out(capsys, short + ["--output-dir", folder / "short"])
    a, b = weights_of(folder / "best"), weights_of(folder / "short")
    assert all(torch.equal(a[k], b[k]) for k in b)

    # and scored again from the saved run, they give the score logged for that epoch
    import evaluate
    classifier, run_info = evaluate.load_run(folder / "best", torch.device("cpu"))
    acc = evaluate.evaluate_splits(classifier, run_info, torch.device("cpu"))[
        "validation"]["accuracy"]
    assert f"{acc*100:.2f}" == f"{scores(out)[best - 1][1]:.2f}"
    plain_final = json.loads((folder / "plain" / "metrics.json").read_text())
    assert json.loads((folder / "best" / "metrics.json").read_text())["history"] == \
        plain_final["history"]


@pytest.mark.slow
@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_ends_after_n_epochs_without_a_better_score(overfit, capsys, patience):
    folder, args = overfit
    out = main_out(capsys, args + ["--output-dir", folder / f"stop{patience}", "--keep-best",
                                   "val_loss", "--early-stopping", patience])
    losses = [loss for loss, _ in scores(out)]
    # the rule, applied to the logged scores: the first epoch `patience` past the best so far
    best, stop = 1, None
    for epoch, loss in enumerate(losses, 1):
        if loss < losses[best - 1]:
            best = epoch
        if epoch - best >= patience:
            stop = epoch
            break
    assert stop is not None and stop < 8, f"no early stop in {losses}"
    assert len(losses) == stop
    assert (f"Early stopping: no better validation loss in the {patience} epochs since epoch "
            f"{best}; training ends after epoch {stop} of 8") in out
    assert len([line for line in reference.chapter_lines(out) if " | " in line]) == stop
    info = json.loads((folder / f"stop{patience}" / "run.json").read_text())
    assert info["best_epoch"]["epoch"] == best


# ------------------------------------------------------------------------------ what is refused

def error_line(capsys, args):
    return one_error_line(finetune, args, capsys)


@pytest.fixture(scope="module")
def _stopped_once(tmp_path_factory, tiny_weights, small_raw_path):
    """An unfinished run folder, killed after its 2nd checkpoint, on a copy of the data."""
    folder = tmp_path_factory.mktemp("stopped")
    run, data = folder / "run", folder / "SMSSpamCollection"
    data.write_bytes(small_raw_path.read_bytes())  # a copy of its own: a test changes it
    args = ["--weights", tiny_weights, "--data", data, *QUICK]
    killed_run(folder, args + ["--output-dir", run], 2)
    return run, data, args


@pytest.fixture
def stopped(_stopped_once, tmp_path):
    """(a copy of the unfinished run folder in tmp_path, its args); the data put back after."""
    run, data, args = _stopped_once
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    raw = data.read_bytes()
    yield copy, args
    data.write_bytes(raw)


@pytest.mark.slow
def test_resume_refuses_a_flag_that_would_change_the_run(stopped, capsys):
    run, args = stopped
    before = (run / files.CHECKPOINT).read_bytes()
    line = error_line(capsys, ["--resume", run, "--lr", "1e-3"])
    assert "--lr 0.001 would change it" in line and "--lr 5e-05" in line and "drop --lr" in line
    line = error_line(capsys, ["--resume", run, "--no-shortcuts"])
    assert "--no-shortcuts would change it" in line
    line = error_line(capsys, args + ["--output-dir", run, "--resume", "--epochs", "6"])
    assert "--epochs 6 would change it" in line
    assert (run / files.CHECKPOINT).read_bytes() == before  # nothing touched


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_a_folder_without_checkpoint(tmp_path, capsys,
                                                                       stopped):
    run, args = stopped
    finetune.main(["--resume", str(run)])
    capsys.readouterr()
    line = error_line(capsys, ["--resume", run])
    assert "has finished" in line and "nothing to resume" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.txt").write_text("Run folder: x\n")
    assert "holds no checkpoint" in error_line(capsys, ["--resume", empty])
    assert "no such folder" in error_line(capsys, ["--resume", tmp_path / "nowhere"])
    assert "needs the run folder" in error_line(capsys, ["--resume"])


@pytest.mark.slow
def test_resume_refuses_a_corrupt_checkpoint(stopped, capsys):
    run, _ = stopped
    ckpt = run / files.CHECKPOINT
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[:len(raw) // 2])
    line = error_line(capsys, ["--resume", run])
    assert f"the checkpoint {ckpt} is damaged" in line and "start the run again" in line
    ckpt.write_bytes(b"not a checkpoint at all")
    assert "is damaged" in error_line(capsys, ["--resume", run])


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_version(stopped, capsys):
    run, _ = stopped
    ckpt = run / files.CHECKPOINT
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "format": longrun.CHECKPOINT_FORMAT + 1}, ckpt)
    line = error_line(capsys, ["--resume", run])
    assert "another version of finetune.py" in line
    flags = {**state["flags"], "a_flag_of_the_future": 1}
    torch.save({**state, "flags": flags}, ckpt)
    assert "another version of finetune.py" in error_line(capsys, ["--resume", run])


@pytest.mark.slow
def test_resume_refuses_other_base_weights_or_other_data(stopped, capsys, tmp_path,
                                                         tiny_weights):
    run, _ = stopped
    other = tmp_path / "other-weights"
    other.mkdir()
    for f in tiny_weights.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    ckpt = run / files.CHECKPOINT
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "flags": {**state["flags"], "weights": str(other)}}, ckpt)
    tensors = load_file(other / "model.safetensors")  # the same shapes, other numbers
    from safetensors.torch import save_file
    save_file({k: v + 0.01 for k, v in tensors.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    line = error_line(capsys, ["--resume", run])
    assert "trained from other base weights" in line and str(other) in line
    torch.save(state, ckpt)  # its own weights back; then other data
    data = Path(state["flags"]["data"])
    changed = tmp_path / "changed-data"
    changed.write_text(data.read_text().replace("lol", "lmao"))
    torch.save({**state, "flags": {**state["flags"], "data": str(changed)}}, ckpt)
    assert "trained on other data" in error_line(capsys, ["--resume", run])
    torch.save(state, ckpt)  # its own data path back, the file there changed in place
    data.write_text(data.read_text().replace("lol", "lmao"))
    assert "trained on other data" in error_line(capsys, ["--resume", run])


@pytest.mark.slow
def test_resume_dir_alone_keeps_the_flags_the_run_recorded(stopped):
    """--resume DIR alone goes on with the run's own --checkpoint-every and --final-splits (not
    the flags' defaults); given again, they change (the flags a resume may change)."""
    import config
    run, _ = stopped
    ckpt = run / files.CHECKPOINT
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "flags": {**state["flags"], "checkpoint_every": 7,
                                   "final_splits": "validation"}}, ckpt)

    def resumed(*argv):
        argv = ["--resume", str(run), *argv]
        cfg, _ = longrun.resume_config(config.parse_args(argv),
                                       set(config.parse_args(argv, defaults=False)))
        return cfg.checkpoint_every, cfg.final_splits

    assert resumed() == (7, "validation")
    cfg, _ = longrun.resume_config(config.parse_args(["--resume", str(run)]))
    assert (cfg.checkpoint_every, cfg.final_splits) == (7, "validation")
    assert resumed("--checkpoint-every", "3", "--final-splits", "test") == (3, "test")


@pytest.mark.slow
def test_early_stopping_needs_keep_best(capsys, tiny_weights, small_raw_path, tmp_path):
    line = error_line(capsys, ["--weights", tiny_weights, "--data", small_raw_path,
                               "--output-dir", tmp_path / "run", "--early-stopping", "2"])
    assert "--early-stopping needs --keep-best" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_checkpoint_every_and_early_stopping_below_1_are_refused(capsys, tmp_path):
    for flag in ("--checkpoint-every", "--early-stopping"):
        for n in ("0", "-1"):
            line = error_line(capsys, ["--output-dir", tmp_path / "run", flag, n,
                                       "--keep-best", "val_loss"])
            assert f"{flag} must be 1 or more" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_under_torchrun_every_process_resumes(tmp_path, tiny_weights, small_raw_path,
                                              monkeypatch):
    """Two CPU processes (gloo, loopback): rank 0, which alone writes the checkpoint, is
    SIGKILLed after epoch 2 (torchrun then ends rank 1); both resume from the checkpoint and
    the run ends as the one never stopped, bit for bit."""
    from test_ddp import torchrun
    args = ["--weights", tiny_weights, "--data", small_raw_path, *QUICK, "--no-initial-eval"]
    whole = torchrun(args + ["--output-dir", tmp_path / "whole"], cwd=tmp_path, timeout=300)
    assert whole.returncode == 0, whole.stderr

    script = tmp_path / "killed.py"
    script.write_text(KILLER)
    run = tmp_path / "run"
    monkeypatch.setenv("KILL_AT", "2")
    monkeypatch.setenv("KILL", "after")
    killed = torchrun(args + ["--output-dir", run], cwd=tmp_path, script=script, timeout=300)
    assert killed.returncode != 0 and not (run / "run.json").exists()
    assert longrun.read_checkpoint(run / files.CHECKPOINT)["point"]["epoch"] == 2

    resumed = torchrun(["--resume", run], cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("Saved the fine-tuned model") == 1  # rank 0 alone writes
    assert_same_run(run, tmp_path / "whole")
    assert reference.chapter_lines((run / "log.txt").read_text()) == reference.chapter_lines(
        (tmp_path / "whole" / "log.txt").read_text())
    assert json.loads((run / "metrics.json").read_text())["processes"] == 2


# ------------------------------------------------------------------------- the final pass's splits

def final_lines(out):
    lines = out.splitlines()
    after = lines[[i for i, x in enumerate(lines) if x.startswith("Training completed")][0] + 1:]
    # the final pass's lines (the decisions' lines after them are docs/decisions.md's)
    return [x for x in after if x.startswith("The final pass") or reference.CHAPTER_LINE.match(x)]


@pytest.mark.slow
def test_a_large_own_file_leaves_the_training_split_out_of_the_final_pass(
        tmp_path, capsys, tiny_weights, monkeypatch):
    train, val = write_own_files(tmp_path)
    args = ["--weights", tiny_weights, "--train-file", train, "--val-file", val, "--test-frac",
            "0.2", "--max-steps", "2", "--no-initial-eval", "--device", "cpu"]
    small = main_out(capsys, args + ["--output-dir", tmp_path / "small"])
    assert [x.split(":")[0] for x in final_lines(small)] == [
        "Training accuracy", "Validation accuracy", "Test accuracy"]  # as the chapter does

    monkeypatch.setattr(finetune, "FINAL_TRAIN_ROWS", 50)  # the training split has 96 rows
    big = main_out(capsys, args + ["--output-dir", tmp_path / "big"])
    assert final_lines(big) == [
        "The final pass scores validation and test only (the training split's 96 rows are "
        "over 50; --final-splits all scores it too)"] + final_lines(small)[1:]
    metrics = json.loads((tmp_path / "big" / "metrics.json").read_text())
    assert set(metrics["final_accuracy"]) == {"validation", "test"}

    every = main_out(capsys, args + ["--output-dir", tmp_path / "all", "--final-splits", "all"])
    assert final_lines(every) == final_lines(small)
    one = main_out(capsys, args + ["--output-dir", tmp_path / "one", "--final-splits", "test"])
    assert final_lines(one) == ["The final pass scores test only (--final-splits)",
                                final_lines(small)[2]]
    line = error_line(capsys, args + ["--output-dir", tmp_path / "bad", "--final-splits",
                                      "valid"])
    assert "--final-splits valid: give all, or some of train,validation,test" in line


@pytest.mark.slow
def test_a_killed_overwrite_run_resumes_beside_the_finished_run(tmp_path, capsys, tiny_weights,
                                                                small_raw_path):
    """--overwrite builds the new run in DIR.unfinished: --resume DIR goes on with it there,
    the finished run staying in DIR until the resumed one has finished."""
    args = ["--weights", tiny_weights, "--data", small_raw_path, *QUICK, "--no-initial-eval"]
    run = tmp_path / "run"
    main_out(capsys, args + ["--output-dir", run, "--epochs", "1"])
    old = (run / "run.json").read_bytes()
    killed_run(tmp_path, args + ["--output-dir", run, "--overwrite"], 2)
    assert (run / "run.json").read_bytes() == old
    assert (tmp_path / "run.unfinished" / files.CHECKPOINT).is_file()
    main_out(capsys, ["--resume", run])
    main_out(capsys, args + ["--output-dir", tmp_path / "whole"])
    assert_same_run(run, tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run"]


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_a_warning(tmp_path, capsys, tiny_weights,
                                                          small_raw_path, monkeypatch):
    import errno
    real = files.write_atomic

    def full(path, data, sync=False):
        if Path(path).name == files.CHECKPOINT:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, sync)
    monkeypatch.setattr(files, "write_atomic", full)
    run = tmp_path / "run"
    out = main_out(capsys, ["--weights", tiny_weights, "--data", small_raw_path, *QUICK,
                            "--epochs", "2", "--output-dir", run])
    warned = "warning: could not write the checkpoint"
    warnings = [x for x in out.splitlines() if x.startswith(warned)]
    assert len(warnings) == 2 and f"{run / files.CHECKPOINT}: the disk is full" in warnings[0]
    assert (run / "run.json").is_file()  # training went on and finished


@pytest.mark.slow
def test_deterministic_turns_on_the_deterministic_algorithms_for_the_run_alone(
        tmp_path, capsys, tiny_weights, small_raw_path, monkeypatch):
    seen = []
    train = finetune.train_classifier_simple

    def watching(*a, **k):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return train(*a, **k)
    monkeypatch.setattr(finetune, "train_classifier_simple", watching)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    args = ["--weights", tiny_weights, "--data", small_raw_path, "--max-steps", "2",
            "--device", "cpu"]
    out = main_out(capsys, args + ["--output-dir", tmp_path / "det", "--deterministic"])
    assert "deterministic algorithms)" in out.splitlines()[0]
    assert seen == [(True, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled()  # put back after the run
    main_out(capsys, args + ["--output-dir", tmp_path / "plain"])
    assert seen[1][0] is False
    # on a CPU nothing changes: the same weights
    a, b = weights_of(tmp_path / "det"), weights_of(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ misleading --resume messages

def error_line_longrun(capsys, args):
    """finetune.main's one `error:` line for `args` (no traceback)."""
    with pytest.raises(SystemExit) as e:
        finetune.main(list(map(str, args)))
    message = str(e.value.code)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def unfinished(tmp_path):
    """A run folder as a run leaves it when stopped before its first checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("Run folder: run\n", encoding="utf-8")
    return run


def test_resume_with_another_output_dir_is_refused(unfinished, tmp_path, capsys):
    other = tmp_path / "other"
    line = error_line_longrun(capsys, ["--resume", unfinished, "--output-dir", other])
    assert line == (f"error: --resume {unfinished} goes on in that run's own folder, but "
                    f"--output-dir {other} names another; a resumed run stays where it began: "
                    "drop --output-dir")
    assert not other.exists()
    with pytest.raises(ValueError, match="drop --output-dir"):
        finetune.run(config.TrainConfig(resume=unfinished, output_dir=other))


def test_resume_with_its_own_folder_as_output_dir_goes_on_to_the_folder(unfinished, capsys):
    for same in (unfinished, f"{unfinished}/", unfinished.with_name("run.unfinished")):
        line = error_line_longrun(capsys, ["--resume", unfinished, "--output-dir", same])
        assert "holds no checkpoint" in line  # the folder's own fault, not --output-dir's
    assert longrun.same_folder(unfinished, unfinished.parent / "." / "run")


def test_resume_on_a_model_folder_says_it_is_not_a_run_folder(tiny_weights, capsys, tmp_path):
    line = error_line_longrun(capsys, ["--resume", tiny_weights])
    assert line == (f"error: --resume {tiny_weights}: not a run folder (a run folder of "
                    "finetune.py holds log.txt, and while unfinished checkpoint.pt); it holds "
                    f"a model: to train from it, pass --weights {tiny_weights} and a new "
                    "--output-dir")
    assert "--output-dir " + str(tiny_weights) not in line  # never: train into the model
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_line_longrun(capsys, ["--resume", empty]).endswith(
        "not a run folder (a run folder of finetune.py holds log.txt, and while unfinished "
        "checkpoint.pt); pass the folder of the run to go on with")
