"""Fused attention, forward and backward, against F.scaled_dot_product_attention and a float64 reference.

A result passes when its error against the float64 reference is at most twice
PyTorch's own error in the same dtype (SDPA run on the same low-precision inputs)
plus a small floor: low-precision attention has no exact answer, only one as good
as PyTorch's. The CPU runs tiny shapes under the interpreter (fp32, fp16); the
GPU adds bf16, N = 1000, D = 128 and every autotuning config.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from conftest import DTYPES, ON_GPU, cuda_only

from triton_transformer import attention, runtime
import triton  # noqa: E402  (after the package: it picks GPU or interpreter)
import triton.language as tl  # noqa: E402

A = importlib.import_module("triton_transformer.attention")  # the module (the package's `attention` is the function)

# error floor, relative to the reference's largest magnitude; fp32 on a GPU runs its dots in TF32
FLOOR = {torch.float32: 1e-2 if ON_GPU else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def allowed(B, n_q, n_k, mask=None, causal=False, device="cpu"):
    """(B, 1, N_q, N_k) bool: which scores take part (True), or None when all do."""
    a = None
    if mask is not None:
        a = mask[:, None, None, :].expand(B, 1, n_q, n_k)
    if causal:
        c = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
        a = c.expand(B, 1, n_q, n_k) if a is None else a & c
    return a


def reference(q, k, v, mask=None, causal=False, scale=None, keep=None, p=0.0):
    """Float64 math attention. Fully masked rows give 0 (as SDPA) with zero gradients; `keep` applies dropout."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    a = allowed(q.shape[0], q.shape[2], k.shape[2], mask, causal, q.device)
    if a is not None:
        any_key = a.any(-1, keepdim=True)
        s = s.masked_fill(~a, float("-inf")).masked_fill(~any_key, 0.0)
        probs = torch.softmax(s, -1) * any_key
    else:
        probs = torch.softmax(s, -1)
    if keep is not None:
        probs = probs * keep / (1.0 - p)
    return probs @ v


def sdpa(q, k, v, mask=None, causal=False, scale=None):
    a = allowed(q.shape[0], q.shape[2], k.shape[2], mask, causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=a, scale=scale)


def fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(q, k, v, mask=None, causal=False, scale=None, do=None):
    """Our forward and three gradients against float64 and against SDPA in the inputs' dtype."""
    do = torch.randn(q.shape[:3] + (v.shape[-1],), device=q.device, dtype=q.dtype) if do is None else do
    ours = fwd_bwd(attention, q, k, v, do, mask=mask, causal=causal, scale=scale)
    ref = fwd_bwd(reference, q, k, v, do.double(), mask=mask, causal=causal, scale=scale)
    torch_ = fwd_bwd(sdpa, q, k, v, do, mask=mask, causal=causal, scale=scale)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, torch_):
        t = t.nan_to_num(0.0)  # some fused SDPA backends return NaN for fully masked rows; the reference says 0
        assert a.shape == r.shape and a.dtype == q.dtype, name
        assert not torch.isnan(a).any(), f"{name}: NaN"
        bound = 2 * err(t, r) + FLOOR[q.dtype] * max(1.0, r.abs().max().item())
        assert err(a, r) <= bound, f"{name}: error {err(a, r):.3g} > {bound:.3g} (SDPA's error {err(t, r):.3g})"
    return ours


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device, dtype=dtype)


@pytest.fixture(autouse=True)
def _few_configs(monkeypatch):
    """On a GPU, autotune over two configs only (the small first one and a big Hopper one).

    Every new shape autotunes, and compiling all configs for each of this file's shapes would
    take many minutes. `test_every_autotune_config` checks every config on its own.
    """
    if ON_GPU:
        for tuner, make, big in [(A._attn_fwd, A._fwd_configs, (128, 64, 4, 3)),
                                 (A._attn_bwd_dq, A._dq_configs, (128, 32, 8, 3)),
                                 (A._attn_bwd_dkdv, A._dkdv_configs, (32, 128, 8, 3))]:
            cfgs = make()
            pick = [c for c in cfgs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == big]
            monkeypatch.setattr(tuner, "configs", cfgs[:1] + pick)


# ------------------------------------------------------------------ forward and backward

# (N, D): one row; a tail shorter than a block; several whole blocks (causal skipping); head dims
# that are not powers of two or are below tl.dot's 16 (padded inside)
CASES = [(1, 16), (17, 32), (128, 64), (45, 24), (9, 1), (9, 8)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n,d", CASES, ids=[f"N{n}-D{d}" for n, d in CASES])
def test_forward_backward(n, d, causal, device):
    q, k, v = (randn(2, 1, n, d, device=device) for _ in range(3))
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision(dtype, causal, device):
    n = 300 if ON_GPU else 17  # the interpreter's fp16 dots are slow
    q, k, v = (randn(2, 3, n, 64, dtype=dtype, device=device) for _ in range(3))
    check(q, k, v, causal=causal)


LONG = [(torch.bfloat16, 16), (torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
        (torch.float16, 64), (torch.float16, 128), (torch.float32, 64)]


@cuda_only
@pytest.mark.parametrize("dtype,d", LONG, ids=[f"{str(t)[6:]}-D{d}" for t, d in LONG])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequences(d, causal, dtype, device):
    if dtype == torch.bfloat16 and not runtime.SUPPORTS_BF16:
        pytest.skip("no bf16 on this GPU")
    q, k, v = (randn(2, 3, 1000, d, dtype=dtype, device=device) for _ in range(3))
    check(q, k, v, causal=causal)


def test_cross_attention_lengths(device):
    """k, v may be longer or shorter than q; causal is top-left aligned, as SDPA's is_causal."""
    for n_q, n_k in [(20, 50), (50, 20)]:
        q = randn(1, 2, n_q, 32, device=device)
        k, v = randn(1, 2, n_k, 32, device=device), randn(1, 2, n_k, 32, device=device)
        check(q, k, v)
        check(q, k, v, causal=True)


def test_scale(device):
    q, k, v = (randn(1, 2, 33, 16, device=device) for _ in range(3))
    check(q, k, v, scale=0.3)
    check(q, k, v, scale=-0.2)  # negative: the kernel sees -q with scale 0.2
    check(q, k, v, scale=0.0)   # every score 0: the mean of v


def test_strided_inputs(device):
    """q, k, v as views of one packed (B, N, 3, H, D) projection, as a Transformer makes them: no copies."""
    B, N, H, D = 2, 40, 3, 16
    qkv = randn(B, N, 3, H, D, device=device).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D), strided
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    do = randn(B, N, H, D, device=device).transpose(1, 2)  # a non-contiguous upstream gradient
    check(q, k, v, causal=True, do=do)


# ------------------------------------------------------------------ key padding mask

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask(causal, device):
    B, H, N, D = 3, 1, 70, 32
    q, k, v = (randn(B, H, N, D, device=device) for _ in range(3))
    mask = torch.rand(B, N, device=device) > 0.3
    mask[1, :] = True
    mask[2, :40] = False  # causal: rows 0..39 of batch 2 see no key at all
    ours = check(q, k, v, mask=mask, causal=causal)
    if causal:
        assert torch.all(ours[0][2, :, :40] == 0)


def test_fully_masked_rows_match_pytorch(device):
    """Rows without a single visible key: output 0 like SDPA, gradients 0, and no NaN anywhere."""
    B, H, N, D = 2, 2, 24, 16
    q, k, v = (randn(B, H, N, D, device=device) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[0] = False  # batch 0: every key is padding
    do = randn(B, H, N, D, device=device)
    o, dq, dk, dv = fwd_bwd(attention, q, k, v, do, mask=mask)
    with sdpa_kernel(SDPBackend.MATH):  # the reference semantics; fused GPU backends may differ on such rows
        o_t, dq_t, dk_t, dv_t = fwd_bwd(sdpa, q, k, v, do, mask=mask)
    for a, b in [(o, o_t), (dq, dq_t), (dk, dk_t), (dv, dv_t)]:
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.all(o[0] == 0) and torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)


def test_masked_keys_with_huge_scores_do_not_leak(device):
    """A masked key whose score would overflow exp() must not turn other rows' gradients into NaN."""
    B, H, N, D = 1, 1, 40, 16
    q, k, v = (randn(B, H, N, D, device=device) for _ in range(3))
    k[..., 5, :] = q[..., 0, :] * 100  # query 0's score for key 5 is ~400: exp() overflows fp32
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[:, 5] = False
    check(q, k, v, mask=mask)
    check(q, k, v, mask=mask, causal=True)


# ------------------------------------------------------------------ dropout

def keep_mask_of(B, H, n_q, n_k, p, seed, device):
    """The dropout mask the kernels apply, read back through attention itself.

    With q = 0 every probability is 1 / N_k, and with v holding an identity block for
    columns c0..c0+d of P, output row i is that slice of row i of dropout(P) / (1 - p):
    its zeros are exactly the dropped entries. The mask depends only on (seed, b, h, i, j).
    """
    d = min(128, max(16, n_k))
    q = torch.zeros(B, H, n_q, d, device=device)
    k = torch.zeros(B, H, n_k, d, device=device)
    keep = []
    for c0 in range(0, n_k, d):
        v = torch.zeros(B, H, n_k, d, device=device)
        cols = torch.arange(c0, min(c0 + d, n_k), device=device)
        v[:, :, cols, cols - c0] = 1.0
        with torch.no_grad():
            o = attention(q, k, v, dropout_p=p, seed=seed)
        keep.append(o[..., : len(cols)] != 0)
    return torch.cat(keep, -1)


@pytest.mark.parametrize("causal,N", [(False, 40), (True, 37)], ids=["full-N40", "causal-N37"])
def test_dropout_matches_reference(causal, N, device):
    # N % 4 == 0 takes keep_mask_2d (one Philox call per four columns), other N the per-element keep_mask
    B, H, D, p, seed = 2, 1, 32, 0.3, 1234
    keep = keep_mask_of(B, H, N, N, p, seed, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    q, k, v = (randn(B, H, N, D, device=device) for _ in range(3))
    do = randn(B, H, N, D, device=device)
    ours = fwd_bwd(attention, q, k, v, do, causal=causal, dropout_p=p, seed=seed)
    ref = fwd_bwd(reference, q, k, v, do.double(), causal=causal, keep=keep, p=p)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert err(a, r) <= FLOOR[torch.float32] * max(1.0, r.abs().max().item()), name


def test_dropout_mask_is_the_dropout_chapters(device):
    """P[b, h, i, j] is dropped exactly when dropout() drops element (b, h, i, j) of a (B, H, N_q, N_k) tensor."""
    D = importlib.import_module("triton_transformer.dropout")
    for B, H, n_q, n_k, p, seed in [(2, 3, 20, 36, 0.25, 99), (1, 2, 5, 19, 0.5, -3)]:
        keep = keep_mask_of(B, H, n_q, n_k, p, seed, device)
        assert torch.equal(keep, D.dropout(torch.ones(B, H, n_q, n_k, device=device), p, seed=seed) != 0)


def test_dropout_is_deterministic(device):
    q, k, v = (randn(1, 2, 20, 16, device=device) for _ in range(3))
    do = randn(1, 2, 20, 16, device=device)
    a = fwd_bwd(attention, q, k, v, do, dropout_p=0.2, seed=7)
    b = fwd_bwd(attention, q, k, v, do, dropout_p=0.2, seed=7)
    c = fwd_bwd(attention, q, k, v, do, dropout_p=0.2, seed=8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    # without a seed, torch.manual_seed decides
    torch.manual_seed(3)
    x = attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(3)
    assert torch.equal(x, attention(q, k, v, dropout_p=0.2))


def test_dropout_expectation(device):
    """Averaged over many masks, dropout changes nothing: E[dropout(P) V] = P V.

    One query repeated on 256 rows: every row draws its own mask (the mask depends on the row).
    """
    reps, n_k, D, p = 256, 16, 16, 0.4
    q = randn(1, 1, 1, D, device=device).expand(1, 1, reps, D).contiguous()
    k, v = randn(1, 1, n_k, D, device=device), randn(1, 1, n_k, D, device=device)
    with torch.no_grad():
        o = attention(q, k, v, dropout_p=p, seed=5)[0, 0]
        o_ref = attention(q[:, :, :1], k, v)[0, 0]
    mean, sem = o.mean(0, keepdim=True), o.std(0, keepdim=True) / math.sqrt(reps)
    assert torch.all((mean - o_ref).abs() <= 5 * sem + 1e-3)
    assert (o.std(0) > 0).all()  # the masks do differ from row to row


# ------------------------------------------------------------------ inference and bad input

def test_no_grad_saves_nothing(device, monkeypatch):
    q, k, v = (randn(1, 2, 30, 16, device=device) for _ in range(3))
    wanted = []
    real = A.attention_forward
    monkeypatch.setattr(A, "attention_forward", lambda *a, **kw: wanted.append(kw["need_lse"]) or real(*a, **kw))
    with torch.no_grad():
        o = attention(q.requires_grad_(), k, v, causal=True)
    assert o.grad_fn is None and wanted == [False]  # no log-sum-exp written, no autograd context
    o2 = attention(q, k, v, causal=True)
    assert wanted == [False, True] and o2.grad_fn is not None
    torch.testing.assert_close(o, o2.detach(), atol=0, rtol=0)


def test_empty(device):
    q = randn(2, 3, 0, 16, device=device)
    assert attention(q, q, q).shape == (2, 3, 0, 16)
    q, kv = randn(2, 3, 5, 16, device=device), randn(2, 3, 0, 16, device=device)
    assert torch.equal(attention(q, kv, kv), torch.zeros_like(q))  # no keys: SDPA gives 0 too
    q.requires_grad_()
    kv.requires_grad_()
    attention(q, kv, kv).sum().backward()  # and the backward: zero gradients of the right shapes
    assert torch.equal(q.grad, torch.zeros_like(q)) and kv.grad.shape == kv.shape


def test_bad_input(device):
    q = randn(2, 3, 10, 16, device=device)
    k12 = randn(2, 3, 12, 16, device=device)
    with pytest.raises(ValueError, match="4 dimensions"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k and v must be"):
        attention(q, randn(2, 3, 10, 32, device=device), q)
    with pytest.raises(ValueError, match="k and v must be"):
        attention(q, randn(2, 4, 10, 16, device=device), q)
    with pytest.raises(ValueError, match="v has shape"):
        attention(q, k12, q)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="key padding mask must be"):
        attention(q, k12, k12, mask=torch.ones(2, 10, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="2 dimensions"):
        attention(q, q, q, mask=torch.ones(2, 1, 1, 10, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="bool"):
        attention(q, q, q, mask=torch.ones(2, 10, device=device))
    with pytest.raises(ValueError, match="head dimension"):
        big = randn(1, 1, 4, 256, device=device)
        attention(big, big, big)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=1.0)
    with pytest.raises(TypeError, match="dtype"):
        attention(q.long(), q.long(), q.long())


# ------------------------------------------------------------------ GPU only: every config, memory

@cuda_only
@pytest.mark.parametrize("d", [64, 128])
def test_every_autotune_config(d, device):
    """The autotuner may pick any config: each must be right (causal, mask, dropout, ragged N)."""
    import triton

    B, H, N, p = 2, 3, 300, 0.1
    dtype = runtime.default_dtype()
    q, k, v = (randn(B, H, N, d, dtype=dtype, device=device) for _ in range(3))
    mask = torch.rand(B, N, device=device) > 0.2
    mask[1, :50] = False
    do = randn(B, H, N, d, dtype=dtype, device=device)
    o_ref, lse = A.attention_forward(q, k, v, mask, True, p, None, 11)
    grads_ref = A.attention_backward(do, q, k, v, o_ref, lse, mask, True, p, None, 11)
    keep = keep_mask_of(B, H, N, N, p, 11, device)
    exact = fwd_bwd(reference, q, k, v, do.double(), mask=mask, causal=True, keep=keep, p=p)
    for name, a, r in zip(("out", "dq", "dk", "dv"), (o_ref, *grads_ref), exact):
        assert err(a, r) <= 3e-2 * max(1.0, r.abs().max().item()), name
    ran = 0
    for cfg in A._fwd_configs():
        try:
            o, _ = A.attention_forward(q, k, v, mask, True, p, None, 11, config=cfg)
        except triton.runtime.errors.OutOfResources:
            continue
        ran += 1
        assert err(o, exact[0]) <= 3e-2 * max(1.0, exact[0].abs().max().item()), f"fwd {cfg}"
    dkdv, dq = A._dkdv_configs(), A._dq_configs()
    for c1, c2 in [(c, dq[0]) for c in dkdv] + [(dkdv[0], c) for c in dq[1:]]:
        try:
            grads = A.attention_backward(do, q, k, v, o_ref, lse, mask, True, p, None, 11, configs=(c1, c2))
        except triton.runtime.errors.OutOfResources:
            continue
        ran += 1
        for name, a, r in zip(("dq", "dk", "dv"), grads, exact[1:]):
            assert err(a, r) <= 3e-2 * max(1.0, r.abs().max().item()), f"{name} {c1} {c2}"
    assert ran > 3


@cuda_only
def test_memory_is_linear_in_n(device):
    """Forward + backward at N = 8192 needs a few copies of q, k, v; the N x N scores alone would be 4 GiB."""
    B, H, N, D = 1, 16, 8192, 64
    q, k, v = (randn(B, H, N, D, dtype=torch.float16, device=device).requires_grad_() for _ in range(3))
    # a first call compiles and autotunes; the tuner's own L2-flush buffer (256 MiB) is not the kernel's
    attention(q, k, v, causal=True).sum().backward()
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    attention(q, k, v, causal=True).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * q.numel() * q.element_size(), f"{extra / 2**20:.0f} MiB above the inputs"


@cuda_only
def test_growing_sequence_does_not_retune(device):
    """Generation grows N_k by one per step: the autotuner's key rounds N to a power of two, so lengths
    600..615 share one tuning (keyed on exact N it re-benchmarked every config at every step)."""
    B, H, D = 4, 8, 64
    before = len(A._attn_fwd.cache)
    with torch.no_grad():
        for n in range(600, 616):
            q = randn(B, H, n, D, dtype=torch.bfloat16, device=device)
            attention(q, q, q, causal=True)
    assert len(A._attn_fwd.cache) - before <= 1


@cuda_only
def test_cuda_repeated_calls_launch_from_the_memo(device):
    """A call like one before launches straight from `runtime.launch_memo`'s memory (forward, dQ and dK/dV, on the
    first config below AUTOTUNE_MIN_MACS and on the tuned one above): right each time on fresh tensors, with the
    same dropout mask for the same seed; an input off a 16-byte boundary takes the ordinary path, and is right too."""
    A._MEMO.clear()
    for shape in [(2, 3, 100, 64), (2, 4, 512, 64)]:
        for _ in range(3):
            q, k, v, do = (randn(*shape, dtype=torch.bfloat16, device=device) for _ in range(4))
            check(q, k, v, causal=True, do=do)
    assert len(A._MEMO) == 6
    dropped = [fwd_bwd(attention, q, k, v, do, causal=True, dropout_p=0.3, seed=7) for _ in range(2)]
    assert len(A._MEMO) == 9
    assert all(torch.equal(a, b) for a, b in zip(*dropped))
    flat = randn(q.numel() + 1, dtype=torch.bfloat16, device=device)
    check(flat[1:].view(q.shape), k, v, causal=True, do=do)  # two bytes past the boundary
    assert len(A._MEMO) == 9


def test_small_problems_take_the_first_config(monkeypatch, device):
    """Below AUTOTUNE_MIN_MACS the launcher never enters the autotuner: it runs the first config directly."""
    def tuned(*args, **kwargs):
        raise AssertionError("the autotuner ran for a problem below AUTOTUNE_MIN_MACS")

    for kernel in (A._attn_fwd, A._attn_bwd_dq, A._attn_bwd_dkdv):
        monkeypatch.setattr(kernel, "run", tuned)
    q = randn(1, 2, 5, 16, device=device).requires_grad_()
    attention(q, q, q, causal=True).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(AssertionError, match="autotuner ran"):  # the spy works: a big problem reaches it
        A.attention_forward(*(randn(1, 1, 1 << 13, 16, device=device) for _ in range(3)))


# ------------------------------------------------------------------ packed q | k | v

@pytest.mark.parametrize("causal,masked,p", [(True, False, 0.0), (False, True, 0.0), (True, True, 0.2)],
                         ids=["causal", "mask", "causal-mask-dropout"])
def test_packed_qkv_equals_split_heads(causal, masked, p, device):
    """attention_qkv runs the same kernels on strided views: the same values as splitting the heads by hand."""
    B, N, H, D = 2, 37, 3, 24
    qkv = randn(B, N, 3 * H * D, device=device)
    mask = (torch.rand(B, N, device=device) > 0.3) if masked else None
    dout = randn(B, N, H * D, device=device)

    def split(qkv):
        q, k, v = (t.transpose(1, 2) for t in qkv.view(B, N, 3, H, D).unbind(2))
        o = attention(q, k, v, mask=mask, causal=causal, dropout_p=p, seed=7)
        return o.transpose(1, 2).reshape(B, N, H * D)

    outs = []
    for fn in (lambda t: A.attention_qkv(t, H, mask=mask, causal=causal, dropout_p=p, seed=7), split):
        x = qkv.detach().requires_grad_()
        o = fn(x)
        outs.append((o, *torch.autograd.grad(o, x, dout)))
    (o, dqkv), (o_ref, dqkv_ref) = outs
    assert o.shape == (B, N, H * D) and o.is_contiguous() and dqkv.is_contiguous()
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(dqkv, dqkv_ref, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(A.attention_qkv(qkv, H, mask=mask, causal=causal, dropout_p=p, seed=7), o_ref,
                                   rtol=0, atol=0)


def test_packed_qkv_bad_input(device):
    qkv = randn(2, 5, 3 * 2 * 16, device=device)
    with pytest.raises(ValueError, match="3 \\* heads \\* head_dim"):
        A.attention_qkv(qkv, 5)
    with pytest.raises(ValueError, match="dimensions"):
        A.attention_qkv(qkv[0], 2)
    with pytest.raises(ValueError, match="key padding mask"):
        A.attention_qkv(qkv, 2, mask=torch.ones(2, 4, dtype=torch.bool, device=device))


def test_inputs_on_another_device_raise(device):
    q = randn(1, 2, 4, 16, device=device)
    with pytest.raises(ValueError, match="k is on meta"):
        attention(q, torch.empty_like(q, device="meta"), q)
    with pytest.raises(ValueError, match="mask is on meta"):
        attention(q, q, q, mask=torch.ones(1, 4, dtype=torch.bool, device="meta"))


def test_offsets_within_a_head_stay_within_32_bits():
    # The kernels add offsets within one (batch, head) in 32 bits. A head sliced out of a wide tensor can
    # spread its rows further apart than that: it is copied first; one too long even when contiguous is
    # a clear error. (Meta tensors: shapes and strides without the gigabytes.)
    spread = torch.empty_strided((1, 1, 3, 16), (0, 0, 2**30 + 16, 1), device="meta", dtype=torch.float16)
    assert A._fit_offsets("q", spread).stride() == (48, 48, 16, 1)
    near = torch.empty((1, 1, 2**27 - 1, 16), device="meta", dtype=torch.float16)
    assert A._fit_offsets("q", near) is near
    with pytest.raises(ValueError, match="32-bit offsets within a head"):
        A._fit_offsets("k", torch.empty((1, 1, 2**27 + 1, 16), device="meta", dtype=torch.float16))
    assert A._fit_out(spread) is None and A._fit_out(near) is near


def test_more_batches_or_heads_than_a_grid_axis_holds_is_a_clear_error(device):
    q = torch.empty(70000, 1, 4, 16, device=device, dtype=torch.float16)  # 9 MB: refused before any launch
    with pytest.raises(ValueError, match="at most 65535"):
        attention(q, q, q)


@triton.jit(do_not_specialize=["head_group"])
def _record_causal_programs(out_ptr, head_group, LONGEST_LAST: tl.constexpr):
    # Each program writes the (block, head, batch) it takes at its launch index (the grid's first axis fastest).
    launched = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    block, h, b = A._causal_program(head_group, LONGEST_LAST)
    tl.store(out_ptr + 3 * launched, block)
    tl.store(out_ptr + 3 * launched + 1, h)
    tl.store(out_ptr + 3 * launched + 2, b)


@pytest.mark.parametrize("head_group", [6, 1, 4])
@pytest.mark.parametrize("longest_last", [True, False])
def test_causal_programs_start_longest_first_within_head_groups(longest_last, head_group, device):
    # Under the causal mask every (block, head, batch) is still taken exactly once. In launch order the (batch,
    # head) pairs come in groups of head_group (6: one group of all; 4 of 6 leaves a short last group), and
    # within a group the blocks with the most work come first, of every head of the group, before any shorter one.
    n_blocks, heads, batches = 5, 3, 2
    out = torch.full((n_blocks * heads * batches, 3), -1, dtype=torch.int32, device=device)
    _record_causal_programs[(n_blocks, heads, batches)](out, head_group, LONGEST_LAST=longest_last)
    taken = [tuple(row) for row in out.tolist()]
    assert sorted(taken) == [(blk, h, b) for blk in range(n_blocks) for h in range(heads) for b in range(batches)]
    n_bh = heads * batches
    for first in range(0, n_bh, head_group):
        group = range(first, min(first + head_group, n_bh))
        chunk, taken = taken[:n_blocks * len(group)], taken[n_blocks * len(group):]
        assert sorted({b * heads + h for _, h, b in chunk}) == list(group)
        blocks = [blk for blk, _, _ in chunk]
        assert blocks == sorted(blocks, reverse=longest_last)


@pytest.mark.parametrize("head_group", [1, 4, 6])
def test_head_groups_give_the_same_bits(head_group, device, monkeypatch):
    # Causal programs in groups of 1, 4 (the last group short) or all 6 (batch, head) pairs: only the order in
    # which programs start changes, never a result. Each group size is checked against the math, and its bits
    # against the package's own pick.
    q, k, v, do = (randn(2, 3, 70, 32, device=device) for _ in range(4))
    picked = fwd_bwd(attention, q, k, v, do, causal=True)
    monkeypatch.setattr(A, "_head_group", lambda q, n_rows: head_group)
    grouped = fwd_bwd(attention, q, k, v, do, causal=True)
    check(q, k, v, causal=True, do=do)
    assert all(torch.equal(a, b) for a, b in zip(grouped, picked))


def test_head_groups_fill_half_the_l2(device):
    # At most as many (batch, head) pairs as fit their two streamed tensors in half the L2, at least 1, at most
    # all, in as few groups as that allows, as even as they can be.
    half = runtime.l2_cache_bytes(torch.device(device)) // 2
    per_head = lambda n, d: 2 * n * d * 4  # noqa: E731  (fp32)
    rows = half // per_head(1, 16)
    assert A._head_group(torch.empty(2, 3, 1, 16, device=device), rows // 4) == 3  # 4 fit: two groups of 3
    assert A._head_group(torch.empty(2, 3, 1, 16, device=device), rows // 2) == 2  # 2 fit: three groups of 2
    assert A._head_group(torch.empty(2, 5, 1, 16, device=device), rows // 4) == 4  # 10 pairs: 4, 4 and 2
    assert A._head_group(torch.empty(2, 3, 1, 16, device=device), rows) == 1
    assert A._head_group(torch.empty(2, 3, 1, 16, device=device), rows * 100) == 1
    assert A._head_group(torch.empty(2, 3, 1, 16, device=device), 1) == 6
