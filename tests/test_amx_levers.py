"""Levers of issue 22 (near the machine's limit on an AMX CPU): each changes no number.

- `shortcuts.keep_freed_memory`: glibc's malloc keeps freed memory for reuse (no fresh mmap
  and page faults per step); training steps give the same losses and weights bit for bit.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import gpt
import shortcuts

CFG = gpt.GPTConfig(vocab_size=50, context_length=24, emb_dim=32, n_heads=4, n_layers=3)
GLIBC = shortcuts.platform.system() == "Linux" and shortcuts.platform.libc_ver()[0] == "glibc"


def steps(model, n=3):
    """n cached bf16 training steps as finetune.py takes them: losses and the final weights."""
    trunk = shortcuts.TrunkCache(model, pad_id=0)
    classifier = gpt.Classifier(model, autocast_dtype=torch.bfloat16,
                                shortcuts=shortcuts.Shortcuts(trunk=trunk))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, CFG.vocab_size, (4, 12), generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    losses = []
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(classifier(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def restore_malloc():
    yield
    shortcuts.keep_freed_memory(False)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_keeping_freed_memory_changes_no_number(restore_malloc):
    torch.manual_seed(0)
    model = gpt.GPTModel(CFG)
    gpt.setup_classifier(model, 3)
    assert shortcuts.keep_freed_memory(False) is True
    before = steps(copy.deepcopy(model))
    assert shortcuts.keep_freed_memory() is True
    after = steps(copy.deepcopy(model))
    assert before[0] == after[0]
    for k, v in before[1].items():
        assert torch.equal(v, after[1][k]), k


def test_off_glibc_it_does_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(shortcuts.platform, "libc_ver", lambda: ("", ""))
    assert shortcuts.keep_freed_memory() is False
    monkeypatch.setattr(shortcuts.platform, "system", lambda: "Darwin")
    assert shortcuts.keep_freed_memory() is False


def test_training_on_a_cpu_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(shortcuts, "keep_freed_memory", lambda keep=True: calls.append(keep))
    torch.manual_seed(0)
    model = gpt.GPTModel(CFG)
    gpt.setup_classifier(model, 3)
    shortcuts.for_training(model)
    assert calls == [True]
