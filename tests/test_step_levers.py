"""Levers of issue 30 (the cached step and the fill near this machine's limit): each computes
what it replaces, bit for bit or up to float rounding.

- `shortcuts.use_huge_pages`: torch's large CPU tensors on transparent huge pages (set when
  shortcuts.py is imported); training steps give the same losses and weights bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shortcuts

ROOT = Path(__file__).resolve().parents[1]

# A few cached training steps of a small model (its feed-forward weights 4 MiB each), in a
# fresh process (torch reads the variable once, at its first large allocation): its losses and
# a digest of its final weights.
STEPS = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.nn.functional as F
import gpt, shortcuts
cfg = gpt.GPTConfig(vocab_size=50, context_length=24, emb_dim=512, n_heads=4, n_layers=2)
torch.manual_seed(0)
model = gpt.GPTModel(cfg)
gpt.setup_classifier(model, 3)
trunk = shortcuts.TrunkCache(model, pad_id=0)
classifier = gpt.Classifier(model, autocast_dtype=getattr(torch, sys.argv[2], None),
                            shortcuts=shortcuts.Shortcuts(trunk=trunk))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
gen = torch.Generator().manual_seed(1)
x = torch.randint(1, cfg.vocab_size, (4, 12), generator=gen)
y = torch.randint(0, 3, (4,), generator=gen)
losses = []
for _ in range(3):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(classifier(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
digest = hashlib.sha256()
for v in model.state_dict().values():
    digest.update(v.detach().float().numpy().tobytes())
huge = [line.split()[1] for line in open("/proc/self/smaps_rollup")
        if line.startswith("AnonHugePages")] if sys.platform == "linux" else ["0"]
print(json.dumps({"losses": losses, "weights": digest.hexdigest(), "huge_kb": int(huge[0])}))
"""


def run_steps(thp, dtype):
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
    out = subprocess.run([sys.executable, "-c", STEPS, str(ROOT), dtype], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="torch's huge pages are Linux only")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_huge_pages_change_no_number(dtype):
    off, on = run_steps("0", dtype), run_steps("1", dtype)
    assert off["losses"] == on["losses"]
    assert off["weights"] == on["weights"]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():  # the lever took effect
        assert on["huge_kb"] > 0 and off["huge_kb"] == 0


def test_huge_pages_are_asked_for_on_import_unless_the_environment_says_no(monkeypatch):
    monkeypatch.setattr(shortcuts.platform, "system", lambda: "Linux")
    monkeypatch.delenv(shortcuts.THP_ENV, raising=False)
    assert shortcuts.use_huge_pages() is True and os.environ[shortcuts.THP_ENV] == "1"
    monkeypatch.setenv(shortcuts.THP_ENV, "0")
    assert shortcuts.use_huge_pages() is False and os.environ[shortcuts.THP_ENV] == "0"
