"""Cross-entropy benchmark cases: forward+backward of the loss at GPT-2's vocabulary and at bytes (issue 7)."""

import torch
import torch.nn.functional as F

from .. import runtime
from ..cross_entropy import cross_entropy
from . import Case

SHAPES = [(8192, 50304), (8192, 256)]  # (tokens, vocabulary): GPT-2 (padded) and a byte-level model


def cases(quick: bool = False):
    dtype = runtime.default_dtype()
    for n, v in SHAPES[1:] if quick else SHAPES:
        compiled = torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)
        x = torch.randn(n, v, device=runtime.DEVICE, dtype=dtype).requires_grad_()
        target = torch.randint(0, v, (n,), device=runtime.DEVICE)
        nbytes = x.numel() * x.element_size()

        def step(loss_fn, x=x, target=target):
            # Drop the last run's gradient first, so that the peak memory of one step counts the
            # logits and what the loss itself allocates, not a leftover x.grad from the timing loop.
            x.grad = None
            loss_fn(x, target).backward()

        # the least any fused loss must move: read the logits once, write their gradient once
        yield Case("cross_entropy", "fwdbwd", [n, v], dtype, bytes=2 * nbytes + target.numel() * 8,
                   grad_to_none=[x], extra={"logits_GiB": round(nbytes / 2**30, 4)}, providers={
                       "triton": lambda step=step: step(cross_entropy),
                       "torch": lambda step=step: step(F.cross_entropy),
                       "torch.compile": lambda step=step, compiled=compiled: step(compiled),
                       # the logits read and a logits-sized tensor written once, the floor above
                       "copy": lambda x=x: x.detach().clone(),
                   })
        del x, target, step
