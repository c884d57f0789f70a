"""GPT-2 from scratch, its pretrained weights, and the swap to a classification head.

The modules carry the chapter's names (tok_emb, trf_blocks, att.W_query, ff, norm1, out_head...),
so a reader holding chapter 6 finds every piece where the text puts it. Weights come in Hugging
Face format (config.json + model.safetensors) and are mapped onto these names by one table.

    python gpt.py --weights small --prompt "Every effort moves" --max-new-tokens 15
    python gpt.py --weights random --prompt "Hello" --max-new-tokens 5 --print-ids
"""

import argparse
import json
import math
import os
import struct
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import files


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
PAD_ID = data.PAD_ID  # <|endoftext|>, the pad token: the tokenizer's (data.py)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes
TRAINABLE = ("last_layer", "last_block", "last_two_blocks", "all", "lora")


class WeightsError(Exception):
    """Weights that cannot be used; the message names the problem and what to do."""


# ----------------------------------------------------------------------------------------- modules
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


# Devices whose attention kernels get their queries, keys and values contiguous: on MPS,
# transposed (non-contiguous) ones met wrong results at head size 64 in recent torch releases.
CONTIGUOUS_HEADS = {"mps"}


def heads_layout(t):
    """A (B, nh, T, hs) view, made contiguous on the devices of CONTIGUOUS_HEADS."""
    return t.contiguous() if t.device.type in CONTIGUOUS_HEADS else t


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
        return heads_layout(t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2))

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


# ---------------------------------------------------------------------------------- classification

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


def classify_logits(model, in_idx, position="last", average=False, pad_id=PAD_ID):
    """Class logits (B, C) for token ids (B, T): the classifier's whole forward pass.

    The chapter's line by default: the logits at the last position. `position` first or
    flexible (the last real token of each right-padded row) picks another position per row;
    `average` classifies the mean of all positions' outputs. shortcuts.classify_logits computes
    the same numbers faster (a Classifier's seam).
    """
    if average:
        return model(in_idx).mean(dim=1)
    if position == "last":
        return model(in_idx)[:, -1, :]  # the chapter's line: the last output token
    x = model.trf_blocks(model.embed(in_idx))  # (B, T, E)
    x = x[torch.arange(len(x), device=x.device), token_positions(in_idx, position, pad_id)]
    return model.out_head(model.final_norm(x))  # (B, C)


class Classifier(nn.Module):
    """A GPTModel with a class head, as a module whose forward gives class logits (B, C).

    Holds the choices of `classify_logits` and, when `autocast_dtype` is set (bf16 or fp16),
    runs under autocast on the input's device; the logits come back in float32 either way.
    `shortcuts` is the one seam for speed (a shortcuts.Shortcuts): where given, its
    `classify_logits` computes the logits instead of the chapter's, to the same numbers.
    """

    def __init__(self, gpt, position="last", average=False, pad_id=PAD_ID, autocast_dtype=None,
                 shortcuts=None):
        super().__init__()
        self.gpt = gpt
        self.position, self.average, self.pad_id = position, average, pad_id
        self.autocast_dtype, self.shortcuts = autocast_dtype, shortcuts

    def autocast(self, device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def forward(self, in_idx):
        logits_of = classify_logits if self.shortcuts is None else self.shortcuts.classify_logits
        with self.autocast(in_idx.device):
            logits = logits_of(self.gpt, in_idx, self.position, self.average, self.pad_id)
        return logits.float()


# ----------------------------------------------------------------------------- LoRA, causal switch

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


# ----------------------------------------------------------------------------------------- weights

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
    """Copy Hugging Face GPT-2 tensors into `model` in place, checking names and shapes (the
    chapter's `load_weights_into_gpt`, from the checkpoint's own names: HF_NAMES)."""
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
    _, repo = PRESETS[name]
    folder = (Path(cache) if cache else files.cache_dir()) / "weights" / repo.split("/")[-1]
    for file, check in (("config.json", lambda p: config_from_hf(p)),
                        ("model.safetensors", _check_safetensors)):
        if not (folder / file).is_file():
            def checked(p, check=check):
                try:
                    check(p)
                except WeightsError as e:
                    raise data.DataError(str(e)) from e
            try:
                files.download_file([HF_URL.format(repo=repo, file=file)], folder / file,
                                    check=checked, **download_kw)
            except data.DataError as e:
                raise WeightsError(f"could not download the {name} GPT-2 weights ({e}); "
                                   "pass --weights DIR (a folder with config.json and "
                                   "model.safetensors) or --weights random") from e
    return folder


def is_random(weights):
    """True for `random` and `random-medium`, `random-large`, `random-xl`."""
    name = str(weights).lower()
    return name == "random" or name.startswith("random-") and name[7:] in PRESETS


def context_of(weights):
    """The context length --weights gives, without loading them: 1024 for OpenAI's GPT-2 of
    every size (and their random forms), else the folder's config.json."""
    name = ALIASES.get(str(weights).lower(), str(weights).lower())
    if is_random(weights) or name in PRESETS:
        return GPTConfig().context_length
    return config_from_hf(Path(weights) / "config.json").context_length


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


def base_identity(model):
    """What a run needs to find the weights `model` was loaded from again: {"weights": the
    preset's name or the folder's absolute path, "sha256": of its model.safetensors}; None for
    random weights (made by load_gpt with no `source`), which cannot be found again."""
    source = getattr(model, "source", None)
    if source is None:
        return None
    return {"weights": source["weights"], "sha256": files.file_sha256(source["file"])}


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
    digest = files.file_sha256(file)
    if digest != base["sha256"]:
        raise WeightsError(f"its base weights {file} are not the ones it was trained from "
                           f"(sha256 {digest[:12]}..., where the run recorded "
                           f"{base['sha256'][:12]}...); put the original file back")
    return load_hf_weights(model, read_safetensors(file))


def config_from_dict(d):
    return replace(GPTConfig(), **d)


# -------------------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size=None):
    """Greedy decoding (the chapter's `generate_text_simple`): append the most likely next
    token `max_new_tokens` times. idx: (B, T)."""
    context_size = context_size or model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]  # (B, vocab)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def main(argv=None):
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
    tokenizer = data.get_tokenizer()
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
