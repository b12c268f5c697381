"""Probes behind decisions in the package (not part of the book or of benchmarks/run.py), on a GPU:

    python3 benchmarks/experiments/probe.py host ce softmax mm mm2

host     host (Python) time of small forward+backward calls against their GPU time, with a profile
ce       cross-entropy's forward kernel: the row kept whole on chip against the online path, per block/warps
softmax  the same choice for softmax's forward
mm       dW = dz^T x of a GPT's projections over 16384 rows: TMA or pointer kernel (forced), per split-K
mm2      forward, dX and dW of the same projections: "auto" routing against the pointer kernel and cuBLAS
tmacfg   the TMA kernel's forward and dX with each config forced, against the autotuner's pick and cuBLAS
dwcfg    dW = dz^T x with each pointer-kernel config forced (and a few more), at the split "auto" picks and at 1
lnbwd    layer norm's backward as the GPT runs it (fp32 residual stream, bf16 dy): tile and program count
dbfuse   dW and db of the GPT's bias-only projections: db in the dW kernel's row sums, or its own pass
tmastore the TMA kernel's forward and dX with the outputs stored through TMA or through pointers, against cuBLAS
attn     causal attention per kernel (forward, dQ, dK/dV) against SDPA's forward and backward, the tuned configs,
         and the tuner's pick from a wider list of configs
onexp    the one-block softmax forward and cross-entropy kernels against copies of older modules (kernel time)
warps    one-block softmax forward and cross-entropy at 16 and 32 warps (kernel time, registers, spills)
dwir     dW at split 1 (pointer and TMA kernel) against cuBLAS and the forward, and what Triton made of it (IR)
ff       a GPT's feed-forward forward+backward: feed_forward (act' in the dh GEMM) against two linears and torch
ffstep   the GPT-2-small training step (CUDA graph, as benchmarked) with the feed-forward fused or as two linears
dwsplit  dW = dz^T x (fp32 out, as the model) of every projection of both models, split-K forced 1 to 12 (GPU time)
dwdb     the same dW with and without the bias's row sums (db in the dW kernel), GPU time
smhint   softmax's two-pass online path at (8192, 50304) with L2 eviction hints (first read kept, second
         read and the writes evicted first), per block / warps / programs per SM / stages
cesync   cross-entropy fwd+bwd with and without the bad-target readback (do_bench), its GPU time and kernels
hostparts where the host time of small forward+backward calls goes: allocation, autograd, launch() against
         Triton's own launch and the compiled launcher, at tiny shapes (GPU time negligible), with a profile
cehost   cross-entropy fwd+bwd at (8192, 50304) timed as do_bench does (L2 flush, then the call): host time from
         the call to the main kernel's launch, against the flush's GPU time, and the call's wall time
ceparts  where cross-entropy's host time goes, at (8192, 256) (GPU time negligible): its pieces, with a profile
roof     the memory-bound forwards (softmax 4096^2, layer norm 16384x768, dropout 16M) against a copy of the
         same bytes (torch and a Triton load/store kernel), wall and GPU time; dropout variants
"""
import cProfile
import pstats
import sys
import time

import torch
import triton
import triton.testing
import triton.language as tl

import triton_transformer as tt
import importlib
ce_mod = importlib.import_module("triton_transformer.cross_entropy")
from triton_transformer import runtime
sm_mod = importlib.import_module("triton_transformer.softmax")
from triton_transformer.bench import measure_gpu_ms

dev = runtime.DEVICE
bf16 = torch.bfloat16


def host_us(fn, grads, n=200, warmup=10):
    """(host us per call, us per call once the GPU has drained) of `fn` in a loop, gradients dropped each time."""
    for _ in range(warmup):
        fn()
        for t in grads:
            t.grad = None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
        for t in grads:
            t.grad = None
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / n, 1e6 * (time.perf_counter() - t0) / n


def _print_profile(fn, grads, calls: int, top: int):
    """cProfile of `calls` calls of `fn` (gradients dropped each time), the `top` functions by own time."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
        for t in grads:
            t.grad = None
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)


def host():
    torch.autograd.set_multithreading_enabled(False)
    x = torch.randn(16384, 768, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(768, device=dev, dtype=bf16, requires_grad=True)
    b = torch.zeros(768, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn(16384, 768, device=dev, dtype=bf16)
    xs = torch.randn(4096, 1024, device=dev, dtype=bf16, requires_grad=True)
    dys = torch.randn_like(xs)
    xd = torch.randn(4194304, device=dev, dtype=bf16, requires_grad=True)
    dyd = torch.randn_like(xd)
    xl = torch.randn(16384, 768, device=dev, dtype=bf16, requires_grad=True)
    wl = torch.randn(3072, 768, device=dev, dtype=bf16, requires_grad=True)
    dyl = torch.randn(16384, 3072, device=dev, dtype=bf16)
    q, k, v = (torch.randn(8, 12, 1024, 64, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))
    dya = torch.randn_like(q)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cases = {
        "layer_norm": (lambda: tt.layer_norm(x, (768,), w, b).backward(dy), [x, w, b]),
        "layer_norm_fwd_only": (lambda: tt.layer_norm(x, (768,), w, b), [x, w, b]),
        "layer_norm_nograd": (lambda: tt.layer_norm(x.detach(), (768,), w.detach(), b.detach()), []),
        "softmax": (lambda: tt.softmax(xs).backward(dys), [xs]),
        "dropout": (lambda: tt.dropout(xd, 0.1).backward(dyd), [xd]),
        "torch_ln": (lambda: torch.nn.functional.layer_norm(x, (768,), w, b).backward(dy), [x, w, b]),
        "linear": (lambda: tt.linear(xl, wl).backward(dyl), [xl, wl]),
        "torch_linear": (lambda: torch.nn.functional.linear(xl, wl).backward(dyl), [xl, wl]),
        "attention": (lambda: tt.attention(q, k, v, causal=True).backward(dya), [q, k, v]),
        "sdpa": (lambda: sdpa(q, k, v, is_causal=True).backward(dya), [q, k, v]),
    }
    for name, (fn, grads) in cases.items():
        host, drained = host_us(fn, grads, n=300, warmup=20)
        print(f"{name}: host {host:.1f} us/call, with drain {drained:.1f} us/call, "
              f"do_bench {1e3 * triton.testing.do_bench(fn, grad_to_none=grads, return_mode='median'):.1f} us, "
              f"gpu {1e3 * (measure_gpu_ms(fn, grads) or float('nan')):.1f} us")
        if name in ("layer_norm", "linear", "attention"):
            _print_profile(fn, grads, calls=200, top=14)


def bench(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _with_launch_params(module, params, call):
    """call() with `module._launch_params` forced to return `params` (None: the module's own choice)."""
    if params is None:
        return call()
    orig = module._launch_params
    module._launch_params = lambda *a, **k: params
    try:
        return call()
    finally:
        module._launch_params = orig


def _use_configs(kernel, configs):
    """Make an autotuned `kernel` choose among `configs` (just one: it runs without benchmarking).

    The package's cached launches are dropped too: they would keep the kernel compiled for the last list.
    """
    kernel.configs = list(configs)
    runtime._launchers.clear()


def _config_name(cfg):
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}s{cfg.num_stages}w{cfg.num_warps}"


def ce():
    ce_mod._BadTargetCount.check = lambda *a, **k: None  # the read-back, out of the timing
    for V in (50304, 256):
        logits = torch.randn(8192, V, device=dev, dtype=bf16)
        target = torch.randint(0, V, (8192,), device=dev)
        nbytes = 2 * logits.numel() * 2
        variants = [("default", None, None, None)]
        if V > 4096:
            variants += [("single16", True, 65536, 16), ("single32", True, 65536, 32)]
            for blk in (1024, 2048, 4096, 8192, 16384):
                for w in (4, 8, 16):
                    if blk // (32 * w) >= 4:
                        variants.append((f"online{blk}w{w}", False, blk, w))
        for name, single, blk, w in variants:
            params = None if single is None else (blk, single, w)

            def fn(params=params):
                return _with_launch_params(
                    ce_mod, params, lambda: ce_mod.cross_entropy_forward(logits, target, with_grad=True))
            try:
                us = bench(fn)
                print(f"ce [8192, {V}] {name}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s (read+write once)")
            except Exception as e:  # noqa: BLE001
                print(f"ce {name}: failed {type(e).__name__}: {str(e)[:200]}")


def softmax():
    for m, n in ((8192, 50304), (4096, 4096), (4096, 16384)):
        x = torch.randn(m, n, device=dev, dtype=bf16)
        nbytes = 2 * x.numel() * 2
        variants = [("default", None)]
        for blk in (2048, 4096, 8192, 16384, 65536):
            for w in (4, 8, 16, 32):
                if blk // (32 * w) >= 4 and blk <= triton.next_power_of_2(n):
                    variants.append((f"{'single' if blk >= n else 'online'}{blk}w{w}", (blk, blk >= n, w)))
        for name, params in variants:
            def fn(params=params):
                return _with_launch_params(sm_mod, params, lambda: sm_mod.softmax_forward(x))
            try:
                us = bench(fn)
                print(f"softmax [{m}, {n}] {name}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s")
            except Exception as e:  # noqa: BLE001
                print(f"softmax {name}: failed {type(e).__name__}: {str(e)[:200]}")
    y = torch.empty(8192 * 50304 * 2, device=dev, dtype=bf16)
    src = torch.randn(8192 * 50304, device=dev, dtype=bf16)
    us = bench(lambda: y[: src.numel()].copy_(src))
    print(f"device copy 8192x50304 bf16: {us:.1f} us, {2 * src.numel() * 2 / us / 1e3:.0f} GB/s")



def _projections():
    """(label, x, W, dy, flops) for every projection of the seed model and GPT-2 small over 16384 rows."""
    M = 16384
    for k_in, n_out in ((512, 1536), (512, 512), (512, 2048), (2048, 512), (512, 256), (768, 3072), (3072, 768)):
        x = torch.randn(M, k_in, device=dev, dtype=bf16)
        w = torch.randn(n_out, k_in, device=dev, dtype=bf16) / k_in ** 0.5
        dy = torch.randn(M, n_out, device=dev, dtype=bf16)
        yield f"[{M},{k_in}->{n_out}]", x, w, dy, 2 * M * k_in * n_out


def mm():
    MM = importlib.import_module("triton_transformer.matmul")
    for label, x, w, dy, flops in _projections():
        line = [label]
        for name, ours, ref in (("fwd", lambda: MM.matmul(x, w.t()), lambda: x @ w.t()),
                                ("dX", lambda: MM.matmul(dy, w), lambda: dy @ w)):
            t, r = bench(ours), bench(ref)
            line.append(f"{name} {t:.1f}/{r:.1f}us ({flops / t / 1e6:.0f}/{flops / r / 1e6:.0f} TF)")
        r = bench(lambda: dy.t() @ x)
        n_out, k_in = w.shape
        split = MM._split_k(n_out, k_in, x.shape[0], dev)
        line.append(f"dW cublas {r:.1f}us ({flops / r / 1e6:.0f} TF) auto-split {split}:")
        for tma in (True, False):  # forced: "auto" now leaves dW to the pointer kernel
            for split in (None, 1, 2, 3, 4, 6, 8):
                MM.SPLIT_K, MM.TMA = split, tma
                t = bench(lambda: MM.matmul(dy.t(), x, out_dtype=torch.float32))
                line.append(f"{'tma' if tma else 'ptr'}{split or 'h'} {t:.1f}")
        MM.SPLIT_K, MM.TMA = None, "auto"
        print(" ".join(line), flush=True)


def mm2():
    MM = importlib.import_module("triton_transformer.matmul")
    for label, x, w, dy, flops in _projections():
        line = [label]
        for name, a, b in (("fwd", x, w.t()), ("dX", dy, w), ("dW", dy.t(), x)):
            r = bench(lambda: a @ b)
            times = []
            for tma in ("auto", False):
                MM.TMA = tma
                times.append(bench(lambda: MM.matmul(a, b)))
            MM.TMA = "auto"
            line.append(f"| {name} cublas {r:.1f} auto {times[0]:.1f} ptr {times[1]:.1f}us "
                        f"({flops / times[0] / 1e6:.0f} TF)")
        print(" ".join(line), flush=True)


def tmacfg():
    MM = importlib.import_module("triton_transformer.matmul")
    kernel = MM._matmul_tma_kernel
    configs = list(kernel.configs)
    M = 16384
    for k_in, n_out in ((512, 1536), (512, 512), (768, 3072), (768, 50304)):
        x = torch.randn(M, k_in, device=dev, dtype=bf16)
        w = torch.randn(n_out, k_in, device=dev, dtype=bf16) / k_in ** 0.5
        dy = torch.randn(M, n_out, device=dev, dtype=bf16)
        for name, a, b in (("fwd", x, w.t()), ("dX", dy, w)):
            MM.TMA = True
            _use_configs(kernel, configs)
            auto = bench(lambda: MM.matmul(a, b))
            line = [f"[{M},{k_in}->{n_out}] {name} cublas {bench(lambda: a @ b):.1f} tuned {auto:.1f} "
                    f"({_config_name(kernel.best_config)}) |"]
            for cfg in configs[1:]:
                _use_configs(kernel, [cfg])
                try:
                    t = f"{bench(lambda: MM.matmul(a, b)):.1f}"
                except Exception as err:  # out of shared memory and the like
                    t = type(err).__name__
                line.append(f"{_config_name(cfg)} {t}")
            _use_configs(kernel, configs)
            MM.TMA = "auto"
            print(" ".join(line), flush=True)
        MM.TMA = False
        print(f"  ptr fwd {bench(lambda: MM.matmul(x, w.t())):.1f} dX {bench(lambda: MM.matmul(dy, w)):.1f} "
              f"dW {bench(lambda: MM.matmul(dy.t(), x)):.1f} | cublas dW {bench(lambda: dy.t() @ x):.1f}", flush=True)
        MM.TMA = "auto"


def lnbwd():
    """The backward of layer norm as the GPT runs it, at its two widths, against the other tiles."""
    L = importlib.import_module("triton_transformer.layernorm")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default_tile, default_params = L._default_tile, L._bwd_params
    for n_rows, n, dtype in ((16384, 768, torch.float32), (16384, 512, torch.float32), (16384, 768, bf16)):
        residual = dtype == torch.float32  # the model's fused add: dh in, dr out
        h = torch.randn(n_rows, n, device=dev, dtype=dtype)
        w, b = torch.rand(n, device=dev, dtype=dtype) + 0.5, torch.randn(n, device=dev, dtype=dtype)
        dy = torch.randn(n_rows, n, device=dev, dtype=bf16)
        dh = torch.randn(n_rows, n, device=dev) if residual else None
        dr = torch.empty(n_rows, n, device=dev, dtype=bf16) if residual else None
        _, mean, rstd = L.layer_norm_forward(h, w, b, 1e-5, store_stats=True, out_dtype=bf16)
        # read h, dy (and dh); write dx (and dr)
        moved = n_rows * n * (2 * h.element_size() + 2 + (4 + 2 if residual else 0))
        chosen = L._bwd_params(n_rows, n, h.device, h.element_size())
        t = bench(lambda: L.layer_norm_backward(dy, h, w, mean, rstd, 1e-5, dh=dh, dr=dr))
        print(f"({n_rows}, {n}) {str(dtype)[6:]}{' + residual' if residual else ''}: package's (ROWS "
              f"{chosen[0]}, warps {chosen[3]}, {chosen[4]} programs) {t:.1f} us {moved / t / 1e3:.0f} GB/s", flush=True)
        L._bwd_params = lambda r, c, d, e=2: default_params(r, c, d, 2)  # the 16-bit rule, for any x
        for rows, warps in ((2, 4), (4, 4), (8, 4), (8, 8)):
            # the same tile in values at every width: ROWS x BLOCK_N = rows x 1024
            L._default_tile = lambda block, single, rows=rows * 1024 // runtime.next_power_of_2(n), warps=warps: (
                max(1, rows), warps)
            line = [f"  ROWS {L._default_tile(0, True)[0]} warps {warps}:"]
            for per_sm in (1, 2, 4):
                t = bench(lambda: L.layer_norm_backward(dy, h, w, mean, rstd, 1e-5, dh=dh, dr=dr,
                                                        num_programs=sms * per_sm))
                line.append(f"{per_sm}/SM {t:.1f} us ({moved / t / 1e3:.0f} GB/s)")
            print(" ".join(line), flush=True)
        L._default_tile, L._bwd_params = default_tile, default_params
        src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)  # read half, write half
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src))
        print(f"  device copy of the same bytes: {t:.1f} us {moved / t / 1e3:.0f} GB/s", flush=True)


def dwcfg():
    MM = importlib.import_module("triton_transformer.matmul")
    kernel = MM._matmul_kernel
    listed = list(kernel.configs)
    extra = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=w)
             for bm, bn, bk, st, w in ((128, 256, 64, 4, 8), (256, 128, 64, 4, 8), (128, 128, 128, 3, 8),
                                       (128, 256, 32, 5, 8), (256, 128, 32, 5, 8), (128, 128, 64, 5, 8),
                                       (256, 64, 64, 4, 4), (64, 128, 64, 5, 4))]
    M = 16384
    for k_in, n_out in ((768, 3072), (3072, 768), (512, 2048), (512, 1536)):
        x = torch.randn(M, k_in, device=dev, dtype=bf16)
        dy = torch.randn(M, n_out, device=dev, dtype=bf16)
        split = MM._split_k(n_out, k_in, M, dev)
        line = [f"dW [{n_out}x{k_in}] over {M}: cublas {bench(lambda: dy.t() @ x):.1f}"]
        _use_configs(kernel, listed)
        line.append(f"tuned(split {split}) {bench(lambda: MM.matmul(dy.t(), x)):.1f} |")
        for cfg in listed[1:] + extra:
            _use_configs(kernel, [cfg])
            times = []
            for forced in (None, 1):
                MM.SPLIT_K = forced
                try:
                    times.append(f"{bench(lambda: MM.matmul(dy.t(), x)):.1f}")
                except Exception as err:
                    times.append(type(err).__name__[:12])
            MM.SPLIT_K = None
            line.append(f"{_config_name(cfg)} {'/'.join(times)}")
        _use_configs(kernel, listed)
        print(" ".join(line), flush=True)


def dbfuse():
    MM = importlib.import_module("triton_transformer.matmul")
    M = 16384
    for label, n_out, k_in in (("GPT-2 logits", 50304, 768), ("GPT-2 proj_out", 768, 3072),
                               ("GPT-2 to_out", 768, 768), ("seed logits", 256, 512), ("seed proj_out", 512, 2048)):
        x = torch.randn(M, k_in, device=dev, dtype=bf16)
        dy = torch.randn(M, n_out, device=dev, dtype=bf16)
        db = torch.empty(n_out, device=dev)
        fused = lambda: MM.matmul(dy.t(), x, out_dtype=torch.float32, row_sum=db)
        fused()
        err = (db - dy.float().sum(0)).abs().max().item()
        apart = lambda: (MM.activation_backward(dy, None, 0, True, torch.float32),
                         MM.matmul(dy.t(), x, out_dtype=torch.float32))
        print(f"{label} [{n_out}x{k_in}] over {M}: fused {bench(fused):.1f} us | dW alone "
              f"{bench(lambda: MM.matmul(dy.t(), x, out_dtype=torch.float32)):.1f} + db pass = {bench(apart):.1f} | "
              f"cublas dW + torch db {bench(lambda: (dy.t() @ x, dy.sum(0))):.1f} | db err {err:.1e}", flush=True)


def _ir_summary(compiled):
    """The lines of a compiled kernel's TTGIR and PTX that say how the dot gets its operands, counted."""
    import collections
    import re
    seen = collections.Counter()
    for line in compiled.asm["ttgir"].splitlines():
        line = line.strip()
        if line.startswith("#shared") or line.startswith("#mma"):
            seen[line[:170]] += 1
        for op in ("warp_group_dot ", "ttg.convert_layout", "ttg.local_alloc", "ttg.memdesc_trans", "async_copy_global",
                   "async_tma_copy", "ttg.local_load", "tt.trans", "warp_group_dot_wait"):
            if op in line:
                seen[op + " : " + re.sub(r"%[\w#]+", "%", line.split(":")[-1])[:150]] += 1
    for line in compiled.asm["ptx"].splitlines():
        m = re.match(r"\s*(wgmma\.mma_async[\w.]*|ldmatrix[\w.]*|cp\.async[\w.:]*|stmatrix[\w.]*)", line)
        if m:
            tail = line.rsplit(",", 4)[1:] if m.group(1).startswith("wgmma") else []
            seen[m.group(1) + " " + ",".join(t.strip() for t in tail)] += 1
    for k, v in sorted(seen.items()):
        print(f"    {v:4d}  {k}")


def dwir():
    MM = importlib.import_module("triton_transformer.matmul")
    M = 16384
    for n_out, k_in in ((50304, 768), (3072, 768)):
        x = torch.randn(M, k_in, device=dev, dtype=bf16)
        w = torch.randn(n_out, k_in, device=dev, dtype=bf16)
        dy = torch.randn(M, n_out, device=dev, dtype=bf16)
        flops = 2 * M * k_in * n_out
        tf = lambda us: f"{us:.1f} us {flops / us / 1e6:.0f} TF"  # noqa: E731
        print(f"[{n_out}x{k_in}] over {M}: cublas dW {tf(bench(lambda: dy.t() @ x))} | cublas fwd "
              f"{tf(bench(lambda: x @ w.t()))} | cublas dX {tf(bench(lambda: dy @ w))}", flush=True)
        for tma in (False, True):
            MM.TMA = tma
            for name, a, b in (("dW", dy.t(), x), ("fwd", x, w.t()), ("dX", dy, w)):
                MM.SPLIT_K = 1
                runtime._launchers.clear()
                t = bench(lambda: MM.matmul(a, b, out_dtype=torch.float32 if name == "dW" else None))
                kernel = MM._matmul_tma_kernel if tma else MM._matmul_kernel
                cfg = kernel.best_config
                print(f"  {'tma' if tma else 'ptr'} {name} split 1: {tf(t)} ({_config_name(cfg)})", flush=True)
                if n_out == 3072 and name in ("dW", "fwd"):
                    for compiled, _, _ in runtime._launchers[id(kernel)].cache.values():
                        _ir_summary(compiled)
            MM.SPLIT_K, MM.TMA = None, "auto"


def tmastore():
    MM = importlib.import_module("triton_transformer.matmul")
    M = 16384
    for k_in, n_out in ((768, 3072), (3072, 768), (768, 2304), (768, 768), (768, 50304), (512, 1536), (512, 256)):
        x = torch.randn(M, k_in, device=dev, dtype=bf16)
        w = torch.randn(n_out, k_in, device=dev, dtype=bf16) / k_in ** 0.5
        bias = torch.randn(n_out, device=dev, dtype=bf16)
        dy = torch.randn(M, n_out, device=dev, dtype=bf16)
        flops = 2 * M * k_in * n_out
        line = [f"[{M},{k_in}->{n_out}]"]
        for name, call, ref in (
                ("fwd", lambda: MM.matmul(x, w.t()), lambda: x @ w.t()),
                ("fwd+bias", lambda: MM.matmul(x, w.t(), bias), lambda: torch.addmm(bias, x, w.t())),
                ("gelu+z", lambda: MM.matmul(x, w.t(), bias, MM.GELU, store_z=True),
                 lambda: torch.nn.functional.gelu(torch.addmm(bias, x, w.t()), approximate="tanh")),
                ("dX", lambda: MM.matmul(dy, w), lambda: dy @ w)):
            times = []
            for store in (False, True):
                MM.TMA_STORE = store
                times.append(bench(call))
            MM.TMA_STORE = True
            r = bench(ref)
            line.append(f"| {name} ptr-store {times[0]:.1f} tma-store {times[1]:.1f} ({flops / times[1] / 1e6:.0f} TF) "
                        f"torch {r:.1f}")
        print(" ".join(line), flush=True)


def _kernel_times(fn, reps=20):
    """GPU ms per call of each kernel `fn` launches (torch.profiler), by kernel name."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key[:40]: e.device_time_total / reps / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def attn():
    A = importlib.import_module("triton_transformer.attention")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kernels = {"fwd": A._attn_fwd, "dq": A._attn_bwd_dq, "dkdv": A._attn_bwd_dkdv}
    cfg = lambda m, n, w, s: triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)  # noqa: E731
    wider = {"fwd": [(128, 64, 4, 2), (128, 64, 4, 5), (64, 64, 4, 4), (64, 32, 4, 4), (128, 128, 4, 3),
                     (256, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 2)],
             "dkdv": [(16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4), (32, 128, 4, 4), (64, 128, 8, 2),
                      (32, 128, 4, 2), (16, 64, 4, 4), (64, 128, 4, 2), (32, 256, 8, 3)],
             "dq": [(64, 64, 4, 4), (128, 64, 4, 4), (64, 32, 4, 5), (128, 128, 8, 2), (64, 64, 8, 3),
                    (128, 32, 4, 4), (64, 16, 4, 4), (128, 16, 4, 4)]}
    listed = {name: list(k.configs) for name, k in kernels.items()}
    for B, H, N, D in ((16, 12, 1024, 64), (4, 16, 4096, 64), (4, 16, 4096, 128)):
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=bf16) for _ in range(4))
        flops = 4 * B * H * N * N * D / 2  # forward, causal half
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        os_ = sdpa(qs, ks, vs, is_causal=True)
        sd_f = bench(lambda: sdpa(q, k, v, is_causal=True))
        sd_b = bench(lambda: torch.autograd.grad(os_, (qs, ks, vs), do, retain_graph=True))
        print(f"[{B},{H},{N},{D}] sdpa fwd {sd_f:.1f} us ({flops / sd_f / 1e6:.0f} TF) bwd {sd_b:.1f} us "
              f"({2.5 * flops / sd_b / 1e6:.0f} TF) | {_kernel_times(lambda: torch.autograd.grad(os_, (qs, ks, vs), do, retain_graph=True))}",
              flush=True)
        for label in ("listed", "wider"):
            for name, kern in kernels.items():
                kern.configs = listed[name] + ([cfg(*c) for c in wider[name]] if label == "wider" else [])
                kern.cache.clear()
            runtime._launchers.clear()
            o, lse = A.attention_forward(q, k, v, causal=True)
            f = bench(lambda: A.attention_forward(q, k, v, causal=True))
            b = bench(lambda: A.attention_backward(do, q, k, v, o, lse, causal=True))
            times = _kernel_times(lambda: A.attention_backward(do, q, k, v, o, lse, causal=True))
            picks = {name: _attn_cfg(kern.best_config) for name, kern in kernels.items()}
            print(f"  {label}: fwd {f:.1f} us ({flops / f / 1e6:.0f} TF) bwd {b:.1f} us ({2.5 * flops / b / 1e6:.0f} TF) "
                  f"fwdbwd {flops * 3.5 / (f + b) / 1e6:.0f} TF | kernels {times} | picks {picks}", flush=True)
        for name, kern in kernels.items():
            kern.configs = listed[name]
            kern.cache.clear()
        runtime._launchers.clear()


def _attn_cfg(c):
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"


def onexp():
    """GPU time of the one-block softmax forward and cross-entropy kernels, this tree's against the copies of
    the modules in triton_transformer/_old_*.py (git show REV:... > those files before the run)."""
    mods = {"new": (sm_mod, ce_mod),
            "old": (importlib.import_module("triton_transformer._old_softmax"),
                    importlib.import_module("triton_transformer._old_ce"))}
    for n_rows, n_cols in ((8192, 50304), (16384, 50304), (4096, 4096), (8192, 32000)):
        x = torch.randn(n_rows, n_cols, device=dev, dtype=bf16) * 3
        t = torch.randint(0, n_cols, (n_rows,), device=dev)
        moved = 2 * x.numel() * x.element_size()
        line = [f"({n_rows}, {n_cols})"]
        for label, (S, C) in mods.items():
            for name, fn, kern in (("softmax", lambda: S.softmax_forward(x), S._softmax_fwd_kernel),
                                   ("ce", lambda: C.cross_entropy_forward(x, t, with_grad=True), C._cross_entropy_fwd_kernel)):
                times = _kernel_times(fn)
                ms = sum(v for k, v in times.items() if k.startswith(kern.fn.__name__ if hasattr(kern, "fn") else kern.__name__))
                regs = [(c.n_regs, c.n_spills) for c, _, _ in runtime._launchers[id(kern)].cache.values()]
                line.append(f"| {label} {name} {1e3 * ms:.1f} us {moved / ms / 1e6:.0f} GB/s regs/spills {regs}")
        print(" ".join(line), flush=True)


def warps():
    for n_rows, n_cols in ((8192, 50304), (16384, 50304), (8192, 32000)):
        x = torch.randn(n_rows, n_cols, device=dev, dtype=bf16) * 3
        t = torch.randint(0, n_cols, (n_rows,), device=dev)
        moved = 2 * x.numel() * x.element_size()
        line = [f"({n_rows}, {n_cols})"]
        for mod, name, fn, kern in ((sm_mod, "softmax", lambda: sm_mod.softmax_forward(x), sm_mod._softmax_fwd_kernel),
                                    (ce_mod, "ce", lambda: ce_mod.cross_entropy_forward(x, t, with_grad=True),
                                     ce_mod._cross_entropy_fwd_kernel)):
            orig = mod._launch_params
            for w in (16, 32):
                mod._launch_params = lambda *a, orig=orig, w=w, **k: (*orig(*a, **k)[:-1], w)
                runtime._launchers.clear()
                try:
                    times = _kernel_times(fn)
                    us = 1e3 * sum(v for k, v in times.items() if k.startswith(kern.fn.__name__))
                    c = [c for c, _, _ in runtime._launchers[id(kern)].cache.values()][-1]
                    line.append(f"| {name} w{w} {us:.1f} us {moved / us / 1e3:.0f} GB/s ({c.n_regs} regs, {c.n_spills} spills)")
                except Exception as err:
                    line.append(f"| {name} w{w} {type(err).__name__}: {str(err)[:60]}")
                finally:
                    mod._launch_params = orig
        print(" ".join(line), flush=True)
    runtime._launchers.clear()


def ff():
    torch.autograd.set_multithreading_enabled(False)
    import torch.nn.functional as F
    for rows, dim in ((16384, 768), (16384, 512)):
        x = torch.randn(rows, dim, device=dev, dtype=bf16, requires_grad=True)
        # fp32 parameters with bf16 activations, as the model runs under autocast
        w1 = (torch.randn(4 * dim, dim, device=dev) / dim ** 0.5).requires_grad_()
        b1 = torch.zeros(4 * dim, device=dev, requires_grad=True)
        w2 = (torch.randn(dim, 4 * dim, device=dev) / (2 * dim) ** 0.5).requires_grad_()
        b2 = torch.zeros(dim, device=dev, requires_grad=True)
        dy = torch.randn(rows, dim, device=dev, dtype=bf16)
        params = [x, w1, b1, w2, b2]

        def torch_ff(x, w1, b1, w2, b2):
            with torch.autocast("cuda", bf16):
                return F.linear(F.relu(F.linear(x, w1, b1)).square(), w2, b2)
        compiled = torch.compile(torch_ff)
        cases = {
            "feed_forward": lambda: tt.feed_forward(x, w1, b1, w2, b2).backward(dy),
            "two linears": lambda: tt.linear(tt.linear(x, w1, b1, "relu_squared"), w2, b2).backward(dy),
            "torch": lambda: torch_ff(*params).backward(dy),
            "compile": lambda: compiled(*params).backward(dy),
        }
        line = [f"[{rows},{dim}->{4 * dim}->{dim}] fwd+bwd us:"]
        for name, fn in cases.items():
            line.append(f"{name} {1e3 * triton.testing.do_bench(fn, grad_to_none=params, return_mode='median'):.1f} "
                        f"(gpu {1e3 * (measure_gpu_ms(fn, params) or float('nan')):.1f})")
        print(" | ".join(line), flush=True)
        MM = importlib.import_module("triton_transformer.matmul")
        dh = torch.randn(rows, dim, device=dev, dtype=bf16)
        w2b = w2.detach().to(bf16)
        h = torch.relu(torch.randn(rows, 4 * dim, device=dev, dtype=bf16)) ** 2
        plain = bench(lambda: MM.matmul(dh, w2b))
        fused = bench(lambda: MM.matmul(dh, w2b, grad_of=(MM.RELU_SQUARED, h)))
        print(f"  dh GEMM {plain:.1f} us plain, {fused:.1f} with act'", flush=True)
        for name in ("feed_forward", "two linears"):
            times = _kernel_times(cases[name])
            print(f"  {name}: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])),
                  flush=True)


def ffstep():
    import functools
    T = importlib.import_module("triton_transformer.transformer")
    from triton_transformer.bench import measure_ms
    from triton_transformer.bench.transformer import train_step
    for batch, seq, dim, depth, vocab in ((16, 1024, 768, 12, 50304), (16, 1024, 512, 6, 256)):
        torch.manual_seed(0)
        model = T.Transformer(num_tokens=vocab, max_seq_len=seq, dim=dim, depth=depth, heads=dim // 64,
                              dim_head=64, causal=True).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        x = torch.randint(0, vocab, (batch, seq), device=dev)
        y = torch.randint(0, vocab, (batch, seq), device=dev)
        steps = {}
        for fused in (False, True):
            T.FUSED_FEED_FORWARD = fused  # read while the step's graph is recorded, on its first calls
            steps[fused] = train_step(functools.partial(model, use_triton=True), opt, x, y, bf16, cuda_graph=True)
            for _ in range(5):
                steps[fused]()
        T.FUSED_FEED_FORWARD = True
        times = {False: [], True: []}
        for _ in range(3):
            for fused, step in steps.items():
                times[fused].append(measure_ms(step))
        print(f"[{batch},{seq},{dim},{depth},{vocab}] step ms, three rounds: two linears "
              f"{', '.join(f'{t:.3f}' for t in times[False])} | feed_forward {', '.join(f'{t:.3f}' for t in times[True])}",
              flush=True)
        del model, opt, steps


def dwsplit():
    """GPU time (profiler: dW kernel + the partials' sum, no host time) of every split, two rounds each."""
    MM = importlib.import_module("triton_transformer.matmul")
    rows = 16384
    splits = (None, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12)
    # (out, in) of every dW: seed qkv, out, ff in, ff out, logits; GPT-2 the same (its logits take split 1)
    for n_out, k_in in ((1536, 512), (512, 512), (2048, 512), (512, 2048), (256, 512),
                        (2304, 768), (768, 768), (3072, 768), (768, 3072)):
        x = torch.randn(rows, k_in, device=dev, dtype=bf16)
        dz = torch.randn(rows, n_out, device=dev, dtype=bf16)
        flops = 2 * rows * k_in * n_out
        times = {s: [] for s in splits}
        picks = {}
        for _ in range(2):
            for split in splits:
                MM.SPLIT_K = split
                kt = _kernel_times(lambda: MM.matmul(dz.t(), x, out_dtype=torch.float32), reps=30)
                times[split].append(1e3 * sum(kt.values()))
                picks[split] = _config_name(MM._matmul_kernel.best_config)
        MM.SPLIT_K = None
        auto = MM._split_k(n_out, k_in, rows, torch.device(dev))
        cells = [f"s{s or 'auto'} {min(t):.1f}/{max(t):.1f} {picks[s]}" for s, t in times.items()]
        best = min(splits[1:], key=lambda s: min(times[s]))
        print(f"dW [{n_out}x{k_in}] auto={auto} best=s{best} ({flops / min(times[best]) / 1e6:.0f} TF, auto "
              f"{flops / min(times[None]) / 1e6:.0f}) cublas {1e3 * sum(_kernel_times(lambda: dz.t() @ x).values()):.1f} | "
              + " | ".join(cells), flush=True)



def dwdb():
    """What the bias's row sums cost the dW GEMM: dW of every split projection with and without them
    (GPU time of all kernels of the call, profiler, two rounds). Behind `transformer.project`."""
    MM = importlib.import_module("triton_transformer.matmul")
    rows = 16384
    for n_out, k_in in ((512, 512), (512, 2048), (768, 768), (3072, 768), (768, 3072)):
        x = torch.randn(rows, k_in, device=dev, dtype=bf16)
        dz = torch.randn(rows, n_out, device=dev, dtype=bf16)
        db = torch.empty(n_out, device=dev)
        cells = []
        for label, fn in (("dW", lambda: MM.matmul(dz.t(), x, out_dtype=torch.float32)),
                          ("dW+db", lambda: MM.matmul(dz.t(), x, out_dtype=torch.float32, row_sum=db))):
            t = [1e3 * sum(_kernel_times(fn, reps=30).values()) for _ in range(2)]
            cells.append(f"{label} {min(t):.1f}/{max(t):.1f} us")
        print(f"[{n_out}x{k_in}] split {MM._split_k(n_out, k_in, rows, torch.device(dev))}: " + " | ".join(cells),
              flush=True)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    m = offs < n - start
    tl.store(y_ptr + start + offs, tl.load(x_ptr + start + offs, mask=m), mask=m)


@triton.jit(do_not_specialize=["seed"])
def _dropout16_kernel(x_ptr, y_ptr, n_elements, p16, scale, seed, BLOCK: tl.constexpr, HINTS: tl.constexpr):
    """Dropout with 16-bit uniforms: one Philox call per 8 elements (each 32-bit word serves two)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    in_bounds = offs < n_elements - start
    if HINTS:
        x = tl.load(x_ptr + start + offs, mask=in_bounds, other=0.0, eviction_policy="evict_first")
    else:
        x = tl.load(x_ptr + start + offs, mask=in_bounds, other=0.0)
    counter = (start >> 3) + tl.arange(0, BLOCK // 8)
    lo = counter.to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK // 2])
    halves = tl.reshape(tl.join(r & 0xFFFF, r >> 16), [BLOCK])
    keep = halves >= p16
    y = x.to(tl.float32) * tl.where(keep, scale, 0.0)
    if HINTS:
        tl.store(y_ptr + start + offs, y.to(y_ptr.dtype.element_ty), mask=in_bounds, cache_modifier=".cs")
    else:
        tl.store(y_ptr + start + offs, y.to(y_ptr.dtype.element_ty), mask=in_bounds)


def roof():
    D = importlib.import_module("triton_transformer.dropout")
    L = importlib.import_module("triton_transformer.layernorm")

    def row(label, fn, moved):
        ms = bench(fn) / 1e3
        g = measure_gpu_ms(fn)
        print(f"  {label:34s} wall {1e3 * ms:7.2f} us {moved / ms / 1e9:6.0f} GB/s | gpu {1e3 * g:7.2f} us "
              f"{moved / g / 1e9:6.0f} GB/s", flush=True)

    for name, shape in (("softmax", (4096, 4096)), ("layer_norm", (16384, 768)), ("dropout", (16777216,))):
        x = torch.randn(*shape, device=dev, dtype=bf16)
        y = torch.empty_like(x)
        n = x.numel()
        moved = 2 * x.numel() * 2
        print(f"{name} {list(shape)}", flush=True)
        row("torch copy_", lambda: y.copy_(x), moved)
        for block, warps in ((1024, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16)):
            row(f"triton copy {block}/{warps}", lambda: _copy_kernel[(triton.cdiv(n, block),)](
                x, y, n, BLOCK=block, num_warps=warps), moved)
        if name == "softmax":
            row("tt.softmax", lambda: tt.softmax(x), moved)
        elif name == "layer_norm":
            w = torch.randn(768, device=dev, dtype=bf16)
            b = torch.randn(768, device=dev, dtype=bf16)
            row("tt.layer_norm (no grad)", lambda: tt.layer_norm(x, (768,), w, b), moved)
            row("torch layer_norm", lambda: torch.nn.functional.layer_norm(x, (768,), w, b), moved)
        else:
            row("tt.dropout", lambda: tt.dropout(x, 0.1, seed=1), moved)
            row("torch dropout", lambda: torch.nn.functional.dropout(x, 0.1), moved)
            p16 = int(0.1 * 65536)
            for hints in (False, True):
                for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)):
                    row(f"dropout16 {block}/{warps} hints={hints}", lambda: _dropout16_kernel[(triton.cdiv(n, block),)](
                        x, y, n, p16, 1 / 0.9, 1, BLOCK=block, HINTS=hints, num_warps=warps), moved)
            # the mask of ones, scaled by 1: its mean is the kept fraction
            _dropout16_kernel[(triton.cdiv(n, 4096),)](torch.ones_like(x), y, n, p16, 1.0, 1, BLOCK=4096,
                                                       HINTS=False, num_warps=4)
            print(f"  dropout16 kept fraction {y.float().mean().item():.5f} (expect {1 - p16 / 65536:.5f})")


@triton.jit
def _sm_online_hint_kernel(x_ptr, y_ptr, stride, n_rows, n_cols, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                           HINTS: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        xr = x_ptr + row * stride
        yr = y_ptr + row * stride
        m = tl.full([BLOCK], -float("inf"), tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            if HINTS:
                x = tl.load(xr + start + cols, mask=start + cols < n_cols, other=-float("inf"),
                            eviction_policy="evict_last").to(tl.float32)
            else:
                x = tl.load(xr + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            m, d = sm_mod.online_update(m, d, x)
        m_row, d_row = sm_mod.online_combine(m, d)
        inv = 1.0 / d_row
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            if HINTS:
                x = tl.load(xr + start + cols, mask=start + cols < n_cols, other=-float("inf"),
                            eviction_policy="evict_first").to(tl.float32)
                y = tl.exp2((x - m_row) * 1.4426950408889634) * inv
                tl.store(yr + start + cols, y.to(y_ptr.dtype.element_ty), mask=start + cols < n_cols,
                         cache_modifier=".cs")
            else:
                x = tl.load(xr + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
                y = tl.exp2((x - m_row) * 1.4426950408889634) * inv
                tl.store(yr + start + cols, y.to(y_ptr.dtype.element_ty), mask=start + cols < n_cols)


def smhint():
    M, N = 8192, 50304
    x = torch.randn(M, N, device=dev, dtype=bf16) * 3
    y = torch.empty_like(x)
    ref = torch.softmax(x.float(), -1)
    moved = 2 * x.numel() * 2
    sms = runtime.num_sms(x.device)
    base = bench(lambda: tt.softmax(x))
    print(f"tt.softmax: {base:.1f} us {moved / base / 1e3:.0f} GB/s; copy: "
          f"{bench(lambda: y.copy_(x)):.1f} us", flush=True)
    for hints in (True, False):
        for block, warps in ((4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)):
            for per_sm in (1, 2, 4, 8):
                for stages in (2, 3):
                    if not hints and stages == 2:
                        continue
                    fn = lambda: _sm_online_hint_kernel[(per_sm * sms,)](x, y, N, M, N, BLOCK=block, STAGES=stages,
                                                                         HINTS=hints, num_warps=warps)
                    try:
                        fn()
                        err = (y.float() - ref).abs().max().item()
                        us = bench(fn)
                        print(f"hints={hints} block {block} w{warps} {per_sm}/SM stages {stages}: {us:.1f} us "
                              f"{moved / us / 1e3:.0f} GB/s (err {err:.2g})", flush=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"hints={hints} {block} w{warps} {per_sm}: {type(e).__name__} {str(e)[:100]}")


def cesync():
    """Cross-entropy fwd+bwd: what the bad-target readback costs in wall time, against GPU time."""
    check = ce_mod._BadTargetCount.check
    for V in (50304, 256):
        logits = torch.randn(8192, V, device=dev, dtype=bf16, requires_grad=True)
        target = torch.randint(0, V, (8192,), device=dev)
        for name, fn in (("package", lambda: tt.cross_entropy(logits, target).backward()),
                         ("package inplace", lambda: tt.cross_entropy(logits * 1, target, inplace=True).backward())):
            for how, patched in (("with its readback", check), ("no readback", lambda *a, **k: None)):
                ce_mod._BadTargetCount.check = patched
                ms = [triton.testing.do_bench(fn, grad_to_none=[logits], return_mode="median") for _ in range(3)]
                print(f"ce fwd+bwd [8192, {V}] {name}, {how}: do_bench "
                      + " / ".join(f"{1e3 * m:.1f}" for m in ms) + " us", flush=True)
            ce_mod._BadTargetCount.check = check
        fn = lambda: tt.cross_entropy(logits, target).backward()
        print(f"ce fwd+bwd [8192, {V}] GPU (graph) {1e3 * measure_gpu_ms(fn, [logits]):.1f} us", flush=True)


def cehost():
    """Whether the host launches cross-entropy's main kernel before the GPU runs out of work (the flush).

    Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0; two processes, 50 calls each): 186-194 us
    of host time from the call to the main kernel's launch (109-283), 454-499 us for the whole call, against
    93-123 us for the flush; do_bench 782-785 us against 775.5 us of GPU time. do_bench's loop does not
    wait for each call, so the host runs up to one call ahead (the bad-target check waits for the current
    call's pre-pass only): the wall time is the GPU's until the host's ~0.45 ms a call passes the GPU's ~0.78.
    """
    torch.autograd.set_multithreading_enabled(False)
    logits = torch.randn(8192, 50304, device=dev, dtype=bf16, requires_grad=True)
    target = torch.randint(0, 50304, (8192,), device=dev)
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=dev)
    launched = []
    plain = ce_mod.launch

    def timed(kernel, grid, *args, **meta):
        if kernel is ce_mod._cross_entropy_fwd_kernel:
            launched.append(time.perf_counter())
        return plain(kernel, grid, *args, **meta)

    ce_mod.launch = timed
    try:
        rows = []
        for i in range(60):
            logits.grad = None
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            cache.zero_()
            e[1].record()
            t0 = time.perf_counter()
            tt.cross_entropy(logits, target).backward()
            t1 = time.perf_counter()
            e[2].record()
            torch.cuda.synchronize()
            if i >= 10:
                rows.append((1e6 * (launched[-1] - t0), 1e6 * (t1 - t0), 1e3 * e[0].elapsed_time(e[1]),
                             1e3 * e[1].elapsed_time(e[2])))
    finally:
        ce_mod.launch = plain
    for i, label in enumerate(("host us to the main launch", "host us of the whole call", "flush GPU us",
                               "call us (flush end to call end)")):
        vals = sorted(r[i] for r in rows)
        print(f"{label:34s} median {vals[len(vals) // 2]:8.1f}  min {vals[0]:8.1f}  max {vals[-1]:8.1f}")
    def call():
        tt.cross_entropy(logits, target).backward()

    wall = triton.testing.do_bench(call, grad_to_none=[logits], return_mode="median")
    print(f"do_bench {1e3 * wall:.1f} us, GPU (graph) {1e3 * measure_gpu_ms(call, [logits]):.1f} us")


def _mark_and_check(bad, target):
    count = ce_mod._BadTargetCount(bad)
    count.mark()
    count.check(target, 256, -100)


def ceparts():
    """Host microseconds per call of the pieces of a cross-entropy forward+backward.

    Measured (same machine and versions as cehost): torch.zeros(2) 11.9 us, a pinned empty(2) 2.2,
    _BadTargetCount(stats) 25.6 (with its check 32.1), a new Event recorded 11.9, the loss's
    sum / count 24.2, cross_entropy_forward with the gradient 158.5, tt.cross_entropy forward 194.5,
    forward+backward 332.2 against F.cross_entropy's 97.5. (Those were the pieces before the pre-pass wrote
    per-part counts and the loss was summed in the main kernel; the cases below are today's pieces.)
    """
    torch.autograd.set_multithreading_enabled(False)
    F = torch.nn.functional
    logits = torch.randn(8192, 256, device=dev, dtype=bf16, requires_grad=True)
    target = torch.randint(0, 256, (8192,), device=dev)
    ld = logits.detach()
    stats = torch.zeros(2, dtype=torch.int32, device=dev)
    loss_rows = torch.randn(8192, device=dev)
    cases = {
        "torch.zeros(2)": (lambda: torch.zeros(2, dtype=torch.int32, device=dev), []),
        "pinned empty(2)": (lambda: torch.empty(2, dtype=torch.int32, pin_memory=True), []),
        "_BadTargetCount(stats).mark()": (lambda: ce_mod._BadTargetCount(stats).mark(), []),
        "_BadTargetCount + mark + check": (lambda: _mark_and_check(stats, target), []),
        "Event() + record": (lambda: torch.cuda.Event().record(), []),
        "loss_rows.sum() / stats[0]": (lambda: loss_rows.sum() / stats[0], []),
        "cross_entropy_forward no grad": (lambda: ce_mod.cross_entropy_forward(ld, target), []),
        "cross_entropy_forward with grad": (lambda: ce_mod.cross_entropy_forward(ld, target, with_grad=True), []),
        "tt.cross_entropy no grad": (lambda: tt.cross_entropy(ld, target), []),
        "tt.cross_entropy fwd": (lambda: tt.cross_entropy(logits, target), [logits]),
        "tt.cross_entropy fwd+bwd": (lambda: tt.cross_entropy(logits, target).backward(), [logits]),
        "F.cross_entropy fwd+bwd": (lambda: F.cross_entropy(logits, target).backward(), [logits]),
    }
    for name, (fn, grads) in cases.items():
        runs = [host_us(fn, grads, n=300, warmup=20)[0] for _ in range(3)]
        print(f"{name:34s} host {min(runs):7.1f} us/call (runs " + " ".join(f"{r:.1f}" for r in runs) + ")",
              flush=True)
    print("---- profile of tt.cross_entropy fwd+bwd, 300 calls")
    _print_profile(*cases["tt.cross_entropy fwd+bwd"], calls=300, top=30)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def hostparts():
    """Host microseconds per call of each piece of a small fwd+bwd, at shapes whose GPU time is negligible.

    Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, layer norm's 16-argument forward kernel):
    14.7 us per launch through runtime.launch, 17.7 through the launcher before its key was generated code,
    37.8 through kernel[grid], 6.5 for the compiled launcher alone. (An earlier probe, launch_cost.py, found
    no cost from launch() following its tensors' device, within the host's 2x noise; that check now sits in
    the key, so there is no "before" left to compare it with, and the probe was removed.)
    """
    torch.autograd.set_multithreading_enabled(False)
    ln = importlib.import_module("triton_transformer.layernorm")
    F = torch.nn.functional
    x = torch.randn(64, 768, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(768, device=dev, dtype=bf16, requires_grad=True)
    b = torch.zeros(768, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn_like(x)
    xd, dyd = x.detach(), dy.detach()
    y2, mean, rstd = ln.layer_norm_forward(xd, w.detach(), b.detach(), 1e-5, store_stats=True)
    kernel = ln._fwd_kernel_for(1024, True)
    ln_args = (xd, y2, w, b, mean, rstd, xd, xd, xd, 768, 768, 0, 0, 64, 768, 1e-5)
    ln_meta = dict(BLOCK_N=1024, SINGLE_BLOCK=True, HAS_W=True, HAS_B=True, STORE_STATS=True,
                   HAS_RESIDUAL=False, HAS_RBIAS=False)
    grid = lambda meta: (runtime.cdiv(64, meta["ROWS"]),)  # noqa: E731
    compiled = runtime.launch(kernel, grid, *ln_args, **ln_meta)
    launcher = runtime._launchers[id(kernel)]
    _, consts, tail = list(launcher.cache.values())[-1]
    stream = torch._C._cuda_getCurrentRawStream(0)
    g0 = runtime.cdiv(64, consts["ROWS"])
    xs = torch.randn(64, 1024, device=dev, dtype=bf16, requires_grad=True)
    dys = torch.randn_like(xs)
    xdr = torch.randn(65536, device=dev, dtype=bf16, requires_grad=True)
    dydr = torch.randn_like(xdr)
    cases = {
        "loop (nothing)": (lambda: None, []),
        "torch.empty": (lambda: torch.empty((64, 768), dtype=bf16, device=dev), []),
        "autograd identity fwd+bwd": (lambda: _Identity.apply(x).backward(dy), [x]),
        "compiled.run (ln fwd kernel)": (lambda: compiled.run(g0, 1, 1, stream, compiled.function,
                                                              compiled.packed_metadata, None, None, None,
                                                              *ln_args, *tail), []),
        "launch() (ln fwd kernel)": (lambda: runtime.launch(kernel, grid, *ln_args, **ln_meta), []),
        "kernel[grid] (ln fwd kernel)": (lambda: kernel[grid](*ln_args, **ln_meta), []),
    }
    try:  # the launcher of an older tree, saved beside this file (git show REV:triton_transformer/runtime.py)
        old = importlib.import_module("_old_runtime")._Launcher(kernel)
        cases["older launcher (ln fwd kernel)"] = (lambda: old(grid, *ln_args, **ln_meta), [])
    except ImportError:
        pass
    cases |= {
        "ln checks only": (lambda: ln._check_args(x, (768,), w, b, None), []),
        "layer_norm_forward": (lambda: ln.layer_norm_forward(xd, w, b, 1e-5, store_stats=True), []),
        "layer_norm_backward": (lambda: ln.layer_norm_backward(dyd, xd, w, mean, rstd, 1e-5), []),
        "tt.layer_norm nograd": (lambda: tt.layer_norm(xd, (768,), w.detach(), b.detach()), []),
        "tt.layer_norm fwd": (lambda: tt.layer_norm(x, (768,), w, b), [x, w, b]),
        "tt.layer_norm fwd+bwd": (lambda: tt.layer_norm(x, (768,), w, b).backward(dy), [x, w, b]),
        "F.layer_norm fwd+bwd": (lambda: F.layer_norm(x, (768,), w, b).backward(dy), [x, w, b]),
        "tt.softmax fwd+bwd": (lambda: tt.softmax(xs).backward(dys), [xs]),
        "torch.softmax fwd+bwd": (lambda: torch.softmax(xs, -1).backward(dys), [xs]),
        "tt.dropout fwd+bwd": (lambda: tt.dropout(xdr, 0.5).backward(dydr), [xdr]),
        "F.dropout fwd+bwd": (lambda: F.dropout(xdr, 0.5).backward(dydr), [xdr]),
    }
    for name, (fn, grads) in cases.items():
        runs = [host_us(fn, grads, n=400, warmup=20)[0] for _ in range(3)]
        print(f"{name:32s} host {min(runs):7.1f} us/call (runs " + " ".join(f"{r:.1f}" for r in runs) + ")",
              flush=True)
    for name in ("tt.layer_norm fwd+bwd", "tt.dropout fwd+bwd"):
        print(f"---- profile of {name}, 300 calls")
        _print_profile(*cases[name], calls=300, top=22)


if __name__ == "__main__":
    for what in sys.argv[1:]:
        print(f"==== {what}")
        globals()[what]()
