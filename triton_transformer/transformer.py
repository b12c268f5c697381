"""The Transformer (chapter 7): the seed's GPT, assembled from the package's kernels.

    x = token_emb(ids) + pos_emb(0..n-1)
    for each of `depth` blocks (pre-norm residual):
        x = x + Attention(LayerNorm(x))            qkv projection -> fused attention -> out projection
        x = x + FeedForward(LayerNorm(x))          linear + squared ReLU (Primer) -> linear
    logits = Linear(LayerNorm(x))                  (batch, seq, num_tokens)

Each residual add is fused into the layer norm that follows it (`add_norm`: a block
receives the stream h and the previous sublayer's output r, and normalizes h + r in
the same pass that forms it), and so is the bias of the projection that produced r
(`project`); the PyTorch path computes the same sum and norm separately.

One set of parameters, two ways to run it. ``use_triton=True`` sends every
operation through the package's kernels (layer norm, linear with its fused
activation for every projection, fused attention, dropout, cross-entropy; the
feed-forward's two projections are one `feed_forward` call, whose backward
fuses the activation's derivative into a GEMM);
``use_triton=False`` is the same model in plain PyTorch (``F.layer_norm``,
``F.linear``, ``F.scaled_dot_product_attention``, ``F.cross_entropy``), the
reference both for correctness and for speed. The choice can be overridden on
each call: ``model(x, use_triton=False)``.

What changed from the seed (lucidrains/triton-transformer):

* the padding mask is a (batch, seq) key mask handed to attention as is; the seed
  built a (batch, seq, seq) mask and applied it to (batch * heads, seq, seq) scores,
  which does not broadcast (an error) as soon as batch > 1 and heads > 1;
* dropout follows ``self.training``, not ``requires_grad``;
* weights start GPT-2 style (std 0.02, the residual projections scaled by
  1/sqrt(2 * depth)); the seed's feed-forward weight had std 1;
* the layer norms' biases are used by both paths.

Inference: under ``torch.no_grad()`` autograd records nothing, so no kernel saves
anything for a backward that will never come. `Transformer.generate` decodes with a
key/value cache: the prompt goes through the model once, its keys and values are
kept, and each new token then runs alone, its one query attending to the cache.

``torch.compile(model)`` works on both paths: the Triton path's ops are opaque
to the compiler (``torch.compiler.disable``), so it compiles the glue between them.
Under ``torch.autocast`` the Triton path runs the projections and attention in bf16, as
autocast would; layer norm and the loss compute in fp32 as autocast's would, but layer norm
writes its output in bf16 (the next projection's input) and the loss reads the bf16 logits,
with no fp32 copy of either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention as tt_attention
from .attention import attention_qkv as tt_attention_qkv
from .attention import split_heads
from . import runtime
from .runtime import as_float, as_int, positive_int
from .cross_entropy import cross_entropy as tt_cross_entropy
from .dropout import dropout as tt_dropout
from .layernorm import add_layer_norm as tt_add_layer_norm
from .matmul import feed_forward as tt_feed_forward
from .matmul import linear as tt_linear

# ---------------------------------------------------------------- configuration


@dataclasses.dataclass
class TransformerConfig:
    """Everything that defines the model. The defaults are the seed's README model."""

    num_tokens: int = 256
    max_seq_len: int = 1024
    dim: int = 512
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    causal: bool = False
    ff_mult: int = 4
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    use_triton: bool = True
    ignore_index: int = -100  # labels equal to this (and padded positions) do not count in the loss

    def __post_init__(self):
        # A clear error now, rather than a shape error from the first forward (or, for a dropout, the first
        # training step).
        for name in ("num_tokens", "max_seq_len", "dim", "depth", "heads", "dim_head", "ff_mult"):
            value = getattr(self, name)
            n = positive_int(value)  # numpy and torch integers become ints
            if n is None:
                raise ValueError(f"TransformerConfig: {name} must be a positive int, got {value!r}")
            setattr(self, name, n)
        for name in ("attn_dropout", "ff_dropout"):
            value = getattr(self, name)
            try:
                p = as_float(name, value)
            except TypeError:
                p = math.nan
            if not 0.0 <= p < 1.0:
                raise ValueError(f"TransformerConfig: {name} must be a float in [0, 1), got {value!r}")
            setattr(self, name, p)


# ---------------------------------------------------------------- the operations, two ways
#
# Each op below takes `use_triton` and runs either our kernel or its PyTorch
# twin on the same tensors. The Triton branches are wrapped in
# torch.compiler.disable: under torch.compile they run as they are, between
# compiled graphs, instead of being traced through their launchers.


#: The Triton path runs a feed-forward as one `feed_forward` node, its dropout in the first GEMM's epilogue
#: (except in fp16, where relu^2 keeps z and `feed_forward` composes linear, dropout, linear: see
#: `matmul.fused_dropout`). False: two `linear` calls with an elementwise pass for act', and dropout's,
#: between them (with dropout, that composition is `bench/linear.py`'s "triton unfused" provider, timed in chapter 3).
FUSED_FEED_FORWARD = True


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The low-precision dtype autocast would run a matmul in here, or None outside autocast."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return None


@torch.compiler.disable
def _triton_add_norm(h, r, r_bias, weight, bias, eps):
    # Autocast runs layer norm in fp32 and the next projection casts its output to bf16. The
    # kernel computes in fp32 whatever it reads and writes the bf16 itself: the same rounding,
    # one kernel instead of two, and half the bytes written. The residual add rides along, and
    # with it the bias of the projection that produced r (see `project`).
    dt = _autocast_dtype(h)
    if dt is not None:
        h, weight, bias = h.float(), weight.float(), bias.float()
    return tt_add_layer_norm(h, r, (h.shape[-1],), weight, bias, eps, out_dtype=dt, residual_bias=r_bias)


@torch.compiler.disable
def _triton_linear(x, weight, bias, activation):
    # Autocast would cast input, weight and bias of a linear to its dtype, and their gradients back: four
    # small kernels per projection. Our linear takes the fp32 weight and bias as they are (it casts the
    # weight itself, adds the bias in fp32 and writes both gradients in fp32); only x needs the dtype.
    dt = _autocast_dtype(x)
    if dt is not None:
        x = x.to(dt)
    return tt_linear(x, weight, bias, activation=activation)


@torch.compiler.disable
def _triton_feed_forward(x, w1, b1, w2, b2, activation, dropout_p):
    # Both projections in one autograd node: its backward multiplies by act' inside the GEMM that
    # forms the hidden layer's gradient, and the dropout between them happens in the first one's
    # epilogue (see `matmul.FeedForwardFunction`). Parameters as in _triton_linear.
    dt = _autocast_dtype(x)
    if dt is not None:
        x = x.to(dt)
    return tt_feed_forward(x, w1, b1, w2, b2, activation, dropout_p=dropout_p)


@torch.compiler.disable
def _triton_attention(q, k, v, mask, causal, dropout_p):
    dt = _autocast_dtype(q)
    if dt is not None:
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return tt_attention(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p)


@torch.compiler.disable
def _triton_attention_qkv(qkv, heads, mask, causal, dropout_p):
    dt = _autocast_dtype(qkv)
    return tt_attention_qkv(qkv if dt is None else qkv.to(dt), heads, mask=mask, causal=causal, dropout_p=dropout_p)


@torch.compiler.disable
def _triton_dropout(x, p):
    return tt_dropout(x, p=p, training=True)


@torch.compiler.disable
def _triton_cross_entropy(logits, target, ignore_index):
    # Autocast would upcast the logits to fp32; the kernel reads bf16 and computes in
    # fp32 itself, which is the same arithmetic without a (tokens x vocab) fp32 copy.
    # inplace: the gradient overwrites the logits, which nothing else reads (the model does
    # not return them with the loss and the logits projection does not save its output).
    return tt_cross_entropy(logits, target, ignore_index=ignore_index, inplace=logits.requires_grad)


def add_norm(h, r, ln: nn.LayerNorm, use_triton: bool):
    """The residual update h + r and the layer norm of the result: (normalized, new h).

    r is a sublayer's output as `project` returns it, (output, bias still to add or None); None: no add.
    """
    r, r_bias = r if r is not None else (None, None)
    if use_triton:
        return _triton_add_norm(h, r, r_bias, ln.weight, ln.bias, ln.eps)
    h = h if r is None else h + (r if r_bias is None else r + r_bias)
    return F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps), h


def linear(x, lin: nn.Linear, use_triton: bool, activation: str | None = None):
    if use_triton:
        return _triton_linear(x, lin.weight, lin.bias, activation)
    y = F.linear(x, lin.weight, lin.bias)
    if activation == "relu_squared":
        y = F.relu(y).square()
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return y


def project(x, lin: nn.Linear, use_triton: bool):
    """A projection into the residual stream, as (output, bias still to add): what `add_norm` takes.

    The Triton path leaves the bias out of the matmul and hands it on: the next `add_norm`
    adds it in the pass that adds the residual (Megatron's fused "bias-dropout-add", without
    the dropout) and sums its gradient there, from the gradient it writes anyway. The dW
    GEMM then has no bias gradient to add up from the rows of dz.
    """
    if use_triton:
        return _triton_linear(x, lin.weight, None, None), lin.bias
    return linear(x, lin, use_triton), None


def attention(q, k, v, mask, causal: bool, dropout_p: float, use_triton: bool):
    """(B, H, N, D) attention; `mask` is (B, N) bool, True = a real key to attend to."""
    if use_triton:
        return _triton_attention(q, k, v, mask, causal, dropout_p)
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :]  # broadcast over heads and queries
        if causal:  # SDPA takes one or the other, so fold the triangle into the mask
            n = q.shape[-2]
            attn_mask = attn_mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)


def dropout(x, p: float, training: bool, use_triton: bool):
    if not training or p == 0.0:  # no launch at all at inference
        return x
    return _triton_dropout(x, p) if use_triton else F.dropout(x, p, training=True)


def cross_entropy(logits, target, ignore_index: int, use_triton: bool):
    if use_triton:
        return _triton_cross_entropy(logits, target, ignore_index)
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)  # F's takes no int32 targets


# ---------------------------------------------------------------- the model


class KVCache:
    """Keys and values of every layer for the tokens decoded so far (one per batch row, all aligned)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens cached so far; the model advances it after each forward
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        # Set by `DecodeGraph`: the new token's position and the keys it may see, as device tensors,
        # so that a step never reads `length` on the host (a recorded CUDA graph replays no Python), and
        # `span`, how many rows of the cache a step attends over (each span is recorded once).
        self.position: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.span = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new (B, H, n, D) keys and values after the cached ones; return all of them."""
        if layer not in self.k:  # allocated on first use, in the dtype the projections produce
            b, h, _, d = k.shape
            # zeros, not empty: a recorded step (DecodeGraph) attends over the whole length, and a masked
            # key's probability 0 times whatever NaN an empty buffer held would still be NaN
            self.k[layer] = k.new_zeros(b, h, self.max_len, d)
            self.v[layer] = v.new_zeros(b, h, self.max_len, d)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    @property
    def recorded_step(self) -> bool:
        """Whether a `DecodeGraph` drives this cache: positions and the keys seen live on the device."""
        return self.position is not None

    def write_at_position(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """The static step's `update`: write one token's keys and values at `position`; return the first `span`
        rows of the cache, with the mask of those the token may see."""
        self.k[layer].index_copy_(2, self.position, k)
        self.v[layer].index_copy_(2, self.position, v)
        return self.k[layer][:, :, :self.span], self.v[layer][:, :, :self.span], self.seen[:, :self.span]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.dim_head = layer, cfg.heads, cfg.dim_head
        self.causal, self.dropout = cfg.causal, cfg.attn_dropout
        inner = cfg.heads * cfg.dim_head
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.dim)

    def forward(self, x, mask, use_triton: bool, cache: KVCache | None = None):
        """x: the normalized residual stream (Block applies self.norm, fused with the residual add).
        Returns the output projection's result as `project` does: (output, bias still to add)."""
        b, n, _ = x.shape
        qkv = linear(x, self.to_qkv, use_triton)
        p = self.dropout if self.training else 0.0
        if use_triton and cache is None:
            # the kernels read q, k, v out of the packed projection and write the output with the heads
            # side by side: neither direction copies (attention.attention_qkv)
            out = _triton_attention_qkv(qkv, self.heads, mask, self.causal, p)
            return project(out, self.to_out, use_triton)
        q, k, v = split_heads(qkv, self.heads)  # three (b, heads, n, dim_head) views, no copy
        if cache is not None and cache.recorded_step:
            # one token in a recorded step (DecodeGraph): it attends over a fixed span of the cache, the keys it
            # may see masked by `seen`, instead of over a slice whose length the host would choose
            k, v, seen = cache.write_at_position(self.layer, k, v)
            out = attention(q, k, v, seen, False, p, use_triton)
        elif cache is None or cache.length == 0:
            if cache is not None:  # prefill: cache the prompt's keys and values, attend as usual
                cache.update(self.layer, k, v)
            out = attention(q, k, v, mask, self.causal, p, use_triton)
        else:
            start = cache.length
            k, v = cache.update(self.layer, k, v)
            if n == 1:  # one new token sees every cached key: no mask at all
                out = attention(q, k, v, None, False, p, use_triton)
            else:
                # a chunk of new tokens: query i sees the cache and the new tokens up to itself, a
                # causal triangle aligned to the bottom right, which the kernel (top-left) does not do
                i = torch.arange(n, device=x.device)[:, None]
                seen = torch.arange(start + n, device=x.device)[None, :] <= start + i
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return project(out, self.to_out, use_triton)


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.dropout = cfg.ff_dropout
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj_in = nn.Linear(cfg.dim, cfg.dim * cfg.ff_mult)
        self.proj_out = nn.Linear(cfg.dim * cfg.ff_mult, cfg.dim)

    def forward(self, x, use_triton: bool):
        """x: the normalized residual stream (Block applies self.norm). Squared ReLU (So et al., Primer)
        is fused into the first projection's epilogue, and its derivative into the backward's GEMMs.
        Returns (output, bias still to add), as `project`."""
        p = self.dropout if self.training else 0.0
        if use_triton and FUSED_FEED_FORWARD:  # the output's bias goes on, as in `project`
            return _triton_feed_forward(x, self.proj_in.weight, self.proj_in.bias, self.proj_out.weight, None,
                                        "relu_squared", p), self.proj_out.bias
        h = linear(x, self.proj_in, use_triton, activation="relu_squared")
        h = dropout(h, self.dropout, self.training, use_triton)
        return project(h, self.proj_out, use_triton)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.ff = FeedForward(cfg)

    def forward(self, h, r, mask, use_triton: bool, cache: KVCache | None = None):
        """x = x + attn(norm(x)); x = x + ff(norm(x)), with each add fused into the norm that follows it.

        h is the residual stream and r the previous sublayer's output, not yet added to it (as `project`
        returns it). Returns the same pair for the next block: (h, this block's feed-forward output).
        """
        y, h = add_norm(h, r, self.attn.norm, use_triton)
        r = self.attn(y, mask, use_triton, cache)
        y, h = add_norm(h, r, self.ff.norm, use_triton)
        return h, self.ff(y, use_triton)


class Transformer(nn.Module):
    """The seed's GPT: ``Transformer(num_tokens=256, max_seq_len=1024, dim=512, depth=6)``.

    ``model(x, mask=None, labels=None, use_triton=None)`` takes token ids ``x`` of
    shape (batch, seq) and returns logits (batch, seq, num_tokens), or the mean
    cross-entropy against ``labels`` (batch, seq) when they are given (no shift:
    pass the next tokens as labels). ``mask`` is (batch, seq) bool, True for real
    tokens; padded positions are neither attended to nor counted in the loss.
    """

    def __init__(self, num_tokens: int = 256, max_seq_len: int = 1024, dim: int = 512, depth: int = 6,
                 heads: int = 8, dim_head: int = 64, causal: bool = False, ff_mult: int = 4,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0, use_triton: bool = True,
                 ignore_index: int = -100):
        super().__init__()
        cfg = self.config = TransformerConfig(num_tokens, max_seq_len, dim, depth, heads, dim_head, causal,
                                              ff_mult, attn_dropout, ff_dropout, use_triton, ignore_index)
        self.use_triton = use_triton
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)
        self.reset_parameters()
        self._ids_checked = False

    @classmethod
    def from_config(cls, cfg: TransformerConfig) -> "Transformer":
        return cls(**dataclasses.asdict(cfg))

    def reset_parameters(self):
        """GPT-2's initialisation: N(0, 0.02) everywhere, zero biases, and the two projections
        that write into the residual stream scaled by 1/sqrt(2 * depth) so that its variance
        does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.layers:
            for proj in (block.attn.to_out, block.ff.proj_out):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.depth))

    # ------------------------------------------------------------ accounting

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters; without the two embedding tables when `embeddings=False` (they cost no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.token_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight (multiply + add) for every projection, plus
        attention's two (n x n x dim_head) products per head (halved when causal); a training
        step is forward + backward = 3x the forward."""
        cfg = self.config
        n = seq_len or cfg.max_seq_len
        weights = self.num_params(embeddings=False)  # every other parameter is a matmul weight ...
        weights -= sum(p.numel() for name, p in self.named_parameters()  # ... but biases and norms
                       if name.endswith("bias") or ".norm." in name or name.startswith("norm."))
        attn = 2 * 2 * n * cfg.heads * cfg.dim_head * cfg.depth * (0.5 if cfg.causal else 1.0)
        forward = 2 * weights + attn
        return 3 * forward if training else forward

    # ------------------------------------------------------------ forward

    def _check(self, x, mask, labels, start: int):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a (batch, seq) tensor of token ids, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"x must hold integer token ids, int64 or int32 (what an embedding takes), got {x.dtype}")
        device = self.token_emb.weight.device
        for name, t in (("x", x), ("mask", mask), ("labels", labels)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor of the shape of x, got {type(t).__name__}")
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but the model is on {device} (model.to(...) or "
                                 f"{name}.to(...))")
        if start + x.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of length {start + x.shape[1]} is longer than max_seq_len="
                             f"{self.config.max_seq_len} (the model has that many position embeddings)")
        # Token ids outside the table crash CUDA with a device-side assert that kills the
        # process, so look once (a GPU sync) on the first forward, and on every CPU forward.
        if not torch.compiler.is_compiling() and x.numel() and (x.device.type == "cpu" or not self._ids_checked):
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.config.num_tokens:
                raise ValueError(f"token ids must lie in [0, {self.config.num_tokens}), got [{lo}, {hi}]")
            self._ids_checked = True
        if mask is not None:
            if mask.shape != x.shape:
                raise ValueError(f"mask must have the shape of x {tuple(x.shape)} (True = real token), "
                                 f"got {tuple(mask.shape)}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
        if labels is not None and labels.shape != x.shape:
            raise ValueError(f"labels must have the shape of x {tuple(x.shape)}, got {tuple(labels.shape)}")
        if labels is not None and labels.dtype not in (torch.int64, torch.int32):
            # both paths take these (the PyTorch path's cross-entropy is given int64)
            raise TypeError(f"labels must hold integer token ids, int64 or int32, got {labels.dtype}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_triton: bool | None = None, cache: KVCache | None = None):
        use_triton = self.use_triton if use_triton is None else use_triton
        start = 0 if cache is None else cache.length
        self._check(x, mask, labels, start)
        if cache is not None and mask is not None:
            raise ValueError("decoding with a KV cache does not take a padding mask")
        if cache is not None and start > 0 and not self.config.causal:
            raise ValueError("a KV cache needs causal=True: without it, old positions would see new tokens")

        n = x.shape[1]
        static = cache is not None and cache.recorded_step  # a DecodeGraph step: positions on the device
        h = self.token_emb(x) + self.pos_emb(cache.position if static else
                                             torch.arange(start, start + n, device=x.device))
        r = None  # each block's last output is added to h inside the next norm
        for block in self.layers:
            h, r = block(h, r, mask, use_triton, cache)
        if cache is not None and not static:  # (a DecodeGraph counts its own steps)
            cache.length += n
        logits = linear(add_norm(h, r, self.norm, use_triton)[0], self.to_logits, use_triton)
        if labels is None:
            return logits

        if mask is not None:  # padding never counts in the loss
            labels = labels.masked_fill(~mask, self.config.ignore_index)
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             self.config.ignore_index, use_triton)

    # ------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool | None = None, use_triton: bool | None = None,
                 cuda_graph: bool | None = None):
        """Sample `max_new_tokens` after `prompt` (batch, n); returns (batch, n + max_new_tokens).

        temperature 0 is greedy. With `use_cache` (the default for a causal model) the
        keys and values of past tokens are kept, so each step runs the model on one
        token instead of the whole sequence; the tokens drawn are the same either way.
        With the cache, `cuda_graph` (default: on a GPU) records the one-token step as a
        CUDA graph and replays it (`DecodeGraph`); on the CPU, True runs that same step
        without recording it. Call ``model.eval()`` first, or dropout stays on.
        """
        use_cache = self.config.causal if use_cache is None else use_cache
        if use_cache and not self.config.causal:
            raise ValueError("use_cache=True needs a causal model (causal=True)")
        max_new_tokens = as_int("max_new_tokens", max_new_tokens)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and as_int("top_k", top_k) < 1:
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (batch, n) token ids with n >= 1, got shape {tuple(prompt.shape)}")
        total = prompt.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.config.max_seq_len}")

        if max_new_tokens == 0:
            return prompt
        cache = KVCache(self.config.max_seq_len) if use_cache else None
        dropping = self.training and (self.config.attn_dropout > 0 or self.config.ff_dropout > 0)
        if cuda_graph is None:
            cuda_graph = prompt.is_cuda and not runtime.INTERPRET and not dropping
        elif cuda_graph and use_cache and dropping:
            raise ValueError("generate(cuda_graph=True) in training mode with dropout: a recorded step would replay "
                             "one dropout mask for every token; call model.eval() first (or cuda_graph=False)")
        decoder = None
        seq = prompt
        logits = self(prompt, use_triton=use_triton, cache=cache)[:, -1].float()  # the prompt, in one pass
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k)
            seq = torch.cat([seq, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            if use_cache and cuda_graph:
                decoder = decoder or DecodeGraph(self, cache, use_triton, record=prompt.is_cuda)
                logits = decoder(nxt)
            else:
                logits = self(nxt if use_cache else seq, use_triton=use_triton, cache=cache)[:, -1].float()
        return seq


class DecodeGraph:
    """`generate`'s one-token step with the KV cache, recorded as a CUDA graph and replayed per token.

    One token at a time, decoding is bound by the host: each op's Python runs for a kernel of a few
    microseconds, and the Triton path's ops run more Python than PyTorch's (chapter 7 times both). A replay
    submits the whole step with one call, as `training.CudaGraphStep` does for a training step. What a
    replay assumes, and how this keeps it true:

    * the same addresses: the token goes in through `token`; its position and the mask of the keys it may
      see are device tensors (`KVCache.position`, `.seen`) that the recorded step itself advances; the
      cache was allocated at its full length, in zeros, by the prompt's pass;
    * nothing chosen on the host: the step attends over a fixed `span` of the cache with that mask (the
      eager step slices the keys seen so far, a length the host picks). Spans are powers of two from
      `MIN_SPAN`, and each is recorded once, when the cache first needs it: a token at position 40 attends
      over 64 rows, not the model's whole context. The first step of each span runs eagerly, so that its
      kernels are compiled and tuned before the recording;
    * no randomness inside: sampling runs after each replay.

    ``record=False`` runs the same steps eagerly (the CPU; the tests compare them with `generate`'s).
    """

    MIN_SPAN = 64

    def __init__(self, model: "Transformer", cache: KVCache, use_triton: bool | None, record: bool = True):
        first = next(iter(cache.k.values()))
        batch, device = first.shape[0], first.device
        self.model, self.cache, self.use_triton, self.record = model, cache, use_triton, record
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=device)
        cache.position = torch.full((1,), cache.length, dtype=torch.long, device=device)
        cache.seen = torch.zeros((batch, cache.max_len), dtype=torch.bool, device=device)
        cache.seen[:, :cache.length] = True
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor]] = {}  # span -> (graph, logits)

    def _step(self) -> torch.Tensor:
        self.cache.seen.index_fill_(1, self.cache.position, True)  # the new token sees itself
        logits = self.model(self.token, use_triton=self.use_triton, cache=self.cache)[:, -1].float()
        self.cache.position.add_(1)
        return logits

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) of the next token after `token` (batch, 1); valid until the next call."""
        cache = self.cache
        cache.span = min(cache.max_len, max(self.MIN_SPAN, runtime.next_power_of_2(cache.length + 1)))
        self.token.copy_(token)
        graph, logits = self.graphs.get(cache.span, (None, None))
        if not self.record:
            logits = self._step()
        elif logits is None:  # a span's first step runs eagerly, on a side stream as CUDA graphs want
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graphs[cache.span] = (None, logits)
        else:
            if graph is None:  # its second records it; recording runs nothing, the replay below does
                graph = torch.cuda.CUDAGraph()
                # autocast's cast cache must stay off while recording: cached casts would outlive the pool
                kind = self.token.device.type
                amp = (torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=False)
                       if torch.is_autocast_enabled(kind) else contextlib.nullcontext())
                with torch.cuda.graph(graph), amp:
                    logits = self._step()
                self.graphs[cache.span] = (graph, logits)
            graph.replay()
        cache.length += 1
        return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """One token per row of (batch, vocab) logits: greedy at temperature 0, else softmax sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
