"""One run, one folder: a run holds its folder alone from its first write to its last (a lock
that a crash drops), and a finished run's files are checked to belong together when read."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import files
import finetune

ROOT = Path(__file__).resolve().parents[1]


def train(out, tiny_weights, small_raw_path, *extra, capsys=None):
    finetune.main(["--weights", str(tiny_weights), "--data", str(small_raw_path),
                   "--output-dir", str(out), "--device", "cpu", "--epochs", "1",
                   "--max-steps", "2", "--no-initial-eval", *extra])


def error_of(*args, **kw):
    with pytest.raises(SystemExit) as e:
        train(*args, **kw)
    return str(e.value)


@pytest.fixture
def holder(tmp_path):
    """Another process holding a folder (as a finetune.py training there would), until killed."""
    procs = []

    def hold(out):
        code = ("import sys, time, files; from pathlib import Path; "
                "files.hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
        p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p
    yield hold
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def test_a_second_run_into_a_held_folder_is_refused_and_writes_nothing(
        tmp_path, tiny_weights, small_raw_path, holder):
    out = tmp_path / "run"
    holder(out)
    message = error_of(out, tiny_weights, small_raw_path)
    assert message.startswith("error: another finetune.py is writing to") and str(out) in message
    assert list(out.iterdir()) == []  # no log.txt, no weights: the holder's folder untouched


def test_a_killed_holder_frees_the_folder(tmp_path, tiny_weights, small_raw_path, holder):
    out = tmp_path / "run"
    p = holder(out)
    p.kill()  # SIGKILL: no clean-up runs, the system drops the lock
    p.wait(timeout=10)
    train(out, tiny_weights, small_raw_path)
    assert (out / "run.json").is_file()


def test_overwrite_is_refused_while_another_run_holds_the_finished_run(
        tmp_path, tiny_weights, small_raw_path, holder):
    out = tmp_path / "run"
    train(out, tiny_weights, small_raw_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder(out)
    message = error_of(out, tiny_weights, small_raw_path, "--overwrite")
    assert "another finetune.py is writing to" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not files.unfinished_path(out).exists()


def test_the_lock_is_dropped_when_a_run_ends_finished_or_failed(tmp_path, tiny_weights,
                                                                small_raw_path):
    out = tmp_path / "run"
    train(out, tiny_weights, small_raw_path)
    lock = files.hold(out)  # nobody holds it any more
    files.release(lock)
    bad = tmp_path / "bad"
    folder = files.RunFolder(bad, replace=False)
    with pytest.raises(files.RunFailed):
        with folder:
            folder.make()
            raise ValueError("failed after the folder was made")
    files.release(files.hold(bad))


def test_a_run_that_finished_meanwhile_is_not_written_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    folder = files.RunFolder(out, replace=False)  # planned while out held no finished run
    (out / "run.json").write_text("{}")  # ... which another process then finished there
    with pytest.raises(ValueError, match="holds a finished run now"):
        with folder:
            folder.make()
    assert (out / "run.json").read_text() == "{}" and not (out / "log.txt").exists()
    files.release(files.hold(out))  # and the refused run let go of the folder


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_weights, small_raw_path):
    root = tmp_path_factory.mktemp("two")
    for name, seed in (("a", "1"), ("b", "2")):
        train(root / name, tiny_weights, small_raw_path, "--seed", seed)
    return root / "a", root / "b"


def test_each_file_of_a_run_carries_its_run_id(two_runs):
    a, b = two_runs
    info = json.loads((a / "run.json").read_text())
    assert len(info["run_id"]) == 32
    assert json.loads((a / "metrics.json").read_text())["run_id"] == info["run_id"]
    assert info["run_id"] != json.loads((b / "run.json").read_text())["run_id"]
    evaluate.load_run(a, torch.device("cpu"))  # its own files: taken


@pytest.mark.parametrize("which", ["weights", "metrics"])
def test_a_folder_mixing_two_runs_files_is_refused(tmp_path, two_runs, which):
    a, b = two_runs
    name = json.loads((a / "run.json").read_text())["weights_file"] if which == "weights" \
        else "metrics.json"
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / name, mixed / name)  # the other run's file, same name
    with pytest.raises(files.RunError, match=f"{name} is not this run's .*mixes the files of "
                                             "two runs"):
        evaluate.load_run(mixed, torch.device("cpu"))
    with pytest.raises(SystemExit, match="^error: .*mixes the files of two runs"):
        evaluate.main(["--run", str(mixed), "--text", "hello"])


def test_a_weights_file_without_a_run_id_is_not_taken_as_the_runs(tmp_path, two_runs):
    """A weights file that carries no run id (saved by hand, or by another tool) is not this
    run's: only a run.json without a run id (a run older than run ids) is taken as it is."""
    from safetensors.torch import load_file, save_file
    a, _ = two_runs
    bare = tmp_path / "bare"
    shutil.copytree(a, bare)
    name = json.loads((bare / "run.json").read_text())["weights_file"]
    save_file(load_file(bare / name), bare / name)  # the same tensors, no run id
    with pytest.raises(files.RunError, match=rf"{name} is not this run's \(its run id is None"):
        evaluate.load_run(bare, torch.device("cpu"))


def test_a_run_made_before_run_ids_is_still_read(tmp_path, two_runs):
    a, _ = two_runs
    old = tmp_path / "old"
    shutil.copytree(a, old)
    info = json.loads((old / "run.json").read_text())
    del info["run_id"]
    (old / "run.json").write_text(json.dumps(info))
    evaluate.load_run(old, torch.device("cpu"))


def test_two_runs_started_together_leave_one_whole_run(tmp_path, tiny_weights, small_raw_path):
    """Two finetune.py processes given one --output-dir at once: exactly one trains there; the
    other says why in one line; the finished run's files all carry one run id."""
    out = tmp_path / "run"
    cmd = [sys.executable, "finetune.py", "--weights", str(tiny_weights), "--data",
           str(small_raw_path), "--output-dir", str(out), "--device", "cpu", "--epochs", "1",
           "--max-steps", "20", "--no-initial-eval"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    deadline = time.time() + 240
    results = [p.communicate(timeout=max(1, deadline - time.time())) + (p.returncode,)
               for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    refused = next(r for r in results if r[2] == 1)[1].strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith("error: ") and (
        "another finetune.py is writing to" in refused[0] or "holds a finished run" in
        refused[0]), refused
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert json.loads((out / "metrics.json").read_text())["run_id"] == run_id
    evaluate.load_run(out, torch.device("cpu"))
