"""Layer norm forward and backward against F.layer_norm (and a float64 reference)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close_named, cuda_only

from triton_transformer import layer_norm, runtime
from triton_transformer.testing import tolerance

# the module itself (the package's `layer_norm` name is the function), for its launchers and limits
L = importlib.import_module("triton_transformer.layernorm")

SHAPES = [(1, 5), (3, 768), (4, 130, 1000), (2, 4097)]


def make_params(n, device, dtype, weight=True, bias=True):
    """weight far from 1 and bias far from 0: the seed's dgamma was right only at 1 and 0."""
    w = (1.0 + 0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_() if weight else None
    b = (0.3 * torch.randn(n, device=device)).to(dtype).requires_grad_() if bias else None
    return w, b


def check_fwd_bwd(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Forward and every gradient against float64 F.layer_norm, and the forward against F.layer_norm in x's dtype."""
    x = x.detach().requires_grad_()
    ref_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    inputs = [t for t in (x, weight, bias) if t is not None]
    y = layer_norm(x, normalized_shape, weight, bias, eps)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    x64 = ref_inputs[0]
    w64 = ref_inputs[1] if weight is not None else None
    b64 = ref_inputs[-1] if bias is not None else None
    y64 = F.layer_norm(x64, ref_shape, w64, b64, eps)
    ref_grads = torch.autograd.grad(y64, ref_inputs, dy.double())

    assert y.dtype == x.dtype and y.shape == x.shape
    tol = tolerance(x.dtype)
    torch.testing.assert_close(y.double(), y64, **tol)
    for name, ours, ref, t in zip(("dx", "dweight", "dbias")[:len(inputs)] if weight is not None
                                  else ("dx", "dbias"), grads, ref_grads, inputs):
        assert ours.dtype == t.dtype and ours.shape == t.shape, name
        # dweight and dbias are sums over all rows: compare relative to their size
        scale = max(1.0, float(ref.abs().max()))
        assert_close_named(ours.double() / scale, ref / scale, name, **tolerance(t.dtype))
    # and against PyTorch in the input dtype, the way a user would swap one for the other
    # (F.layer_norm on CUDA wants parameters in x's dtype, so cast them for this comparison)
    with torch.no_grad():
        w_, b_ = (t.to(x.dtype) if t is not None else None for t in (weight, bias))
        torch.testing.assert_close(y.float(), F.layer_norm(x, ref_shape, w_, b_, eps).float(), **tol)
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, dtype, device):
    n = shape[-1]
    w, b = make_params(n, device, dtype)
    check_fwd_bwd(torch.randn(shape, device=device, dtype=dtype) * 2 + 1, (n,), w, b)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_weight_or_bias_none(weight, bias, device):
    w, b = make_params(300, device, torch.float32, weight, bias)
    check_fwd_bwd(torch.randn(7, 300, device=device), 300, w, b)


def test_non_contiguous(device):
    base = torch.randn(40, 781, device=device)
    w, b = make_params(500, device, torch.float32)
    check_fwd_bwd(base[::3, :500], (500,), w, b)  # strided rows: read in place, no copy
    w, b = make_params(40, device, torch.float32)
    check_fwd_bwd(base.t()[:100], (40,), w, b)    # transposed: columns not contiguous, copied
    # non-contiguous weight and upstream gradient
    w = torch.randn(2, 60, device=device)[:, ::2][0].requires_grad_()
    x = torch.randn(5, 30, device=device, requires_grad=True)
    y = layer_norm(x, (30,), w)
    dy = torch.randn(30, 5, device=device).t()
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(F.layer_norm(x, (30,), w), (x, w), dy)
    torch.testing.assert_close(gx, rx, **tolerance(torch.float32))
    torch.testing.assert_close(gw, rw, **tolerance(torch.float32))


def test_normalized_shape_of_several_dims(device):
    """Like F.layer_norm, normalized_shape may cover several trailing dims (they are flattened into one row)."""
    w, b = (1 + torch.randn(5, 6, device=device)).requires_grad_(), torch.randn(5, 6, device=device).requires_grad_()
    check_fwd_bwd(torch.randn(3, 4, 5, 6, device=device), (5, 6), w, b)
    check_fwd_bwd(torch.randn(3, 4, 5, 6, device=device), torch.Size([4, 5, 6]))
    check_fwd_bwd(torch.randn(5, 6, device=device), (5, 6), w, b)  # a 2-D input normalized as one row


def test_mixed_dtypes(device):
    """Half-precision activations with fp32 parameters (as under mixed precision): y in x's dtype, grads in theirs."""
    w, b = make_params(96, device, torch.float32)
    dx, dw, db = check_fwd_bwd(torch.randn(9, 96, device=device, dtype=torch.float16), (96,), w, b)
    assert dx.dtype == torch.float16 and dw.dtype == db.dtype == torch.float32


def test_large_mean_small_variance(device):
    """Variance from centred values: E[x^2] - mean^2 would cancel to garbage here."""
    x = 1000.0 + 0.01 * torch.randn(4, 256, device=device)
    y = layer_norm(x, 256)
    ref = F.layer_norm(x.double(), (256,))
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-2)


def test_long_rows_take_the_looping_path(monkeypatch, device):
    """Rows longer than one block loop over chunks, forward and backward (limits lowered for a CPU)."""
    monkeypatch.setattr(L, "MAX_FUSED_BLOCK", 256)
    monkeypatch.setattr(L, "LOOP_BLOCK", 128)
    assert L._block_n(1000) == (128, False)
    w, b = make_params(1000, device, torch.float32)
    check_fwd_bwd(torch.randn(5, 1000, device=device) * 3 + 2, (1000,), w, b)
    check_fwd_bwd(torch.randn(2, 300, device=device), (300,))
    # the looping backward's recompute variant as well
    x = torch.randn(4, 1000, device=device)
    dy = torch.randn_like(x)
    _, mean, rstd = L.layer_norm_forward(x, w.detach(), b.detach(), 1e-5, store_stats=True)
    stored = L.layer_norm_backward(dy, x, w.detach(), mean, rstd, 1e-5)
    recomputed = L.layer_norm_backward(dy, x, w.detach(), None, None, 1e-5)
    for a, r in zip(stored, recomputed):
        torch.testing.assert_close(a, r)


def test_backward_is_deterministic(device):
    """dweight/dbias come from per-program partial sums added in a fixed order: no run-to-run rounding noise."""
    x = torch.randn(300, 77, device=device, requires_grad=True)
    w, b = make_params(77, device, torch.float32)
    y = layer_norm(x, 77, w, b)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, b), dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_row_split_changes_only_rounding(device):
    """However the rows are split among backward programs, the sums agree (to rounding)."""
    x = torch.randn(50, 64, device=device)
    dy = torch.randn_like(x)
    w = 1 + torch.randn(64, device=device)
    _, mean, rstd = L.layer_norm_forward(x, w, None, 1e-5, store_stats=True)
    ref = L.layer_norm_backward(dy, x, w, mean, rstd, 1e-5, num_programs=1)
    for programs in (2, 7, 50, 1000):
        got = L.layer_norm_backward(dy, x, w, mean, rstd, 1e-5, num_programs=programs)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r)


def test_recompute_matches_stored_statistics(device):
    x = torch.randn(33, 200, device=device) * 4 - 1
    dy = torch.randn_like(x)
    w = 1 + torch.randn(200, device=device)
    _, mean, rstd = L.layer_norm_forward(x, w, None, 1e-5, store_stats=True)
    stored = L.layer_norm_backward(dy, x, w, mean, rstd, 1e-5)
    recomputed = L.layer_norm_backward(dy, x, w, None, None, 1e-5)
    for a, r in zip(stored, recomputed):
        torch.testing.assert_close(a, r)


def test_statistics_stored_only_when_grad_is_needed(monkeypatch, device):
    calls = []
    forward = L.layer_norm_forward

    def spy(*args, store_stats, **kw):
        calls.append(store_stats)
        return forward(*args, store_stats=store_stats, **kw)

    monkeypatch.setattr(L, "layer_norm_forward", spy)
    x = torch.randn(4, 32, device=device, requires_grad=True)
    w = torch.ones(32, device=device, requires_grad=True)
    with torch.no_grad():
        assert layer_norm(x, 32, w).grad_fn is None
    assert layer_norm(x.detach(), 32, w.detach()).grad_fn is None
    assert layer_norm(x, 32, w).grad_fn is not None
    assert calls == [False, False, True]


def test_gradient_to_some_inputs_only(device):
    """Only the gradients autograd asks for are computed (COMPUTE_DX/DW/DB off otherwise)."""
    x = torch.randn(6, 50, device=device)
    w, b = make_params(50, device, torch.float32)
    # weight and bias only (the input is data): no dx
    gw, gb = torch.autograd.grad(layer_norm(x, 50, w, b).sum(), (w, b))
    rw, rb = torch.autograd.grad(F.layer_norm(x, (50,), w, b).sum(), (w, b))
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)
    # input only: frozen parameters
    x.requires_grad_()
    (gx,) = torch.autograd.grad(layer_norm(x, 50, w.detach(), b.detach()).sum(), (x,))
    (rx,) = torch.autograd.grad(F.layer_norm(x, (50,), w.detach(), b.detach()).sum(), (x,))
    torch.testing.assert_close(gx, rx, **tolerance(torch.float32))


def test_dgamma_uses_the_normalized_input_not_the_output(device):
    """The seed's bug: dgamma = sum(dy * y) is right only while gamma == 1 and beta == 0."""
    x = torch.randn(16, 40, device=device)
    w, b = make_params(40, device, torch.float32)
    y = layer_norm(x, 40, w, b)
    dy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, (w,), dy)
    xhat = F.layer_norm(x, (40,))
    torch.testing.assert_close(gw, (dy * xhat).sum(0), **tolerance(torch.float32))
    assert not torch.allclose(gw, (dy * y.detach()).sum(0), atol=1e-2)


def test_empty_and_single_column(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w, b = make_params(8, device, torch.float32)
    y = layer_norm(x, 8, w, b)
    assert y.shape == (0, 8)
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    assert torch.equal(gw, torch.zeros(8, device=device)) and torch.equal(gb, torch.zeros(8, device=device))
    # one column: xhat is 0, y is the bias
    w, b = make_params(1, device, torch.float32)
    check_fwd_bwd(torch.randn(5, 1, device=device), 1, w, b)


def test_bad_input_raises_clear_errors(device):
    x = torch.randn(4, 10, device=device)
    with pytest.raises(ValueError, match=r"normalized_shape \[12\] must match the last dimensions"):
        layer_norm(x, 12)
    with pytest.raises(ValueError, match=r"normalized_shape \[3, 4, 10\] must match"):
        layer_norm(x, (3, 4, 10))
    with pytest.raises(ValueError, match=r"weight has shape \[9\] but normalized_shape is \[10\]"):
        layer_norm(x, 10, torch.ones(9, device=device))
    with pytest.raises(ValueError, match=r"bias has shape \[1, 10\]"):
        layer_norm(x, 10, None, torch.zeros(1, 10, device=device))
    with pytest.raises(TypeError, match="dtype int64"):
        layer_norm(torch.arange(10, device=device).reshape(2, 5), 5)
    with pytest.raises(TypeError, match="weight has dtype int64"):
        layer_norm(x, 10, torch.ones(10, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence"):
        layer_norm(x, "ten")


@cuda_only
@pytest.mark.parametrize("shape", [(16384, 768), (8192, 4096), (256, 16384), (8, 40000)], ids=str)
def test_cuda_bf16_benchmark_shapes(shape, device):
    """The benchmark shapes in bf16, the widest single-block row, and a row long enough to loop."""
    w, b = make_params(shape[-1], device, torch.bfloat16)
    check_fwd_bwd(torch.randn(shape, device=device, dtype=torch.bfloat16) * 2 + 1, (shape[-1],), w, b)


@cuda_only
def test_cuda_deterministic_bf16(device):
    x = torch.randn(16384, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
    w, b = make_params(768, device, torch.bfloat16)
    y = layer_norm(x, 768, w, b)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        for a, c in zip(first, again):
            assert torch.equal(a, c)


@cuda_only
def test_cuda_repeated_calls_launch_from_the_memo(device):
    """A call like one before launches straight from `runtime.launch_memo`'s memory: right each time, on fresh
    tensors; an input off a 16-byte boundary takes the ordinary path, and is right too."""
    for memo in (L._FWD_MEMO, L._BWD_MEMO, L._SUM_MEMO):
        memo.clear()
    w, b = make_params(768, device, torch.bfloat16)
    for _ in range(3):
        check_fwd_bwd(torch.randn(300, 768, device=device, dtype=torch.bfloat16), 768, w, b)
    assert [len(m) for m in (L._FWD_MEMO, L._BWD_MEMO, L._SUM_MEMO)] == [1, 1, 1]
    flat = torch.randn(300 * 768 + 1, device=device, dtype=torch.bfloat16)
    check_fwd_bwd(flat[1:].view(300, 768), 768, w, b)  # two bytes past the boundary
    check_fwd_bwd(torch.randn(300, 768, device=device, dtype=torch.bfloat16), 768, w, b)
    assert [len(m) for m in (L._FWD_MEMO, L._BWD_MEMO, L._SUM_MEMO)] == [1, 1, 1]


@pytest.mark.parametrize("out_dtype", [d for d in DTYPES if d != torch.float32])
def test_out_dtype_is_the_cast_fused(out_dtype, device):
    """fp32 in, low precision out: the same values as F.layer_norm(x).to(out_dtype), and the same gradients."""
    x = torch.randn(37, 300, device=device, requires_grad=True)
    w, b = make_params(300, device, torch.float32)
    y = layer_norm(x, (300,), w, b, out_dtype=out_dtype)
    ref = F.layer_norm(x, (300,), w, b).to(out_dtype)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y, ref, **tolerance(out_dtype))
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    refs = torch.autograd.grad(ref, (x, w, b), dy)
    for g, r in zip(grads, refs):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="out_dtype"):
        layer_norm(x, (300,), out_dtype=torch.int32)


# ---------------------------------------------------------------- residual add fused in

def check_add_layer_norm(x, r, n, out_dtype=None, use_h=True, residual_bias=False):
    """add_layer_norm against h = x + r (+ rb); F.layer_norm(h).to(out_dtype): y, h and every gradient."""
    w, b = make_params(n, x.device, torch.float32)
    x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
    rb = torch.randn(n, device=x.device).requires_grad_() if residual_bias else None
    y, h = L.add_layer_norm(x, r, (n,), w, b, out_dtype=out_dtype, residual_bias=rb)
    h_ref = x + r if rb is None else x + (r + rb)
    y_ref = F.layer_norm(h_ref, (n,), w, b)
    y_ref = y_ref.to(out_dtype) if out_dtype is not None else y_ref
    assert y.dtype == y_ref.dtype and h.dtype == h_ref.dtype
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the same rounding as the separate add
    torch.testing.assert_close(y, y_ref, **tolerance(y.dtype))
    dy = torch.randn_like(y_ref)
    dh = torch.randn_like(h_ref) if use_h else None
    outs, refs = (y, h) if use_h else (y,), (y_ref, h_ref) if use_h else (y_ref,)
    inputs, names = ((x, r, w, b), ("dx", "dr", "dw", "db")) if rb is None else (
        (x, r, w, b, rb), ("dx", "dr", "dw", "db", "d residual_bias"))
    grads = torch.autograd.grad(outs, inputs, (dy, dh) if use_h else (dy,))
    ref_grads = torch.autograd.grad(refs, inputs, (dy, dh) if use_h else (dy,))
    for name, g, ref in zip(names, grads, ref_grads):
        assert g.dtype == ref.dtype, name
        assert_close_named(g, ref, name, **tolerance(g.dtype))


@pytest.mark.parametrize("use_h", [True, False], ids=["h-used", "h-unused"])
@pytest.mark.parametrize("residual_bias", [False, True], ids=["", "residual-bias"])
def test_add_layer_norm_matches_add_then_norm(use_h, residual_bias, device):
    check_add_layer_norm(torch.randn(3, 37, 200, device=device), torch.randn(3, 37, 200, device=device), 200,
                         use_h=use_h, residual_bias=residual_bias)


@pytest.mark.parametrize("residual_bias", [False, True], ids=["", "residual-bias"])
def test_add_layer_norm_mixed_precision(residual_bias, device):
    """The model's case: fp32 residual stream, half-precision sublayer output (its projection's fp32 bias
    added here), normalized into half precision."""
    half = torch.bfloat16 if torch.bfloat16 in DTYPES else torch.float16
    check_add_layer_norm(torch.randn(2, 65, 96, device=device), torch.randn(2, 65, 96, device=device).to(half), 96,
                         out_dtype=half, residual_bias=residual_bias)


@pytest.mark.parametrize("residual_bias", [False, True], ids=["", "residual-bias"])
def test_add_layer_norm_long_rows(monkeypatch, residual_bias, device):
    monkeypatch.setattr(L, "MAX_FUSED_BLOCK", 64)  # rows of 150 take the looping path (LOOP_BLOCK chunks)
    monkeypatch.setattr(L, "LOOP_BLOCK", 64)
    check_add_layer_norm(torch.randn(5, 150, device=device), torch.randn(5, 150, device=device), 150,
                         residual_bias=residual_bias)


def test_add_layer_norm_without_grad_and_without_residual(device):
    x, r = torch.randn(4, 48, device=device), torch.randn(4, 48, device=device)
    with torch.no_grad():
        y, h = L.add_layer_norm(x, r, 48)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, F.layer_norm(x + r, (48,)), **tolerance(torch.float32))
    rb = torch.randn(48, device=device)
    with torch.no_grad():
        y, h = L.add_layer_norm(x, r, 48, residual_bias=rb)
    torch.testing.assert_close(h, x + (r + rb), rtol=0, atol=0)
    y, h = L.add_layer_norm(x, None, 48)
    assert h is x
    torch.testing.assert_close(y, F.layer_norm(x, (48,)), **tolerance(torch.float32))
    with pytest.raises(ValueError, match="residual has shape"):
        L.add_layer_norm(x, r[:, :10], 48)
    with pytest.raises(ValueError, match="residual_bias has shape"):
        L.add_layer_norm(x, r, 48, residual_bias=rb[:10])
    with pytest.raises(ValueError, match="residual_bias needs a residual"):
        L.add_layer_norm(x, None, 48, residual_bias=rb)


def test_inputs_on_another_device_raise(device):
    x = torch.randn(3, 8, device=device)
    on_meta = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match="layer_norm weight is on meta"):
        layer_norm(x, (8,), on_meta)
    with pytest.raises(ValueError, match="layer_norm bias is on meta"):
        layer_norm(x, (8,), torch.ones(8, device=device), on_meta)
    with pytest.raises(ValueError, match="add_layer_norm residual is on meta"):
        L.add_layer_norm(x, torch.empty(3, 8, device="meta"), (8,))


def test_add_layer_norm_single_row_and_non_contiguous(device):
    check_add_layer_norm(torch.randn(1, 77, device=device), torch.randn(1, 77, device=device), 77)
    base = torch.randn(30, 130, device=device)
    x = base[::3]                                    # strided rows
    r = torch.randn(130, 10, device=device).t()      # transposed: columns not contiguous
    check_add_layer_norm(x, r, 130)


@pytest.mark.parametrize("looping", [False, True], ids=["one-block", "looping"])
@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_eps_is_used(eps, looping, monkeypatch, device):
    """A large eps changes every output: forward, backward, and the backward that recomputes the statistics."""
    if looping:
        monkeypatch.setattr(L, "MAX_FUSED_BLOCK", 256)
        monkeypatch.setattr(L, "LOOP_BLOCK", 128)
    x = 0.1 * torch.randn(6, 300, device=device)  # a variance (0.01) that eps dominates
    w, b = make_params(300, device, torch.float32)
    check_fwd_bwd(x, (300,), w, b, eps=eps)
    dy = torch.randn_like(x)
    _, mean, rstd = L.layer_norm_forward(x, w.detach(), b.detach(), eps, store_stats=True)
    stored = L.layer_norm_backward(dy, x, w.detach(), mean, rstd, eps)
    recomputed = L.layer_norm_backward(dy, x, w.detach(), None, None, eps)
    for a, c in zip(stored[:3], recomputed[:3]):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("n_cols", [300, 768])
def test_every_forward_tile(n_cols, monkeypatch, device):
    """The forward's autotuner may pick any tile of rows x columns (the suite's GPU runs try two): each must be right."""
    block, single = L._block_n(n_cols)
    tuner = L._fwd_kernel_for(block, single)
    x = torch.randn(37, n_cols, device=device)
    w, b = make_params(n_cols, device, torch.float32)
    for config in L._fwd_configs(block, single):
        monkeypatch.setattr(tuner, "configs", [config])
        monkeypatch.setattr(runtime, "_launchers", {})  # no kernel compiled for another tile is reused,
        monkeypatch.setattr(L, "_FWD_MEMO", {})  # nor remembered by the forward's launch_memo
        check_fwd_bwd(x, (n_cols,), w, b)
