"""Own files of skewed lengths: padding each batch to its own longest text against padding
every text to the longest, with and without length grouping (issue 10).

    python -m pytest bench/test_padding.py --benchmark-only      # CPU: about 3 minutes
    python -m pytest -q bench/test_padding.py --benchmark-disable  # smoke pass, tiny sizes

Lengths as skewed as real labelled text: nine in ten texts short (8 to 40 tokens), one in ten
long (300 to 500). Each benchmark is one training epoch of GPT-2 small (random weights, the last
block trainable, the last real token classified, --no-shortcuts, fp32) over the same 48 examples in
batches of 8, through finetune.py's loaders and training step. extra_info holds examples/s and
the padded tokens the epoch computed; the ratio between rows is the speed-up. No timing is
asserted.
"""

import time

import pytest
import torch

import data
import finetune
import gpt

MODES = {  # name: (dataset padding, group by length)
    "longest": (True, False),
    "batch": ("batch", False),
    "batch+grouped": ("batch", True),
}


@pytest.fixture(scope="module")
def skewed_rows(sizes):
    """(label, token ids) rows: 90% short, 10% long, three classes; seeded."""
    g = torch.Generator().manual_seed(123)
    n = 12 if sizes.tiny else 48
    short, long = ((3, 8), (30, 60)) if sizes.tiny else ((8, 40), (300, 500))
    rows = []
    for i in range(n):
        lo, hi = long if i % 10 == 9 else short
        length = int(torch.randint(lo, hi + 1, (), generator=g))
        ids = torch.randint(0, data.PAD_ID, (length,), generator=g).tolist()
        rows.append((i % 3, ids))
    return rows


class IdsTokenizer:
    """Texts that are already token ids (the benchmark's rows), for data.TextDataset."""

    def encode_ordinary(self, ids):
        return list(ids)


@pytest.mark.parametrize("mode", MODES)
def test_epoch_of_skewed_lengths(benchmark, mode, skewed_rows, sizes):
    pad, grouped = MODES[mode]
    torch.manual_seed(123)
    model = gpt.GPTModel(sizes.cfg)
    torch.manual_seed(123)
    gpt.setup_classifier(model, 3, "last_block")
    ds = data.TextDataset(skewed_rows, IdsTokenizer(), pad=pad)
    batch = 2 if sizes.tiny else 8
    cfg = finetune.TrainConfig(batch_size=batch)
    classifier = gpt.Classifier(model, position="flexible")
    optimizer = finetune.build_optimizer(model, cfg, torch.device("cpu"))
    tokens = []

    def epoch():  # finetune.train_classifier_simple's step, over one pass of the training loader
        torch.manual_seed(123)
        loader = data.create_loaders({"train": ds}, batch_size=batch,
                                     group_by_length=grouped)["train"]
        tokens.clear()
        classifier.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            finetune.calc_loss_batch(x, y, classifier, torch.device("cpu")).backward()
            optimizer.step()
            tokens.append(x.numel())

    benchmark.group = "own data: one epoch, skewed lengths"
    start = time.perf_counter()
    benchmark.pedantic(epoch, rounds=1 if sizes.tiny else 2, warmup_rounds=0)
    seconds = benchmark.stats.stats.median if benchmark.enabled else \
        time.perf_counter() - start
    examples = len(tokens) * batch
    benchmark.extra_info.update(
        mode=mode, examples=examples, padded_tokens=sum(tokens),
        real_tokens=sum(ds.lengths()), seconds=seconds, examples_per_s=examples / seconds,
        device_threads=torch.get_num_threads(), torch=torch.__version__, tiny=sizes.tiny)
    assert len(tokens) == len(ds) // batch  # the same examples per epoch in every mode
