"""The exact speed shortcuts, and the policy that turns them on for training and inference.

Each computes what the chapter's code computes, up to float rounding, in less time:
- `TrunkCache`: the frozen leading part's outputs (embeddings + frozen blocks) computed once per
  example and reused by every step and evaluation; filled ahead in batches (`prefill`).
- `block_at`: the last block at the classified position only, re-associated so that no key or
  value is formed (O(T E H) instead of O(T E^2)); in fp32 on a CPU its products at that one
  position go through oneDNN's linear, forward and backward (`linear_at`).
- `FrozenBlock`: a frozen block's weights prepared once per run (Q/K/V in one product, cast once,
  oneDNN's linear with the GELU and residual adds fused on a CPU), for the cache's fill and for
  inference (`run_prepared`).
- `attention_backend`: PyTorch's math attention where its CPU flash kernel is the slower.
- `keep_freed_memory`: glibc's allocator keeps freed blocks of up to 32 MiB for reuse instead of
  handing them back to the system, so a step's fresh gradients and bf16 weight casts cost no
  page faults (nothing computed changes: only where the memory comes from).
- `use_huge_pages`: tensors of 2 MiB and more on transparent huge pages (fewer TLB misses in
  the memory-bound step and fill; nothing computed changes), set when this module is imported.
gpt.Classifier takes a `Shortcuts` at its one seam; this module imports gpt.py, never the reverse.

    python finetune.py                    # the shortcuts are on by default
    python finetune.py --no-shortcuts     # every step computes the whole model, as the chapter
"""

import ctypes
import ctypes.util
import itertools
import os
import platform
import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

import ddp
import files
import gpt


def _has_amx():
    """Whether this CPU has AMX tiles (torch's own check; False where this torch lacks it)."""
    try:
        return bool(torch._C._cpu._init_amx())
    except (AttributeError, RuntimeError):
        return False


HAS_AMX = _has_amx()

# torch's CPU allocator reads this once, at its first large allocation (2 MiB or more)
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages():
    """Have torch's CPU allocator back every tensor of 2 MiB or more with transparent huge pages
    (2 MiB-aligned, madvise(MADV_HUGEPAGE)): what `THP_MEM_ALLOC_ENABLE=1` does. Why: the cached
    training step is bound by memory traffic (AdamW streams the last block's weight, gradient
    and both moments, 200 MB per step; the products at one position read each weight once),
    and with 4 KiB pages every 4 KiB of that stream costs a TLB miss, a two-level page walk in
    a virtual machine; likewise each frozen block's weights read once per fill. Nothing
    computed changes: only where the memory lies. torch reads the variable once, at its first
    large allocation, so this is called when shortcuts.py is imported (before the model is
    built); an explicit THP_MEM_ALLOC_ENABLE=0 in the environment is left as it is (the
    benchmarks' before). Linux only (elsewhere torch ignores the variable). Returns whether the
    variable asks for huge pages now."""
    if platform.system() == "Linux":
        os.environ.setdefault(THP_ENV, "1")
    return os.environ.get(THP_ENV) == "1"


use_huge_pages()


def attention_backend(device_type):
    """The context PyTorch's scaled_dot_product_attention runs in: its math backend when
    training under bf16 or fp16 autocast on a CPU without AMX, where the CPU flash kernel's
    backward is the slower (GPT-2 small, 8 x 120 tokens, 2 cores of an AMD EPYC: 18.6 -> 13.3 ms
    per layer forward and backward; a bf16 training step with every layer trainable 1.09x
    quicker, the median of 6 pairs); otherwise PyTorch's own choice (on AMX its flash kernel
    uses the tiles). The math backend computes the scores and softmax in fp32: the same
    function, rounded no worse."""
    if device_type == "cpu" and not HAS_AMX and torch.is_grad_enabled() and \
            torch.is_autocast_enabled("cpu") and \
            torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16):
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def _weight_bias(linear):
    """(weight, bias) of an nn.Linear, or the effective ones of a LoRALinear (W + alpha (A B)^T,
    differentiable in A and B), so that F.linear(x, *_weight_bias(m)) computes m(x)."""
    if isinstance(linear, gpt.LoRALinear):
        return (linear.base.weight + linear.alpha * (linear.A @ linear.B).T, linear.base.bias)
    return linear.weight, linear.bias


class _OneDNNLinear(torch.autograd.Function):
    """F.linear(x, w, b) for 2-D fp32 CPU tensors with its three products through oneDNN's linear
    (`onednn_linear`): y = x W^T + b forward; dx = dy W and dW = dy^T x backward, each read
    through a transposed view (no copy; oneDNN takes the strides as they are). The same
    products F.linear and its backward compute (MKL's on this torch), rounded differently."""

    @staticmethod
    def forward(ctx, x, w, b, op):
        ctx.save_for_backward(x, w)
        ctx.op, ctx.has_bias = op, b is not None
        return op(x, w, b, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        op, grad = ctx.op, grad.contiguous()
        dx = op(grad, w.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None
        dw = op(grad.t(), x.t(), None, "none", [], "") if ctx.needs_input_grad[1] else None
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def linear_at(x, w, b=None, onednn=True):
    """F.linear(x, w, b) for the few rows of one position per example (B, in) -> (B, out), in
    fp32 on a CPU through oneDNN's linear, forward and backward (`_OneDNNLinear`). Why: at 8
    rows a product only streams its weight once, yet MKL (F.linear's route for fp32 on a CPU)
    reads GPT-2 small's 9.4 MB feed-forward matrix at 16 GB/s where a copy moves 80; oneDNN's
    linear does the forward 1.4x and the backward's dy W 2.5x quicker (1.7x and 2.9x from cold
    caches; 2 cores of an AMD EPYC Zen 4), and a cached fp32 training step 1.21x quicker
    (bench/test_levers.py, docs/speed.md). Elsewhere (bf16 or fp16 autocast, which casts the
    weights; CUDA, MPS; no working op) it is F.linear."""
    op = onednn_linear(torch.float32) if onednn else None
    if op is None or x.device.type != "cpu" or x.dim() != 2 or \
            x.dtype != torch.float32 or w.dtype != torch.float32 or \
            torch.is_autocast_enabled("cpu"):
        return F.linear(x, w, b)
    return _OneDNNLinear.apply(x.contiguous(), w, b, op)


def _module_at(linear, x, onednn=True):
    """linear(x) for the trainable block's nn.Linear or LoRALinear at one position: an
    nn.Linear through `linear_at`; a LoRALinear as it is written (at 8 rows its low-rank
    update costs less than forming its effective weight)."""
    if isinstance(linear, torch.nn.Linear):
        return linear_at(x, linear.weight, linear.bias, onednn)
    return linear(x)


def _normalised(norm, x):
    """A LayerNorm's input normalised, before its scale and shift: (x - mean) / sqrt(var + eps)."""
    if norm.plain:
        mean = x.mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + norm.eps)
    return F.layer_norm(x, x.shape[-1:], eps=norm.eps)


def block_at(block, x, pos, onednn=True):
    """A TransformerBlock's output at one position per row, (B, E), from its input (B, T, E).

    The same function as `block(x)[rows, pos]`, re-associated so that no key or value is formed:
    with xhat the first layer norm's normalised input, g and b its scale and shift, and q_h the
    query of head h at the classified position,
        score_h(t)  = xhat_t . (g * W_k^h^T q_h) / sqrt(d) + q_h . (W_k^h b + b_k^h) / sqrt(d)
                      (the second term is constant in t: the softmax cancels it)
        context_h   = ((sum_t p_h(t) xhat_t) * g + b) W_v^h^T + b_v^h   (the p_h(t) sum to 1).
    That costs O(T E H) per example instead of the O(T E^2) of keys and values at every
    position; autograd gives every gradient through these products. LoRA-wrapped projections
    enter with their effective weights. The products at the one position go through
    `linear_at` (oneDNN's linear in fp32 on a CPU; `onednn=False`: F.linear, the benchmarks'
    before). With dropout active (training, drop_rate > 0) the block runs as written.
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
    query = linear_at(xhat[rows, pos] * g + b, w_q, b_q, onednn)
    query = query.view(bsz, heads, hs)  # (B, nh, hs)
    u = torch.einsum("bhd,hde->bhe", query, w_k.view(heads, hs, emb))  # W_k^h^T q_h: (B, nh, E)
    scores = torch.einsum("bhe,bte->bht", u * (g / hs**0.5), xhat)  # (B, nh, T)
    # The terms constant in t (the keys' share of the shift b and the key bias) change no
    # weight, but they are kept so that every parameter gets the gradient the block gives it
    # (for b_k a float-rounding zero, which AdamW then treats as the chapter's code does):
    # q_h . (W_k^h b + b_k^h) = (W_k^h^T q_h) . b + q_h . b_k^h, from u (no second pass over W_k)
    constant = u @ b if b_k is None else u @ b + (query * b_k.view(heads, hs)).sum(-1)
    scores = scores + constant.unsqueeze(-1) / hs**0.5
    if att.causal:  # position p sees keys 0..p
        cols = torch.arange(num_tokens, device=x.device)
        scores = scores.masked_fill((cols[None, :] > pos[:, None])[:, None, :], -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    mixed = torch.einsum("bht,bte->bhe", weights, xhat) * g + b  # (B, nh, E)
    context = torch.einsum("bhe,hde->bhd", mixed, w_v.view(heads, hs, emb))  # (B, nh, hs)
    if b_v is not None:
        context = context + b_v.view(heads, hs)
    h = _module_at(att.out_proj, context.reshape(bsz, emb), onednn) + x[rows, pos]  # (B, E)
    fc, gelu, proj = block.ff.layers
    return h + _module_at(proj, gelu(_module_at(fc, block.norm2(h), onednn)), onednn)


# glibc's mallopt parameters, and the largest mmap threshold it accepts on a 64-bit machine
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_MAX = -1, -3, 32 * 2**20
_KEPT = {}  # "applied" -> whether keep_freed_memory took effect in this process


def keep_freed_memory(keep=True):
    """Have glibc's malloc keep freed memory for reuse: blocks of up to 32 MiB come from its heap
    (not a fresh mmap each time: 128 KiB and up by default), and freed memory stays in the heap
    (no trim). A training step allocates its gradients (zero_grad sets them to None) and, under
    autocast, its bf16 copies of the trainable weights afresh: by default each is a fresh mmap,
    its pages faulted in and zeroed by the kernel on first touch, then returned at the step's
    end. Measured paired on 2 cores of an Intel Xeon with AMX (loaded): a cached bf16 step 1.46x
    quicker, fp32 1.16x (bench/test_levers.py). Process-wide; the numbers are the same bit for
    bit. Returns whether it took effect (False off glibc, e.g. macOS or musl). `keep=False`
    restores glibc's defaults (the benchmarks' before)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if keep:
            done = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) == 1 and \
                libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
        else:
            done = libc.mallopt(_M_MMAP_THRESHOLD, 128 * 2**10) == 1 and \
                libc.mallopt(_M_TRIM_THRESHOLD, 128 * 2**10) == 1
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    _KEPT["applied"] = bool(done and keep)
    return bool(done)


def default_cache_bytes(device=None):
    """The trunk cache's default memory cap: a quarter of the machine's RAM, or on CUDA a
    quarter of the GPU's free memory when the cache is made (after the model is on it)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]  # + what torch holds but no tensor uses
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free // 4
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
        heads = (t.view(bsz, num_tokens, self.heads, -1).transpose(1, 2)
                 for t in qkv.split(emb, dim=-1))
        q, k, v = (gpt.heads_layout(t) for t in heads)  # (B, nh, T, hs) each
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
        not any(isinstance(m, gpt.LoRALinear) for m in blocks.modules())


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
    so it is computed once per distinct example and reused by every later step and evaluation.
    Refused when dropout is on; raises if a cached weight changes.

    Under the causal mask a row's outputs at its first L positions do not depend on what follows
    them, so with right padding (`pad_id`) an example is keyed by its ids without the trailing
    padding: the same text padded to 120 and to 90 tokens shares one entry (a shorter padding
    reads its prefix). Without the causal mask the whole padded row is the key.

    What an entry holds depends on the data alone, not on when or beside which rows it was first
    read: `fill` computes the rows a run reads ahead of the loop, in fixed groups, and an entry
    is computed again only where a batch is padded past it and `extend` is off. With `extend`
    (the classified position is at or before each row's last real token: the last real token or
    the first, not the mean) nothing past that token is ever read (the causal mask gives it
    weight exactly 0), so such an entry is extended with zeros instead. A resumed run thus reads
    exactly what the run never stopped read.

    Entries are stored in the dtype the fill computes in (bf16 under bf16 autocast) and handed
    back in the model's dtype. `max_bytes` caps the store (default: `default_cache_bytes`); past
    it, new examples are computed each time they are read, and `on_full` (if given) is called
    once with a message saying so. The frozen blocks run as `FrozenBlock`s, prepared once per
    model, weights and precision (weights cast once instead of by autocast on every call, Q/K/V
    in one product, oneDNN's fused GELU and adds on a CPU); `prepare=False` runs the blocks as
    written (under autocast if on), `onednn=False` prepares them without oneDNN: the benchmarks'
    before and after.
    """

    def __init__(self, model, pad_id=gpt.PAD_ID, max_bytes=None, on_full=None, prepare=True,
                 onednn=True, extend=False):
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
        if any(isinstance(m, gpt.LoRALinear) for b in frozen for m in b.modules()):
            raise ValueError("the frozen-trunk cache cannot cover LoRA-wrapped layers")
        self.model, self.pad_id = model, pad_id
        self.params = [p for m in frozen for p in m.parameters()]
        self.versions = [p._version for p in self.params]  # bumped by every in-place change
        self.store = {}  # key -> the cached part's output for that example, (T', E)
        self.max_bytes = default_cache_bytes(self.params[0].device) if max_bytes is None \
            else max_bytes
        self.bytes, self.uncached, self.on_full = 0, set(), on_full
        self.prepare, self.onednn, self.extend = prepare, onednn, extend
        self.host_ids = None  # see keys_from

    @property
    def causal(self):
        # (not a slice of the ModuleList: that builds a new module, 30 us a call)
        return all(block.att.causal
                   for block in itertools.islice(self.model.trf_blocks, self.n_blocks))

    @property
    def partial(self):
        """Whether some example went unstored for want of room."""
        return bool(self.uncached)

    def key(self, row, causal=None):
        """The store's key of one row of token ids (a numpy array); `causal`: self.causal, where
        the caller has it already (a step keys a whole batch)."""
        if self.causal if causal is None else causal:  # drop the trailing padding: a shorter
            real = (row != self.pad_id).nonzero()[0]  # padding is a prefix of a longer one
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

    def fill(self, rows, batch_size=16, progress=None):
        """Compute and store, in batches of `batch_size`, each of `rows` (1-D token ids, any
        lengths) not stored yet: the examples a run will read, ahead of time, in batches larger
        than the loop's (larger matrix products run nearer the machine's peak). The rows are
        grouped in a fixed way, by length (a stable sort: rows of one length, such as the
        chapter's padded rows, keep their order), each group padded to its longest row, so the
        same rows always give the same entries. Only under the causal mask (otherwise the
        padding is part of the key, and the loop fills). Stops where the store is full.
        `progress` wraps the batches (a progress bar). Returns the number of examples
        computed."""
        if not self.causal:
            return 0
        pending = {}
        for row in rows:
            row = torch.as_tensor(row)
            key = self.key(row.cpu().numpy(), True)
            if key not in self.store and key not in pending:
                pending[key] = row
        if not pending:
            return 0
        items = sorted(pending.items(), key=lambda item: len(item[1]))
        chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        done = 0
        device = self.params[0].device
        for chunk in (progress(chunks) if progress else chunks):
            if self.uncached:
                break
            width = max(len(row) for _, row in chunk)
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

    @contextmanager
    def keys_from(self, host_ids):
        """Within this block, a call given ids of the shape of `host_ids` (token ids on the host:
        the batch a loader gave, before it was moved to the device) reads its keys from them
        instead of copying the ids back from the device, a copy that makes the host wait for the
        device to finish its queue (training_loss_batch: so a step never waits)."""
        self.host_ids = host_ids
        try:
            yield
        finally:
            self.host_ids = None

    def __call__(self, in_idx):
        """Token ids (B, T) -> the output of the cached part, (B, T, E), in the model's dtype."""
        self._check()
        num_tokens = in_idx.shape[1]
        host = self.host_ids
        if host is None or host.device.type != "cpu" or host.shape != in_idx.shape:
            host = in_idx.cpu()  # (evaluations: they wait for the device's numbers anyway)
        causal = self.causal
        keys = [self.key(row, causal) for row in host.numpy()]
        rows, missing = [None] * len(keys), []
        for i, k in enumerate(keys):
            hit = self.store.get(k)
            if hit is not None and len(hit) >= num_tokens:
                rows[i] = hit[:num_tokens]
            elif hit is not None and self.extend and causal:  # never read past its end
                rows[i] = F.pad(hit, (0, 0, 0, num_tokens - len(hit)))
            else:
                missing.append(i)
        if missing:  # the rows to compute, picked on the device without an index from the host
            computed = self.compute(pick_rows(in_idx, missing))
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


def pick_rows(t, rows):
    """t[rows] for row numbers the host knows (ascending), with nothing copied from the host:
    each run of consecutive rows is a slice (a view; its bounds are kernel arguments), joined
    on the device. An index tensor would be a host-to-device copy from pageable memory, which
    waits for the device's queue on CUDA: a stall in every step that misses the cache."""
    runs, start = [], rows[0]
    for prev, row in zip(rows, rows[1:] + [None]):
        if row != prev + 1:
            runs.append(t[start:prev + 1])
            start = row
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def keys_from(model, host_ids):
    """The context in which the trunk cache of `model` (a Classifier, under DDP or not) reads
    its keys from `host_ids`, the host copy of the ids it is given (TrunkCache.keys_from); a
    no-op without a cache."""
    taken = getattr(getattr(model, "module", model), "shortcuts", None)
    trunk = taken.trunk if taken is not None else None
    return trunk.keys_from(host_ids) if trunk is not None else nullcontext()


def classify_logits(model, in_idx, position="last", average=False, pad_id=gpt.PAD_ID,
                    tail=False, trunk=None, prepared=False):
    """gpt.classify_logits through the exact shortcuts: the same class logits (B, C), up to
    float rounding. `trunk` (a TrunkCache) supplies the frozen part's output; `tail` runs the
    last block only at the classified position (`block_at`: in O(T E H), no keys or values
    formed), since no other position of its output is read. `prepared`: for inference (no
    gradient), the blocks before the last one through FrozenBlocks (`run_prepared`), where they
    allow it."""
    if trunk is not None:
        x, blocks = trunk(in_idx), model.trf_blocks[trunk.n_blocks:]
    elif prepared and not torch.is_grad_enabled() and preparable(model):
        n = len(model.trf_blocks) - 1
        x, blocks = run_prepared(model, model.embed(in_idx), n), model.trf_blocks[n:]
    elif not tail or average:  # no shortcut applies: the model as written
        with attention_backend(in_idx.device.type):
            return gpt.classify_logits(model, in_idx, position, average, pad_id)
    else:
        x, blocks = model.embed(in_idx), model.trf_blocks
    with attention_backend(in_idx.device.type):
        if average:
            return model.out_head(model.final_norm(blocks(x))).mean(dim=1)
        pos = gpt.token_positions(in_idx, position, pad_id)
        if tail and len(blocks):
            x = block_at(blocks[-1], blocks[:-1](x), pos)  # (B, E)
        else:
            x = blocks(x)[torch.arange(len(x), device=x.device), pos]  # (B, E)
    return model.out_head(model.final_norm(x))


class Shortcuts:
    """What a gpt.Classifier takes at its seam: which shortcuts its forward pass uses (see
    `classify_logits`)."""

    def __init__(self, trunk=None, tail=True, prepared=False):
        self.trunk, self.tail, self.prepared = trunk, tail, prepared

    def classify_logits(self, model, in_idx, position="last", average=False,
                        pad_id=gpt.PAD_ID):
        return classify_logits(model, in_idx, position, average, pad_id, self.tail, self.trunk,
                               self.prepared)


# -------------------------------------------------------------------------------------- the policy

def for_training(model, max_bytes=None, on_full=None, pad_id=gpt.PAD_ID, extend=False):
    """(Shortcuts, note) for training the set-up `model`: the frozen-trunk cache (capped at
    `max_bytes`, 0 for none; `extend`: see TrunkCache) and the last block at the classified
    position; on a CPU also glibc's freed memory kept for reuse (`keep_freed_memory`). The note
    says why the cache is off, or is None."""
    trunk, note = None, None
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()
    try:
        if max_bytes == 0:
            raise ValueError("--trunk-cache-gb 0")
        trunk = TrunkCache(model, pad_id=pad_id, max_bytes=max_bytes, on_full=on_full,
                           extend=extend)
    except ValueError as e:
        note = f"frozen-trunk cache off: {e}"
    return Shortcuts(trunk=trunk, tail=True), note


def for_inference(shortcuts=True):
    """The shortcuts a trained model is used through (evaluate.py, serving): the blocks before
    the last through FrozenBlocks, prepared once, and the last at the classified position only;
    None (the model as written) where `shortcuts` is False: the benchmarks' before."""
    return Shortcuts(tail=True, prepared=True) if shortcuts else None


# Examples per trunk-cache fill ahead of the loop (the loop's batches are 8). Measured per example
# on a 2-core AMD EPYC (fp32, bf16): 16 is as quick as 8 or quicker, and 32 is 1.13x slower in
# fp32, its activations outgrowing the caches (bench/test_levers.py).
FILL_BATCH = 16
# On a GPU (CUDA, MPS) larger products run nearer its peak, and 64 x 120 tokens of GPT-2 xl's
# activations fit any of them. Not measured on a GPU yet.
FILL_BATCH_GPU = 64


def fill_batch(device):
    """Examples per fill ahead of the loop on `device`: FILL_BATCH on a CPU, more on a GPU."""
    return FILL_BATCH_GPU if torch.device(device).type in ("cuda", "mps") else FILL_BATCH


def prefill(classifier, loaders, cfg):
    """Fill the classifier's trunk cache, ahead of the loop and in batches of `fill_batch`, with
    the examples the loop reads: every training example and the validation examples its
    evaluations read, in the precision the forward pass runs in. Larger batches run nearer the
    machine's peak (the numbers are the same up to float rounding), and the cache then holds
    the same whatever the loop reads first, so a resumed run reads what the run never stopped
    read (see TrunkCache). Skipped for a run shorter than an epoch (--max-steps) that writes no
    checkpoint within it: it would compute rows it never reads. Under torchrun each process
    fills every row: each reads a share of every batch. Returns the examples computed."""
    trunk = classifier.shortcuts.trunk if classifier.shortcuts is not None else None
    train_loader = loaders["train"]
    short = cfg.max_steps is not None and cfg.max_steps < len(train_loader)
    if trunk is None or short and not cfg.checkpoint_every:
        return 0
    val = loaders["validation"].dataset
    read = min(len(val), cfg.eval_iter * cfg.batch_size)
    rows = [train_loader.dataset[i][0] for i in range(len(train_loader.dataset))] + \
        [val[i][0] for i in range(read)]

    def bar(chunks):
        return files.progress(chunks, desc="Frozen-trunk cache", unit="batch")
    device = trunk.params[0].device
    with classifier.autocast(device):
        return trunk.fill(rows, fill_batch(device), bar)


def enabled(cfg):
    """Whether a run takes the exact shortcuts: by default, unless --no-shortcuts or --plain
    (the chapter's computation step by step). `cfg`: a TrainConfig."""
    return cfg.shortcuts and not cfg.plain


def cache_budget(cfg, device):
    """The trunk cache's cap in bytes for a run (None: the default, a quarter of the machine's
    memory): --trunk-cache-gb where given; under torchrun on a CPU the default shared among the
    processes on this machine, which share its memory."""
    if cfg.trunk_cache_gb is not None:
        return int(cfg.trunk_cache_gb * 2**30)
    if device.type == "cpu" and ddp.local_world() > 1:
        return default_cache_bytes() // ddp.local_world()
    return None


# The device types torch's fused AdamW runs on (torch's own list).
FUSED_DEVICES = _get_fused_kernels_supported_devices()


def fused_adamw(cfg, device):
    """Whether AdamW runs as one fused kernel: with the shortcuts on, on every device torch has
    it for (CPU, CUDA, MPS, ...): the same formula, rounded differently, and on a 2-core CPU
    3.05x quicker than the loop over tensors (docs/speed.md). None leaves torch's default."""
    return enabled(cfg) and device.type in FUSED_DEVICES or None


def describe(classifier, optimizer, precision):
    """The log's line saying which exact shortcuts a training run takes (`precision`: its
    --precision)."""
    on = []
    trunk = classifier.shortcuts.trunk if classifier.shortcuts is not None else None
    if trunk is not None:
        blocks = f"{trunk.n_blocks} frozen block{'s' * (trunk.n_blocks != 1)}"
        device = trunk.params[0].device
        onednn = device.type == "cpu" and trunk.n_blocks and \
            onednn_linear(gpt.PRECISIONS[precision] or torch.float32) is not None
        on.append(f"frozen-trunk cache (embeddings + {blocks}, stored in "
                  f"{precision}, up to {trunk.max_bytes / 2**30:.1f} GiB"
                  f"{'; computed through oneDNN' if onednn else ''})")
    if not classifier.average:
        on.append("last block at the classified position only")
    if optimizer.defaults.get("fused"):
        on.append("fused AdamW")
    return ("Shortcuts (exact up to float rounding; --no-shortcuts turns them off): "
            + (", ".join(on) or "none apply"))
