"""Whole-model benchmark: one training step of the Transformer (issue 8).

A step is forward and loss under bf16 autocast, backward, and a fused AdamW
update, on random tokens. The three providers share one model and one
optimizer, so parameters, gradients and Adam's state weigh the same in every
provider's peak memory:

* ``triton``: the model with ``use_triton=True`` (every op one of our kernels), forward and backward
  replayed as one CUDA graph (`training.CudaGraphStep`), as ``train.py`` runs it;
* ``torch``: the same model with ``use_triton=False``, eager PyTorch (SDPA attention);
* ``torch.compile``: ``torch.compile(model)`` called with ``use_triton=False``;
* ``torch graph`` and ``torch.compile graph``: those two steps replayed as CUDA graphs by the same
  `training.CudaGraphStep`, so that no provider pays the host's launch costs and the comparison is of
  the kernels alone (on a GPU only).

Shapes are [batch, seq, dim, depth, num_tokens], causal, heads = dim // 64 of
64 dimensions: the seed's model, then GPT-2 small. ``transformer_train_step_dropout`` is the
seed's model with GPT-2's dropout of 0.1 (attention and feed-forward), where the Triton step is
replayed with its masks keyed from device memory (`dropout.replayable_seeds`); its extra provider
``triton eager`` is the same step run without a graph, as every dropout run was before. Rows carry ``tokens`` and
(derived by `bench.run_case`) ``tokens_per_s``; TFLOP/s counts the matmul FLOPs
of `Transformer.flops_per_token` (causal attention at half).
"""

import functools

import torch

from .. import runtime
from ..training import CudaGraphStep
from ..transformer import Transformer
from . import DROPOUT, Case

SHAPES = [(16, 1024, 512, 6, 256), (16, 1024, 768, 12, 50304)]
QUICK = [(2, 128, 128, 2, 256)]


def train_step(forward, optimizer, x, y, dtype, cuda_graph=False, dropout=False):
    """One zero-argument training step: autocast forward + loss, backward, AdamW, drop the gradients.

    Forward and backward are `training.CudaGraphStep`'s: eager, or with `cuda_graph` replayed as one
    CUDA graph (as ``train.py`` runs the Triton path), recorded on the step's first calls, which warm
    up do_bench.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = [CudaGraphStep(forward, params, dtype, record=cuda_graph, dropout=dropout)]

    def step():
        held[0](x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients freed between steps, as in a training loop

    step.peak_bytes = lambda: held[0].peak_bytes  # a recorded graph's peak (bench.run_case reads it)
    # bench.run_case calls this before timing: the graph is recorded (and its peak taken) before do_bench
    # allocates its 256 MB buffer for flushing the L2, which would otherwise count in that peak
    step.prepare = lambda: [step() for _ in range(held[0].warmup + 1)]
    # and this once the provider is measured: a recorded graph keeps its memory pool while it lives,
    # which would count in the next provider's peak
    step.release = held.clear
    return step


def _case(shape, dtype, device, dropout: float = 0.0):
    batch, seq, dim, depth, num_tokens = shape
    torch.manual_seed(0)
    model = Transformer(num_tokens=num_tokens, max_seq_len=seq, dim=dim, depth=depth, heads=dim // 64,
                        dim_head=64, causal=True, attn_dropout=dropout, ff_dropout=dropout).to(device)
    # a small learning rate keeps hundreds of timed steps on random tokens well away from overflow
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    compiled = torch.compile(model)
    x = torch.randint(0, num_tokens, (batch, seq), device=device)
    y = torch.randint(0, num_tokens, (batch, seq), device=device)
    # The Triton provider goes last: its graph keeps its memory pool for as long as it lives, which
    # must not count in the other providers' peak memory.
    graph, drop = device.type == "cuda", dropout > 0
    providers = {
        "torch": train_step(functools.partial(model, use_triton=False), optimizer, x, y, dtype),
        "torch.compile": train_step(functools.partial(compiled, use_triton=False), optimizer, x, y, dtype),
    }
    if graph:  # the same two steps replayed as CUDA graphs, as the Triton step is
        providers["torch graph"] = train_step(functools.partial(model, use_triton=False), optimizer, x, y, dtype,
                                              True, drop)
        providers["torch.compile graph"] = train_step(functools.partial(compiled, use_triton=False), optimizer, x, y,
                                                      dtype, True, drop)
    if drop:
        providers["triton eager"] = train_step(functools.partial(model, use_triton=True), optimizer, x, y, dtype,
                                               dropout=True)
    providers["triton"] = train_step(functools.partial(model, use_triton=True), optimizer, x, y, dtype, graph, drop)
    return Case("transformer_train_step_dropout" if drop else "transformer_train_step", "fwdbwd", list(shape), dtype,
                providers=providers, flops=model.flops_per_token(seq) * batch * seq,
                extra={"tokens": batch * seq, **({"dropout": dropout} if drop else {})})


def cases(quick: bool = False):
    dtype = runtime.default_dtype()
    device = runtime.DEVICE
    for shape in QUICK if quick else SHAPES:
        yield _case(shape, dtype, device)
        torch._dynamo.reset()
    for shape in QUICK if quick else SHAPES[:1]:
        yield _case(shape, dtype, device, DROPOUT)
        torch._dynamo.reset()
