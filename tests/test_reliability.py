"""Never a silent wrong number, never a traceback, nothing a user had is lost.

Each test here is a fault a user met: damaged weights, a loss that diverges, folders that cannot
be written, a disk that fills up, a finished run about to be replaced. Runs use the tiny GPT-2 of
conftest.py and stop after a step or two, so the whole file takes seconds.
"""

import errno
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import evaluate
import files
import finetune
import gpt


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """A small file in the SMS Spam Collection's format: 60 messages, a third of them spam."""
    words = ["free", "call", "now", "winner", "home", "later", "see", "you", "prize", "txt"]
    lines = [f"{'spam' if i % 3 == 0 else 'ham'}\tMessage {i}: " +
             " ".join(words[(i * j) % 10] for j in range(i % 17 + 2)) for i in range(60)]
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def quick(tiny_weights, data_path, out, *extra):
    """finetune.py's arguments for a one-step run of the tiny model into `out`."""
    return ["--weights", str(tiny_weights), "--data", data_path, "--output-dir", str(out),
            "--max-steps", "1", "--no-initial-eval", *map(str, extra)]


def fails(main, args):
    """The one line main() exits with (SystemExit's message), which must be an error line."""
    with pytest.raises(SystemExit) as e:
        main(args)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_weights, data_path):
    out = tmp_path_factory.mktemp("runs") / "run"
    finetune.main(quick(tiny_weights, data_path, out))
    assert (out / "run.json").is_file()
    return out


def garble(path):
    """Overwrite every tensor byte of a safetensors file with 0xff (NaN in float32), keeping
    its header intact: the file still opens and every shape is right."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n:] = b"\xff" * (len(raw) - 8 - n)
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- silent wrong numbers

def test_weights_with_garbage_bytes_are_refused_naming_tensor_and_file(tiny_weights, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_weights / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((tiny_weights / "model.safetensors").read_bytes())
    garble(folder / "model.safetensors")
    with pytest.raises(gpt.WeightsError) as e:
        gpt.load_gpt(folder)
    message = str(e.value)
    assert str(folder / "model.safetensors") in message and "NaN or infinite" in message
    assert "h.0." in message or "wte" in message or "wpe" in message  # a tensor's name
    assert fails(finetune.main, ["--weights", str(folder), "--data", "x", "--max-steps", "1",
                                 "--output-dir", str(tmp_path / "run")])


def test_one_infinite_value_is_enough(tiny_weights, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_weights / "config.json").read_bytes())
    tensors = load_file(tiny_weights / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.bias"][3] = float("inf")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(gpt.WeightsError, match=r"tensor transformer\.h\.1\.mlp\.c_fc\.bias "):
        gpt.load_gpt(folder)


def test_evaluate_refuses_a_run_whose_weights_hold_nan(finished_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in finished_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    weights = next(run.glob("*.safetensors"))
    garble(weights)
    message = fails(evaluate.main, ["--run", str(run), "--text", "hello"])
    assert str(weights) in message and "NaN or infinite" in message and "tensor " in message


@pytest.mark.parametrize("flag, value", [("--weight-decay", "inf"), ("--weight-decay", "nan"),
                                         ("--lr", "1e39")])
def test_non_finite_settings_are_refused_before_any_work(flag, value, tmp_path):
    message = fails(finetune.main, ["--weights", "random", "--data", "/nowhere", flag, value,
                                    "--output-dir", str(tmp_path / "run")])
    assert flag in message
    assert not (tmp_path / "run").exists()


def test_a_diverging_loss_stops_the_run_at_once(tiny_weights, data_path, tmp_path, capsys):
    out = tmp_path / "run"
    message = fails(finetune.main, quick(tiny_weights, data_path, out, "--lr", "1e20",
                                         "--eval-freq", "1", "--max-steps", "50"))
    assert "loss is nan at step 0" in message and "--lr" in message
    printed = capsys.readouterr().out
    assert "Step 000001" not in printed  # stopped at the first check, not 49 steps later
    assert not (out / "run.json").exists()  # unfinished
    assert not list(out.glob("*.safetensors"))  # nothing that looks like a trained model


def test_non_finite_weights_are_caught_between_printed_losses(tiny_weights, data_path, tmp_path,
                                                              monkeypatch):
    # A weight turns NaN at the second step, after step 0's printed losses were fine and with no
    # other loss printed (--eval-freq beyond the run): the check after the epoch catches it.
    real = finetune.build_optimizer

    def poisoning(model, cfg, device):
        optimizer = real(model, cfg, device)
        step, calls = optimizer.step, []

        def poisoned_step(*args, **kw):
            calls.append(1)
            result = step(*args, **kw)
            if len(calls) == 2:
                with torch.no_grad():
                    model.trf_blocks[-1].ff.layers[0].bias[0] = float("nan")
            return result
        optimizer.step = poisoned_step
        return optimizer
    monkeypatch.setattr(finetune, "build_optimizer", poisoning)
    out = tmp_path / "run"
    message = fails(finetune.main, quick(tiny_weights, data_path, out, "--eval-freq", "1000",
                                         "--max-steps", "3"))
    assert "the weight trf_blocks.1." in message and "holds NaN or infinite values" in message
    assert "step 2" in message and "--lr" in message
    assert not (out / "run.json").exists()


# -------------------------------------------------------------- folders that cannot be written

@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only as a read-only filesystem would (chmod does not stop root):
    creating, opening for writing, renaming or removing anything under them raises EROFS.
    Returns a function that adds a folder."""
    import builtins
    import os
    roots = []

    def hit(*paths):
        for p in paths:
            if isinstance(p, int) or p is None:
                continue
            p = os.path.abspath(os.fsdecode(p))
            if any(p == r or p.startswith(r + os.sep) for r in roots):
                raise OSError(errno.EROFS, "Read-only file system", p)

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kw):
        if any(c in mode for c in "wax+"):
            hit(file)
        return real_open(file, mode, *args, **kw)

    def guarded_os_open(path, flags, *args, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            hit(path)
        return real_os_open(path, flags, *args, **kw)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("mkdir", "rename", "replace", "remove", "unlink", "rmdir"):
        real = getattr(os, name)

        def guarded(*args, real=real, **kw):
            hit(*args[:2])
            return real(*args, **kw)
        monkeypatch.setattr(os, name, guarded)

    def add(folder):
        folder.mkdir(parents=True, exist_ok=True)
        roots.append(os.path.abspath(folder))
        return folder
    return add


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test: the checks must come before the network."""
    import urllib.request

    def refuse(*args, **kw):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_output_dir_under_a_file(tiny_weights, data_path, tmp_path):
    (tmp_path / "afile.txt").write_text("mine")
    out = tmp_path / "afile.txt" / "sub"
    message = fails(finetune.main, quick(tiny_weights, data_path, out))
    assert str(out) in message and "afile.txt is a file, not a folder" in message
    assert "--output-dir" in message
    assert (tmp_path / "afile.txt").read_text() == "mine"


@pytest.mark.parametrize("out", ["/proc/gpt2-runs/run", "/sys/gpt2-run"])
def test_output_dir_in_proc_or_sys(tiny_weights, data_path, out, capsys):
    message = fails(finetune.main, quick(tiny_weights, data_path, out))
    assert out in message and "choose another --output-dir" in message
    assert capsys.readouterr().out == ""  # refused before any work, not even the data read


@pytest.mark.parametrize("sub", ["", "sub", "sub/deeper"])
def test_output_dir_on_a_read_only_filesystem(tiny_weights, data_path, tmp_path, read_only, sub):
    ro = read_only(tmp_path / "ro")
    out = ro / sub if sub else ro
    message = fails(finetune.main, quick(tiny_weights, data_path, out))
    assert str(out) in message and "read-only" in message and "--output-dir" in message
    assert list(ro.iterdir()) == []


def test_a_read_only_cache_is_found_before_downloading(tiny_weights, tmp_path, read_only,
                                                       no_network, monkeypatch):
    cache = read_only(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    # the data download is due: finetune.py and evaluate.py
    message = fails(finetune.main, ["--weights", str(tiny_weights), "--max-steps", "1",
                                    "--output-dir", str(tmp_path / "run")])
    assert str(cache / "gpt2-classify") in message and "read-only" in message
    assert "XDG_CACHE_HOME" in message
    assert not (tmp_path / "run").exists()


def test_a_read_only_cache_for_the_weights(data_path, tmp_path, read_only, no_network,
                                           monkeypatch):
    cache = read_only(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    message = fails(finetune.main, ["--data", data_path, "--max-steps", "1",
                                    "--output-dir", str(tmp_path / "run")])
    assert str(cache / "gpt2-classify" / "weights") in message and "read-only" in message
    assert "XDG_CACHE_HOME" in message and "--weights DIR" in message
    assert not (tmp_path / "run").exists()


@pytest.fixture
def run_on_the_download(finished_run, tmp_path):
    """A copy of the finished run, as if trained on the published data's download, now gone
    from the cache: evaluate.py --all-splits downloads it again."""
    run = tmp_path / "run-on-download"
    run.mkdir()
    for f in finished_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    info = json.loads((run / "run.json").read_text())
    info["data"] = {"path": str(tmp_path / "gone" / "SMSSpamCollection"),
                    "sha256": data.SMS_SHA256}
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_evaluate_with_a_cache_in_proc(run_on_the_download, monkeypatch, no_network):
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-cache-here")
    message = fails(evaluate.main, ["--run", str(run_on_the_download), "--all-splits"])
    assert "/proc/no-cache-here/gpt2-classify" in message and "XDG_CACHE_HOME" in message


def test_evaluate_with_a_read_only_cache(run_on_the_download, tmp_path, read_only, no_network,
                                         monkeypatch):
    cache = read_only(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    message = fails(evaluate.main, ["--run", str(run_on_the_download), "--all-splits"])
    assert str(cache) in message and "read-only" in message and "XDG_CACHE_HOME" in message


# ----------------------------------------------------------------------------- nothing lost

def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def finished_copy(finished_run, tmp_path):
    """A finished run of our own, to be (or not be) replaced."""
    out = tmp_path / "run"
    out.mkdir()
    for f in finished_run.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture
def full_disk(monkeypatch):
    """Writes of file contents under the folders given fail as on a full disk (ENOSPC), as the
    disk filling up during training would make them; returns a function that adds a folder."""
    import os
    real_fdopen, full = os.fdopen, []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *args, **kw):
        f = real_fdopen(fd, *args, **kw)
        path = os.readlink(f"/proc/self/fd/{fd}")
        return FullDisk(f) if any(path.startswith(str(d) + os.sep) for d in full) else f
    monkeypatch.setattr(os, "fdopen", fdopen)
    return full.append


def test_a_full_disk_at_the_end_saves_the_run_elsewhere(tiny_weights, data_path, tmp_path,
                                                        full_disk, monkeypatch, capsys):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spare-disk"))
    (tmp_path / "spare-disk").mkdir()
    out = tmp_path / "run"
    full_disk(out)
    message = fails(finetune.main, quick(tiny_weights, data_path, out))
    assert f"could not write {out / 'trained.safetensors'}: the disk is full" in message
    (spare,) = (tmp_path / "spare-disk").glob("gpt2-classify-run-*")
    assert f"the finished run was saved to {spare} instead" in message
    assert f"Kept: {out / 'log.txt'}" in message
    log = (out / "log.txt").read_text()
    assert "Training completed in" in log and log.splitlines()[-1] == message
    assert not (out / "run.json").exists() and not list(out.glob("*.part"))
    assert "Traceback" not in capsys.readouterr().err
    # the spare folder is a finished run like any other
    metrics = json.loads((spare / "metrics.json").read_text())
    assert final_accuracies(spare) == metrics["final_accuracy"]
    assert "Training completed in" in (spare / "log.txt").read_text()


def test_a_full_disk_everywhere_says_so(tiny_weights, data_path, tmp_path, full_disk,
                                        monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spare-disk"))
    (tmp_path / "spare-disk").mkdir()
    out = tmp_path / "run"
    full_disk(out)
    full_disk(tmp_path / "spare-disk")
    message = fails(finetune.main, quick(tiny_weights, data_path, out))
    assert "nor in the temporary folder" in message and "free some space" in message
    assert f"Kept: {out / 'log.txt'} keeps the log" in message


def test_too_little_space_is_known_before_training(tiny_weights, data_path, tmp_path,
                                                   monkeypatch, capsys):
    import collections
    import shutil
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "run"
    message = fails(finetune.main, quick(tiny_weights, data_path, out))
    assert "--output-dir" in message and "MB are free" in message
    assert "Ep 1" not in capsys.readouterr().out  # no training
    assert not out.exists()


def test_overwrite_with_bad_input_keeps_the_finished_run(finished_copy, tiny_weights, data_path,
                                                         tmp_path):
    before = snapshot(finished_copy)
    args = quick(tiny_weights, data_path, finished_copy, "--overwrite")
    for bad in (["--data", str(tmp_path / "typo")], ["--context-length", "500"],
                ["--weights", str(tmp_path / "nothing")]):
        fails(finetune.main, args + bad)  # the later flag wins
        assert snapshot(finished_copy) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_that_fails_in_training_keeps_the_finished_run(finished_copy, tiny_weights,
                                                                 data_path, tmp_path):
    before = snapshot(finished_copy)
    message = fails(finetune.main, quick(tiny_weights, data_path, finished_copy, "--overwrite",
                                         "--lr", "1e20"))
    assert snapshot(finished_copy) == before
    log = tmp_path / "run.unfinished" / "log.txt"
    assert f"the finished run in {finished_copy} is unchanged" in message and str(log) in message
    assert log.read_text().splitlines()[-1] == message
    assert not (tmp_path / "run.unfinished" / "run.json").exists()


def test_overwrite_replaces_a_finished_run_once_the_new_one_finished(finished_copy, tiny_weights,
                                                                     data_path, tmp_path):
    finetune.main(quick(tiny_weights, data_path, finished_copy, "--overwrite", "--seed", "7"))
    assert json.loads((finished_copy / "run.json").read_text())["flags"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .unfinished, .replaced
    assert "Saved the fine-tuned model" in (finished_copy / "log.txt").read_text()


def test_overwrite_never_deletes_files_it_did_not_write(finished_copy, tiny_weights, data_path):
    (finished_copy / "notes.txt").write_text("my notes")
    before = snapshot(finished_copy)
    message = fails(finetune.main, quick(tiny_weights, data_path, finished_copy, "--overwrite"))
    assert "notes.txt" in message and "move them out" in message
    assert snapshot(finished_copy) == before


@pytest.mark.parametrize("bad", [["--data", "/no/such/file"], ["--weights", "/no/such/folder"],
                                 ["--context-length", "500"], ["--weights", "small"]])
def test_a_run_that_fails_before_training_leaves_no_folder(bad, tiny_weights, data_path,
                                                           tmp_path, monkeypatch, closed_url):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gpt, "HF_URL", closed_url + "/{repo}/{file}")  # a failed download
    real = files.download_file
    monkeypatch.setattr(files, "download_file", lambda urls, dest, **kw: real(
        urls, dest, **{**kw, "retries": 1, "timeout": 2}))
    args = ["--weights", str(tiny_weights), "--data", data_path, "--max-steps", "1"] + bad
    fails(finetune.main, args)
    assert not (tmp_path / "runs").exists()  # the default runs/<timestamp>


def test_a_run_that_fails_later_keeps_its_log_with_the_error_line(tiny_weights, data_path,
                                                                  tmp_path):
    out = tmp_path / "run"
    message = fails(finetune.main, quick(tiny_weights, data_path, out, "--lr", "1e20"))
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("Run folder: ") and log[-1] == message
    assert f"Kept: {out / 'log.txt'} keeps the log; the run is unfinished" in message
    assert sorted(p.name for p in out.iterdir()) == ["log.txt"]


def test_an_interrupted_run_says_what_it_kept(tiny_weights, data_path, tmp_path, monkeypatch):
    def interrupted(*args, **kw):
        print("Ep 1 (Step 000000): Train loss 0.700, Val loss 0.700")
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "train_classifier_simple", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        finetune.main(quick(tiny_weights, data_path, out))
    assert str(e.value).startswith("interrupted. Kept: ") and str(out / "log.txt") in str(e.value)
    log = (out / "log.txt").read_text().splitlines()
    assert log[-2].startswith("Ep 1") and log[-1] == str(e.value)
    assert not (out / "run.json").exists()


def test_a_swap_cut_short_is_named_by_evaluate(finished_run, tmp_path):
    (tmp_path / "run.unfinished").mkdir()
    for f in finished_run.iterdir():
        (tmp_path / "run.unfinished" / f.name).write_bytes(f.read_bytes())
    message = fails(evaluate.main, ["--run", str(tmp_path / "run"), "--text", "hi"])
    assert f"rename it to {tmp_path / 'run'}" in message


# ------------------------------------------------------------ disk use: what a run folder keeps

def final_accuracies(run):
    classifier, info = evaluate.load_run(run, torch.device("cpu"))
    results = evaluate.evaluate_splits(classifier, info, torch.device("cpu"),
                                       info["flags"]["data"])
    return {name: r["accuracy"] for name, r in results.items()}


def copy_weights(tiny_weights, folder):
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_weights / name).read_bytes())
    return folder


def test_a_run_keeps_only_what_training_changed(finished_run, tiny_weights):
    info = json.loads((finished_run / "run.json").read_text())
    assert info["weights_file"] == "trained.safetensors"
    assert not (finished_run / "model.safetensors").exists()
    assert info["base"] == {"weights": str(tiny_weights.resolve()),
                            "sha256": files.file_sha256(tiny_weights / "model.safetensors")}
    kept = load_file(finished_run / "trained.safetensors")
    # last_block: the last block, the final norm and the new head, nothing frozen
    assert all(k.startswith(("trf_blocks.1.", "final_norm.", "out_head.")) for k in kept)
    assert {"out_head.weight", "out_head.bias", "final_norm.scale"} <= kept.keys()
    size = (finished_run / "trained.safetensors").stat().st_size
    assert size < (tiny_weights / "model.safetensors").stat().st_size / 20
    assert sorted(info["files"]) == sorted(p.name for p in finished_run.iterdir())


def test_evaluate_reassembles_the_model_with_the_same_numbers(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert final_accuracies(finished_run) == metrics["final_accuracy"]


@pytest.mark.parametrize("flags", [["--self-contained"], ["--trainable-layers", "lora"],
                                   ["--trainable-layers", "lora", "--self-contained"]])
def test_both_forms_give_the_same_classifier(flags, tiny_weights, data_path, tmp_path):
    out = tmp_path / "run"
    finetune.main(quick(tiny_weights, data_path, out, *flags))
    info = json.loads((out / "run.json").read_text())
    if "--self-contained" in flags:
        assert info["weights_file"] == "model.safetensors" and info["base"] is None
        assert not (out / "trained.safetensors").exists()
    else:  # LoRA: the adapters and the head, not the merged layers
        assert info["weights_file"] == "trained.safetensors" and info["base"]
        kept = load_file(out / "trained.safetensors")
        assert kept and all(k.endswith((".A", ".B")) or k.startswith("out_head.") for k in kept)
    metrics = json.loads((out / "metrics.json").read_text())
    assert final_accuracies(out) == metrics["final_accuracy"]


def test_random_weights_are_always_self_contained(data_path, tmp_path, monkeypatch):
    tiny = gpt.GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2)
    monkeypatch.setitem(gpt.PRESETS, "small", (tiny, "openai-community/gpt2"))
    out = tmp_path / "run"
    finetune.main(["--weights", "random", "--data", data_path, "--output-dir", str(out),
                   "--max-steps", "1", "--no-initial-eval"])
    info = json.loads((out / "run.json").read_text())
    assert info["weights_file"] == "model.safetensors" and info["base"] is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert final_accuracies(out) == metrics["final_accuracy"]


def test_a_missing_or_changed_base_is_refused(tiny_weights, data_path, tmp_path):
    base = copy_weights(tiny_weights, tmp_path / "base")
    out = tmp_path / "run"
    finetune.main(quick(base, data_path, out))
    tensors = load_file(base / "model.safetensors")
    tensors["transformer.h.0.ln_1.weight"] += 0.01  # other weights, same shapes
    save_file(tensors, base / "model.safetensors")
    message = fails(evaluate.main, ["--run", str(out), "--text", "hello"])
    assert str(base / "model.safetensors") in message and "sha256" in message
    assert "--self-contained" in message
    for f in base.iterdir():
        f.unlink()
    base.rmdir()
    message = fails(evaluate.main, ["--run", str(out), "--text", "hello"])
    assert str(base / "model.safetensors") in message and "gone" in message
    assert "--self-contained" in message


def test_a_preset_base_is_downloaded_again_and_checked(tiny_weights, data_path, tmp_path,
                                                       monkeypatch, http_server):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    preset = copy_weights(tiny_weights, cache / "gpt2-classify" / "weights" / "gpt2")
    out = tmp_path / "run"
    finetune.main(quick("small", data_path, out))
    info = json.loads((out / "run.json").read_text())
    assert info["base"]["weights"] == "small"
    expected = final_accuracies(out)
    for name in ("config.json", "model.safetensors"):  # the cache is cleared; the hub has them
        http_server.serve(f"/openai-community/gpt2/{name}", (preset / name).read_bytes())
        (preset / name).unlink()
    monkeypatch.setattr(gpt, "HF_URL", http_server.base + "/{repo}/{file}")
    assert final_accuracies(out) == expected
    assert (preset / "model.safetensors").is_file()


def test_a_folder_of_other_files_is_never_written_into(tiny_weights, data_path, tmp_path):
    # --output-dir given the weights folder by mistake: its model.safetensors must survive
    folder = copy_weights(tiny_weights, tmp_path / "gpt2")
    before = snapshot(folder)
    message = fails(finetune.main, quick(folder, data_path, folder, "--self-contained"))
    assert "config.json" in message and "choose a new or empty folder" in message
    assert snapshot(folder) == before


def test_an_unfinished_run_is_replaced_in_place(tiny_weights, data_path, tmp_path):
    out = tmp_path / "run"
    fails(finetune.main, quick(tiny_weights, data_path, out, "--lr", "1e20"))  # unfinished
    finetune.main(quick(tiny_weights, data_path, out))
    assert (out / "run.json").is_file() and "error:" not in (out / "log.txt").read_text()
