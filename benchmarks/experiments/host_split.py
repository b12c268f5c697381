"""Where a small call's host time goes, on the GPU machine: ours against eager, and autograd's floor.

    python3 benchmarks/experiments/host_split.py [attn] [parts] [case-to-profile ...]

Forward+backward of tiny tensors (the GPU's time is negligible, so the time per call is the host's):
eager PyTorch, the package, and `Skel`, an autograd.Function with layer norm's inputs and outputs that
does no work (the floor any Function pays); causal attention at (1, 2, 64, 64) against SDPA, and with its three
launches replaced by nothing (what is left is the Python around them), or made without `runtime.launch_memo`'s
memory, or (`norun`) with everything but Triton's compiled launcher itself, or (`tensorptr`) with the tensors
handed to that launcher as tensors rather than addresses (`runtime.RAW_POINTERS` off). `parts` adds the pieces of layer norm's call; a case name
profiles that case with cProfile.

Measured (H100 80GB HBM3 machine, torch 2.11.0+cu130, Triton 3.6.0, medians of five rounds, two processes):
layer norm 213 and 329 us per forward+backward, eager's 68 and 115, the Skel floor 63 and 95; softmax 114
and 155 (eager 50, 81); dropout 101 and 195 (eager 52, 78). Of layer norm's 329: layer_norm_backward 94,
_check_args 11, each torch.empty(shape, dtype=, device=) 6.1 against 3.7 for torch.empty_like, unbind 5.
After the trims that followed (a set lookup for inputs already checked, empty_like, one partial-sum buffer
without unbind views), old and new package side by side on one H200 machine, alternating processes:
layer norm 190 / 203 us before, 176 / 153 after; softmax 93 / 91 before, 84 / 79 after; dropout 96 / 99
before, 88 / 75 after (eager layer norm 57-64 there, the Skel floor 49-56).

Causal attention, `attn` (H100 80GB HBM3 machines, same versions, medians of five rounds): on one machine
409 us a forward+backward, 231 with the launches left out, against SDPA's 135 and the Skel floor's 88.
After its launches went through `runtime.launch_memo`, side by side in one process on another machine:
330 us, 432 without the memo, 266 with no launches, SDPA 156, Skel 87 (a third machine: 399, 294, SDPA 181).
Then each tensor's strides read once, one integer test of the heads' spans instead of a call per tensor, new
outputs by empty_like, and a memo hit tried before the launch's keyword arguments are built: the package against
the module of the commit before, side by side in one process (a quicker host, medians of seven rounds): 182.7 us
against 196.5, SDPA 120.8, Skel 59.7. With `norun` added, on a slow host (same GPU and versions, medians of five
rounds): 416.6 us a call, 307.8 with everything but Triton's compiled launchers (so the three launches cost
109, 36 us each, in Triton's launcher and the driver), 319.3 with the launches left out (`NoLaunch` now skips the
memo too, so it builds every launch's keyword arguments), 594.1 without the memo; SDPA 245.7, Skel 122.1.
Then the cached launches hand Triton's launcher their tensors' addresses (`runtime.RAW_POINTERS`): per tensor
it no longer calls data_ptr and asks the driver what memory the address is. Another machine, medians of five
rounds (min in brackets): 270.6 us (170.1) a call against 285.5 (185.2) with tensors handed over as before;
204.0 (136.4) with everything but the launchers, 183.7 with the launches left out, 384.5 without the memo;
SDPA 134.4 (96.6), Skel 90.4 (57.2).
"""
import cProfile
import pstats
import sys
import time

import torch
import triton_transformer as tt
from host_cliff import Skel  # (this folder is the script's own: Python puts it on the path)

torch.autograd.set_multithreading_enabled(False)
dev = tt.runtime.DEVICE
dt = torch.bfloat16 if dev.type == "cuda" else torch.float32


def per_call(fn, n=2000):
    for _ in range(100):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


xs = torch.randn(64, 64, device=dev, dtype=dt, requires_grad=True)
dys = torch.randn_like(xs)
x = torch.randn(64, 768, device=dev, dtype=dt, requires_grad=True)
dy = torch.randn_like(x)
w = torch.ones(768, device=dev, dtype=dt, requires_grad=True)
b = torch.zeros(768, device=dev, dtype=dt, requires_grad=True)
xd = torch.randn(4096, device=dev, dtype=dt, requires_grad=True)
dyd = torch.randn_like(xd)
qa, ka, va = (torch.randn(1, 2, 64, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
doa = torch.randn_like(qa)
A = __import__("importlib").import_module("triton_transformer.attention")


class NoLaunch:
    """Within it, the attention module's launches do nothing: what is left of a call is its Python."""

    def __enter__(self):
        self.saved = A.launch_memo, A.launch_from_memo
        A.launch_memo = lambda *args, **meta: None
        A.launch_from_memo = lambda memo, key, args: None  # a miss: on to launch_memo, which does nothing

    def __exit__(self, *exc):
        A.launch_memo, A.launch_from_memo = self.saved


class NoMemo(NoLaunch):
    """Within it, the attention module's launches go through `runtime.launch` (no key: nothing remembered)."""

    def __enter__(self):
        self.saved = A.launch_memo, A.launch_from_memo
        launch_memo = A.launch_memo
        A.launch_memo = lambda memo, key, *args, **meta: launch_memo(memo, None, *args, **meta)
        A.launch_from_memo = lambda memo, key, args: None


class NoRun:
    """Within it, a launch that the memo holds does everything but call Triton's compiled launcher (C code and
    the driver's launch): the difference to a whole call is what those launches cost."""

    def __enter__(self):
        self.saved = tt.runtime._run
        tt.runtime._run = lambda compiled, *rest: compiled

    def __exit__(self, *exc):
        tt.runtime._run = self.saved


def attn_no_run():
    with NoRun():
        tt.attention(qa, ka, va, causal=True).backward(doa)
    reset(qa, ka, va)


def attn_tensor_pointers():
    tt.runtime.RAW_POINTERS = False
    try:
        tt.attention(qa, ka, va, causal=True).backward(doa)
    finally:
        tt.runtime.RAW_POINTERS = True
    reset(qa, ka, va)


def attn_no_memo():
    with NoMemo():
        tt.attention(qa, ka, va, causal=True).backward(doa)
    reset(qa, ka, va)


def attn_no_launch():
    with NoLaunch():
        tt.attention(qa, ka, va, causal=True).backward(doa)
    reset(qa, ka, va)


def reset(*ts):
    for t in ts:
        t.grad = None


F = torch.nn.functional
cases = {
    "eager softmax fb": lambda: (torch.softmax(xs, -1).backward(dys), reset(xs)),
    "tt softmax fb": lambda: (tt.softmax(xs).backward(dys), reset(xs)),
    "tt softmax f": lambda: tt.softmax(xs),
    "eager ln fb": lambda: (F.layer_norm(x, (768,), w, b).backward(dy), reset(x, w, b)),
    "skel ln fb": lambda: (Skel.apply(x, w, b, 64, 768, 1e-5, None).backward(dy), reset(x, w, b)),
    "tt ln fb": lambda: (tt.layer_norm(x, (768,), w, b).backward(dy), reset(x, w, b)),
    "tt ln f": lambda: tt.layer_norm(x, (768,), w, b),
    "eager dropout fb": lambda: (F.dropout(xd, 0.1).backward(dyd), reset(xd)),
    "tt dropout fb": lambda: (tt.dropout(xd, 0.1).backward(dyd), reset(xd)),
    "tt dropout f": lambda: tt.dropout(xd, 0.1),
    "sdpa fb": lambda: (F.scaled_dot_product_attention(qa, ka, va, is_causal=True).backward(doa), reset(qa, ka, va)),
    "tt attn fb": lambda: (tt.attention(qa, ka, va, causal=True).backward(doa), reset(qa, ka, va)),
    "tt attn fb nolaunch": attn_no_launch,
    "tt attn fb nomemo": attn_no_memo,
    "tt attn fb norun": attn_no_run,
    "tt attn fb tensorptr": attn_tensor_pointers,
}
L = __import__("importlib").import_module("triton_transformer.layernorm")
S = __import__("importlib").import_module("triton_transformer.softmax")
xx = x.detach()
_, mean, rstd = L.layer_norm_forward(xx, w.detach(), b.detach(), 1e-5, store_stats=True)
wd = w.detach()
parts = {
    "ln _check_args": lambda: L._check_args(x, (768,), w, b, None),
    "ln forward()": lambda: L.layer_norm_forward(xx, wd, b.detach(), 1e-5, store_stats=True),
    "ln backward()": lambda: L.layer_norm_backward(dy, xx, wd, mean, rstd, 1e-5),
    "ln bwd params": lambda: L._bwd_params(64, 768, x.device, 2),
    "torch.empty": lambda: torch.empty((64, 768), dtype=dt, device=dev),
    "empty_like": lambda: torch.empty_like(xx),
    "check_tensor": lambda: tt.runtime.check_tensor("x", x, dtypes=tt.runtime.FLOAT_DTYPES),
    "softmax_forward()": lambda: S.softmax_forward(xs.detach()),
    "unbind": lambda: torch.empty((2, 132, 768), device=dev).unbind(0),
}
if "attn" in sys.argv:  # the attention cases and the two it is compared with
    cases = {k: f for k, f in cases.items() if "attn" in k or "sdpa" in k or "skel" in k}
    sys.argv.remove("attn")
if "parts" in sys.argv:
    cases.update(parts)
    sys.argv.remove("parts")
results = {k: [] for k in cases}
for _ in range(5):
    for k, f in cases.items():
        results[k].append(per_call(f))
for k, v in results.items():
    v = sorted(v)
    print(f"{k:18s} median {v[2]:7.1f} us  (min {v[0]:.1f}, max {v[-1]:.1f})")
for name in sys.argv[1:]:
    f = cases[name]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(2000):
        f()
    pr.disable()
    print(name)
    pstats.Stats(pr).sort_stats("tottime").print_stats(22)
