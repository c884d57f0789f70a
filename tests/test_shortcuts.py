"""shortcuts.py: every exact speed shortcut computes what the chapter's code computes (block_at,
the trunk cache, FrozenBlock, oneDNN, attention backends, the allocator levers), and the policy
that turns them on.
"""

import copy
import json
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import data
import finetune
import gpt
import longrun
import shortcuts


# ---------------------------------------------------- the shortcuts against the model as written

PAD = 0  # the tiny vocabulary's pad id
CFG = gpt.GPTConfig(vocab_size=50, context_length=24, emb_dim=32, n_heads=4, n_layers=3)
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-5)


def noisy_model(cfg=CFG, trainable="last_block", seed=0, plain=False, dtype=torch.float64):
    """A classifier whose every weight (layer-norm scales and shifts, all biases) is random."""
    torch.manual_seed(seed)
    model = gpt.GPTModel(cfg, plain=plain)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    gpt.setup_classifier(model, 3, trainable, lora_rank=4, lora_alpha=2.0)
    if trainable == "lora":  # B starts at zero: give the update a value to be checked
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, gpt.LoRALinear):
                    m.B.normal_(0, 0.1)
    return model.to(dtype).eval()


def padded(lengths, total, seed=1, vocab=CFG.vocab_size):
    gen = torch.Generator().manual_seed(seed)
    x = torch.full((len(lengths), total), PAD)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
    return x


def grads_of(model, logits_fn, x, weights):
    model.zero_grad(set_to_none=True)
    logits = logits_fn(model, x)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.requires_grad}


def assert_close_in_bf16(got, expected, ulps=2, mean_ulps=0.25):
    """Equal up to bf16 rounding: within `ulps` units in the last place of bf16 at the largest
    value, and a mean difference of at most `mean_ulps` of one."""
    ulp = 2.0 ** (torch.floor(torch.log2(expected.abs().max())).item() - 7)
    diff = (got.float() - expected.float()).abs()
    assert diff.max() <= ulps * ulp, f"max difference {diff.max():.4g} > {ulps} x {ulp}"
    assert diff.mean() <= mean_ulps * ulp, f"mean difference {diff.mean():.4g} > " \
        f"{mean_ulps} x {ulp}"


# ----------------------------------------------------------------------------- block_at

@pytest.mark.parametrize("plain", [False, True], ids=["fused", "plain"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "no-mask"])
@pytest.mark.parametrize("position", ["last", "first", "flexible"])
@pytest.mark.parametrize("trainable", ["last_block", "last_two_blocks", "all", "lora"])
def test_block_at_equals_the_whole_block_in_float64(trainable, position, causal, plain):
    """Logits and every trainable parameter's gradient, tail vs the whole model, in float64; with
    the trunk cache where it applies and without it (all, LoRA: no cache or embeddings only)."""
    model = noisy_model(replace(CFG, causal=causal), trainable, plain=plain)
    x = padded([12, 7, 1, 10], 12)
    weights = torch.randn(len(x), 3, dtype=torch.float64)
    rows = torch.arange(len(x))
    pos = gpt.token_positions(x, position, PAD)

    def whole(m, ids):
        return m(ids)[rows, pos]

    expected, expected_grads = grads_of(model, whole, x, weights)
    # (the key bias never moves a softmax; nor do queries and keys where position 0, the only
    # one it sees, is classified)
    still = ("W_key.", "W_query.") if position == "first" and causal else ("W_key.bias",)
    assert all(g.abs().sum() > 0 for n, g in expected_grads.items()
               if not any(s in n for s in still))
    trunks = [None]
    try:
        trunks.append(shortcuts.TrunkCache(model, pad_id=PAD))
    except ValueError:
        assert trainable == "all"
    for trunk in trunks:
        def tail(m, ids):
            return shortcuts.classify_logits(m, ids, position, pad_id=PAD, tail=True, trunk=trunk)
        got, got_grads = grads_of(model, tail, x, weights)
        assert_close(got, expected, **F64)
        assert got_grads.keys() == expected_grads.keys()
        for name, g in expected_grads.items():  # the key bias's gradient is a rounding zero
            assert_close(got_grads[name], g, msg=name, **F64)


def test_block_at_matches_the_block_at_every_position():
    model = noisy_model()
    block = model.trf_blocks[-1]
    x = torch.randn(3, 9, CFG.emb_dim, dtype=torch.float64)
    with torch.no_grad():
        full = block(x)
        for p in range(9):
            pos = torch.full((3,), p)
            assert_close(shortcuts.block_at(block, x, pos), full[:, p], **F64)
        mixed = torch.tensor([8, 0, 4])
        assert_close(shortcuts.block_at(block, x, mixed), full[torch.arange(3), mixed], **F64)


def test_block_at_forms_no_keys_or_values():
    """The point of the re-association: the key and value projections never see the T positions
    (their weights enter only through products with one query per head)."""
    model = noisy_model(dtype=torch.float32)
    block, seen = model.trf_blocks[-1], []
    for name in ("W_key", "W_value"):
        getattr(block.att, name).register_forward_hook(lambda *a, name=name: seen.append(name))
    x = torch.randn(2, 10, CFG.emb_dim)
    shortcuts.block_at(block, x, torch.tensor([9, 3]))
    assert seen == []
    block(x)
    assert seen == ["W_key", "W_value"]


def test_block_at_in_bf16_stays_close():
    model = noisy_model(dtype=torch.float32)
    x = padded([12, 7, 1, 10], 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)[:, -1].float()
        got = shortcuts.classify_logits(model, x, pad_id=PAD, tail=True).float()
    assert_close(got, expected, rtol=0.05, atol=0.05)


def test_block_at_with_dropout_in_training_runs_the_block_as_written():
    model = noisy_model(replace(CFG, drop_rate=0.5), dtype=torch.float32).train()
    block = model.trf_blocks[-1]
    x, pos = torch.randn(2, 6, CFG.emb_dim), torch.tensor([5, 2])
    torch.manual_seed(3)
    got = shortcuts.block_at(block, x, pos)
    torch.manual_seed(3)
    assert torch.equal(got, block(x, query_pos=pos)[:, 0])


# ----------------------------------------------------------------------------- linear_at

def needs_onednn():
    if shortcuts.onednn_linear(torch.float32) is None:
        pytest.skip("this build of torch has no working mkldnn::_linear_pointwise for fp32 on "
                    "this CPU: linear_at is F.linear here")


def counting_onednn(monkeypatch):
    """Have the fp32 oneDNN linear count its calls into the returned list."""
    op, calls = shortcuts.onednn_linear(torch.float32), []

    def counted(*args):
        calls.append(args[3])
        return op(*args)
    monkeypatch.setitem(shortcuts._ONEDNN, torch.float32, counted)
    return calls


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("upstream", ["dense", "expanded"])
def test_linear_at_gives_f_linears_output_and_gradients(bias, upstream, monkeypatch):
    """Forward and the three gradients through oneDNN, against F.linear in float64; the
    upstream gradient dense or a stride-0 expansion (what a sum's backward hands down)."""
    needs_onednn()
    calls = counting_onednn(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 48, generator=gen, requires_grad=True)
    w = torch.randn(80, 48, generator=gen, requires_grad=True)
    b = torch.randn(80, generator=gen, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    dy = torch.randn(8, 80, generator=gen) if upstream == "dense" else \
        torch.tensor(0.7).expand(8, 80)
    got = shortcuts.linear_at(x, w, b)
    assert got.grad_fn.name() == "_OneDNNLinearBackward" and calls == ["none"]
    got_grads = torch.autograd.grad(got, leaves, dy)
    assert len(calls) == 3  # dy W and dy^T x through oneDNN too
    wide = [t.detach().double().requires_grad_() for t in leaves]
    expected = F.linear(*wide, None) if not bias else F.linear(*wide)
    expected_grads = torch.autograd.grad(expected, wide, dy.double())
    assert_close(got.double(), expected, **F32)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert_close(g.double(), e, **F32)


def test_linear_at_forms_only_the_gradients_asked_for(monkeypatch):
    needs_onednn()
    calls = counting_onednn(monkeypatch)
    x = torch.randn(4, 16, requires_grad=True)
    w, b = torch.randn(24, 16), torch.randn(24)  # frozen
    (dx,) = torch.autograd.grad(shortcuts.linear_at(x, w, b).sum(), [x])
    assert len(calls) == 2  # the forward and dy W; no weight gradient formed
    assert_close(dx, torch.ones(4, 24) @ w, **F32)


def test_linear_at_is_f_linear_wherever_onednn_does_not_apply(monkeypatch):
    """bf16 autocast (it casts the weights), other dtypes, other devices, onednn=False, and a
    torch or CPU without a working op: exactly F.linear."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen), \
        torch.randn(5, generator=gen)
    cases = [(x.double(), w.double(), b.double(), {}, nullcontext()),
             (x, w, b, dict(onednn=False), nullcontext()),
             (x, w, b, {}, torch.autocast("cpu", dtype=torch.bfloat16)),
             (x.to("meta"), w.to("meta"), b.to("meta"), {}, nullcontext())]
    for xi, wi, bi, kw, ctx in cases:
        with ctx:
            got, expected = shortcuts.linear_at(xi, wi, bi, **kw), F.linear(xi, wi, bi)
        assert got.dtype == expected.dtype and got.device == expected.device
        if got.device.type != "meta":
            assert torch.equal(got, expected)
    monkeypatch.setitem(shortcuts._ONEDNN, torch.float32, None)  # no working op here
    xg = x.clone().requires_grad_()
    got = shortcuts.linear_at(xg, w, b)
    assert got.grad_fn.name() == "AddmmBackward0" and torch.equal(got, F.linear(x, w, b))


@pytest.mark.parametrize("trainable", ["last_block", "last_two_blocks", "lora"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv-bias", "no-qkv-bias"])
def test_block_at_through_onednn_gives_the_models_logits_and_gradients(trainable, qkv_bias,
                                                                       monkeypatch):
    """fp32 on a CPU, the tail's products through oneDNN (counted), against the whole model in
    float64: the logits and every trainable parameter's gradient, with the trunk cache."""
    needs_onednn()
    model = noisy_model(replace(CFG, qkv_bias=qkv_bias), trainable)  # float64
    x = padded([12, 7, 1, 10], 12)
    weights = torch.randn(len(x), 3, dtype=torch.float64)
    expected, expected_grads = grads_of(model, lambda m, ids: m(ids)[:, -1], x, weights)
    model32 = copy.deepcopy(model).float()
    calls = counting_onednn(monkeypatch)
    trunk = shortcuts.TrunkCache(model32, pad_id=PAD, prepare=False)
    got, got_grads = grads_of(
        model32, lambda m, ids: shortcuts.classify_logits(m, ids, pad_id=PAD, tail=True,
                                                          trunk=trunk), x, weights.float())
    # query, out_proj and the feed-forward's two forward, then dx and dW of each; under LoRA
    # only the query's effective weight (the wrapped layers run as written)
    assert len(calls) == (3 if trainable == "lora" else 12)
    assert_close(got.double(), expected, **F32)
    for name, g in expected_grads.items():
        assert_close(got_grads[name].double(), g, msg=name, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- TrunkCache

def test_the_cache_keys_a_text_without_its_trailing_padding():
    model = noisy_model(dtype=torch.float32)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD)
    short, long = padded([6, 3], 10), padded([6, 3], 20)
    assert torch.equal(short, long[:, :10])
    with torch.no_grad():
        reference = trunk.compute(long)
        assert_close(trunk(short), reference[:, :10], **F32)
        assert len(trunk.store) == 2 and all(len(v) == 10 for v in trunk.store.values())
        # the longer padding is computed and replaces the entries; the shorter reads a prefix
        assert_close(trunk(long), reference, **F32)
        assert len(trunk.store) == 2 and all(len(v) == 20 for v in trunk.store.values())
        before = trunk.compute
        trunk.compute = None  # from here on, nothing may be computed
        assert_close(trunk(short), reference[:, :10], **F32)
        assert_close(trunk(padded([6, 3], 15)), reference[:, :15], **F32)
        trunk.compute = before


def test_rows_that_differ_only_in_their_last_tokens_are_different_entries():
    model = noisy_model(dtype=torch.float32)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD)
    base = padded([8], 10)[0]
    rows = [base.clone() for _ in range(4)]
    rows[1][7] = (base[7] % (CFG.vocab_size - 1)) + 1  # the last real token differs
    rows[2][8] = 5  # one more real token where the others have padding
    rows[3][9] = 7  # a real token after padding: not padding at the end
    x = torch.stack(rows)
    with torch.no_grad():
        got = trunk(x)
        assert len(trunk.store) == 4
        assert_close(got, trunk.compute(x), **F32)
        again = trunk(x.flip(0))  # read back, in another order
    assert_close(again, got.flip(0), **F32)
    assert (got[0, 7] - got[1, 7]).abs().max() > 1e-3


def test_without_the_causal_mask_the_whole_padded_row_is_the_key():
    model = noisy_model(replace(CFG, causal=False), dtype=torch.float32)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD)
    short, long = padded([6, 3], 10), padded([6, 3], 20)
    with torch.no_grad():
        a, b = trunk(short), trunk(long)
        assert len(trunk.store) == 4  # padding is seen by every position: other outputs
        assert (a - b[:, :10]).abs().max() > 1e-4
        assert_close(a, trunk.compute(short), **F32)


def test_a_full_cache_computes_the_rest_and_says_so_once():
    model = noisy_model(dtype=torch.float32)
    per_example = 10 * CFG.emb_dim * 4  # float32
    messages = []
    trunk = shortcuts.TrunkCache(model, pad_id=PAD, max_bytes=3 * per_example,
                                 on_full=messages.append)
    x = padded([9, 8, 7, 6, 5], 10)
    with torch.no_grad():
        got = trunk(x)
        assert_close(got, trunk.compute(x), **F32)
        assert len(trunk.store) == 3 and trunk.bytes == 3 * per_example and trunk.partial
        trunk(padded([4, 3], 10, seed=5))
    assert len(messages) == 1 and "partial" in messages[0] and "--trunk-cache-gb" in messages[0]
    assert trunk.bytes <= trunk.max_bytes


def test_the_default_cap_is_a_quarter_of_the_machine():
    import os
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert shortcuts.default_cache_bytes() == total // 4
    assert shortcuts.TrunkCache(noisy_model(dtype=torch.float32)).max_bytes == total // 4


def test_under_bf16_autocast_the_cache_stores_bf16_and_prepares_the_blocks_once():
    model = noisy_model(dtype=torch.float32)
    x = padded([12, 7, 1, 10], 12)
    once = shortcuts.TrunkCache(model, pad_id=PAD)
    each_call = shortcuts.TrunkCache(model, pad_id=PAD, prepare=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = once(x), each_call(x)
        plain = model.embed(x)
        for block in model.trf_blocks[:once.n_blocks]:
            plain = block(plain)
    # prepare=False is the blocks as written under autocast, exactly
    assert torch.equal(b, plain.to(torch.bfloat16).float())
    # prepared: the same function, rounded in bf16 where autocast rounds (the fused GELU
    # rounds once instead of twice), then stored in bf16
    assert_close_in_bf16(a, b)
    assert a.dtype == torch.float32
    assert {v.dtype for v in once.store.values()} == {torch.bfloat16}
    prepared = shortcuts._PREPARED[model]
    assert list(prepared) == [(once.n_blocks, torch.bfloat16, True)]  # and none for each_call
    blocks = shortcuts.prepared_blocks(model, once.n_blocks, torch.bfloat16)
    assert blocks is prepared[(once.n_blocks, torch.bfloat16, True)][1]
    assert len(blocks) == once.n_blocks and all(
        w.dtype == torch.bfloat16 for fb in blocks for w in (fb.qkv, fb.out, fb.fc, fb.proj))
    # fp32 runs store fp32, through fp32 prepared blocks
    fp32 = shortcuts.TrunkCache(model, pad_id=PAD)
    with torch.no_grad():
        fp32(x)
    assert {v.dtype for v in fp32.store.values()} == {torch.float32}
    assert (fp32.n_blocks, torch.float32, True) in prepared


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("onednn", [True, False])
def test_a_frozen_block_computes_what_the_block_computes(causal, qkv_bias, onednn):
    model = noisy_model(replace(CFG, causal=causal, qkv_bias=qkv_bias), dtype=torch.float32)
    block = model.trf_blocks[0]
    x = torch.randn(3, 11, CFG.emb_dim)
    fp32 = shortcuts.FrozenBlock(block, torch.float32, "cpu", onednn=onednn)
    with torch.no_grad():
        expected = block(x)
        assert_close(fp32(x), expected, **F32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = block(x)
        got = shortcuts.FrozenBlock(block, torch.bfloat16, "cpu", onednn=onednn)(x)
    assert got.dtype == torch.float32  # the residual stream stays in fp32, as under autocast
    assert_close_in_bf16(got, expected_bf16)
    assert (got - expected).abs().max() > 0  # it did round in bf16


def test_the_onednn_check_draws_nothing_from_the_seeded_generator(monkeypatch):
    monkeypatch.setattr(shortcuts, "_ONEDNN", {})  # not checked yet
    state = torch.get_rng_state()
    first = [shortcuts.onednn_linear(dtype) for dtype in (torch.float32, torch.bfloat16)]
    assert torch.equal(state, torch.get_rng_state())  # a run's shuffles stay the chapter's
    monkeypatch.setattr(shortcuts, "_ONEDNN", {})
    assert [shortcuts.onednn_linear(dtype) for dtype in (torch.float32, torch.bfloat16)] == first


def test_the_frozen_blocks_use_onednn_where_it_works(monkeypatch):
    if shortcuts.onednn_linear(torch.float32) is None:
        pytest.skip("this build of torch has no working mkldnn::_linear_pointwise")
    model = noisy_model(dtype=torch.float32)
    calls = []
    op = shortcuts.onednn_linear(torch.float32)

    class Counting:
        def __call__(self, *args):
            calls.append(args[3])
            return op(*args)

        def binary(self, *args):
            calls.append("add")
            return op.binary(*args)

    monkeypatch.setitem(shortcuts._ONEDNN, torch.float32, Counting())
    x = padded([5, 3], 8)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD)
    with torch.no_grad():
        got = trunk.compute(x)
    # per block: Q/K/V in one product, out_proj + residual, GELU fused, ff's out + residual
    assert calls == ["none", "add", "gelu", "add"] * trunk.n_blocks
    # where the op is missing (another build, another CPU), the same numbers without it
    monkeypatch.setitem(shortcuts._ONEDNN, torch.float32, None)
    shortcuts._PREPARED.pop(model, None)
    with torch.no_grad():
        assert_close(shortcuts.TrunkCache(model, pad_id=PAD).compute(x), got, **F32)
    assert len(calls) == 4 * trunk.n_blocks


def test_a_changed_weight_is_caught_after_the_cast_too():
    model = noisy_model(dtype=torch.float32)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD)
    x = padded([5, 3], 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trunk(x)
        model.trf_blocks[0].att.W_query.weight.add_(1.0)
        with pytest.raises(RuntimeError, match="stale"):
            trunk(padded([4], 8, seed=9))


# ----------------------------------------------------------------------------- finetune.py

def run_log(tmp_path, tiny_weights, raw_path, name, *extra):
    finetune.main(["--weights", str(tiny_weights), "--data", str(raw_path), "--output-dir",
                   str(tmp_path / name), "--max-steps", "3", "--eval-freq", "2",
                   "--no-initial-eval", *map(str, extra)])
    return (tmp_path / name / "log.txt").read_text()


def shortcut_line(log):
    return next(line for line in log.splitlines() if line.startswith("Shortcuts"))


def test_the_shortcuts_are_on_by_default_and_the_log_says_which(tmp_path, tiny_weights,
                                                                raw_path):
    assert finetune.TrainConfig().shortcuts and finetune.parse_args([]).shortcuts
    log = run_log(tmp_path, tiny_weights, raw_path, "default")
    line = shortcut_line(log)
    assert "frozen-trunk cache (embeddings + 1 frozen block, stored in fp32" in line
    onednn = shortcuts.onednn_linear(torch.float32) is not None  # this torch on this CPU
    assert ("; computed through oneDNN)" in line) == onednn
    assert "last block at the classified position only" in line and "fused AdamW" in line
    assert "--no-shortcuts" in line and "cache off" not in log and "partial" not in log


@pytest.mark.parametrize("flag", ["--no-shortcuts", "--plain"])
def test_no_shortcuts_and_plain_turn_them_off(tmp_path, tiny_weights, raw_path, flag):
    cfg = finetune.parse_args([flag])
    assert not shortcuts.enabled(cfg)
    model = noisy_model(dtype=torch.float32)
    classifier, note = finetune.build_classifier(model, cfg, torch.device("cpu"))
    assert classifier.shortcuts is None and note is None
    assert finetune.build_optimizer(model, cfg, torch.device("cpu")).defaults["fused"] is None
    assert shortcut_line(run_log(tmp_path, tiny_weights, raw_path, "off", flag)) == \
        f"Shortcuts: off ({flag})"


def test_no_shortcuts_keeps_the_fused_kernels(tmp_path, tiny_weights, raw_path, monkeypatch):
    built = []
    load = gpt.load_gpt
    monkeypatch.setattr(gpt, "load_gpt", lambda *a, **k: built.append(k) or load(*a, **k))
    run_log(tmp_path, tiny_weights, raw_path, "fused", "--no-shortcuts")
    assert built == [{"plain": False}]


def test_the_log_says_when_the_cache_is_off_or_partial(tmp_path, tiny_weights, raw_path):
    off = run_log(tmp_path, tiny_weights, raw_path, "zero", "--trunk-cache-gb", 0)
    assert "frozen-trunk cache off: --trunk-cache-gb 0" in off
    assert "last block at the classified position only" in shortcut_line(off)
    everything = run_log(tmp_path, tiny_weights, raw_path, "all", "--trainable-layers", "all")
    assert "frozen-trunk cache off: the frozen-trunk cache needs frozen embeddings" in everything
    # room for about two examples of 120 tokens x 32 floats
    partial = run_log(tmp_path, tiny_weights, raw_path, "tiny", "--trunk-cache-gb", 3e-5)
    assert re.search(r"frozen-trunk cache partial: full at .* MiB \(\d+ examples\)", partial)
    assert len(re.findall("cache partial", partial)) == 1


def test_a_negative_cache_cap_is_refused(tmp_path, tiny_weights, raw_path):
    with pytest.raises(SystemExit) as e:
        run_log(tmp_path, tiny_weights, raw_path, "neg", "--trunk-cache-gb", -1)
    assert str(e.value) == "error: --trunk-cache-gb must be 0 (no cache) or more"


def test_a_partial_cache_prints_the_same_log(tmp_path, tiny_weights, raw_path):
    def numbers(name, *extra):
        log = run_log(tmp_path, tiny_weights, raw_path, name, *extra)
        return re.findall(r"(?:loss|accuracy):? (\d+\.\d+)", log)
    assert numbers("whole") == numbers("capped", "--trunk-cache-gb", 3e-5)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_the_shortcuts_on_cuda_give_the_exact_logits_and_gradients():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    model = noisy_model(dtype=torch.float32).cuda()
    x = padded([12, 7, 1, 10], 12).cuda()
    weights = torch.randn(len(x), 3, device="cuda")
    expected, expected_grads = grads_of(model, lambda m, ids: m(ids)[:, -1], x, weights)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD)
    got, got_grads = grads_of(
        model, lambda m, ids: shortcuts.classify_logits(m, ids, pad_id=PAD, tail=True, trunk=trunk),
        x, weights)
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name, g in expected_grads.items():
        assert_close(got_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("position", ["last", "first", "flexible"])
@pytest.mark.parametrize("causal", [True, False])
def test_prepared_inference_computes_what_the_model_computes(position, causal):
    model = noisy_model(replace(CFG, causal=causal), dtype=torch.float32)
    x = padded([12, 7, 1, 10], 12)
    with torch.no_grad():
        expected = gpt.classify_logits(model, x, position, pad_id=PAD)
        got = shortcuts.classify_logits(model, x, position, pad_id=PAD, tail=True, prepared=True)
        assert_close(got, expected, **F32)
        mean = shortcuts.classify_logits(model, x, average=True, pad_id=PAD, prepared=True)
        assert_close(mean, gpt.classify_logits(model, x, average=True, pad_id=PAD), **F32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = shortcuts.classify_logits(model, x, position, pad_id=PAD, tail=True,
                                             prepared=True)
            expected_bf16 = gpt.classify_logits(model, x, position, pad_id=PAD)
    # logits rounded to bf16 by the head: a unit in the last place apart here and there
    assert_close_in_bf16(bf16, expected_bf16, ulps=2, mean_ulps=1)
    assert (n := len(model.trf_blocks) - 1, torch.float32, True) in shortcuts._PREPARED[model], n


def test_prepared_inference_stands_aside_where_it_would_change_the_answer():
    x = padded([5, 3], 8)
    model = noisy_model(dtype=torch.float32)
    # with gradients on (training) the blocks run as written, and backpropagate
    logits = shortcuts.classify_logits(model, x, pad_id=PAD, prepared=True)
    assert logits.grad_fn is not None and model not in shortcuts._PREPARED
    assert torch.equal(logits, gpt.classify_logits(model, x, pad_id=PAD))
    assert shortcuts.preparable(model)
    # the chapter's plain formulas, LoRA-wrapped layers, dropout at work: as written
    for other in (noisy_model(dtype=torch.float32, plain=True),
                  noisy_model(dtype=torch.float32, trainable="lora"),
                  noisy_model(replace(CFG, drop_rate=0.5), dtype=torch.float32).train()):
        assert not shortcuts.preparable(other)
        with torch.no_grad():
            torch.manual_seed(0)
            got = shortcuts.classify_logits(other, x, pad_id=PAD, prepared=True)
            torch.manual_seed(0)
            assert torch.equal(got, gpt.classify_logits(other, x, pad_id=PAD))
        assert other not in shortcuts._PREPARED


def test_bf16_training_on_a_cpu_without_amx_takes_the_math_attention(monkeypatch):
    math = type(shortcuts.sdpa_kernel(shortcuts.SDPBackend.MATH))
    monkeypatch.setattr(shortcuts, "HAS_AMX", False)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            assert isinstance(shortcuts.attention_backend("cpu"), math)
            assert isinstance(shortcuts.attention_backend("cuda"), type(nullcontext()))
            with torch.no_grad():  # no gradient
                assert isinstance(shortcuts.attention_backend("cpu"), type(nullcontext()))
    assert isinstance(shortcuts.attention_backend("cpu"), type(nullcontext()))  # fp32
    monkeypatch.setattr(shortcuts, "HAS_AMX", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(shortcuts.attention_backend("cpu"), type(nullcontext()))


def test_the_math_attention_trains_as_the_flash_kernel_does(monkeypatch):
    x = padded([12, 7, 1, 10], 12)
    weights = torch.randn(4, 3)
    results = {}
    for amx in (True, False):  # True: PyTorch's choice (flash); False: the math backend
        monkeypatch.setattr(shortcuts, "HAS_AMX", amx)
        model = noisy_model(trainable="all", dtype=torch.float32).train()

        def logits(m, ids):
            with shortcuts.attention_backend(ids.device.type):
                return m(ids)[:, -1].float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[amx] = grads_of(model, logits, x, weights)
    (flash, flash_grads), (math_, math_grads) = results[True], results[False]
    assert_close_in_bf16(math_, flash, ulps=4, mean_ulps=1)  # three layers of bf16 apart
    for name, g in flash_grads.items():
        if name.endswith("W_key.bias"):  # the softmax cancels it: its gradient is rounding
            continue
        assert_close(math_grads[name], g, rtol=0.05, atol=0.05 * g.abs().max().item(), msg=name)


def test_the_prepared_blocks_are_shared_by_later_caches_and_redone_when_weights_change():
    model = noisy_model(dtype=torch.float32)
    x = padded([5, 3], 8)
    first, second = shortcuts.TrunkCache(model, pad_id=PAD), shortcuts.TrunkCache(model, pad_id=PAD)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = first(x)
        second(x)
        blocks = shortcuts.prepared_blocks(model, first.n_blocks, torch.bfloat16)
        assert shortcuts.prepared_blocks(model, second.n_blocks, torch.bfloat16) is blocks
        model.trf_blocks[0].ff.layers[0].weight.mul_(2.0)  # as loading other weights would
        third = shortcuts.TrunkCache(model, pad_id=PAD)
        got = third(x)
        assert shortcuts.prepared_blocks(model, third.n_blocks, torch.bfloat16) is not blocks
        expected = model.embed(x)
        for block in model.trf_blocks[:third.n_blocks]:
            expected = block(expected)
    assert_close_in_bf16(got, expected.to(torch.bfloat16))
    assert (got - before).abs().max() > 0.1  # from the new weights, not the old ones


def test_fill_ahead_stores_each_new_text_once_and_the_loop_then_only_reads():
    model = noisy_model(dtype=torch.float32)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD, extend=True)
    x = padded([9, 4, 6, 9], 12)
    x[3] = x[0]  # the same text twice
    rows = [x[0], x[1][:4], x[2][:8], x[3]]  # any lengths: unpadded, padded a little
    assert trunk.fill(rows, batch_size=2) == 3
    # grouped by length (4 and 8, then 12), each group padded to its longest row
    assert sorted(len(v) for v in trunk.store.values()) == [8, 8, 12]
    assert trunk.fill(rows) == 0  # nothing new
    with torch.no_grad():
        expected = trunk.compute(x)
        trunk.compute = None  # the loop's batches, padded to 12 or less, are all read
        for width in (12, 10):
            got = trunk(x[:, :width])
            for row, n in enumerate([9, 4, 6, 9]):  # up to each row's last real token
                assert_close(got[row, :n], expected[row, :n], **F32)


def test_an_entry_holds_the_same_whatever_the_loop_reads_later():
    """Once filled, an entry is never computed again: batches padded past it (per-batch
    padding, other neighbours) read it extended with zeros, so a resumed run, which fills
    afresh, reads what the run never stopped read."""
    model = noisy_model(dtype=torch.float32)
    lengths = [3, 9, 5, 12, 7, 4, 10, 6]
    x = padded(lengths, 12, seed=4)
    rows = [x[i, :n] for i, n in enumerate(lengths)]
    fresh = shortcuts.TrunkCache(model, pad_id=PAD, extend=True)
    fresh.fill(rows, batch_size=3)
    used = shortcuts.TrunkCache(model, pad_id=PAD, extend=True)
    used.fill(rows, batch_size=3)
    computed = []
    compute = used.compute
    used.compute = lambda ids: computed.append(ids) or compute(ids)
    with torch.no_grad():
        for batch in ([0, 3], [5, 1, 2], [4, 6, 7], [2, 0]):  # padded to each batch's longest
            width = max(lengths[i] for i in batch)
            used(x[batch, :width])
    assert computed == []
    assert fresh.store.keys() == used.store.keys()
    assert all(torch.equal(fresh.store[k], used.store[k]) for k in fresh.store)


@pytest.mark.parametrize("position", ["flexible", "first"])
def test_an_extended_entry_gives_the_models_logits_and_gradients(position):
    model = noisy_model(dtype=torch.float32)
    lengths = [3, 9, 5, 12]
    x = padded(lengths, 12, seed=5)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD, extend=True)
    trunk.fill([x[i, :n] for i, n in enumerate(lengths)], batch_size=2)  # 2 groups: 3,5 / 9,12
    assert sorted(len(v) for v in trunk.store.values()) == [5, 5, 12, 12]
    weights = torch.randn(len(lengths), 3)
    got = grads_of(model, lambda m, ids: shortcuts.classify_logits(
        m, ids, position, pad_id=PAD, tail=True, trunk=trunk), x, weights)
    expected = grads_of(model, lambda m, ids: gpt.classify_logits(
        m, ids, position, pad_id=PAD), x, weights)
    assert_close(got[0], expected[0], **F32)
    for name in expected[1]:
        assert_close(got[1][name], expected[1][name], **F32)


def test_a_resume_on_other_threads_says_its_numbers_are_not_bit_for_bit():
    now = torch.get_num_threads()
    assert longrun.threads_note({"threads": now}) is None
    assert longrun.threads_note({}) is None  # a checkpoint that did not record them
    note = longrun.threads_note({"threads": now + 3})
    assert note.startswith(f"note: the run ran on {now + 3} CPU threads and resumes on {now}")
    assert f"OMP_NUM_THREADS={now + 3}" in note


def test_fill_ahead_stops_at_the_cap_and_skips_without_the_causal_mask():
    model = noisy_model(dtype=torch.float32)
    trunk = shortcuts.TrunkCache(model, pad_id=PAD, max_bytes=2 * 8 * CFG.emb_dim * 4)
    assert trunk.fill(list(padded([8, 7, 6, 5, 4, 3], 8)), batch_size=2) == 4
    assert len(trunk.store) == 2 and trunk.partial
    open_model = noisy_model(replace(CFG, causal=False), dtype=torch.float32)
    assert shortcuts.TrunkCache(open_model, pad_id=PAD).fill(list(padded([8, 7], 8))) == 0


def test_the_run_fills_ahead_only_when_it_reads_a_whole_epoch(tmp_path, tiny_weights, raw_path,
                                                              monkeypatch):
    filled = []
    original = shortcuts.TrunkCache.fill

    def counting(self, rows, *a, **k):
        filled.append(original(self, rows, *a, **k))
        return filled[-1]
    monkeypatch.setattr(shortcuts.TrunkCache, "fill", counting)
    run_log(tmp_path, tiny_weights, raw_path, "short")  # --max-steps 3
    assert filled == []
    finetune.main(["--weights", str(tiny_weights), "--data", str(raw_path), "--output-dir",
                   str(tmp_path / "epoch"), "--epochs", "1", "--no-initial-eval"])
    # every training example and the 40 validation examples the evaluations read (a text may
    # occur twice: one entry each)
    assert 1000 < filled[-1] <= 1045 + 40


# --------------------------------------------------------------- the levers in use in whole runs

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_fused_optimizer_is_on_by_default(tmp_path, tiny_weights, small_raw_path, observed,
                                              capsys):
    run(tmp_path, tiny_weights, small_raw_path, "shortcuts", "--max-steps", "2")
    (optimizer,) = observed["optimizers"]
    assert all(group["fused"] is True for group in optimizer.param_groups)
    run(tmp_path, tiny_weights, small_raw_path, "off", "--max-steps", "2", "--no-shortcuts")
    assert not observed["optimizers"][1].param_groups[0]["fused"]


@pytest.mark.slow
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


# ------------------------------------------------------------------------- AMX and the allocator

GLIBC = shortcuts.platform.system() == "Linux" and shortcuts.platform.libc_ver()[0] == "glibc"


def steps(model, n=3, dtype=torch.bfloat16):
    """n cached training steps under `dtype` autocast (None: fp32) as finetune.py takes them:
    losses and the final weights."""
    trunk = shortcuts.TrunkCache(model, pad_id=0)
    classifier = gpt.Classifier(model, autocast_dtype=dtype,
                                shortcuts=shortcuts.Shortcuts(trunk=trunk))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, model.cfg.vocab_size, (4, 12), generator=gen)
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


# ---------------------------------------------------------------- the step's levers (huge pages)

ROOT = Path(__file__).resolve().parents[1]

# A few cached training steps of a small model (its feed-forward weights 4 MiB each), in float32
# and then bfloat16, in a fresh process (torch reads the variable once, at its first large
# allocation): per precision, its losses and a digest of its final weights.
STEPS = """
import hashlib, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import torch
import gpt
from test_shortcuts import steps
cfg = gpt.GPTConfig(vocab_size=50, context_length=24, emb_dim=512, n_heads=4, n_layers=2)
result = {}
for dtype in sys.argv[2:]:
    torch.manual_seed(0)
    model = gpt.GPTModel(cfg)
    gpt.setup_classifier(model, 3)
    losses, weights = steps(model, dtype=getattr(torch, dtype, None))
    digest = hashlib.sha256()
    for v in weights.values():
        digest.update(v.detach().float().numpy().tobytes())
    result[dtype] = {"losses": losses, "weights": digest.hexdigest()}
huge = [line.split()[1] for line in open("/proc/self/smaps_rollup")
        if line.startswith("AnonHugePages")] if sys.platform == "linux" else ["0"]
print(json.dumps({"runs": result, "huge_kb": int(huge[0])}))
"""
DTYPES = ("float32", "bfloat16")


def run_steps(thp):
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
    out = subprocess.run([sys.executable, "-c", STEPS, str(ROOT), *DTYPES], env=env,
                         check=True, capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="torch's huge pages are Linux only")
def test_huge_pages_change_no_number():
    off, on = run_steps("0"), run_steps("1")
    for dtype in DTYPES:
        assert off["runs"][dtype]["losses"] == on["runs"][dtype]["losses"], dtype
        assert off["runs"][dtype]["weights"] == on["runs"][dtype]["weights"], dtype
    assert off["runs"]["float32"]["losses"] != off["runs"]["bfloat16"]["losses"]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():  # the lever took effect
        assert on["huge_kb"] > 0 and off["huge_kb"] == 0


def test_huge_pages_are_asked_for_on_import_unless_the_environment_says_no(monkeypatch):
    monkeypatch.setattr(shortcuts.platform, "system", lambda: "Linux")
    monkeypatch.delenv(shortcuts.THP_ENV, raising=False)
    assert shortcuts.use_huge_pages() is True and os.environ[shortcuts.THP_ENV] == "1"
    monkeypatch.setenv(shortcuts.THP_ENV, "0")
    assert shortcuts.use_huge_pages() is False and os.environ[shortcuts.THP_ENV] == "0"
