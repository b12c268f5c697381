"""Dropout: the mask against an independent Philox reference, reproducibility, gradients, statistics, edge cases."""

import importlib
import math
import warnings

import pytest
import torch
import triton
import triton.language as tl
from conftest import DTYPES, ON_GPU, cuda_only

from triton_transformer import dropout

# the module itself (the package's `dropout` name is the function)
D = importlib.import_module("triton_transformer.dropout")


def expected(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * m / (1 - p) in float32 with the mask of the definition (computed on the CPU, independently of Triton)."""
    keep = D.reference_mask(x.shape, p, seed).to(x.device)
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0)


# ---------------------------------------------------------------- the random numbers themselves

def test_reference_philox_matches_random123_vectors():
    """The NumPy Philox4x32-10 against the known-answer vectors published with Random123 (Salmon et al.)."""
    P = D.philox4x32_reference
    assert [int(w) for w in P(0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert [int(w) for w in P(2**64 - 1, ones, ones, ones, ones)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    key = (0x299F31D0 << 32) | 0xA4093822
    assert [int(w) for w in P(key, 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)] == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@triton.jit  # the seed may be specialised: a seed of 1 reaches `philox` as a constexpr
def _philox_kernel(c_ptr, out_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    c0 = tl.load(c_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + 2 * n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + 3 * n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = D.philox(seed, c0, c1, c2, c3)
    tl.store(out_ptr + i, r0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + n + i, r1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 2 * n + i, r2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 3 * n + i, r3.to(tl.int32, bitcast=True), mask=m)


def _counters(n: int, gen_seed: int) -> torch.Tensor:
    """(4, n) random 32-bit counter words as int32, the first two columns all 0 and all 0xFFFFFFFF."""
    gen = torch.Generator().manual_seed(gen_seed)
    counters = torch.randint(-2**31, 2**31, (4, n), generator=gen, dtype=torch.int64)
    counters[:, :2] = torch.tensor([[0, -1]] * 4)
    return counters.to(torch.int32)


SEEDS = [0, 1, -5, 2**31 + 9, 2**32 + 5, 2**63 - 1, -2**63]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_match_the_reference(seed, device):
    """`dropout.philox` (in PTX on an NVIDIA GPU, tl.philox elsewhere): all four words, against the NumPy reference."""
    n = 300
    counters = _counters(n, seed % 1000)
    out = torch.empty(4, n, dtype=torch.int32, device=device)
    compiled = _philox_kernel[(1,)](counters.to(device), out, seed, n, BLOCK=512)
    got = out.cpu().numpy().view("uint32")
    want = D.philox4x32_reference(seed, *counters.numpy().view("uint32"))
    for k in range(4):
        assert (got[k] == want[k]).all(), (seed, k)
    if ON_GPU:  # the words above came from the PTX, not from tl.philox
        assert D.PTX_PHILOX
        assert "mul.wide.u32" in compiled.asm["ptx"] and "mul.hi.u32" not in compiled.asm["ptx"]


def _run_ptx(ptx: str, operands) -> list[int]:
    """Interpret `philox_ptx`'s straight-line PTX on Python ints (operands $4...), returning $0-$3."""
    m32 = 0xFFFFFFFF
    regs = {f"${i + 4}": v for i, v in enumerate(operands)}
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        a = [t.strip() for t in rest.replace("{", "").replace("}", "").split(",")]
        val = lambda t: int(t, 16) if t.startswith("0x") else regs[t]  # noqa: E731
        if op == "mul.wide.u32":
            regs[a[0]] = val(a[1]) * val(a[2])
        elif op == "mov.b64":  # {low, high} halves of a 64-bit register
            regs[a[0]], regs[a[1]] = regs[a[2]] & m32, regs[a[2]] >> 32
        elif op == "xor.b32":
            regs[a[0]] = val(a[1]) ^ val(a[2])
        elif op == "add.u32":
            regs[a[0]] = (val(a[1]) + val(a[2])) & m32
        elif op == "mov.u32":
            regs[a[0]] = val(a[1])
        else:
            raise AssertionError(f"an instruction this test does not know: {line}")
    return [regs[f"${i}"] for i in range(4)]


@pytest.mark.parametrize("rounds", [1, 7, 10])
def test_philox_ptx_text_is_philox(rounds):
    """The PTX itself, run by a small interpreter of its five instructions, on any machine (the CPU tests
    never execute PTX): every word against the reference, keys with either half set."""
    ptx = D.philox_ptx(rounds)
    counters = _counters(40, rounds).numpy().view("uint32").astype("int64")
    for seed in SEEDS + [2**64 - 1]:
        key = D.normalize_seed(seed) % 2**64
        want = D.philox4x32_reference(seed, *counters, rounds=rounds)
        for j in range(counters.shape[1]):
            got = _run_ptx(ptx, [int(c) for c in counters[:, j]] + [key & 0xFFFFFFFF, key >> 32])
            assert got == [int(w[j]) for w in want], (rounds, seed, j)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_is_the_reference_mask(p, device):
    """Bit for bit: element e keeps iff word e % 4 of Philox(seed, e // 4) >= p * 2**32."""
    x = torch.ones(3, 1001, device=device)  # 3003 elements: four programs and a ragged tail
    for seed in [0, 123456789, -5, 2**63 + 17]:
        y = dropout(x, p, seed=seed)
        assert torch.equal((y != 0).cpu(), D.reference_mask(x.shape, p, seed)), seed


@triton.jit
def _keep_mask_kernel(out_ptr, off_ptr, n, seed, p, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offsets = tl.load(off_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, D.keep_mask(seed, offsets, p).to(tl.int8), mask=i < n)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_keep_mask_helper_and_offsets_past_2_to_the_32(dtype, device):
    """The shared jit helper, on int32 and on int64 offsets far past 2**31 and 2**32 (no wrap-around)."""
    if dtype == torch.int64:
        offs = [0, 1, 2, 3, 4, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**34, 2**34 + 3, 2**40 + 7, 2**62 + 5]
    else:
        offs = list(range(12)) + [2**31 - 2, 2**31 - 1]
    off = torch.tensor(offs, dtype=dtype, device=device)
    out = torch.empty(len(offs), dtype=torch.int8, device=device)
    for seed, p in [(7, 0.5), (2**40 + 3, 0.25)]:
        _keep_mask_kernel[(1,)](out, off, len(offs), seed, p, BLOCK=16)
        assert out.bool().cpu().tolist() == D.reference_keep(seed, offs, p).tolist()
    if dtype == torch.int64:
        # 2**32 elements apart: same position in the counter's low word, different masks
        many = torch.arange(64, dtype=torch.int64, device=device)
        a, b = torch.empty(64, dtype=torch.int8, device=device), torch.empty(64, dtype=torch.int8, device=device)
        _keep_mask_kernel[(1,)](a, many, 64, 3, 0.5, BLOCK=64)
        _keep_mask_kernel[(1,)](b, many + 2**34, 64, 3, 0.5, BLOCK=64)
        assert not torch.equal(a, b)


@triton.jit
def _attention_style_kernel(out_ptr, seed, p, H, M, N, BM: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr):
    """Writes the keep mask of a (B, H, M, N) probability tensor one [BM, BN] tile at a time, as attention does."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    row_offsets = ((b * H + h) * M + rows).to(tl.int64) * N
    for start_n in range(0, N, BN):
        cols = start_n + tl.arange(0, BN)
        offsets = row_offsets[:, None] + cols[None, :]
        if TILE:
            keep = D.keep_mask_2d(seed, row_offsets, start_n, p, BN)
        else:
            keep = D.keep_mask(seed, offsets, p)
        tl.store(out_ptr + offsets, keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < N))


@pytest.mark.parametrize("tile", [False, True])
def test_attention_style_offsets_give_the_dropout_mask(tile, device):
    """Per-(batch, head, row, col) offsets inside a tiled kernel reproduce dropout's mask of the full tensor."""
    B, H, M, N, p, seed = 2, 3, 7, 12, 0.3, 99   # N a multiple of 4 (keep_mask_2d's condition); ragged rows
    out = torch.zeros(B, H, M, N, dtype=torch.int8, device=device)
    _attention_style_kernel[(B * H, triton.cdiv(M, 4))](out, seed, p, H, M, N, BM=4, BN=8, TILE=tile)
    ref = dropout(torch.ones(B, H, M, N, device=device), p, seed=seed) != 0
    assert torch.equal(out.bool(), ref)


# ---------------------------------------------------------------- forward and backward

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (5, 7), (2, 3, 129)], ids=str)
def test_forward_backward_against_the_mask(shape, dtype, device):
    p, seed = 0.3, 42
    x = (torch.randn(shape, device=device) + 3).to(dtype).requires_grad_()   # no zeros: y == 0 only where dropped
    y = dropout(x, p, seed=seed)
    dy = torch.randn(shape, device=device, dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.dtype == dtype and y.shape == x.shape
    # the same formula as torch (fp32 multiply, one rounding): identical where the mask is identical
    torch.testing.assert_close(y, expected(x.detach(), p, seed).to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(dx, expected(dy, p, seed).to(dtype), atol=0, rtol=0)
    # dx is the mask applied to dy: zero exactly where y is zero
    assert torch.equal(dx == 0, y == 0)


def test_same_seed_same_result_different_seed_different(device):
    x = torch.randn(2000, device=device, requires_grad=True)
    dy = torch.randn(2000, device=device)
    y1 = dropout(x, 0.5, seed=1)
    (g1,) = torch.autograd.grad(y1, x, dy)
    y2 = dropout(x, 0.5, seed=1)
    (g2,) = torch.autograd.grad(y2, x, dy)
    y3 = dropout(x, 0.5, seed=2)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert not torch.equal(y1, y3)
    # seeds equal modulo 2**64 are the same key
    assert torch.equal(dropout(x, 0.5, seed=-1), dropout(x, 0.5, seed=2**64 - 1))


def test_seed_drawn_from_torch_generator(device):
    x = torch.randn(1000, device=device)
    torch.manual_seed(1234)
    a, b = dropout(x), dropout(x)
    torch.manual_seed(1234)
    c, d = dropout(x), dropout(x)
    assert torch.equal(a, c) and torch.equal(b, d)
    assert not torch.equal(a, b)  # each call draws a new seed


def test_saves_no_tensor_for_backward(device):
    """Zero bytes per element: the autograd graph holds no tensor (PyTorch's dropout holds its mask)."""
    saved = []
    x = torch.randn(4, 100, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x, 0.5, seed=11)
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.nn.functional.dropout(x, 0.5, training=True)
    assert sum(t.numel() for t in saved) >= x.numel()  # torch: one mask element per input element
    y.sum().backward()  # and the backward still works (its dy is an expanded, stride-0 tensor)
    torch.testing.assert_close(x.grad, expected(torch.ones_like(x), 0.5, 11), rtol=0, atol=0)


def test_non_contiguous_input(device):
    base = torch.randn(40, 30, device=device, requires_grad=True)
    xt = base.t()  # (30, 40), transposed
    y = dropout(xt, 0.4, seed=5)
    assert y.shape == xt.shape
    # the mask follows the logical (row-major) index, whatever the memory layout
    assert torch.equal(y, dropout(xt.contiguous(), 0.4, seed=5))
    dy = torch.ones(40, 30, device=device).t()  # a transposed upstream gradient
    y.backward(dy)
    torch.testing.assert_close(base.grad.t(), expected(torch.ones_like(xt), 0.4, 5), rtol=0, atol=0)
    sliced = torch.randn(10, 64, device=device)[::3, 5:37]
    assert torch.equal(dropout(sliced, 0.2, seed=9), dropout(sliced.contiguous(), 0.2, seed=9))


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_kept_fraction_within_binomial_bounds_and_mean_preserved(p, device):
    n = 1 << 22 if ON_GPU else 8192   # the interpreter is slow: a small sample on a CPU
    x = torch.ones(n, device=device)
    for seed in range(2):
        y = dropout(x, p, seed=seed)
        kept = int((y != 0).sum())
        sd = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) < 5 * sd, (seed, kept)
        # E[y] = x: the 1/(1-p) scale preserves the mean (sd of the mean: sqrt(p / ((1-p) n)))
        assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(p / ((1 - p) * n))
        # no lane of the four-words-per-call scheme is biased
        lanes = (y != 0).view(-1, 4).float().mean(0)
        assert ((lanes - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) / (n / 4))).all(), lanes


def test_neighbours_are_independent(device):
    """Adjacent elements (same Philox call, and across calls) are uncorrelated."""
    n = 1 << 22 if ON_GPU else 16384
    k = (dropout(torch.ones(n, device=device), 0.5, seed=11) != 0).float().cpu() - 0.5
    for lag in (1, 2, 3, 4, 5):
        corr = float((k[:-lag] * k[lag:]).mean() / 0.25)
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)


# ---------------------------------------------------------------- edge cases and bad input

def test_p_zero_and_eval_return_the_input(device):
    x = torch.randn(10, device=device)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.7, training=False) is x


def test_p_one_gives_zeros_and_zero_gradients(device):
    x = torch.randn(10, 3, device=device, requires_grad=True)
    y = dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    y.backward(torch.randn_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_p_near_the_ends(device):
    x = torch.ones(4096, device=device)
    assert int((dropout(x, 1e-9, seed=0) == 0).sum()) == 0
    assert int((dropout(x, 1 - 1e-9, seed=0) != 0).sum()) == 0  # rounds to p = 1 in fp32: all dropped


def test_inf_and_nan_like_torch(device):
    """torch computes x * mask * scale: a dropped inf becomes NaN, a kept one stays inf. So do we."""
    x = torch.tensor([float("inf"), float("nan"), -float("inf"), 1.0] * 16, device=device)
    y = dropout(x, 0.5, seed=3)
    keep = D.reference_mask(x.shape, 0.5, 3).to(device)
    torch.testing.assert_close(y, x * keep * 2.0, equal_nan=True, atol=0, rtol=0)


def test_empty_and_scalar(device):
    e = torch.empty(0, 5, device=device, requires_grad=True)
    assert dropout(e, 0.5).shape == (0, 5)
    s = torch.tensor(2.0, device=device)
    assert dropout(s, 0.5, seed=0).shape == ()


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", None])
def test_bad_p(p, device):
    """Out of range: ValueError, as F.dropout's; not a number: TypeError (F.dropout fails comparing it)."""
    err, match = (TypeError, "must be a float") if p is None or isinstance(p, str) else (ValueError, "between 0 and 1")
    with pytest.raises(err, match=match):
        dropout(torch.randn(4, device=device), p)


def test_bad_input(device):
    with pytest.raises(TypeError, match="dtype"):
        dropout(torch.arange(4, device=device), 0.5)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        dropout(torch.randn(4, device=device), 0.5, seed=1.5)


@cuda_only
def test_more_than_2_to_the_31_elements():
    """int64 offsets in a real launch: the tail of a 2**31 + 4100 element tensor matches the reference."""
    n = 2**31 + 4100
    try:
        x = torch.ones(n, device="cuda", dtype=torch.bfloat16)
        y = dropout(x, 0.5, seed=77)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    for lo in (0, 2**31 - 2000, n - 5000):
        got = (y[lo:lo + 5000] != 0).cpu()
        assert torch.equal(got, D.reference_keep(77, range(lo, min(lo + 5000, n)), 0.5))


@pytest.mark.skipif(not ON_GPU, reason="bf16 only on a GPU")
def test_bf16_matches_torch_formula():
    x = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
    y = dropout(x, 0.1, seed=3)
    keep = D.reference_mask(x.shape, 0.1, 3).to(x.device)  # the definition's mask, computed on the CPU
    ref = torch.where(keep, (x.float() * (1 / 0.9)).to(torch.bfloat16), torch.zeros_like(x))
    assert torch.equal(y, ref)
    assert abs(float(keep.float().mean()) - 0.9) < 5 * math.sqrt(0.09 / x.numel())


def test_p_may_be_a_numpy_or_tensor_scalar(device):
    np = pytest.importorskip("numpy")
    x = torch.randn(1000, device=device)
    for p in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25).item()):
        assert torch.equal(dropout(x, p, seed=3), dropout(x, 0.25, seed=3))


@pytest.mark.parametrize("i", range(len(D._configs())))
def test_every_autotune_config_draws_the_reference_mask(i, monkeypatch, device):
    """Whatever block the autotuner picks (the suite's GPU runs tune over two), the mask is the reference's,
    over a length that leaves every block size a ragged tail."""
    from triton_transformer import runtime
    monkeypatch.setattr(D._dropout_kernel, "configs", [D._configs()[i]])
    monkeypatch.setattr(runtime, "_launchers", {})  # no kernel compiled for another block is reused
    n = 3 * 8192 + 37
    x = torch.ones(n, device=device)
    y = dropout(x, 0.3, seed=123)
    assert torch.equal((y != 0).cpu(), D.reference_mask((n,), 0.3, 123))
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))


# ---------------------------------------------------------------- seeds a CUDA graph can replay

def test_replayable_seeds_key_each_mask_by_its_salt_and_the_base(device):
    """Inside `replayable_seeds(base)` the n-th dropout without a seed is keyed by salt(n) ^ base, read from
    the tensor when the kernel runs: the forward and the backward agree, a new value in base gives new masks,
    an explicit seed keeps its own mask, and a dropout outside the block draws from torch's generator."""
    x = torch.randn(3, 1001, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    base = torch.tensor([123456789012345], dtype=torch.int64, device=device)
    with D.replayable_seeds(base):
        y1 = dropout(x, 0.3)
        y2 = dropout(x, 0.3)
        fixed = dropout(x, 0.3, seed=5)  # takes no salt: the next dropout is still the block's third
        y3 = dropout(x, 0.3)
    salts = [D._salt(n) for n in (1, 2, 3)]
    assert len(set(salts)) == 3
    for y, salt in zip((y1, y2, y3), salts):
        torch.testing.assert_close(y, expected(x.detach(), 0.3, salt ^ 123456789012345).to(x.dtype))
    torch.testing.assert_close(fixed, expected(x.detach(), 0.3, 5).to(x.dtype))
    (dx,) = torch.autograd.grad(y1, x, dy)
    torch.testing.assert_close(dx, expected(dy, 0.3, salts[0] ^ 123456789012345).to(x.dtype))
    base.fill_(-77)  # what a training step writes before each replay
    with D.replayable_seeds(base):
        z = dropout(x, 0.3)
    torch.testing.assert_close(z, expected(x.detach(), 0.3, salts[0] ^ -77).to(x.dtype))
    torch.manual_seed(4)
    outside = dropout(x, 0.3)
    torch.manual_seed(4)
    assert torch.equal(outside, dropout(x, 0.3, seed=D.draw_seed()))


def test_replayable_seeds_key_attention_dropout_too(device):
    """Attention's dropout takes the block's next salt as `dropout` does: forward and all three gradients are
    those of the explicit seed salt ^ base, and attention without dropout takes no salt."""
    A = importlib.import_module("triton_transformer.attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 37, 16, device=device, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    base = torch.tensor([-987654321987], dtype=torch.int64, device=device)
    with D.replayable_seeds(base):
        A.attention(q, k, v, causal=True)  # no dropout: no salt
        o = A.attention(q, k, v, causal=True, dropout_p=0.3)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    o_ref = A.attention(q, k, v, causal=True, dropout_p=0.3, seed=D._salt(1) ^ -987654321987)
    want = (o_ref, *torch.autograd.grad(o_ref, (q, k, v), do))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    qkv = torch.randn(2, 37, 3 * 2 * 16, device=device, requires_grad=True)
    with D.replayable_seeds(base):
        packed = A.attention_qkv(qkv, 2, causal=True, dropout_p=0.3)
    assert torch.equal(packed, A.attention_qkv(qkv, 2, causal=True, dropout_p=0.3, seed=D._salt(1) ^ -987654321987))


def test_replayable_seeds_reject_a_bad_base_a_nested_block_and_a_rewritten_base(device):
    with pytest.raises(TypeError, match="replayable_seeds: base has dtype int32"):
        with D.replayable_seeds(torch.zeros(1, dtype=torch.int32, device=device)):
            pass
    with pytest.raises(ValueError, match="must hold one int64"):
        with D.replayable_seeds(torch.zeros(2, dtype=torch.int64, device=device)):
            pass
    base = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="do not nest"):
        with D.replayable_seeds(base):
            with D.replayable_seeds(base):
                pass
    assert D._replayable == []  # the outer block closed on the way out
    # the base rewritten between a forward and its backward would give the backward another mask: refused
    x = torch.randn(100, device=device, requires_grad=True)
    with D.replayable_seeds(base):
        y = dropout(x, 0.5)
    base.fill_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@cuda_only
def test_dropout_in_a_cuda_graph_without_replayable_seeds_is_refused():
    """Recorded with a Python-int seed drawn at recording time, every replay would apply one mask: refused,
    with the way out named. Inside `replayable_seeds`, each replay reads the base and draws a new mask."""
    x = torch.randn(4096, device="cuda")
    dropout(x, 0.5)  # compiled and tuned before recording
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="replayable_seeds"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The CUDA Graph is empty")  # the refused recording holds no kernel
        with torch.cuda.graph(graph):
            dropout(x, 0.5)
    base = torch.zeros(1, dtype=torch.int64, device="cuda")
    with D.replayable_seeds(base):
        dropout(x, 0.5)  # the kernel that reads its key from memory, compiled and tuned before recording
    graph = torch.cuda.CUDAGraph()
    with D.replayable_seeds(base), torch.cuda.graph(graph):
        y = dropout(x, 0.5)
    masks = []
    for value in (1, 2, 1):
        base.fill_(value)
        graph.replay()
        masks.append((y != 0).cpu())
        assert torch.equal(masks[-1], D.reference_mask(x.shape, 0.5, D._salt(1) ^ value))
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
