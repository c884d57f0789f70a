"""gpt.py: loading Hugging Face weights, the modules, the classifier set-up and its shortcuts.

Every model here is tiny (2 or 3 layers of width 32, vocabulary 100), so the suite runs in
seconds on a CPU and needs no download: the "pretrained" checkpoint is a randomly initialised
transformers GPT-2 saved to a temporary folder, and downloads come from a local HTTP server.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import data
import files
import gpt
import shortcuts

TINY = gpt.GPTConfig(vocab_size=100, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
TINY3 = replace(TINY, n_layers=3)
PAD = 99  # the tiny vocabulary's stand-in for <|endoftext|>
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_model(cfg=TINY, seed=0, plain=False):
    torch.manual_seed(seed)
    return gpt.GPTModel(cfg, plain=plain).eval()


def classifier(trainable, cfg=TINY3, seed=0, plain=False):
    """A tiny model set up as the chapter does: head drawn right after seeding torch with 123."""
    model = tiny_model(cfg, seed, plain)
    torch.manual_seed(123)
    return gpt.setup_classifier(model, trainable=trainable).eval()


def padded_batch(lengths, total, seed=1):
    """Right-padded rows of random ids below PAD, each `lengths[i]` real tokens long."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(lengths), total), PAD)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(0, PAD, (n,), generator=g)
    return x


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def names_under(model, prefix):
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


@pytest.fixture
def hf_ids():
    return torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(7))


def copy_weights(tiny_hf_dir, dest, edit=None):
    """A copy of the tiny checkpoint folder; `edit(tensors)` may change the tensors first."""
    from safetensors.torch import load_file, save_file

    src, _ = tiny_hf_dir
    dest.mkdir(parents=True)
    shutil.copy(src / "config.json", dest / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("plain", [False, True])
def test_load_gpt_matches_transformers(tiny_hf_dir, hf_ids, plain):
    folder, hf_model = tiny_hf_dir
    model = gpt.load_gpt(folder, plain=plain).eval()
    assert model.cfg == replace(TINY, context_length=64)
    assert model.out_head.weight is model.tok_emb.weight  # GPT-2's tied head
    with torch.no_grad():
        assert_close(model(hf_ids), hf_logits(hf_model, hf_ids), **TOL)


def test_load_gpt_accepts_names_without_prefix(tiny_hf_dir, hf_ids, tmp_path):
    def strip(tensors):
        for name in list(tensors):
            t = tensors.pop(name)
            if name != "lm_head.weight":
                tensors[name.removeprefix("transformer.")] = t
        assert not any(name.startswith("transformer.") for name in tensors)

    folder = copy_weights(tiny_hf_dir, tmp_path / "w", strip)
    for plain in (False, True):
        model = gpt.load_gpt(folder, plain=plain).eval()
        with torch.no_grad():
            assert_close(model(hf_ids), hf_logits(tiny_hf_dir[1], hf_ids), **TOL)


def test_load_gpt_ignores_mask_buffers_and_the_tied_head(tiny_hf_dir, hf_ids, tmp_path):
    def add_buffers(tensors):  # what older transformers versions saved
        for i in range(2):
            tensors[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()

    folder = copy_weights(tiny_hf_dir, tmp_path / "w", add_buffers)
    model = gpt.load_gpt(folder).eval()
    with torch.no_grad():
        assert_close(model(hf_ids), hf_logits(tiny_hf_dir[1], hf_ids), **TOL)


def test_config_from_hf(tiny_hf_dir):
    folder, _ = tiny_hf_dir
    assert gpt.config_from_hf(folder / "config.json") == gpt.GPTConfig(
        vocab_size=100, context_length=64, emb_dim=32, n_heads=4, n_layers=2)


def _delete(name):
    return lambda tensors: tensors.pop(name)


def _reshape(name, shape):
    return lambda tensors: tensors.__setitem__(name, torch.ones(shape))


def _add(name):
    return lambda tensors: tensors.__setitem__(name, torch.zeros(3))


@pytest.mark.parametrize("edit, message", [
    (_delete("transformer.h.1.mlp.c_fc.bias"), "missing h.1.mlp.c_fc.bias"),
    (_delete("transformer.wpe.weight"), "missing wpe.weight"),
    (_reshape("transformer.ln_f.weight", (33,)), "ln_f.weight has shape (33,)"),
    (_reshape("transformer.h.0.attn.c_proj.weight", (32, 16)),
     "h.0.attn.c_proj.weight has shape (32, 16)"),
    (_add("transformer.h.0.attn.extra"), "unexpected h.0.attn.extra"),
], ids=["missing", "missing-embedding", "wrong-shape", "wrong-shape-linear", "unexpected"])
def test_load_gpt_names_what_does_not_fit(tiny_hf_dir, tmp_path, edit, message):
    folder = copy_weights(tiny_hf_dir, tmp_path / "w", edit)
    with pytest.raises(gpt.WeightsError) as e:
        gpt.load_gpt(folder)
    assert "does not fit the model" in str(e.value)
    assert message in str(e.value)


def test_load_gpt_names_missing_layers(tiny_hf_dir, tmp_path):
    folder = copy_weights(tiny_hf_dir, tmp_path / "w")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(gpt.WeightsError, match="missing h.2.attn.c_attn.bias"):
        gpt.load_gpt(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_load_gpt_refuses_a_broken_safetensors_file(tiny_hf_dir, tmp_path, damage):
    folder = copy_weights(tiny_hf_dir, tmp_path / "w")
    path = folder / "model.safetensors"
    whole = path.read_bytes()
    path.write_bytes({"truncated": whole[:len(whole) // 2], "garbage": b"\x00not a tensor file",
                      "empty": b""}[damage])
    with pytest.raises(gpt.WeightsError) as e:
        gpt.load_gpt(folder)
    assert "model.safetensors is not a readable safetensors file" in str(e.value)


def test_load_gpt_refuses_incomplete_folders(tiny_hf_dir, tmp_path):
    folder = copy_weights(tiny_hf_dir, tmp_path / "w")
    (folder / "config.json").unlink()
    with pytest.raises(gpt.WeightsError, match="has no config.json"):
        gpt.load_gpt(folder)

    folder = copy_weights(tiny_hf_dir, tmp_path / "v")
    (folder / "model.safetensors").unlink()
    with pytest.raises(gpt.WeightsError, match="has no model.safetensors"):
        gpt.load_gpt(folder)

    folder = copy_weights(tiny_hf_dir, tmp_path / "u")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(gpt.WeightsError, match="is not a GPT-2 config.json"):
        gpt.load_gpt(folder)

    with pytest.raises(gpt.WeightsError, match="not a preset"):
        gpt.load_gpt(tmp_path / "nonexistent")


# ----------------------------------------------------------------------------- downloads

def serve_tiny_weights(http_server, tiny_hf_dir, monkeypatch, safetensors_length=None):
    folder, _ = tiny_hf_dir
    monkeypatch.setattr(gpt, "HF_URL", http_server.base + "/{repo}/{file}")
    http_server.serve("/openai-community/gpt2/config.json", (folder / "config.json").read_bytes())
    body = (folder / "model.safetensors").read_bytes()
    if safetensors_length is not None:
        body = body[:safetensors_length]
    http_server.serve("/openai-community/gpt2/model.safetensors", body)


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_download_weights_failure_says_what_to_do(http_server, monkeypatch, tmp_path):
    monkeypatch.setattr(gpt, "HF_URL", http_server.base + "/{repo}/{file}")  # all 404
    with pytest.raises(gpt.WeightsError) as e:
        gpt.download_weights("small", cache=tmp_path, retries=1, backoff=0, timeout=5)
    message = str(e.value)
    assert "could not download the small GPT-2 weights" in message
    assert "--weights DIR" in message and "--weights random" in message
    assert http_server.url("/openai-community/gpt2/config.json") in message
    assert files_in(tmp_path) == []


def test_load_gpt_preset_download_failure(http_server, monkeypatch, tmp_path):
    monkeypatch.setattr(files.time, "sleep", lambda seconds: None)  # no real back-off waits
    monkeypatch.setattr(gpt, "HF_URL", http_server.base + "/{repo}/{file}")
    with pytest.raises(gpt.WeightsError) as e:
        gpt.load_gpt("small", cache=tmp_path)
    assert "--weights DIR" in str(e.value) and "--weights random" in str(e.value)
    assert files_in(tmp_path) == []


def test_load_gpt_downloads_a_preset_once(http_server, monkeypatch, tiny_hf_dir, tmp_path,
                                          hf_ids):
    serve_tiny_weights(http_server, tiny_hf_dir, monkeypatch)
    model = gpt.load_gpt("small", cache=tmp_path).eval()
    assert files_in(tmp_path) == ["weights/gpt2/config.json", "weights/gpt2/model.safetensors"]
    assert sorted(http_server.requests) == ["/openai-community/gpt2/config.json",
                                            "/openai-community/gpt2/model.safetensors"]
    with torch.no_grad():
        assert_close(model(hf_ids), hf_logits(tiny_hf_dir[1], hf_ids), **TOL)

    http_server.httpd.routes.clear()  # from now on every request would fail
    again = gpt.load_gpt("GPT2", cache=tmp_path).eval()  # an alias of small, from the cache
    assert len(http_server.requests) == 2
    with torch.no_grad():
        assert_close(again(hf_ids), model(hf_ids), atol=0, rtol=0)


def test_download_weights_refuses_a_truncated_checkpoint(http_server, monkeypatch, tiny_hf_dir,
                                                         tmp_path):
    size = (tiny_hf_dir[0] / "model.safetensors").stat().st_size
    serve_tiny_weights(http_server, tiny_hf_dir, monkeypatch, safetensors_length=size - 100)
    with pytest.raises(gpt.WeightsError) as e:
        gpt.download_weights("small", cache=tmp_path, retries=1, backoff=0, timeout=5)
    assert f"{size - 100} bytes where the header describes {size}" in str(e.value)
    assert "--weights DIR" in str(e.value)
    # The complete config.json stays; the bad checkpoint leaves nothing behind.
    assert files_in(tmp_path) == ["weights/gpt2/config.json"]


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("plain", [False, True])
def test_attention_is_causal(plain):
    model = tiny_model(plain=plain)
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
        for t in (0, 7, 14):
            changed = x.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % 100
            after = model(changed)
            assert_close(after[:, :t + 1], before[:, :t + 1], **TOL)
            assert (after[:, t + 1] - before[:, t + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("plain", [False, True])
def test_without_causal_mask_the_future_is_seen(plain):
    model = tiny_model(replace(TINY, causal=False), plain=plain)
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 100
    with torch.no_grad():
        diff = (model(changed)[:, :8] - model(x)[:, :8]).abs()
    assert diff.amax(dim=-1).min() > 1e-4  # every earlier position of every row moved


@pytest.mark.parametrize("causal", [True, False])
def test_plain_and_fused_modules_agree(causal):
    cfg = replace(TINY, causal=causal)
    fused = tiny_model(cfg, plain=False)
    plain = gpt.GPTModel(cfg, plain=True).eval()
    state = fused.state_dict()
    assert not any(name.endswith("mask") for name in state)  # the mask is no weight
    plain.load_state_dict(state)
    x = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(plain(x), fused(x), **TOL)


def test_layer_norm_and_gelu_match_pytorch():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32) * 3 + 1
    ln = gpt.LayerNorm(32, plain=True)
    with torch.no_grad():
        ln.scale.normal_()
        ln.shift.normal_()
    assert_close(ln(x), nn.functional.layer_norm(x, (32,), ln.scale, ln.shift, 1e-5), **TOL)
    assert_close(gpt.GELU(plain=True)(x), nn.functional.gelu(x, approximate="tanh"), **TOL)


# ----------------------------------------------------------------------------- classifier

def test_setup_classifier_draws_the_head_after_the_seed():
    model = tiny_model()
    torch.manual_seed(123)
    gpt.setup_classifier(model)
    torch.manual_seed(123)
    expected = nn.Linear(32, 2)
    head = model.out_head
    assert isinstance(head, nn.Linear) and head.bias is not None
    assert (head.in_features, head.out_features) == (32, 2)
    assert torch.equal(head.weight, expected.weight) and torch.equal(head.bias, expected.bias)
    x = torch.randint(0, 100, (2, 5))
    assert model(x).shape == (2, 5, 2)
    assert gpt.setup_classifier(tiny_model(), num_classes=3).out_head.out_features == 3


def test_setup_classifier_trainable_sets():
    head = {"out_head.weight", "out_head.bias"}
    norm = {"final_norm.scale", "final_norm.shift"}
    model = classifier("last_layer")
    assert trainable_names(model) == head
    model = classifier("last_block")
    assert trainable_names(model) == head | norm | names_under(model, "trf_blocks.2.")
    model = classifier("last_two_blocks")
    assert trainable_names(model) == head | norm | names_under(model, "trf_blocks.2.") | \
        names_under(model, "trf_blocks.1.")
    assert names_under(model, "trf_blocks.1.") and not trainable_names(model) & \
        names_under(model, "trf_blocks.0.")
    model = classifier("all")
    assert trainable_names(model) == {name for name, _ in model.named_parameters()}

    model = classifier("lora")
    wrapped = [m for m in model.modules() if isinstance(m, gpt.LoRALinear)]
    assert len(wrapped) == 3 * 6 + 1  # q, k, v, out_proj, two feed-forward layers; the head
    assert isinstance(model.out_head, gpt.LoRALinear)
    bases = {id(m.base) for m in wrapped}
    assert all(id(m) in bases for m in model.modules() if type(m) is nn.Linear)
    trainable = trainable_names(model)
    assert trainable and all(name.endswith((".A", ".B")) for name in trainable)
    assert len(trainable) == 2 * len(wrapped)
    assert all(m.A.shape[1] == 16 and not m.B.any() for m in wrapped)

    with pytest.raises(ValueError, match="trainable must be one of"):
        gpt.setup_classifier(tiny_model(), trainable="everything")


def test_lora_starts_out_as_the_plain_classifier():
    x = padded_batch([12, 5, 9], 12)
    plain_head = classifier("last_layer")
    lora = classifier("lora")
    # The head is drawn before LoRA's matrices, so both models got the same head.
    assert torch.equal(lora.out_head.base.weight, plain_head.out_head.weight)
    with torch.no_grad():
        assert_close(lora(x)[:, -1], plain_head(x)[:, -1], **TOL)


def test_merge_lora_keeps_the_function():
    model = classifier("lora")
    x = padded_batch([12, 5, 9], 12)
    with torch.no_grad():
        start = model(x)
        for m in model.modules():
            if isinstance(m, gpt.LoRALinear):
                m.B.normal_(0, 0.1 / m.alpha)  # an update of size ~0.1 after scaling
        unmerged = model(x)
    assert (unmerged - start).abs().max() > 1e-3  # the updates matter
    gpt.merge_lora(model)
    assert not any(isinstance(m, gpt.LoRALinear) for m in model.modules())
    assert isinstance(model.out_head, nn.Linear) and model.out_head.bias is not None
    with torch.no_grad():
        assert_close(model(x), unmerged, **TOL)


def test_token_positions():
    p = gpt.PAD_ID
    x = torch.tensor([[5, 6, 7, p, p], [1, 2, 3, 4, 5], [p, p, p, p, p], [9, p, p, p, p]])
    assert gpt.token_positions(x, "last").tolist() == [4, 4, 4, 4]
    assert gpt.token_positions(x, "first").tolist() == [0, 0, 0, 0]
    flexible = gpt.token_positions(x, "flexible")
    assert flexible.tolist() == [2, 4, 0, 0] and flexible.dtype == torch.long
    assert gpt.token_positions(x, "flexible", pad_id=0).tolist() == [4, 4, 4, 4]  # no 0 in x
    with pytest.raises(ValueError, match="position must be"):
        gpt.token_positions(x, "middle")


def test_flexible_position_ignores_extra_padding():
    model = classifier("last_block")
    x10, x20 = padded_batch([6, 3], 10), padded_batch([6, 3], 20)
    assert torch.equal(x10, x20[:, :10])
    with torch.no_grad():
        short = gpt.classify_logits(model, x10, position="flexible", pad_id=PAD)
        long = gpt.classify_logits(model, x20, position="flexible", pad_id=PAD)
        assert_close(short, long, **TOL)
        # ... and equal the unpadded rows' last-token logits
        for i, n in enumerate([6, 3]):
            assert_close(short[i], model(x10[i:i + 1, :n])[0, -1], **TOL)
        last10 = gpt.classify_logits(model, x10, pad_id=PAD)
        last20 = gpt.classify_logits(model, x20, pad_id=PAD)
    assert (last10 - last20).abs().max() > 1e-4  # the chapter's last position does move


@pytest.mark.parametrize("plain", [False, True], ids=["fused", "plain"])
@pytest.mark.parametrize("position", ["last", "first", "flexible"])
@pytest.mark.parametrize("trainable, cached", [("last_block", 2), ("last_two_blocks", 1),
                                               ("last_layer", 3)])
def test_classify_logits_shortcuts_are_exact(trainable, cached, position, plain):
    model = classifier(trainable, plain=plain)
    x = padded_batch([12, 7, 1, 10], 12)
    rows = torch.arange(len(x))
    with torch.no_grad():
        full = model(x)
        expected = full[rows, gpt.token_positions(x, position, PAD)]
        if position == "last":
            assert torch.equal(expected, full[:, -1])
        assert_close(gpt.classify_logits(model, x, position, pad_id=PAD), expected, **TOL)
        assert_close(shortcuts.classify_logits(model, x, position, pad_id=PAD, tail=True), expected,
                     **TOL)
        trunk = shortcuts.TrunkCache(model)
        assert trunk.n_blocks == cached
        for tail in (False, True, False):  # the later calls read the cache
            got = shortcuts.classify_logits(model, x, position, pad_id=PAD, tail=tail, trunk=trunk)
            assert_close(got, expected, **TOL)
        assert len(trunk.store) == len(x)
        # a batch mixing cached and new rows
        mixed = torch.cat([x[:2], padded_batch([4, 9], 12, seed=2)])
        full_mixed = model(mixed)
        assert_close(shortcuts.classify_logits(model, mixed, position, pad_id=PAD, trunk=trunk),
                     full_mixed[rows, gpt.token_positions(mixed, position, PAD)], **TOL)
        assert len(trunk.store) == len(x) + 2


def test_classify_logits_average():
    model = classifier("last_block")
    x = padded_batch([12, 4], 12)
    with torch.no_grad():
        assert_close(gpt.classify_logits(model, x, average=True), model(x).mean(dim=1), **TOL)
        trunk = shortcuts.TrunkCache(model)
        assert_close(shortcuts.classify_logits(model, x, average=True, trunk=trunk),
                     model(x).mean(dim=1), **TOL)


def test_trunk_cache_gives_the_same_gradients():
    x = padded_batch([12, 7, 3], 12)
    y = torch.tensor([0, 1, 1])
    grads = []
    for use_cache in (False, True):
        model = classifier("last_block")
        trunk = shortcuts.TrunkCache(model) if use_cache else None
        loss = nn.functional.cross_entropy(
            shortcuts.classify_logits(model, x, tail=True, trunk=trunk), y)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], **TOL)


def test_trunk_cache_with_lora_caches_only_the_embeddings():
    model = classifier("lora")
    x = padded_batch([12, 6], 12)
    trunk = shortcuts.TrunkCache(model)
    assert trunk.n_blocks == 0
    with torch.no_grad():
        assert_close(shortcuts.classify_logits(model, x, trunk=trunk), model(x)[:, -1], **TOL)


def test_trunk_cache_refusals():
    torch.manual_seed(0)
    dropout = gpt.GPTModel(replace(TINY3, drop_rate=0.1))
    torch.manual_seed(123)
    gpt.setup_classifier(dropout, trainable="last_block")
    with pytest.raises(ValueError, match="drop_rate"):
        shortcuts.TrunkCache(dropout)
    with pytest.raises(ValueError, match="frozen embeddings"):
        shortcuts.TrunkCache(classifier("all"))


def test_trunk_cache_notices_changed_weights():
    x = padded_batch([12, 6], 12)
    model = classifier("last_block")
    trunk = shortcuts.TrunkCache(model)
    shortcuts.classify_logits(model, x, trunk=trunk)
    with torch.no_grad():
        model.trf_blocks[0].norm1.scale.add_(1)
    with pytest.raises(RuntimeError, match="stale"):
        shortcuts.classify_logits(model, x, trunk=trunk)

    model = classifier("last_block")
    trunk = shortcuts.TrunkCache(model)
    shortcuts.classify_logits(model, x, trunk=trunk)
    model.tok_emb.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="unfrozen or changed"):
        shortcuts.classify_logits(model, x, trunk=trunk)


# ----------------------------------------------------------------------------- generation

def test_generate_is_greedy_and_deterministic():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3], [40, 50, 60]])
    out = gpt.generate(model, idx, 4)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], idx)
    assert torch.equal(gpt.generate(model, idx, 4), out)
    by_hand = idx
    with torch.no_grad():
        for _ in range(4):
            nxt = model(by_hand)[:, -1].argmax(dim=-1, keepdim=True)
            by_hand = torch.cat([by_hand, nxt], dim=1)
    assert torch.equal(out, by_hand)
    assert torch.equal(gpt.generate(model, idx, 0), idx)


def test_generate_crops_to_the_context():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    out = gpt.generate(model, idx, 2, context_size=2)
    by_hand = idx
    with torch.no_grad():
        for _ in range(2):
            nxt = model(by_hand[:, -2:])[:, -1].argmax(dim=-1, keepdim=True)
            by_hand = torch.cat([by_hand, nxt], dim=1)
    assert torch.equal(out, by_hand)
    long = torch.randint(0, 100, (1, 40))  # longer than the context of 32: must not fail
    assert gpt.generate(model, long, 2).shape == (1, 42)


def test_cli_generates_with_a_weights_folder(tiny_hf_dir, capsys):
    folder, _ = tiny_hf_dir
    tok = data.get_tokenizer()
    # The tiny vocabulary has 100 ids; "!#" is [0, 2] in GPT-2's BPE ("!!" is one token, 3228).
    prompt = tok.encode("!#")
    assert prompt == [0, 2]
    gpt.main(["--weights", str(folder), "--prompt", "!#", "--max-new-tokens", "3",
              "--print-ids"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    ids = [int(i) for i in lines[1].split()]
    assert len(ids) == 3 and all(0 <= i < 100 for i in ids)
    expected = gpt.generate(gpt.load_gpt(folder).eval(), torch.tensor([prompt]), 3)[0]
    assert ids == expected[2:].tolist()
    assert lines[0] == tok.decode(expected.tolist())


@pytest.mark.parametrize("argv, message", [
    (["--weights", "/nonexistent"], "not a preset"),
    (["--weights", "random", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--weights", "random", "--prompt", ""], "--prompt is empty"),
])
def test_cli_errors_are_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        gpt.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error:")
    assert message in e.value.code
