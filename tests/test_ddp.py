"""finetune.py under torchrun: two CPU processes (gloo, loopback only) take the steps one takes.

Each test starts `python -m torch.distributed.run --nproc_per_node 2` on the tiny checkpoint and
the real data, bounded by a timeout, and compares its log with a one-process run of the same
flags made here in-process.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ddp
import evaluate
import experiments
import finetune
import gpt
import shortcuts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Short runs that still cross an epoch boundary: 16 steps an epoch, losses every 5 steps.
FLAGS = ["--epochs", "2", "--batch-size", "64", "--eval-freq", "5", "--eval-iter", "2",
         "--lr", "1e-3", "--device", "cpu"]
EP_LINE = re.compile(r"^Ep (\d+) \(Step (\d{6})\): Train loss (\d+\.\d{3}), Val loss (\d+\.\d{3})$")
ACC_LINE = re.compile(r"^(Training|Validation|Test) accuracy: (\d+\.\d\d)%")


def loopback_interface():
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, cwd, script=REPO / "finetune.py", timeout=120):
    """Two processes of `script` on this machine, talking over the loopback interface only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_interface(),
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def log_lines(text):
    """The lines of a log that carry results: losses and accuracies."""
    return [line for line in text.splitlines() if EP_LINE.match(line) or ACC_LINE.match(line)]


def assert_same_log(two, one):
    """Every loss within 0.01, every accuracy equal, line for line."""
    assert len(two) == len(one) and len(one) > 8
    for a, b in zip(two, one):
        ma, mb = EP_LINE.match(a), EP_LINE.match(b)
        if mb:
            assert ma and ma.group(1, 2) == mb.group(1, 2), (a, b)
            assert abs(float(ma[3]) - float(mb[3])) <= 0.01, (a, b)
            assert abs(float(ma[4]) - float(mb[4])) <= 0.01, (a, b)
        else:
            assert a == b


def error_line_in(text):
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    # No traceback from our own code on any process (torchrun adds its own failure summary).
    assert 'finetune.py", line' not in text and "[rank" not in text, text
    return lines[0]


@pytest.mark.parametrize("extra", [
    [],
    # and a loss weighted per class: each process's share scaled by the whole batch's weights
    ["--no-shortcuts", "--class-weights", "1,3", "--no-initial-eval"],
    # and gradients accumulated over 2 batches: DDP averages them once per optimizer step
    ["--trainable-layers", "all", "--accumulation-steps", "2", "--no-initial-eval"]],
    ids=["shortcuts", "no-shortcuts-weighted", "all-layers-accumulated"])
def test_two_processes_print_the_one_process_log(tmp_path, tiny_weights, raw_path, capsys,
                                                 extra):
    args = ["--weights", tiny_weights, "--data", raw_path, *FLAGS, *extra]
    finetune.main(list(map(str, args + ["--output-dir", tmp_path / "one"])))
    one = log_lines(capsys.readouterr().out)

    (tmp_path / "two").mkdir()
    result = torchrun(args, cwd=tmp_path / "two")  # into runs/<timestamp>, as users get it
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "error" not in result.stderr, result.stderr
    two = log_lines(result.stdout)
    assert_same_log(two, one)

    # Rank 0 alone wrote: one run folder, its log holding each line once, as printed.
    folders = list((tmp_path / "two" / "runs").iterdir())
    assert len(folders) == 1 and (folders[0] / "run.json").is_file()
    assert log_lines((folders[0] / "log.txt").read_text()) == two
    assert result.stdout.count("Saved the fine-tuned model") == 1
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    assert metrics["processes"] == 2
    final = {s: f"{v * 100:.2f}" for s, v in metrics["final_accuracy"].items()}
    assert two[-3:] == [f"Training accuracy: {final['train']}%",
                        f"Validation accuracy: {final['validation']}%",
                        f"Test accuracy: {final['test']}%"]

    # evaluate.py reproduces the run's final accuracies.
    evaluate.main(["--run", str(folders[0]), "--data", str(raw_path), "--all-splits"])
    assert log_lines(capsys.readouterr().out)[:3] == two[-3:]

    # experiments.py's table reads it like any other run, as its row 1 (the same settings).
    shutil.copytree(folders[0], tmp_path / "table" / "row-01")
    table = experiments.table(tmp_path / "table", [1])
    assert f"| {final['train']} | {final['validation']} | {final['test']} |" in table


def test_a_failure_on_one_process_ends_both(tmp_path, tiny_weights, raw_path):
    """Rank 1 alone cannot read its --data: both end, with one error line, and no run folder is
    made."""
    missing = tmp_path / "missing" / "SMSSpamCollection"
    script = tmp_path / "rank1_bad_data.py"
    script.write_text(textwrap.dedent(f"""\
        import os
        import sys

        import finetune

        if os.environ["RANK"] == "1":  # this process alone gets a --data it cannot read
            sys.argv[sys.argv.index("--data") + 1] = {str(missing)!r}
        finetune.main()
        """))
    out = tmp_path / "run"
    result = torchrun(["--weights", tiny_weights, "--data", raw_path, *FLAGS,
                       "--output-dir", out], cwd=tmp_path, script=script, timeout=60)
    assert result.returncode != 0
    assert str(missing) in error_line_in(result.stdout + result.stderr)
    assert not out.exists()  # the processes wait for each other's checks before rank 0 makes it


def test_a_batch_that_does_not_split_evenly_is_refused_once(tmp_path, tiny_weights, raw_path):
    result = torchrun(["--weights", tiny_weights, "--data", raw_path, *FLAGS,
                       "--batch-size", "7", "--output-dir", tmp_path / "run"], cwd=tmp_path,
                      timeout=60)
    assert result.returncode != 0
    line = error_line_in(result.stdout + result.stderr)
    assert "--batch-size 7 does not split evenly over 2 processes" in line
    assert not (tmp_path / "run").exists()


def test_a_finished_torchrun_process_leaves_at_once_after_flushing(monkeypatch):
    """ddp.leave: under torchrun the output is flushed, then the process ends with status 0
    without the interpreter's shutdown (where torch's gloo worker threads can abort it); without
    torchrun it does nothing. (The torchrun runs above check that no output is lost.)"""
    calls = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def flush(self):
            calls.append(("flush", self.name))

    monkeypatch.setattr(sys, "stdout", Stream("stdout"))
    monkeypatch.setattr(sys, "stderr", Stream("stderr"))
    monkeypatch.setattr(os, "_exit", lambda code: calls.append(("exit", code)))
    for size in (None, "1"):
        if size is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", size)
        ddp.leave()
        assert calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp.leave()
    assert calls == [("flush", "stdout"), ("flush", "stderr"), ("exit", 0)]


def test_finetune_run_as_a_script_leaves_through_ddp_after_main():
    """The script's entry point: main(), then ddp.leave() (reached only when main returns: an
    error exits through sys.exit first)."""
    source = (Path(finetune.__file__)).read_text(encoding="utf-8")
    entry = source[source.index('if __name__ == "__main__":'):]
    assert [line.strip().split("  #")[0] for line in entry.splitlines()[1:3]] == \
        ["main()", "ddp.leave()"]


def test_processes_on_one_machine_share_the_trunk_caches_default_memory(monkeypatch):
    """Each CPU process's frozen-trunk cache gets its part of the default quarter of the RAM;
    a GPU's processes have a GPU each, and --trunk-cache-gb stays per process."""
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=50, context_length=16, emb_dim=8, n_heads=2,
                                       n_layers=2))
    gpt.setup_classifier(model, 2, "last_block")
    cfg = finetune.TrainConfig()
    cpu = torch.device("cpu")
    alone = finetune.build_classifier(model, cfg, cpu)[0].shortcuts.trunk.max_bytes
    assert alone == shortcuts.default_cache_bytes()
    monkeypatch.setattr(ddp, "local_world", lambda: 4)
    assert finetune.build_classifier(model, cfg, cpu)[0].shortcuts.trunk.max_bytes == alone // 4
    cfg.trunk_cache_gb = 1.0
    assert finetune.build_classifier(model, cfg, cpu)[0].shortcuts.trunk.max_bytes == 2**30


@pytest.mark.parametrize("weight", [None, [1.0, 3.0]], ids=["mean", "class-weighted"])
def test_the_shares_of_a_training_loss_average_to_the_whole_batchs(monkeypatch, weight):
    """What DDP does with the processes' gradients (their mean) gives the whole batch's
    gradient, with class weights too (where the processes' shares hold different weights)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    w = None if weight is None else torch.tensor(weight)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(finetune.calc_loss_batch(x, y, model, "cpu", weight=w))
    monkeypatch.setattr(ddp, "world", lambda: 2)
    monkeypatch.setattr(ddp, "sum_over_ranks", lambda v: (float(w[y].sum()),))  # both shares
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(ddp, "rank", lambda r=r: r)
        shares.append(grads(ddp.training_loss_batch(finetune.calc_loss_batch, x, y, model, "cpu",
                                                    weight=w)))
    for g, g0, g1 in zip(whole, *shares):
        torch.testing.assert_close((g0 + g1) / 2, g)
