"""The benchmarks' arithmetic, against cases worked out by hand: the projection of the chapter's
training phase, the model FLOP counts, and the MFU that is refused above 100%.

These are ordinary tests (no timing): they run in the smoke pass (`--benchmark-disable`) and are
skipped by `--benchmark-only`.
"""

import pytest

import gpt
import test_speed

E, T, BATCH = 32, 16, 2
CFG = gpt.GPTConfig(vocab_size=50257, context_length=64, emb_dim=E, n_heads=4, n_layers=2)


@pytest.fixture
def new_row(results):
    """A Row of a fresh Results (the session's summary stays untouched)."""
    fresh = type(results)(0.0, None)

    def make(trunk=False, peak=1.0, batch=8, tokens=120, fill_batch=32):
        row = fresh.row(device="cpu", device_name="Test CPU", precision="fp32", variant="fused",
                        trainable="last_block", batch=batch, tokens=tokens, fill_batch=fill_batch)
        row.trunk, row.peak_tflops = trunk, peak
        return row
    return make


def test_projection_of_the_chapters_phase(new_row):
    row = new_row()
    row.seconds.update(step=0.5, eval=0.25)
    row.flops.update(step=1e9, eval=2e8)
    # 5 epochs of 130 steps; 13 loss evaluations (steps 0, 50, ..., 600) and 5 accuracies, each
    # over 5 batches of train and 5 of validation: 180 evaluation batches.
    seconds, flops, missing = row.phase()
    assert missing == [] and seconds == pytest.approx(650 * 0.5 + 180 * 0.25)  # 370 s
    assert flops == pytest.approx(650e9 + 180 * 2e8)  # 686 GFLOP
    # epoch 1: 130 steps; losses at steps 0, 50, 100 and the accuracies: 40 batches
    assert row.first_epoch()[0] == pytest.approx(130 * 0.5 + 40 * 0.25)  # 75 s
    p = row.projection()
    assert p["projected_run_min"] == pytest.approx(370 / 60)
    assert p["projected_epoch_s"] == pytest.approx(74.0)
    assert p["projected_first_epoch_s"] == pytest.approx(75.0)
    assert p["run_examples_per_s"] == pytest.approx(650 * 8 / 370)  # 14.05
    assert p["run_tokens_per_s"] == pytest.approx(650 * 8 * 120 / 370)
    assert p["run_mfu"] == pytest.approx(686e9 / 370 / 1e12)  # 0.185% of 1 TFLOP/s


def test_projection_with_the_trunk_cache_adds_one_fill_per_distinct_example(new_row):
    row = new_row(trunk=True)
    row.seconds.update(step=0.04, eval=0.01, fill=2.4)  # a fill: one batch of 32 examples
    row.flops.update(step=1e8, eval=5e7, fill=1.6e11)
    # 1,045 training examples + the 40 validation examples evaluated, filled ahead of the loop
    # in batches of 32 (shortcuts.FILL_BATCH): 1,085 / 32 fills
    seconds, flops, _ = row.phase()
    assert seconds == pytest.approx(650 * 0.04 + 180 * 0.01 + 1085 / 32 * 2.4)  # 109.175 s
    assert flops == pytest.approx(650 * 1e8 + 180 * 5e7 + 1085 / 32 * 1.6e11)
    assert row.first_epoch()[0] == pytest.approx(130 * 0.04 + 40 * 0.01 + 1085 / 32 * 2.4)


def test_projection_waits_for_every_piece(new_row):
    row = new_row(trunk=True)
    row.seconds.update(step=0.04)
    row.flops.update(step=1e8)
    assert row.phase() == (None, None, ["eval", "fill"])
    assert row.projection() == {"projection": "needs eval, fill"}


def test_an_mfu_over_100_percent_is_refused(new_row):
    row = new_row(peak=0.001)  # 1 GFLOP/s: far below what these figures claim
    row.seconds.update(step=0.5, eval=0.25)
    row.flops.update(step=1e9, eval=2e8)
    with pytest.raises(ValueError, match="over 100%.*peak.*FLOP count"):
        row.projection()
    with pytest.raises(ValueError, match="over 100%"):
        row.checked_mfu(2e9, 1.0, "step")
    assert row.checked_mfu(5e8, 1.0, "step") == pytest.approx(0.5)


@pytest.mark.parametrize("variant, trainable, kind, expected", [
    # One block's forward for one example, every position (T = 16, E = 32): 2 FLOPs per
    # multiply-add of its linear layers, 12 E^2 per position, plus attention's 4 E T^2:
    # 2 * 12 * 1024 * 16 + 4 * 32 * 256 = 393,216 + 32,768 = 425,984. The head: 2 * E * 2 = 128.
    ("fused", "last_block", "eval", 2 * (2 * 425_984 + 128)),
    # training: the trained last block and head cost 3 forwards (the 6N rule), the frozen first
    # block one
    ("fused", "last_block", "step", 2 * (425_984 + 3 * 425_984 + 3 * 128)),
    ("plain", "last_block", "step", 2 * (425_984 + 3 * 425_984 + 3 * 128)),
    ("fused", "all", "step", 2 * (6 * 425_984 + 3 * 128)),
    ("fused", "last_layer", "step", 2 * (2 * 425_984 + 3 * 128)),
    # the shortcuts: the first block is cached (no FLOPs in a step), the last one re-associated at
    # the classified position: 2 * 12 E^2 + 4 E T H = 24,576 + 8,192 = 32,768, trained: x 3
    ("shortcuts", "last_block", "step", 2 * (3 * 32_768 + 3 * 128)),
    ("shortcuts", "last_block", "eval", 2 * (32_768 + 128)),
])
def test_flop_counts(variant, trainable, kind, expected, monkeypatch):
    monkeypatch.setattr(test_speed, "_lever_missing", lambda *args: None)
    setup = test_speed.Setup(("cpu", "fp32", variant, trainable),
                             lambda plain: gpt.GPTModel(CFG, plain=plain), sizes=None)
    assert setup.flops(kind, BATCH, T) == expected


def test_the_distance_to_the_limit(new_row):
    """The headline: the fill's FLOPs at the peak (steps and evaluations free) against the
    projected phase, beside the ratio to the chapter's code (the plain row)."""
    import conftest
    row = new_row(trunk=True, peak=0.5, fill_batch=16)
    row.seconds.update(step=0.01, eval=0.005, fill=0.8)
    row.flops.update(step=1e8, eval=5e7, fill=2e11)
    lines = conftest.limit_rows(type("Results", (), {"rows": {"row": row}})())
    assert len(lines) == 2
    floor = 1085 / 16 * 2e11 / 0.5e12  # 27.1 s
    ours = 650 * 0.01 + 180 * 0.005 + 1085 / 16 * 0.8  # 61.65 s
    head, got = lines
    assert got[head.index("floor s (fill FLOPs at peak)")] == f"{floor:.1f}"
    assert got[head.index("ours s (projected phase)")] == f"{ours:.1f}"
    assert got[head.index("share of the limit")] == f"{floor / ours:.0%}"
    assert got[head.index("vs the chapter's code")] == "-"  # no plain row measured
