"""Memory-efficient dropout (chapter 3). Work in progress: the seeded keep-mask is the shared piece."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, offsets, p):
    """True where an element survives dropout with probability p.

    The random number of each element is Philox(seed, offset): a pure function of
    the seed and the element's position, so backward (and any other kernel, such as
    attention dropping probabilities) regenerates the identical mask instead of storing it.
    """
    return tl.rand(seed, offsets) >= p
