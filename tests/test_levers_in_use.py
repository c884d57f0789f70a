"""The speed levers are really on in a run, not only said to be: observed from outside the code
that pulls them (a count of the rows the embedding computes, the optimizer finetune.py builds,
the dtype the layers compute in), on a tiny GPT-2 and a small generated SMS file.
"""

import json

import pytest
import torch

import data
import finetune
import gpt

pytestmark = pytest.mark.slow


@pytest.fixture
def observed(monkeypatch):
    """finetune.py's model, watched: the rows its token embedding computes, the dtypes its class
    head computes in while training, and the optimizers built."""
    seen = {"embedded": 0, "head_dtypes": set(), "optimizers": []}
    load = gpt.load_gpt

    def watched_load(*args, **kwargs):
        model = load(*args, **kwargs)

        def count(module, inputs, output):
            seen["embedded"] += inputs[0].shape[0]
        model.tok_emb.register_forward_hook(count)
        return model
    monkeypatch.setattr(gpt, "load_gpt", watched_load)

    real_add_head = gpt.add_classification_head

    def watched_head(model, *args, **kwargs):
        real_add_head(model, *args, **kwargs)

        def dtype(module, inputs, output):
            if torch.is_grad_enabled():  # a training step
                seen["head_dtypes"].add(output.dtype)
        model.out_head.register_forward_hook(dtype)
        return model
    monkeypatch.setattr(gpt, "add_classification_head", watched_head)

    real_adamw = torch.optim.AdamW

    class WatchedAdamW(real_adamw):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["optimizers"].append(self)
    monkeypatch.setattr(torch.optim, "AdamW", WatchedAdamW)
    return seen


def run(tmp_path, weights, raw, name, *flags):
    out = tmp_path / name
    finetune.main(["--weights", str(weights), "--data", str(raw), "--output-dir", str(out),
                   "--device", "cpu", "--epochs", "3", "--eval-freq", "10", "--no-initial-eval",
                   *flags])
    return json.loads((out / "metrics.json").read_text())


def distinct_examples(raw):
    splits = data.make_splits(data.load_rows(raw))
    return len({text for rows in splits.values() for _, text in rows})


def test_the_trunk_cache_computes_each_example_once(tmp_path, tiny_weights, small_raw_path,
                                                    observed, capsys):
    run(tmp_path, tiny_weights, small_raw_path, "shortcuts")
    distinct = distinct_examples(small_raw_path)  # 240
    cached = observed["embedded"]
    # Three epochs of 21 steps of 8, their evaluations and the final pass read about 900 rows;
    # with the cache each distinct text is embedded once, when first seen.
    assert 0 < cached <= distinct
    observed["embedded"] = 0
    run(tmp_path, tiny_weights, small_raw_path, "no-shortcuts", "--no-shortcuts")
    assert observed["embedded"] > 3 * distinct  # every step and evaluation embeds again


def test_the_fused_optimizer_is_on_by_default(tmp_path, tiny_weights, small_raw_path, observed,
                                              capsys):
    run(tmp_path, tiny_weights, small_raw_path, "shortcuts", "--max-steps", "2")
    (optimizer,) = observed["optimizers"]
    assert all(group["fused"] is True for group in optimizer.param_groups)
    run(tmp_path, tiny_weights, small_raw_path, "off", "--max-steps", "2", "--no-shortcuts")
    assert not observed["optimizers"][1].param_groups[0]["fused"]


def test_bf16_computes_in_bf16(tmp_path, tiny_weights, small_raw_path, observed, capsys):
    fp32 = run(tmp_path, tiny_weights, small_raw_path, "fp32")
    assert observed["head_dtypes"] == {torch.float32}
    observed["head_dtypes"].clear()
    bf16 = run(tmp_path, tiny_weights, small_raw_path, "bf16", "--precision", "bf16")
    assert observed["head_dtypes"] == {torch.bfloat16}
    # bf16 rounding shows in the losses, and no more than rounding
    a, b = fp32["history"]["train_losses"], bf16["history"]["train_losses"]
    assert len(a) == len(b) and a != b
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05
