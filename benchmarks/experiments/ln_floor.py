"""Probe: how low can layer norm's forward+backward host time go in Python, with the package's kernels?

    python3 benchmarks/experiments/ln_floor.py

Issue 3 asks for 0.10 ms of wall time at (16384, 768), forward+backward, for 0.060 ms of GPU time: a wall
time set by the host (host_cliff.py). Here the same three kernels run from two stripped autograd.Functions
that keep only what one fixed call needs (no argument checks, no reshaping, every allocation an `empty_like`):
`lean` launches through `runtime.launch` as the package does; `direct` calls each kernel's compiled launcher
itself, with arguments prepared once per shape (what no general function can do, a floor). Host time at
64 x 768 (GPU time negligible) and do_bench at (16384, 768), against eager, the package and `Skel` (a
Function that does no work, host_cliff.py). `generic` is the package with `runtime.launch_memo` replaced by
plain `runtime.launch`, as the package launched before it had the memo.

Measured (H100 80GB HBM3 machines, torch 2.11.0+cu130, Triton 3.6.0, bf16, two rounds each; each run on a
machine of its own, whose hosts differ; us):

    run                          eager   Skel   package  generic  lean     direct
    1 (before the memo) host     67-116  67-119 202-264  -        135-216  96-99
      do_bench (16384, 768)      154     -      120-126  -        66       65-66
    2 (the memo) host            82-87   83-86  245-257  -        180-206  151
      do_bench                   154-155 -      199-205  -        143-152  99-108
    3 (both, one process) host   67-91   52-82  194-196  251-271  129-131  93-102
      do_bench                   153-154 -      325-516  350-359  169-181  126-156

In one process the memo took 55 to 75 us off a forward+backward's host time (three launches). What is left
between the package and `lean`, about 65 us on these hosts, is the Python around the launches (argument
checks, reshapes, the plumbing of the residual and partial-sum options, the Function's bookkeeping).
The do_bench times move with the host: the same `direct` floor read 65 us on run 1's machine and 99-156
on the others, and run 3's machine was noisy for every provider but eager (whose kernels, 0.146 ms of
GPU time, set its wall time). A 0.10 ms wall time at this shape is within reach of Python only on a quiet,
fast host.
"""
import importlib

import torch
import torch.nn.functional as F
import triton.testing

import triton_transformer as tt
from triton_transformer import runtime
from host_cliff import Skel, host_us  # (this folder is the script's own: Python puts it on the path)

L = importlib.import_module("triton_transformer.layernorm")
dev = runtime.DEVICE
stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
EPS = 1e-5


def setup(rows, n, dt):
    """The kernels' compiled launchers and fixed argument tails for rows x n, via one ordinary call each."""
    block, single = L._block_n(n)
    fwd = L._fwd_kernel_for(block, single)
    x = torch.randn(rows, n, device=dev, dtype=dt)
    w = torch.randn(n, device=dev, dtype=dt)
    y, mean, rstd = L.layer_norm_forward(x, w, w, EPS, store_stats=True)
    L.layer_norm_backward(x, x, w, mean, rstd, EPS)
    r_rows, _, _, warps, programs = L._bwd_params(rows, n, x.device, x.element_size())
    programs = max(1, min(programs, L.cdiv(rows, r_rows)))  # as layer_norm_backward splits the rows
    rows_per_program = L.cdiv(L.cdiv(rows, programs), r_rows) * r_rows
    programs = L.cdiv(rows, rows_per_program)
    block_c, block_p = L._sum_params(n, x.device)
    return dict(fwd=fwd, programs=programs, rows_per_program=rows_per_program, r_rows=r_rows, warps=warps,
                block=block, single=single, block_c=block_c, block_p=block_p)


def make_lean(rows, n, dt, direct):
    s = setup(rows, n, dt)
    programs, rpp = s["programs"], s["rows_per_program"]
    fwd_meta = dict(BLOCK_N=s["block"], SINGLE_BLOCK=s["single"], HAS_W=True, HAS_B=True, STORE_STATS=True,
                    HAS_RESIDUAL=False, HAS_RBIAS=False)
    bwd_meta = dict(ROWS=s["r_rows"], BLOCK_N=s["block"], SINGLE_BLOCK=s["single"], HAS_W=True, COMPUTE_DX=True,
                    COMPUTE_DW=True, COMPUTE_DB=True, RECOMPUTE_STATS=False, HAS_DH=False, STORE_DR=False,
                    COMPUTE_DRB=False, num_warps=s["warps"])
    sum_meta = dict(BLOCK_P=s["block_p"], BLOCK_C=s["block_c"], COMPUTE_DW=True, COMPUTE_DB=True, COMPUTE_DRB=False,
                    num_warps=4)
    sum_grid = (-(-n // s["block_c"]),)
    fwd_kernel = s["fwd"]
    fwd_grid = lambda meta: (-(-rows // meta["ROWS"]),)  # noqa: E731
    cached = {}
    stat = torch.empty(rows, dtype=torch.float32, device=dev)  # templates: empty_like is the cheapest allocation
    partial = torch.empty((2, programs, n), dtype=torch.float32, device=dev)

    def run(name, kernel, grid, args, meta):
        if not direct or name not in cached:
            c = runtime.launch(kernel, grid, *args, **meta)
            if direct:
                compiled, gx, _, _, tail, _ = runtime._launchers[id(kernel)].bound(grid, args, meta)
                cached[name] = (compiled, compiled.function, compiled.packed_metadata, tail, gx)
            return c
        compiled, function, packed, tail, gx = cached[name]
        compiled.run(gx, 1, 1, stream(0), function, packed, None, None, None, *args, *tail)

    class Lean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y = torch.empty_like(x)
            mean = torch.empty_like(stat)
            rstd = torch.empty_like(stat)
            run("fwd", fwd_kernel, fwd_grid, (x, y, w, b, mean, rstd, x, x, x, n, n, 0, 0, rows, n, EPS),
                fwd_meta)
            ctx.save_for_backward(x, w, mean, rstd)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w, mean, rstd = ctx.saved_tensors
            dx = torch.empty_like(x)
            dw = torch.empty_like(w)
            db = torch.empty_like(w)
            part = torch.empty_like(partial)
            run("bwd", L._layer_norm_bwd_kernel, (programs,),
                (x, dy, dx, w, mean, rstd, part, x, x, n, n, n, 0, 0, rows, n, rpp, EPS), bwd_meta)
            run("sum", L._sum_partials_kernel, sum_grid, (part, dw, db, x, programs, n), sum_meta)
            return dx, dw, db

    return Lean


def main():
    torch.autograd.set_multithreading_enabled(False)
    dt = torch.bfloat16
    for rows in (64, 16384):
        x = torch.randn(rows, 768, device=dev, dtype=dt, requires_grad=True)
        w = (1 + 0.1 * torch.randn(768, device=dev)).to(dt).requires_grad_()
        b = (0.1 * torch.randn(768, device=dev)).to(dt).requires_grad_()
        dy = torch.randn_like(x)
        lean, direct = make_lean(rows, 768, dt, False), make_lean(rows, 768, dt, True)
        cases = {
            "eager": lambda: F.layer_norm(x, (768,), w, b).backward(dy),
            "skel": lambda: Skel.apply(x, w, b, rows, 768, EPS, None).backward(dy),
            "package": lambda: tt.layer_norm(x, (768,), w, b).backward(dy),
            "lean": lambda: lean.apply(x, w, b).backward(dy),
            "direct": lambda: direct.apply(x, w, b).backward(dy),
        }
        ref = [t.detach().clone() for t in torch.autograd.grad(F.layer_norm(x.float(), (768,), w.float(), b.float()),
                                                                (x, w, b), dy.float())]
        for name in ("package", "lean", "direct"):
            cases[name]()
            got = [x.grad, w.grad, b.grad]
            err = max(((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref))
            print(f"rows {rows} {name}: max relative error against fp32 {err:.2e}")
            x.grad = w.grad = b.grad = None
        cases["generic"] = cases["package"]  # the package with every launch through runtime.launch
        for rnd in range(2):
            for name, fn in cases.items():
                def call(fn=fn):
                    fn()
                    x.grad = w.grad = b.grad = None
                if name == "generic":
                    L.launch_memo = generic
                if rows == 64:
                    print(f"round {rnd} rows {rows} {name:8s} host {host_us(call):6.1f} us")
                else:
                    ms = triton.testing.do_bench(fn, grad_to_none=[x, w, b], return_mode="median")
                    print(f"round {rnd} rows {rows} {name:8s} do_bench {ms * 1e3:6.1f} us")
                L.launch_memo = runtime.launch_memo


def generic(memo, key, kernel, grid, *args, **meta):
    """`runtime.launch_memo` without its memory: `runtime.launch`, as the package launched before it."""
    return runtime.launch(kernel, grid, *args, **meta)


if __name__ == "__main__":
    main()
