"""Never a silent wrong number, never a traceback, nothing a user had is lost.

Each test here is a fault a user met: damaged weights, a loss that diverges, folders that cannot
be written, a disk that fills up, a finished run about to be replaced. Runs use the tiny GPT-2 of
conftest.py and stop after a step or two, so the whole file takes seconds.
"""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
import finetune
import gpt


@pytest.fixture(scope="module")
def data_path(raw_path):
    return str(raw_path)


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
