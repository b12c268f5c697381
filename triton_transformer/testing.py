"""Comparing our kernels with PyTorch: one tolerance table and one verdict line.

`cmp(name, ours, ref)` is Karpathy's "backprop ninja" check: it prints whether two
tensors are exact, close (within the tolerance of their dtype) or wrong, and the
largest error. The chapters print it in cells that nbval compares, so the printed
verdict must not depend on the machine: it shows the error only when the check fails.
"""

from __future__ import annotations

import torch

# Tolerances for results computed in low precision and compared with a float32
# reference. A hand-written fp32 `tl.dot` on a GPU runs in TF32 (10-bit mantissa), hence 1e-2 there.
TOLERANCES = {
    torch.float64: dict(atol=1e-7, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}


def tolerance(dtype: torch.dtype, *, matmul: bool = False) -> dict:
    """atol/rtol for comparing a result of `dtype`; `matmul=True` widens fp32 for TF32 dots on GPU."""
    tol = dict(TOLERANCES[dtype])
    if matmul and dtype == torch.float32 and torch.cuda.is_available():
        tol = dict(atol=1e-2, rtol=1e-2)
    return tol


def max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, NaNs in the same places counting as equal."""
    a, b = ours.detach().double(), ref.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    same_inf = torch.isinf(a) & (a == b)
    diff = diff.masked_fill(same_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def cmp(name: str, ours: torch.Tensor, ref: torch.Tensor, *, atol: float | None = None,
        rtol: float | None = None, verbose: bool = False) -> bool:
    """Print one line: `name: exact`, `name: close` or `name: WRONG (max error ...)`; return True unless wrong.

    The error is printed only when wrong (or with verbose=True) so that the line is
    identical on every machine and nbval can compare it.
    """
    if ours.shape != ref.shape:
        print(f"{name:<24} WRONG shape {tuple(ours.shape)} != {tuple(ref.shape)}")
        return False
    tol = tolerance(ours.dtype)
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    a, b = ours.detach().float(), ref.detach().float()
    err = max_error(a, b)
    if torch.equal(torch.nan_to_num(a, nan=123.0), torch.nan_to_num(b, nan=123.0)):
        verdict = "exact"
    elif torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
        verdict = "close"
    else:
        verdict = f"WRONG (max error {err:.3g}, atol {atol:g}, rtol {rtol:g})"
    if verbose and not verdict.startswith("WRONG"):
        verdict += f" (max error {err:.3g})"
    print(f"{name:<24} {verdict}")
    return not verdict.startswith("WRONG")


def verdict(name: str, ours: torch.Tensor, ref: torch.Tensor, **tol) -> None:
    """Like `cmp` but prints `ok`/`WRONG`: for nbval-checked cells, where exact-vs-close may differ by machine."""
    a, b = ours.detach().float(), ref.detach().float()
    t = tolerance(ours.dtype)
    t.update(tol)
    ok = ours.shape == ref.shape and torch.allclose(a, b, equal_nan=True, **t)
    print(f"{name:<24} {'ok' if ok else 'WRONG (max error %.3g)' % max_error(a, b)}")
