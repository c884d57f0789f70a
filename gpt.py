"""GPT-2 from scratch, its pretrained weights, and the swap to a classification head.

The modules carry the chapter's names (tok_emb, trf_blocks, att.W_query, ff, norm1, out_head...),
so a reader holding chapter 6 finds every piece where the text puts it. Weights come in Hugging
Face format (config.json + model.safetensors) and are mapped onto these names by one table.

    python gpt.py --weights small --prompt "Every effort moves" --max-new-tokens 15
    python gpt.py --weights random --prompt "Hello" --max-new-tokens 5 --print-ids
"""

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    causal: bool = True  # False lets every position attend to every other (experiment 17)


# name: (config, Hugging Face repo of the OpenAI weights)
PRESETS = {
    "small": (GPTConfig(emb_dim=768, n_layers=12, n_heads=12), "openai-community/gpt2"),
    "medium": (GPTConfig(emb_dim=1024, n_layers=24, n_heads=16), "openai-community/gpt2-medium"),
    "large": (GPTConfig(emb_dim=1280, n_layers=36, n_heads=20), "openai-community/gpt2-large"),
    "xl": (GPTConfig(emb_dim=1600, n_layers=48, n_heads=25), "openai-community/gpt2-xl"),
}
ALIASES = {"gpt2": "small", "124m": "small", "gpt2-medium": "medium", "355m": "medium",
           "gpt2-large": "large", "774m": "large", "gpt2-xl": "xl", "1558m": "xl"}
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
PAD_ID = 50256  # <|endoftext|>, the pad token (data.PAD_ID; gpt.py imports nothing local)
TRAINABLE = ("last_layer", "last_block", "last_two_blocks", "all", "lora")


class WeightsError(Exception):
    """Weights that cannot be used; the message names the problem and what to do."""


# ----------------------------------------------------------------------------- modules
# `plain=True` keeps the chapter's explicit formulas (manual layer norm and GELU, explicit
# attention scores with a mask buffer). They are the benchmark baseline; the default uses
# PyTorch's fused kernels, which compute the same functions up to float rounding.

class LayerNorm(nn.Module):
    def __init__(self, emb_dim, plain=False):
        super().__init__()
        self.eps, self.plain = 1e-5, plain
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        if self.plain:
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased, as GPT-2 was trained
            return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with the tanh approximation GPT-2 uses."""

    def __init__(self, plain=False):
        super().__init__()
        self.plain = plain

    def forward(self, x):
        if self.plain:
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg, plain=False):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(plain),
                                    nn.Linear(4 * cfg.emb_dim, cfg.emb_dim))

    def forward(self, x):
        return self.layers(x)


def _has_amx():
    """Whether this CPU has AMX tiles (torch's own check; False where this torch lacks it)."""
    try:
        return bool(torch._C._cpu._init_amx())
    except (AttributeError, RuntimeError):
        return False


HAS_AMX = _has_amx()


def attention_backend(queries):
    """The context PyTorch's scaled_dot_product_attention runs in: its math backend when
    training in bf16 or fp16 on a CPU without AMX, where the CPU flash kernel's backward is the
    slower (GPT-2 small, 8 x 120 tokens, 2 cores of an AMD EPYC: 18.6 -> 13.3 ms per layer
    forward and backward; a bf16 training step with every layer trainable 1.09x quicker, the
    median of 6 pairs); otherwise PyTorch's own choice (on AMX its flash kernel uses the tiles;
    not measured here). The math backend computes the scores and softmax in fp32: the same
    function, rounded no worse."""
    if queries.device.type == "cpu" and queries.dtype in (torch.bfloat16, torch.float16) and \
            torch.is_grad_enabled() and queries.requires_grad and not HAS_AMX:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False,
                 causal=True, plain=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.causal, self.plain = causal, plain
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # Not persistent: the mask is no weight, and checkpoints stay free of it.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length),
                                                diagonal=1).bool(), persistent=False)

    def _heads(self, t):  # (B, T, d_out) -> (B, nh, T, hs)
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, query_pos=None):
        """x: (B, T, d_in). With `query_pos` (B,) only those positions attend (to all keys they
        may see) and the result is (B, 1, d_out); otherwise every position, (B, T, d_out)."""
        b, num_tokens, _ = x.shape
        keys, values = self._heads(self.W_key(x)), self._heads(self.W_value(x))  # (B, nh, T, hs)
        if query_pos is None:
            queries = self._heads(self.W_query(x))  # (B, nh, T, hs)
            hidden = self.mask[:num_tokens, :num_tokens] if self.causal else None  # (T, T)
        else:
            rows = torch.arange(b, device=x.device)
            queries = self._heads(self.W_query(x[rows, query_pos].unsqueeze(1)))  # (B, nh, 1, hs)
            hidden = None
            if self.causal:  # position p sees keys 0..p
                cols = torch.arange(num_tokens, device=x.device)
                hidden = (cols[None, :] > query_pos[:, None])[:, None, None, :]  # (B, 1, 1, T)
        if self.plain:
            attn_scores = queries @ keys.transpose(2, 3)  # (B, nh, Tq, T)
            if hidden is not None:
                attn_scores = attn_scores.masked_fill(hidden, -torch.inf)
            attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)
            context = self.dropout(attn_weights) @ values  # (B, nh, Tq, hs)
        else:
            p = self.dropout.p if self.training else 0.0
            with attention_backend(queries):
                if hidden is None or query_pos is not None:
                    mask = None if hidden is None else ~hidden
                    context = F.scaled_dot_product_attention(queries, keys, values,
                                                             attn_mask=mask, dropout_p=p)
                else:
                    context = F.scaled_dot_product_attention(queries, keys, values,
                                                             dropout_p=p, is_causal=True)
        context = context.transpose(1, 2).reshape(b, -1, self.d_out)  # (B, Tq, d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg, plain=False):
        super().__init__()
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length,
                                      cfg.drop_rate, cfg.n_heads, cfg.qkv_bias, cfg.causal, plain)
        self.ff = FeedForward(cfg, plain)
        self.norm1 = LayerNorm(cfg.emb_dim, plain)
        self.norm2 = LayerNorm(cfg.emb_dim, plain)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, query_pos=None):
        """(B, T, E) -> (B, T, E); with `query_pos` (B,), only those positions: (B, 1, E)."""
        if query_pos is None:
            shortcut = x
        else:
            shortcut = x[torch.arange(len(x), device=x.device), query_pos].unsqueeze(1)
        x = self.drop_shortcut(self.att(self.norm1(x), query_pos)) + shortcut
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg, plain=False):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, plain)
                                          for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, plain)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def embed(self, in_idx):
        """Token ids (B, T) -> the first block's input (B, T, E)."""
        pos = torch.arange(in_idx.shape[1], device=in_idx.device)
        return self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))

    def forward(self, in_idx):
        """Token ids (B, T) -> logits (B, T, vocab or classes)."""
        x = self.trf_blocks(self.embed(in_idx))
        return self.out_head(self.final_norm(x))


# ----------------------------------------------------------------------------- classification

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: W x + alpha * (x A B).

    The update is scaled by alpha alone, as in the book's appendix E (the LoRA paper divides by
    the rank too), so `--lora-alpha` means what the chapter's experiments table means by it.
    B starts at zero, so the wrapped layer starts out computing exactly what the base did.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, alpha
        self.A = nn.Parameter(torch.empty(base.in_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x):
        return self.base(x) + self.alpha * (x @ self.A @ self.B)

    def merged(self):
        """An nn.Linear computing the same function, for inference."""
        lin = nn.Linear(self.base.in_features, self.base.out_features,
                        bias=self.base.bias is not None).to(self.A)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.alpha * (self.A @ self.B).T)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def _swap_linears(module, make):
    for name, child in module.named_children():
        if isinstance(child, (nn.Linear, LoRALinear)):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def merge_lora(model):
    """Fold every LoRA update into its base weight (in place); returns the model."""
    _swap_linears(model, lambda m: m.merged() if isinstance(m, LoRALinear) else m)
    return model


def set_causal(model, causal):
    """Switch the causal mask on or off in every block (off: experiment 17)."""
    model.cfg = replace(model.cfg, causal=causal)
    for block in model.trf_blocks:
        block.att.causal = causal
    return model


def add_classification_head(model, num_classes=2):
    """Replace the vocabulary head by a `Linear(emb, num_classes)` with bias (draws torch's RNG)."""
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes)
    return model


def setup_classifier(model, num_classes=2, trainable="last_block", lora_rank=16, lora_alpha=16):
    """The chapter's classification set-up (section 6.5), in its order.

    Freeze every weight, put in a new class head (trainable: it is new), then unfreeze by policy:
    `last_layer` the head only; `last_block` also the last transformer block and the final norm
    (the chapter's default); `last_two_blocks` the last two blocks too; `all` everything; `lora`
    freezes even the head and wraps every linear layer in a trainable LoRA update.
    The caller seeds torch right before this: the head's (and LoRA's) initial values are drawn here.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, not {trainable!r}")
    for param in model.parameters():
        param.requires_grad = False
    add_classification_head(model, num_classes)
    unfrozen = {"last_layer": [], "last_block": [model.trf_blocks[-1], model.final_norm],
                "last_two_blocks": [*model.trf_blocks[-2:], model.final_norm],
                "all": [model], "lora": []}[trainable]
    for module in unfrozen:
        for param in module.parameters():
            param.requires_grad = True
    if trainable == "lora":
        for param in model.out_head.parameters():
            param.requires_grad = False
        _swap_linears(model, lambda m: LoRALinear(m, lora_rank, lora_alpha))
    return model


def token_positions(in_idx, position="last", pad_id=PAD_ID):
    """Which position each row is classified from: (B,) long.

    `last` is the chapter's `[:, -1]` (under right padding usually a pad token); `first` is 0;
    `flexible` is the last real token of each right-padded row.
    """
    b, t = in_idx.shape
    if position == "last":
        return torch.full((b,), t - 1, dtype=torch.long, device=in_idx.device)
    if position == "first":
        return torch.zeros(b, dtype=torch.long, device=in_idx.device)
    if position == "flexible":
        return ((in_idx != pad_id).sum(dim=1) - 1).clamp(min=0)
    raise ValueError(f"position must be last, first or flexible, not {position!r}")


def _weight_bias(linear):
    """(weight, bias) of an nn.Linear, or the effective ones of a LoRALinear (W + alpha (A B)^T,
    differentiable in A and B), so that F.linear(x, *_weight_bias(m)) computes m(x)."""
    if isinstance(linear, LoRALinear):
        return (linear.base.weight + linear.alpha * (linear.A @ linear.B).T, linear.base.bias)
    return linear.weight, linear.bias


def _normalised(norm, x):
    """A LayerNorm's input normalised, before its scale and shift: (x - mean) / sqrt(var + eps)."""
    if norm.plain:
        mean = x.mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + norm.eps)
    return F.layer_norm(x, x.shape[-1:], eps=norm.eps)


def block_at(block, x, pos):
    """A TransformerBlock's output at one position per row, (B, E), from its input (B, T, E).

    The same function as `block(x)[rows, pos]`, re-associated so that no key or value is formed:
    with xhat the first layer norm's normalised input, g and b its scale and shift, and q_h the
    query of head h at the classified position,
        score_h(t)  = xhat_t . (g * W_k^h^T q_h) / sqrt(d) + q_h . (W_k^h b + b_k^h) / sqrt(d)
                      (the second term is constant in t: the softmax cancels it)
        context_h   = ((sum_t p_h(t) xhat_t) * g + b) W_v^h^T + b_v^h   (the p_h(t) sum to 1).
    That costs O(T E H) per example instead of the O(T E^2) of keys and values at every
    position; autograd gives every gradient through these products. LoRA-wrapped projections
    enter with their effective weights. With dropout active (training, drop_rate > 0) the block
    runs as written.
    """
    att = block.att
    if block.training and (att.dropout.p > 0 or block.drop_shortcut.p > 0):
        return block(x, query_pos=pos)[:, 0]
    bsz, num_tokens, emb = x.shape
    heads, hs = att.num_heads, att.head_dim
    rows = torch.arange(bsz, device=x.device)
    g, b = block.norm1.scale, block.norm1.shift
    w_q, b_q = _weight_bias(att.W_query)
    w_k, b_k = _weight_bias(att.W_key)
    w_v, b_v = _weight_bias(att.W_value)
    xhat = _normalised(block.norm1, x)  # (B, T, E)
    query = F.linear(xhat[rows, pos] * g + b, w_q, b_q).view(bsz, heads, hs)  # (B, nh, hs)
    u = torch.einsum("bhd,hde->bhe", query, w_k.view(heads, hs, emb)) * (g / hs**0.5)
    scores = torch.einsum("bhe,bte->bht", u, xhat)  # (B, nh, T)
    # The terms constant in t (the keys' share of the shift b and the key bias) change no
    # weight, but they are kept so that every parameter gets the gradient the block gives it
    # (for b_k a float-rounding zero, which AdamW then treats as the chapter's code does).
    shift = F.linear(b, w_k, b_k).view(heads, hs)  # (nh, hs)
    scores = scores + (query * shift).sum(-1, keepdim=True) / hs**0.5
    if att.causal:  # position p sees keys 0..p
        cols = torch.arange(num_tokens, device=x.device)
        scores = scores.masked_fill((cols[None, :] > pos[:, None])[:, None, :], -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    mixed = torch.einsum("bht,bte->bhe", weights, xhat) * g + b  # (B, nh, E)
    context = torch.einsum("bhe,hde->bhd", mixed, w_v.view(heads, hs, emb))  # (B, nh, hs)
    if b_v is not None:
        context = context + b_v.view(heads, hs)
    h = att.out_proj(context.reshape(bsz, emb)) + x[rows, pos]  # (B, E)
    return h + block.ff(block.norm2(h))


def default_cache_bytes(device=None):
    """The trunk cache's default memory cap: a quarter of the device's memory (RAM on a CPU)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # not on every platform
        return 4 * 2**30


_PREPARED = weakref.WeakKeyDictionary()  # model -> {(n, dtype, oneDNN): (stamp, FrozenBlocks)}
_ONEDNN = {}  # dtype -> torch's oneDNN linear op where it works here, else None


def onednn_linear(dtype):
    """torch's oneDNN linear with a fused epilogue (`mkldnn::_linear_pointwise`, the op that
    torch.compile's CPU backend emits), for CPU tensors of `dtype`; None where this build of
    torch lacks it, or it disagrees with F.linear, or (bf16) the CPU lacks oneDNN's bf16 support.
    Why: on some CPUs (AMD's, for one) F.linear in fp32 goes to MKL at half oneDNN's speed, and
    the fused GELU and residual add save whole passes over the activations."""
    if dtype not in _ONEDNN:
        _ONEDNN[dtype] = None
        try:
            op = torch.ops.mkldnn._linear_pointwise
            if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                raise RuntimeError("no bf16 support")
            gen = torch.Generator().manual_seed(0)  # never the global generator: runs are seeded
            x, w, b, y = (torch.randn(*shape, generator=gen).to(dtype)
                          for shape in ((3, 8), (5, 8), (5,), (3, 5)))
            z = F.linear(x, w, b)
            tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else \
                dict(rtol=1e-2, atol=1e-2)
            if torch.allclose(op(x, w, b, "none", [], "").float(), z.float(), **tol) and \
                    torch.allclose(op(x, w, b, "gelu", [], "tanh").float(),
                                   F.gelu(z.float(), approximate="tanh"), **tol) and \
                    torch.allclose(op.binary(x, y, w, b, "add").float(), (z + y).float(), **tol):
                _ONEDNN[dtype] = op
        except (AttributeError, RuntimeError):  # not in this build, or not for this dtype
            pass
    return _ONEDNN[dtype]


class FrozenBlock:
    """A frozen TransformerBlock's forward for inference, its weights prepared once in `dtype`:
    query, key and value stacked into one matrix (one product instead of three), every linear
    weight cast once. On a CPU where torch's oneDNN linear works (`onednn_linear`), the GELU is
    fused into the first feed-forward product and, in fp32, each residual add into the product
    before it. The residual stream stays in fp32 as under autocast (which runs the layer norms
    in fp32 and the products in `dtype`): the same function as `block(x)` under autocast, up to
    float rounding. No dropout (the trunk cache needs it off)."""

    def __init__(self, block, dtype, device, onednn=True):
        att = block.att
        self.dtype, self.causal = dtype, att.causal
        self.heads = att.num_heads

        def cast(t):
            return None if t is None else t.detach().to(device=device, dtype=dtype)
        self.qkv = cast(torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight]))
        biases = [att.W_query.bias, att.W_key.bias, att.W_value.bias]
        self.qkv_bias = None if biases[0] is None else cast(torch.cat(biases))
        self.out, self.out_bias = cast(att.out_proj.weight), cast(att.out_proj.bias)
        fc, proj = block.ff.layers[0], block.ff.layers[2]
        self.fc, self.fc_bias = cast(fc.weight), cast(fc.bias)
        self.proj, self.proj_bias = cast(proj.weight), cast(proj.bias)
        self.norms = [(n.scale.detach(), n.shift.detach(), n.eps)
                      for n in (block.norm1, block.norm2)]
        cpu = torch.device(device).type == "cpu"
        self.op = onednn_linear(dtype) if onednn and cpu else None

    def _norm(self, x, i):
        scale, shift, eps = self.norms[i]
        return F.layer_norm(x, x.shape[-1:], scale, shift, eps).to(self.dtype)

    def _linear(self, x, w, b, gelu=False):
        if self.op is not None:
            return self.op(x, w, b, "gelu" if gelu else "none", [], "tanh" if gelu else "")
        y = F.linear(x, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y

    def _add_linear(self, x, residual, w, b):
        """residual + x W^T + b, in the residual's dtype (fp32)."""
        if self.op is not None and self.dtype == residual.dtype:
            return self.op.binary(x, residual, w, b, "add")
        return residual + self._linear(x, w, b)

    def __call__(self, x):
        """(B, T, E) fp32 -> (B, T, E) fp32."""
        bsz, num_tokens, emb = x.shape
        qkv = self._linear(self._norm(x, 0), self.qkv, self.qkv_bias)  # (B, T, 3E)
        q, k, v = (t.view(bsz, num_tokens, self.heads, -1).transpose(1, 2)
                   for t in qkv.split(emb, dim=-1))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        context = context.transpose(1, 2).reshape(bsz, num_tokens, emb)
        x = self._add_linear(context, x, self.out, self.out_bias)
        hidden = self._linear(self._norm(x, 1), self.fc, self.fc_bias, gelu=True)
        return self._add_linear(hidden, x, self.proj, self.proj_bias)


def prepared_blocks(model, n_blocks, dtype, onednn=True):
    """The model's first `n_blocks` blocks as FrozenBlocks in `dtype`, prepared once per model,
    weights and precision (held while the model lives), and again once a weight has changed."""
    blocks = model.trf_blocks[:n_blocks]
    stamp = tuple((p.data_ptr(), p._version) for block in blocks for p in block.parameters())
    held = _PREPARED.setdefault(model, {})
    key = (n_blocks, dtype, onednn)
    if held.get(key, (None,))[0] != stamp:
        device = next(model.parameters()).device
        held[key] = stamp, [FrozenBlock(block, dtype, device, onednn) for block in blocks]
    return held[key][1]


def preparable(model):
    """Whether FrozenBlocks compute what the model's blocks compute: no dropout at work, the
    fused kernels (not the chapter's plain formulas), no LoRA-wrapped layer."""
    blocks = model.trf_blocks
    return (not model.training or model.cfg.drop_rate == 0) and not blocks[0].att.plain and \
        not any(isinstance(m, LoRALinear) for m in blocks.modules())


def run_prepared(model, x, n_blocks, onednn=True):
    """`model.trf_blocks[:n_blocks](x)` through FrozenBlocks, for inference (no gradient), in
    the autocast precision if on (else x's): the same function up to float rounding, faster."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.no_grad(), torch.autocast(device, enabled=False):  # FrozenBlock casts as autocast
        for block in prepared_blocks(model, n_blocks, dtype, onednn):
            x = block(x)
    return x


class TrunkCache:
    """Outputs of the model's frozen leading part (embeddings + first k blocks), per example.

    With dropout off and those weights frozen, that part's output depends on the token ids alone,
    so it is computed once per distinct example (lazily, when first seen) and reused by every
    later step and evaluation. Refused when dropout is on; raises if a cached weight changes.

    Under the causal mask a row's outputs at its first L positions do not depend on what follows
    them, so with right padding (`pad_id`) an example is keyed by its ids without the trailing
    padding: the same text padded to 120 and to 90 tokens shares one entry (the longest padding
    seen is kept; a shorter one reads its prefix). Without the causal mask the whole padded row
    is the key. Entries are stored in the dtype the fill computes in (bf16 under bf16 autocast)
    and handed back in the model's dtype. `max_bytes` caps the store (default: a quarter of the
    device's
    memory); past it, new examples are computed each time they are read, and `on_full` (if
    given) is called once with a message saying so. The frozen blocks run as `FrozenBlock`s,
    prepared once per model, weights and precision (weights cast once instead of by autocast on
    every call, Q/K/V in one product, oneDNN's fused GELU and adds on a CPU); `prepare=False`
    runs the blocks as written (under autocast if on), `onednn=False` prepares them without
    oneDNN: the benchmarks' before and after.
    """

    def __init__(self, model, pad_id=PAD_ID, max_bytes=None, on_full=None, prepare=True,
                 onednn=True):
        if model.cfg.drop_rate != 0:
            raise ValueError("the frozen-trunk cache needs drop_rate 0: with dropout the "
                             "frozen blocks' outputs are random")
        frozen = [model.tok_emb, model.pos_emb]
        if any(p.requires_grad for m in frozen for p in m.parameters()):
            raise ValueError("the frozen-trunk cache needs frozen embeddings; nothing to cache")
        self.n_blocks = 0
        for block in model.trf_blocks:
            if any(p.requires_grad for p in block.parameters()):
                break
            frozen.append(block)
            self.n_blocks += 1
        if any(isinstance(m, LoRALinear) for b in frozen for m in b.modules()):
            raise ValueError("the frozen-trunk cache cannot cover LoRA-wrapped layers")
        self.model, self.pad_id = model, pad_id
        self.params = [p for m in frozen for p in m.parameters()]
        self.versions = [p._version for p in self.params]  # bumped by every in-place change
        self.store = {}  # key -> the cached part's output for that example, (T', E)
        self.max_bytes = default_cache_bytes(self.params[0].device) if max_bytes is None \
            else max_bytes
        self.bytes, self.uncached, self.on_full = 0, set(), on_full
        self.prepare, self.onednn = prepare, onednn

    @property
    def causal(self):
        return all(block.att.causal for block in self.model.trf_blocks[:self.n_blocks])

    @property
    def partial(self):
        """Whether some example went unstored for want of room."""
        return bool(self.uncached)

    def key(self, row):
        """The store's key of one row of token ids (a numpy array)."""
        if self.causal:  # drop the trailing padding: a shorter padding is a prefix of a longer
            real = (row != self.pad_id).nonzero()[0]
            row = row[:real[-1] + 1] if len(real) else row[:0]
        return row.tobytes()

    def _check(self):
        if any(p.requires_grad for p in self.params) or \
                [p._version for p in self.params] != self.versions:
            raise RuntimeError("a weight under the frozen-trunk cache was unfrozen or changed; "
                               "the cached outputs are stale")

    def compute(self, in_idx):
        """The cached part's output for token ids (B, T), computed now (nothing stored)."""
        self._check()
        blocks = self.model.trf_blocks[:self.n_blocks]
        with torch.no_grad():
            x = self.model.embed(in_idx)
            if self.prepare and len(blocks) and not blocks[0].att.plain:
                # prepared once per run: a later cache over the same frozen weights (the run's,
                # after the look before training) reuses them
                x = run_prepared(self.model, x, self.n_blocks, self.onednn)
            else:
                for block in blocks:
                    x = block(x)
        return x

    def fill(self, rows, batch_size=32, progress=None):
        """Compute and store, in batches of `batch_size`, each of `rows` (1-D token ids, any
        lengths) not stored yet: the examples a run will read, ahead of time, in batches larger
        than the loop's (larger matrix products run nearer the machine's peak). Each is padded
        to the longest row given, so any padding a loader gives it later reads a prefix. Only
        under the causal mask (otherwise the padding is part of the key, and the loop fills).
        Stops where the store is full. `progress` wraps the batches (a progress bar).
        Returns the number of examples computed."""
        if not self.causal:
            return 0
        pending = {}
        for row in rows:
            row = torch.as_tensor(row)
            key = self.key(row.cpu().numpy())
            if key not in self.store and key not in pending:
                pending[key] = row
        if not pending:
            return 0
        width = max(len(row) for row in pending.values())
        items = list(pending.items())
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        done = 0
        device = self.params[0].device
        for chunk in (progress(chunks) if progress else chunks):
            if self.uncached:
                break
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for j, (_, row) in enumerate(chunk):
                ids[j, :len(row)] = row
            computed = self.compute(ids.to(device))
            dtype = self._store_dtype(device.type, computed)
            for (key, _), row in zip(chunk, computed):
                self._put(key, row.to(dtype))
            done += len(chunk)
        return done

    @staticmethod
    def _store_dtype(device_type, computed):
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return computed.dtype

    def __call__(self, in_idx):
        """Token ids (B, T) -> the output of the cached part, (B, T, E), in the model's dtype."""
        self._check()
        num_tokens = in_idx.shape[1]
        keys = [self.key(row) for row in in_idx.cpu().numpy()]
        rows, missing = [None] * len(keys), []
        for i, k in enumerate(keys):
            hit = self.store.get(k)
            if hit is not None and len(hit) >= num_tokens:
                rows[i] = hit[:num_tokens]
            else:
                missing.append(i)
        if missing:
            computed = self.compute(in_idx[missing])
            dtype = self._store_dtype(in_idx.device.type, computed)
            for i, row in zip(missing, computed):  # read as later reads will read it
                rows[i] = row.to(dtype)
                self._put(keys[i], rows[i])
        return torch.stack(rows).to(self.params[0].dtype)  # the model's dtype

    def _put(self, key, value):
        size = value.numel() * value.element_size()
        old = self.store.get(key)
        held = 0 if old is None else old.numel() * old.element_size()
        if self.bytes - held + size > self.max_bytes:
            if not self.uncached and self.on_full is not None:
                self.on_full(f"frozen-trunk cache partial: full at {self.bytes / 2**20:,.0f} MiB "
                             f"({len(self.store):,} examples); further new examples are "
                             "computed each time they are read (--trunk-cache-gb raises the cap)")
            self.uncached.add(key)
            return
        self.store[key] = value.clone()  # a view would keep the whole batch's tensor alive
        self.bytes += size - held
        self.uncached.discard(key)


def classify_logits(model, in_idx, position="last", average=False, pad_id=PAD_ID,
                    tail=False, trunk=None, prepared=False):
    """Class logits (B, C) for token ids (B, T): the classifier's whole forward pass.

    The chapter's `model(in_idx)[:, -1, :]` by default. `average` classifies the mean of all
    positions' outputs. Two exact shortcuts: `trunk` (a TrunkCache) supplies the frozen part's
    output; `tail` runs the last block only at the classified position (`block_at`: in O(T E H),
    no keys or values formed), since no other position of its output is read. `prepared`: for
    inference (no gradient), the blocks before the last one through FrozenBlocks
    (`run_prepared`), where they allow it.
    """
    if trunk is not None:
        x, blocks = trunk(in_idx), model.trf_blocks[trunk.n_blocks:]
    elif prepared and not torch.is_grad_enabled() and preparable(model):
        n = len(model.trf_blocks) - 1
        x, blocks = run_prepared(model, model.embed(in_idx), n), model.trf_blocks[n:]
    else:
        x, blocks = model.embed(in_idx), model.trf_blocks
    if average:
        return model.out_head(model.final_norm(blocks(x))).mean(dim=1)
    pos = token_positions(in_idx, position, pad_id)
    if tail and len(blocks):
        x = block_at(blocks[-1], blocks[:-1](x), pos)  # (B, E)
    else:
        x = blocks(x)[torch.arange(len(x), device=x.device), pos]  # (B, E)
    return model.out_head(model.final_norm(x))


class Classifier(nn.Module):
    """A GPTModel with a class head, as a module whose forward gives class logits (B, C).

    Holds the choices of `classify_logits` and, when `autocast_dtype` is set (bf16 or fp16),
    runs under autocast on the input's device; the logits come back in float32 either way.
    """

    def __init__(self, gpt, position="last", average=False, pad_id=PAD_ID, tail=False,
                 trunk=None, autocast_dtype=None, prepared=False):
        super().__init__()
        self.gpt = gpt
        self.position, self.average, self.pad_id = position, average, pad_id
        self.tail, self.trunk, self.autocast_dtype = tail, trunk, autocast_dtype
        self.prepared = prepared

    def autocast(self, device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def prefill(self, rows, batch_size=32, progress=None):
        """Fill the trunk cache with `rows` ahead of time (`TrunkCache.fill`), in the precision
        the forward pass runs in; nothing without a cache. Returns the examples computed."""
        if self.trunk is None:
            return 0
        with self.autocast(self.trunk.params[0].device):
            return self.trunk.fill(rows, batch_size, progress)

    def forward(self, in_idx):
        amp = self.autocast(in_idx.device)
        with amp:
            logits = classify_logits(self.gpt, in_idx, self.position, self.average, self.pad_id,
                                     self.tail, self.trunk, self.prepared)
        return logits.float()


# ----------------------------------------------------------------------------- weights

# Our name <- the checkpoint's name (after any "transformer." prefix is dropped), and how.
# GPT-2 stores its linear layers as Conv1D, [in, out], so they are transposed for nn.Linear ("T");
# c_attn holds query, key and value stacked along the output dim, split here ("q", "k", "v").
HF_NAMES = [
    ("tok_emb.weight", "wte.weight", ""),
    ("pos_emb.weight", "wpe.weight", ""),
    ("trf_blocks.{i}.norm1.scale", "h.{i}.ln_1.weight", ""),
    ("trf_blocks.{i}.norm1.shift", "h.{i}.ln_1.bias", ""),
    ("trf_blocks.{i}.att.W_query.weight", "h.{i}.attn.c_attn.weight", "qT"),
    ("trf_blocks.{i}.att.W_key.weight", "h.{i}.attn.c_attn.weight", "kT"),
    ("trf_blocks.{i}.att.W_value.weight", "h.{i}.attn.c_attn.weight", "vT"),
    ("trf_blocks.{i}.att.W_query.bias", "h.{i}.attn.c_attn.bias", "q"),
    ("trf_blocks.{i}.att.W_key.bias", "h.{i}.attn.c_attn.bias", "k"),
    ("trf_blocks.{i}.att.W_value.bias", "h.{i}.attn.c_attn.bias", "v"),
    ("trf_blocks.{i}.att.out_proj.weight", "h.{i}.attn.c_proj.weight", "T"),
    ("trf_blocks.{i}.att.out_proj.bias", "h.{i}.attn.c_proj.bias", ""),
    ("trf_blocks.{i}.norm2.scale", "h.{i}.ln_2.weight", ""),
    ("trf_blocks.{i}.norm2.shift", "h.{i}.ln_2.bias", ""),
    ("trf_blocks.{i}.ff.layers.0.weight", "h.{i}.mlp.c_fc.weight", "T"),
    ("trf_blocks.{i}.ff.layers.0.bias", "h.{i}.mlp.c_fc.bias", ""),
    ("trf_blocks.{i}.ff.layers.2.weight", "h.{i}.mlp.c_proj.weight", "T"),
    ("trf_blocks.{i}.ff.layers.2.bias", "h.{i}.mlp.c_proj.bias", ""),
    ("final_norm.scale", "ln_f.weight", ""),
    ("final_norm.shift", "ln_f.bias", ""),
]
# In the checkpoint but no weight of ours: causal-mask buffers, and the head tied to wte.
HF_IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def _convert(t, how):
    if how[:1] in ("q", "k", "v"):
        n = t.shape[-1] // 3
        j = "qkv".index(how[0])
        t = t[..., j * n:(j + 1) * n]
        how = how[1:]
    return t.T if how == "T" else t


def config_from_hf(path):
    """GPTConfig from a Hugging Face GPT-2 `config.json`."""
    try:
        c = json.loads(Path(path).read_text())
        return GPTConfig(vocab_size=c["vocab_size"], context_length=c["n_positions"],
                         emb_dim=c["n_embd"], n_layers=c["n_layer"], n_heads=c["n_head"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path} is not a GPT-2 config.json ({type(e).__name__}: {e})") from e


def nonfinite(tensors):
    """Names of the floating-point tensors in `tensors` (a dict) holding a NaN or an infinity.

    One check over all of them (a single device sync), then a second pass only to name the bad."""
    floats = {k: t for k, t in tensors.items() if t.is_floating_point() and t.numel()}
    if not floats or torch.stack([torch.isfinite(t).all() for t in floats.values()]).all():
        return []
    return [k for k, t in floats.items() if not torch.isfinite(t).all()]


def read_tensors(path, fix="delete it and download or save it again"):
    """All tensors of a safetensors file, refused (WeightsError) where it cannot be read or a
    tensor holds NaN or infinite values: garbage bytes under an intact header would otherwise
    load and classify everything with NaN probabilities."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); {fix}") from e
    bad = nonfinite(tensors)
    if bad:
        raise WeightsError(f"{path} is damaged: tensor {_names(bad, 3)} holds NaN or infinite "
                           f"values; {fix}")
    return tensors


def read_safetensors(path):
    """All tensors of a Hugging Face safetensors file, names without any `transformer.` prefix."""
    return {k.removeprefix("transformer."): v for k, v in read_tensors(path).items()}


def load_hf_weights(model, tensors):
    """Copy Hugging Face GPT-2 tensors into `model` in place, checking names and shapes."""
    n_layers = model.cfg.n_layers
    plan = {ours.format(i=i): (theirs.format(i=i), how) for ours, theirs, how in HF_NAMES
            for i in (range(n_layers) if "{i}" in ours else [0])}
    expected = {theirs for theirs, _ in plan.values()}
    given = {k for k in tensors if not k.endswith(HF_IGNORED)}
    _check_width(model.cfg, tensors)
    problems = []
    if expected - given:
        problems.append("missing " + _names(expected - given))
    if given - expected:
        problems.append("unexpected " + _names(given - expected))
    own = dict(model.named_parameters())
    converted, shapes = {}, []
    for ours, (theirs, how) in plan.items():
        if theirs in tensors:
            t = _convert(tensors[theirs], how)
            if t.shape != own[ours].shape:
                shapes.append(f"{theirs} has shape {tuple(tensors[theirs].shape)}, which does "
                              f"not fit {ours} {tuple(own[ours].shape)}")
            converted[ours] = t
    problems += shapes[:3] + ([f"{len(shapes) - 3} more tensors do not fit"]
                              if len(shapes) > 3 else [])
    if problems:
        raise WeightsError("the checkpoint does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for ours, t in converted.items():
            own[ours].copy_(t)
    model.out_head.weight = model.tok_emb.weight  # GPT-2 ties its output head to wte
    return model


def _check_width(cfg, tensors):
    """Refuse, in one sentence, weights of another width than config.json describes (every
    tensor would be named otherwise)."""
    wte = tensors.get("wte.weight")
    if wte is not None and wte.ndim == 2 and wte.shape[1] != cfg.emb_dim:
        raise WeightsError(f"the checkpoint does not fit the model: config.json describes a "
                           f"model of width {cfg.emb_dim} (n_embd), the weights have width "
                           f"{wte.shape[1]} (wte.weight {tuple(wte.shape)}); config.json and "
                           "model.safetensors come from different models: put the matching "
                           "pair in the folder")


def _names(keys, limit=6):
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_safetensors(path):
    """Refuse a truncated or foreign file: the header must describe exactly the bytes present."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError("file too short for safetensors")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n)) if n < size else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise WeightsError("no safetensors header")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + n + end != size:
        raise WeightsError(f"{size} bytes where the header describes {8 + n + end}")


def download_weights(name, cache=None, **download_kw):
    """Folder holding a preset's config.json and model.safetensors, downloaded once."""
    from data import DataError, cache_dir, download_file  # the one downloader

    _, repo = PRESETS[name]
    folder = (Path(cache) if cache else cache_dir()) / "weights" / repo.split("/")[-1]
    for file, check in (("config.json", lambda p: config_from_hf(p)),
                        ("model.safetensors", _check_safetensors)):
        if not (folder / file).is_file():
            def checked(p, check=check):
                try:
                    check(p)
                except WeightsError as e:
                    raise DataError(str(e)) from e
            try:
                download_file([HF_URL.format(repo=repo, file=file)], folder / file,
                              check=checked, **download_kw)
            except DataError as e:
                raise WeightsError(f"could not download the {name} GPT-2 weights ({e}); "
                                   "pass --weights DIR (a folder with config.json and "
                                   "model.safetensors) or --weights random") from e
    return folder


def is_random(weights):
    """True for `random` and `random-medium`, `random-large`, `random-xl`."""
    name = str(weights).lower()
    return name == "random" or name.startswith("random-") and name[7:] in PRESETS


def weights_folder(weights, cache=None):
    """The Hugging Face-format folder of a preset (downloaded once) or a folder given as is."""
    name = ALIASES.get(str(weights).lower(), str(weights).lower())
    if name in PRESETS:
        folder = download_weights(name, cache)
    else:
        folder = Path(weights)
        if not folder.is_dir():
            raise WeightsError(f"--weights {weights}: not a preset ({', '.join(PRESETS)}, random) "
                               "nor a folder with config.json and model.safetensors")
    for file in ("config.json", "model.safetensors"):
        if not (folder / file).is_file():
            raise WeightsError(f"{folder} has no {file}; a weights folder holds config.json and "
                               "model.safetensors (Hugging Face format)")
    return folder


def load_gpt(weights="small", cache=None, plain=False):
    """A GPTModel from a preset name (downloaded), a Hugging Face-format folder, or random init.

    `random` is a small-sized model with PyTorch's default initialisation (`random-medium`,
    `random-large`, `random-xl` for the other sizes); the caller seeds torch first.
    """
    if is_random(weights):
        name = str(weights).lower()
        return GPTModel(PRESETS[name[7:] or "small"][0], plain=plain)
    folder = weights_folder(weights, cache)
    model = GPTModel(config_from_hf(folder / "config.json"), plain=plain)
    load_hf_weights(model, read_safetensors(folder / "model.safetensors"))
    name = ALIASES.get(str(weights).lower(), str(weights).lower())
    # Where the weights came from, for base_identity: random weights have no such record.
    model.source = {"weights": name if name in PRESETS else str(folder.resolve()),
                    "file": str(folder / "model.safetensors")}
    return model


def file_sha256(path):
    """The sha256 of a file, read in 1 MiB pieces (a 6 GB checkpoint never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def base_identity(model):
    """What a run needs to find the weights `model` was loaded from again: {"weights": the
    preset's name or the folder's absolute path, "sha256": of its model.safetensors}; None for
    random weights (made by load_gpt with no `source`), which cannot be found again."""
    source = getattr(model, "source", None)
    if source is None:
        return None
    return {"weights": source["weights"], "sha256": file_sha256(source["file"])}


def load_base(model, base, cache=None):
    """Load into `model` the very base weights named by `base` (from `base_identity`): a preset
    is downloaded again if the cache lost it; a folder must still be where it was. Raises
    WeightsError when they are gone or their sha256 differs (other weights would silently give
    other numbers)."""
    name = base["weights"]
    if name in PRESETS:
        try:
            folder = download_weights(name, cache)
        except WeightsError as e:
            raise WeightsError(f"its base weights, OpenAI's GPT-2 {name}, are not in the cache "
                               f"and could not be downloaded ({e.__cause__ or e})") from e
    else:
        folder = Path(name)
    file = folder / "model.safetensors"
    if not file.is_file():
        raise WeightsError(f"its base weights {file} are gone; put that folder back where it "
                           "was")
    digest = file_sha256(file)
    if digest != base["sha256"]:
        raise WeightsError(f"its base weights {file} are not the ones it was trained from "
                           f"(sha256 {digest[:12]}..., where the run recorded "
                           f"{base['sha256'][:12]}...); put the original file back")
    return load_hf_weights(model, read_safetensors(file))


def config_from_dict(d):
    return replace(GPTConfig(), **d)


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size=None):
    """Greedy decoding: append the most likely next token `max_new_tokens` times. idx: (B, T)."""
    context_size = context_size or model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]  # (B, vocab)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def main(argv=None):
    from data import get_tokenizer

    p = argparse.ArgumentParser(description="Greedy text generation with GPT-2: the chapter's "
                                "sanity check that the pretrained weights loaded correctly.")
    p.add_argument("--weights", default="small", metavar="NAME|DIR|random",
                   help="small, medium, large or xl (downloaded once into the cache), a folder "
                   "with config.json and model.safetensors, or random, random-medium, "
                   "random-large, random-xl (random weights of that size) (default: small)")
    p.add_argument("--prompt", default="Every effort moves", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=15, help="tokens to generate")
    p.add_argument("--print-ids", action="store_true",
                   help="also print the generated token ids on one line, space-separated")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        sys.exit("error: --max-new-tokens must be 0 or more")
    if not args.prompt:
        sys.exit("error: --prompt is empty; give some text to continue")
    tokenizer = get_tokenizer()
    torch.manual_seed(123)  # the initial weights, where they are random
    try:
        model = load_gpt(args.weights).eval()
    except WeightsError as e:
        sys.exit(f"error: {e}")
    prompt = tokenizer.encode(args.prompt)[-model.cfg.context_length:]
    out = generate(model, torch.tensor([prompt]), args.max_new_tokens)[0].tolist()
    print(tokenizer.decode(out))
    if args.print_ids:
        print(" ".join(map(str, out[len(prompt):])))


if __name__ == "__main__":
    main()
