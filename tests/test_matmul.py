"""linear (matmul + bias + fused activation), forward and backward, against F.linear + activation in float64."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ON_GPU, count_launches, cuda_only, dropout_calls

from triton_transformer import dropout as tt_dropout
from triton_transformer import feed_forward, linear, runtime
from triton_transformer.testing import max_error, tolerance

# the module (the package's `linear` name is the function), for its knobs: TMA, SPLIT_K, AUTOTUNE_MIN_MACS
MM = importlib.import_module("triton_transformer.matmul")
D = importlib.import_module("triton_transformer.dropout")

ACTIVATIONS = [None, "relu", "relu_squared", "gelu"]

#: The TMA kernel runs under the interpreter and on Hopper (sm_90) or newer.
tma_capable = pytest.mark.skipif(ON_GPU and torch.cuda.get_device_capability()[0] < 9,
                                 reason="TMA needs sm_90 or newer")


def act_ref(z, activation):
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "relu_squared":
        return F.relu(z) ** 2
    return F.gelu(z, approximate="tanh")


def check(x, weight, bias=None, activation=None, dy=None, tol=None):
    """Forward and every gradient of linear against the float64 reference, on the same inputs."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    y = linear(x, weight, bias, activation)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    # an fp32 weight with 16-bit x takes part rounded to x's dtype, as under autocast
    w64 = weight.detach().to(x.dtype).double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    z64 = F.linear(x64, w64, b64)
    z64.retain_grad()
    y64 = act_ref(z64, activation)
    y64.backward(dy.double())

    tol = tol or tolerance(x.dtype, matmul=True)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    torch.testing.assert_close(y.double(), y64, **tol)
    # With an activation, dz = dy * act'(z) feeds the three gradient sums rounded to x's dtype, as in
    # PyTorch's own 16-bit autograd. A sum of n such terms then carries a rounding error that grows like
    # the root of the sum of its squared terms, however small the sum itself: allow 2 eps of that
    # (~7 standard deviations), far below what a wrong tile or a misplaced row would add.
    rounded = activation is not None and x.dtype in (torch.float16, torch.bfloat16)
    eps = 2 * torch.finfo(x.dtype).eps if rounded else 0.0
    dz2 = rows(z64.grad) ** 2
    x2 = rows(x64.detach()) ** 2
    close_with_slack(x.grad, x64.grad, tol, eps * (dz2 @ w64.detach() ** 2).sqrt().view(x.shape), "dx")
    assert weight.grad.dtype == weight.dtype and (bias is None or bias.grad.dtype == bias.dtype)
    close_with_slack(weight.grad, w64.grad, tol, eps * (dz2.t() @ x2).sqrt(), "dW")
    if bias is not None:
        close_with_slack(bias.grad, b64.grad, tol, eps * dz2.sum(0).sqrt(), "db")
    return y


def rows(t):
    """t (..., n) as (rows, n); the row count spelled out, as reshape(-1, 0) is ambiguous."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def close_with_slack(ours, ref, tol, slack, name):
    """|ours - ref| <= atol + rtol |ref| + slack, element by element (slack: a tensor like ref)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    bound = tol["atol"] + tol["rtol"] * ref.abs() + slack
    excess = (ours.double() - ref).abs() - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{name}: {int((excess > 0).sum())} of {ref.numel()} elements off; worst at flat "
                               f"index {worst}: ours {ours.flatten()[worst].item():.5f}, reference "
                               f"{ref.flatten()[worst].item():.5f}, allowed {bound.flatten()[worst].item():.5f}")


def inputs(shape, out_features, dtype, device, bias=True, scale=1.0):
    x = torch.randn(shape, device=device, dtype=torch.float32) * scale
    w = torch.randn(out_features, shape[-1], device=device) / shape[-1] ** 0.5
    b = torch.randn(out_features, device=device) if bias else None
    return x.to(dtype), w.to(dtype), (b.to(dtype) if bias else None)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_ragged_tails_fp32(activation, bias, device):
    """(33, 70) x (130, 70): no dimension a multiple of any tile."""
    check(*inputs((33, 70), 130, torch.float32, device, bias), activation)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_fp16(activation, bias, device):
    check(*inputs((33, 70), 130, torch.float16, device, bias), activation)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_fp32_parameters_with_half_precision_input(activation, device):
    """Mixed precision: fp32 weight and bias with 16-bit x (the model under autocast). The product runs in
    x's dtype, the bias is added in fp32, and dW, db come back in fp32 with no cast kernels around them."""
    half = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter's bf16 dots are wrong
    x, w, b = inputs((2, 17, 70), 130, torch.float32, device)
    check(x.to(half), w, b, activation)
    check(x.to(half), w, None, activation)
    with torch.no_grad():  # the path that saves nothing casts the weight the same way
        torch.testing.assert_close(linear(x.to(half), w, b, activation), linear(x.to(half), w.to(half), b, activation))


def test_3d_input_reduces_dW_over_all_rows(device):
    """x of shape (2, 17, 64): dW sums over all 34 rows of both batch entries."""
    check(*inputs((2, 17, 64), 48, torch.float32, device), "relu_squared")
    check(*inputs((2, 17, 64), 48, torch.float16, device), "relu")


def test_one_row_and_one_dimensional_input(device):
    check(*inputs((1, 40), 24, torch.float32, device), "gelu")
    check(*inputs((3, 5), 1, torch.float32, device), "relu_squared")  # K below a tl.dot tile, one output
    check(*inputs((1, 1), 7, torch.float32, device), None)
    x, w, b = inputs((40,), 24, torch.float32, device)
    y = check(x, w, b, None)
    assert y.shape == (24,)


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_few_rows_in_16_bits_take_the_skinny_tiles(rows, monkeypatch, device):
    """Generation's products (a token or a few at a time) in fp16: narrow tiles, a K tail, ragged N."""
    tiles = []
    launch = runtime.launch

    def spy(kernel, grid, *args, **meta):
        tiles.append(meta.get("BLOCK_N"))
        return launch(kernel, grid, *args, **meta)
    monkeypatch.setattr(runtime, "launch", spy)
    check(*inputs((rows, 300), 70, torch.float16, device), "gelu")  # K = 300: one step of 256 and a tail
    assert tiles[0] == MM.SKINNY_CONFIG["BLOCK_N"]  # the forward; its fp32 twin keeps SMALL_CONFIG:
    tiles.clear()
    check(*inputs((rows, 300), 70, torch.float32, device), "gelu")
    assert tiles[0] == MM.SMALL_CONFIG["BLOCK_N"]


def test_gelu_is_finite_for_large_inputs(device):
    """The sigmoid form must neither overflow nor produce NaN far out in the tails."""
    x, w, b = inputs((8, 16), 32, torch.float32, device, scale=60.0)
    y = check(x, w, b, "gelu")
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("fused", [False, True], ids=["linear", "feed_forward"])
def test_relu_squared_gradient_in_fp16_where_y_leaves_its_range(fused, device):
    """relu^2' = 2 relu(z). Recovered from the fp16 output as 2 sqrt(y) it was 0 where z^2 flushes to zero
    (z ~ 1e-4) and inf where z^2 overflows (z = 300): fp16 keeps z instead."""
    z = torch.tensor([1e-4, 2e-4, 5e-4, 300.0, -3.0], dtype=torch.float16, device=device)
    x = torch.diag(z).requires_grad_()
    eye = torch.eye(5, dtype=torch.float16, device=device)
    y = feed_forward(x, eye, None, eye, None, "relu_squared") if fused else linear(x, eye, None, "relu_squared")
    (g,) = torch.autograd.grad(y, x, eye)
    torch.testing.assert_close(g.diag(), 2 * torch.relu(z), rtol=2e-3, atol=0)


def test_strided_inputs_and_reduced_output_gradient(device):
    """Transposed views for x and weight (no copies) and dy of stride 0 (from .sum())."""
    x = torch.randn(70, 33, device=device).t()            # (33, 70), column-major
    w = torch.randn(70, 130, device=device).t() / 8       # (130, 70), column-major
    b = torch.randn(130, device=device)
    check(x, w, b, "gelu")
    check(x, w, b, "relu", dy=torch.ones((), device=device).expand(33, 130))
    x3 = torch.randn(2, 70, 9, device=device).transpose(1, 2)  # (2, 9, 70), non-contiguous 3-D
    check(x3, w, b, "relu_squared")


def test_no_grad_saves_nothing_and_frozen_weight_saves_no_input(device):
    x, w, b = inputs((5, 16), 8, torch.float32, device)
    x.requires_grad_()
    w.requires_grad_()
    with torch.no_grad():
        assert linear(x, w, b, "gelu").grad_fn is None
    # weight frozen: x is not kept for dW; gelu keeps its pre-activation z. (The output stays referenced:
    # a custom Function's grad_fn releases what it saved once its outputs are gone.)
    y = linear(x, w.detach(), b, "gelu")
    saved = y.grad_fn.saved_tensors
    assert saved[0] is None and saved[1] is not None and saved[2] is not None
    # relu and relu^2 recover their derivative from the output: nothing extra is stored
    y = linear(x, w, b, "relu_squared")
    saved = y.grad_fn.saved_tensors
    assert saved[2].data_ptr() == y.data_ptr()
    # input frozen: W is not kept for dx
    y = linear(x.detach(), w, None, None)
    saved = y.grad_fn.saved_tensors
    assert saved[1] is None and saved[2] is None


def test_gradients_are_deterministic(device):
    x, w, b = inputs((2, 17, 64), 48, torch.float32, device)
    grads = []
    for _ in range(2):
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
        linear(xg, wg, bg, "gelu").square().sum().backward()
        grads.append((xg.grad, wg.grad, bg.grad))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_empty(device):
    x, w, b = inputs((0, 16), 8, torch.float32, device)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = linear(x, w, b, "relu")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))  # an empty sum: db is allocated zeroed only when there are no rows
    # no input features (y = b), and no output features, with and without the bias's row sums in dW
    check(*inputs((3, 0), 8, torch.float32, device), None)
    check(*inputs((2, 3, 0), 8, torch.float32, device), "relu")
    check(*inputs((3, 5), 0, torch.float32, device), None)


# ---------------------------------------------------------------- the other code paths, forced on small shapes

def test_autotuned_pointer_kernel(monkeypatch, device):
    """The autotuned launch (on CPU: the first config, 32 x 32 x 32) instead of SMALL_CONFIG."""
    monkeypatch.setattr(MM, "AUTOTUNE_MIN_MACS", 0)
    monkeypatch.setattr(MM, "TMA", False)
    # fp16 on a GPU: autotuning fp32 (exact "ieee" dots) over every config would mostly time compilation
    check(*inputs((33, 70), 130, torch.float16 if ON_GPU else torch.float32, device), "gelu")


@pytest.mark.parametrize("i", range(len(MM._POINTER_CONFIGS)))
def test_every_pointer_config(i, monkeypatch, device):
    """The autotuner may pick any config (the suite's GPU runs tune over the first two only): each must be
    right, forward and the backward's dx and dW (with the bias's row sums)."""
    monkeypatch.setattr(MM, "AUTOTUNE_MIN_MACS", 0)
    monkeypatch.setattr(MM, "TMA", False)
    monkeypatch.setattr(MM._matmul_kernel, "configs", [MM._POINTER_CONFIGS[i]])
    monkeypatch.setattr(runtime, "_launchers", {})  # no kernel compiled for another config is reused,
    monkeypatch.setattr(MM, "_POINTER_MEMO", {})  # nor remembered by matmul's launch_memo
    check(*inputs((2, 150, 100), 270, torch.float16 if ON_GPU else torch.float32, device), "gelu")


@tma_capable
@pytest.mark.parametrize("i", range(len(MM._TMA_CONFIGS)))
def test_every_tma_config(i, monkeypatch, device):
    """The same for the TMA kernel, all three layouts, ragged M and N."""
    monkeypatch.setattr(MM, "TMA", True)
    monkeypatch.setattr(MM._matmul_tma_kernel, "configs", [MM._TMA_CONFIGS[i]])
    monkeypatch.setattr(runtime, "_launchers", {})
    monkeypatch.setattr(MM, "_TMA_MEMO", {})
    check(*inputs((2, 150, 128), 272, torch.float16 if ON_GPU else torch.float32, device), "gelu")


@tma_capable
def test_tma_kernel(monkeypatch, device):
    """The persistent TMA kernel, all three layouts (x W^T, dz W, dz^T x), ragged M and N."""
    calls = count_launches(monkeypatch, MM._matmul_tma_kernel)
    monkeypatch.setattr(MM, "TMA", True)
    # on a GPU the TMA kernel only ever sees fp16/bf16; under the interpreter fp32 is exact enough to test
    dtype = torch.float16 if ON_GPU else torch.float32
    check(*inputs((2, 17, 64), 48, dtype, device), "gelu")
    assert len(calls) == 3  # forward, dx and dW all took it (strides are 16-byte aligned)
    calls.clear()
    # twice the same shapes: on a GPU the second time takes the cached launch (new descriptors, same kernel)
    for _ in range(2):
        check(*inputs((34, 64), 80, torch.float16, device, bias=False), None)
    assert len(calls) == 6


@tma_capable
def test_tma_stores_only_aligned_rows(monkeypatch, device):
    """The TMA kernel stores through descriptors only where every output row is 16-byte aligned: an fp32
    output of 4 columns is (16 bytes) but its fp16 pre-activation is not (8), so both go through pointers.
    Wider outputs take the TMA stores; every variant matches the product."""
    monkeypatch.setattr(MM, "TMA", True)
    stores = []
    launch = MM.runtime.launch
    monkeypatch.setattr(MM.runtime, "launch",
                        lambda kernel, grid, *a, **k: stores.append(k.get("TMA_STORE")) or launch(kernel, grid, *a, **k))
    for n, out_dtype, expected in ((4, torch.float32, False), (8, torch.float32, True), (8, None, True), (4, None, False)):
        a = torch.randn(40, 32, device=device).half()
        b = torch.randn(n, 32, device=device).half().t()  # W^T, as the forward passes it: TMA reads W's rows
        bias = torch.randn(n, device=device).half()
        c, z = MM.matmul(a, b, bias, MM.GELU, store_z=True, out_dtype=out_dtype)
        ref = a.double() @ b.double() + bias.double()
        assert stores[-1] is expected, (n, out_dtype)
        torch.testing.assert_close(z.double(), ref, atol=1e-2, rtol=2e-3)
        torch.testing.assert_close(c.double(), F.gelu(ref, approximate="tanh"), atol=1e-2, rtol=2e-3)


@pytest.mark.parametrize("tma", [False, pytest.param(True, marks=tma_capable)], ids=["pointer", "tma"])
def test_split_k(monkeypatch, tma, device):
    """dW with its K loop (the rows) split in 3, partial sums reduced in fp32."""
    monkeypatch.setattr(MM, "SPLIT_K", 3)
    monkeypatch.setattr(MM, "TMA", tma)
    dtype = torch.float16 if ON_GPU and tma else torch.float32
    check(*inputs((100, 32), 48, dtype, device, bias=False), None)
    x, w, _ = inputs((100, 32), 48, torch.float32, device, bias=False)
    check(x.half(), w, None, None)  # fp32 weight: the split partials summed straight into an fp32 dW
    # with a bias: db from the dW kernel's row sums, one partial per split, summed after
    check(*inputs((100, 32), 48, dtype, device, bias=True), None)


def test_bias_gradient_comes_from_the_dW_matmul(monkeypatch, device):
    """Without an activation, db = sum_rows dy is added up by the dW kernel from the dy tiles it loads:
    no pass of its own over dy. A frozen weight has no dW matmul: then the reduction kernel does it."""
    reductions = count_launches(monkeypatch, MM._act_bwd_kernel)
    check(*inputs((2, 37, 70), 130, torch.float32, device), None)  # 74 rows, ragged tiles everywhere
    assert reductions == []
    x, w, b = inputs((2, 37, 70), 130, torch.float32, device)
    check(x.half() if ON_GPU else x, w, b, None)  # fp32 bias (mixed precision on a GPU): db in fp32
    assert reductions == []
    x, w, b = inputs((33, 70), 130, torch.float32, device)
    b.requires_grad_()
    linear(x, w, b, None).backward(torch.ones(33, 130, device=device))
    assert len(reductions) == 1 and torch.allclose(b.grad, torch.full_like(b, 33.0))


# ---------------------------------------------------------------- feed_forward: act' in the epilogue of the dh GEMM

def ff_check(x, w1, b1, w2, b2, activation, frozen=(), dropout_p=0.0, seed=None):
    """feed_forward against float64, and at least as close to it as our two linears composed.

    The two linears round dh = dy W2 to x's dtype before multiplying by act'; the fused backward rounds
    dz = (dy W2) act' once. So in 16 bits the fused gradients are as accurate or better; in fp32 both
    are exact to the tolerance. `frozen`: names of inputs that get no gradient. With `dropout_p` (and a
    seed) the hidden layer is dropped: the composition is linear, dropout, linear, and the reference
    applies the mask of `dropout.reference_mask`.
    """
    names = ["x", "w1", "b1", "w2", "b2"]
    given = {n: t for n, t in zip(names, (x, w1, b1, w2, b2)) if t is not None}
    trained = [n for n in given if n not in frozen]

    def run(cast, fn):
        leaves = {n: cast(t).detach().requires_grad_(n in trained) for n, t in given.items()}
        y = fn(*(leaves.get(n) for n in names))
        return [y, *torch.autograd.grad(y, [leaves[n] for n in trained], dy.to(y.dtype))]

    dy = torch.randn(*x.shape[:-1], w2.shape[0], device=x.device, dtype=x.dtype)
    hidden = (*x.shape[:-1], w1.shape[0])
    keep = D.reference_mask(hidden, dropout_p, seed) if dropout_p else torch.ones(hidden, dtype=torch.bool)
    kept = keep.to(x.device).double() / (1.0 - dropout_p)
    ours = run(lambda t: t, lambda *a: feed_forward(*a, activation, dropout_p=dropout_p, seed=seed))
    two = run(lambda t: t, lambda x, w1, b1, w2, b2: linear(tt_dropout(linear(x, w1, b1, activation), dropout_p,
                                                                       seed=seed), w2, b2))
    ref = run(lambda t: t.to(x.dtype).double(),
              lambda x, w1, b1, w2, b2: F.linear(act_ref(F.linear(x, w1, b1), activation) * kept, w2, b2))
    tol = tolerance(x.dtype, matmul=True)
    for name, a, b, r in zip(["y", *trained], ours, two, ref):
        assert a.shape == r.shape and a.dtype == b.dtype, name
        floor = 0.1 * tol["atol"] * max(1.0, float(r.detach().abs().max()))
        assert max_error(a, r) <= 1.5 * max_error(b, r) + floor, (name, max_error(a, r), max_error(b, r))
        if x.dtype == torch.float32:
            torch.testing.assert_close(a.double(), r, **tol)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_feed_forward(activation, bias, device):
    """Ragged sizes (40 -> 70 -> 33), a non-contiguous x of 34 rows."""
    x = torch.randn(2, 17, 50, device=device)[..., :40]
    _, w1, b1 = inputs((1, 40), 70, torch.float32, device, bias)
    _, w2, b2 = inputs((1, 70), 33, torch.float32, device, bias)
    ff_check(x, w1, b1, w2, b2, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("hidden", [72, 70], ids=["grouped-mask", "per-element-mask"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_feed_forward_dropout(monkeypatch, activation, hidden, dtype, device):
    """Dropout between the projections: the values and gradients of linear, dropout, linear with the same seed.
    relu and relu^2 drop inside the first GEMM's epilogue and the backward takes the mask from the dropped
    output's zeros (no dropout kernel either way); gelu, no activation and fp16 relu^2 (which keeps z, not
    its output) compose the three calls. A hidden width that is a multiple of 4 shares a Philox call among
    four columns, 70 takes one per element. 150 rows of a non-contiguous x: three row tiles, the last ragged."""
    x = torch.randn(3, 50, 50, device=device)[..., :40].to(dtype)
    _, w1, b1 = inputs((1, 40), hidden, dtype, device)
    _, w2, b2 = inputs((1, hidden), 33, dtype, device)
    ff_check(x, w1, b1, w2, b2, activation, dropout_p=0.3, seed=2**40 + 5)
    # a 32-bit seed next: Triton types the seed by its value, so `matmul` plans (and launches) it apart
    ff_check(x, w1, b1, w2, b2, activation, dropout_p=0.3, seed=1234)
    fused = activation in ("relu", "relu_squared") and not (activation == "relu_squared" and dtype == torch.float16)
    assert MM.fused_dropout(MM.ACTIVATIONS[activation], dtype, 0.3) is fused
    drops = dropout_calls(monkeypatch)
    leaves = [t.detach().requires_grad_() for t in (x, w1, b1, w2, b2)]
    feed_forward(*leaves, activation, dropout_p=0.3, seed=1234).sum().backward()
    assert len(drops) == (0 if fused else 2), activation


@pytest.mark.parametrize("frozen", [("x",), ("w1", "b1"), ("w2", "b2"), ("x", "w1", "b1")], ids=str)
def test_feed_forward_dropout_frozen_inputs(frozen, device):
    """Every gradient that is asked for, whichever are not: the dropped hidden layer feeds dW2 and, through the
    dz GEMM's epilogue, dx, dW1 and db1 (relu^2, the fused path)."""
    x, w1, b1 = inputs((70, 24), 40, torch.float32, device)
    _, w2, b2 = inputs((1, 40), 16, torch.float32, device)
    ff_check(x, w1, b1, w2, b2, "relu_squared", frozen, dropout_p=0.4, seed=31)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("hidden", [72, 70], ids=["tma-stores", "pointer-stores"])
@tma_capable
def test_feed_forward_tma(monkeypatch, hidden, dropout, device):
    """The TMA kernel multiplies by act' in both epilogues: s read through a descriptor where h's rows are
    16-byte aligned, through pointers where they are not (fp32 rows of 70). With dropout both epilogues drop
    the hidden layer (each half-width box of a TMA store with the mask of its own columns) and take act' from
    the dropped output: bf16 on a GPU, where relu^2 is fused; without, fp16, where relu^2 keeps z. 150 rows:
    three row tiles, the last one ragged."""
    monkeypatch.setattr(MM, "TMA", True)
    dtype = (torch.bfloat16 if dropout else torch.float16) if ON_GPU else torch.float32
    if ON_GPU and hidden % 8:
        hidden = 74  # 16-bit rows of 74 (148 bytes): not 16-byte aligned either, and not a multiple of 4 columns
    x, w1, b1 = inputs((3, 50, 64), hidden, torch.float32, device)
    _, w2, b2 = inputs((1, hidden), 48, torch.float32, device)
    tma = count_launches(monkeypatch, MM._matmul_tma_kernel)
    for activation in ("relu_squared", "relu") if dropout else ("relu_squared", "gelu"):
        assert MM.fused_dropout(MM.ACTIVATIONS[activation], dtype, dropout) is (dropout > 0)
        ff_check(x.to(dtype), w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype), activation,
                 dropout_p=dropout, seed=-99)
    assert tma


@pytest.mark.parametrize("tma", [False, pytest.param(True, marks=tma_capable)], ids=["pointer", "tma"])
def test_feed_forward_dropout_keys(monkeypatch, tma, device):
    """Without a seed the mask is drawn as `dropout` draws it; inside `replayable_seeds` it is keyed by the
    block's salt and the base, read by the kernel when it runs (a CUDA graph can replay it with new masks),
    in both kernels. No grad: the same fused forward, nothing saved. A p outside [0, 1] is refused."""
    monkeypatch.setattr(MM, "TMA", tma)
    tma_launches = count_launches(monkeypatch, MM._matmul_tma_kernel)
    x, w1, b1 = inputs((9, 32), 40, torch.float32, device)
    _, w2, b2 = inputs((1, 40), 16, torch.float32, device)
    torch.manual_seed(5)
    drawn = feed_forward(x, w1, b1, w2, b2, dropout_p=0.5)
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, feed_forward(x, w1, b1, w2, b2, dropout_p=0.5, seed=D.draw_seed()))
    base = torch.tensor([77], dtype=torch.int64, device=device)
    with D.replayable_seeds(base):
        keyed = feed_forward(x, w1, b1, w2, b2, dropout_p=0.5)
    torch.testing.assert_close(keyed, feed_forward(x, w1, b1, w2, b2, dropout_p=0.5, seed=D._salt(1) ^ 77))
    assert not torch.allclose(keyed, drawn)
    w1.requires_grad_()
    with torch.no_grad():
        y = feed_forward(x, w1, b1, w2, b2, dropout_p=0.5, seed=3)
    assert y.grad_fn is None
    torch.testing.assert_close(y, feed_forward(x, w1, b1, w2, b2, dropout_p=0.5, seed=3).detach())
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p has to be between 0 and 1"):
            feed_forward(x, w1, b1, w2, b2, dropout_p=p)
    assert bool(tma_launches) is tma


def test_feed_forward_autotuned_pointer_kernel(monkeypatch, device):
    """act' in the epilogue of the autotuned pointer kernel (what runs without TMA: a T4, an A100)."""
    monkeypatch.setattr(MM, "AUTOTUNE_MIN_MACS", 0)
    monkeypatch.setattr(MM, "TMA", False)
    dtype = torch.float16 if ON_GPU else torch.float32
    x, w1, b1 = inputs((2, 17, 40), 70, torch.float32, device)
    _, w2, b2 = inputs((1, 70), 33, torch.float32, device)
    ff_check(x.to(dtype), w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype), "relu_squared")


def test_feed_forward_backward_has_no_elementwise_pass(monkeypatch, device):
    """With every parameter trained, dz leaves the dh GEMM and db1, db2 come from the dW GEMMs' row sums:
    no `_act_bwd_kernel` at all. Frozen weights (no dW GEMM to sum in) take it for their biases."""
    x, w1, b1 = inputs((21, 24), 40, torch.float32, device)
    _, w2, b2 = inputs((1, 40), 16, torch.float32, device)
    for frozen, elementwise in (((), 0), (("w1", "w2"), 2), (("w1", "b1", "w2", "b2"), 0), (("x", "w1", "b1"), 0)):
        ff_check(x, w1, b1, w2, b2, "gelu", frozen)
        passes = count_launches(monkeypatch, MM._act_bwd_kernel)
        leaves = [t.detach().requires_grad_(n not in frozen) for n, t in zip(["x", "w1", "b1", "w2", "b2"],
                                                                               (x, w1, b1, w2, b2))]
        feed_forward(*leaves, "gelu").sum().backward()
        monkeypatch.undo()
        assert len(passes) == elementwise, frozen


def test_feed_forward_bad_input_raises_clear_errors(device):
    x, w1, b1 = inputs((4, 16), 24, torch.float32, device)
    _, w2, b2 = inputs((1, 24), 8, torch.float32, device)
    with pytest.raises(ValueError, match="x has 15 features in its last dimension"):
        feed_forward(x[:, :15], w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"the hidden layer \(w1's out_features\) has 24 features but w2 of shape \(8, 23\)"):
        feed_forward(x, w1, b1, w2[:, :23], b2)
    with pytest.raises(ValueError, match="b1 has 7 elements but w1 has 24 output features"):
        feed_forward(x, w1, b1[:7], w2, b2)
    with pytest.raises(TypeError, match="w2 has dtype float16 but x has dtype float32"):
        feed_forward(x, w1, b1, w2.half(), b2)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        feed_forward(x, w1, b1, w2, b2, "swish")
    with pytest.raises(ValueError, match="b2 is on meta"):
        feed_forward(x, w1, b1, w2, b2.to("meta"))


def test_feed_forward_saves_nothing_without_grad(device):
    x, w1, b1 = inputs((5, 24), 40, torch.float32, device)
    _, w2, b2 = inputs((1, 40), 16, torch.float32, device)
    w1.requires_grad_()
    with torch.no_grad():
        y = feed_forward(x, w1, b1, w2, b2)
    assert y.grad_fn is None and y.shape == (5, 16)
    torch.testing.assert_close(y, linear(linear(x, w1, b1, "relu_squared"), w2, b2).detach())


# ---------------------------------------------------------------- errors

def test_bad_input_raises_clear_errors(device):
    x, w, b = inputs((4, 16), 8, torch.float32, device)
    with pytest.raises(ValueError, match="x has 15 features"):
        linear(x[:, :15], w)
    with pytest.raises(TypeError, match="weight has dtype float16 but x has dtype float32"):
        linear(x, w.half())
    with pytest.raises(TypeError, match="bias has dtype float16"):
        linear(x, w, b.half())
    with pytest.raises(ValueError, match="bias has 7 elements"):
        linear(x, w, b[:7])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        linear(x, w, b, activation="swish")
    with pytest.raises(ValueError, match="weight is on meta"):
        linear(x, w.to("meta"))
    with pytest.raises(TypeError, match="dtype int64"):
        linear(torch.arange(16, device=device).reshape(1, 16), w)
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        linear(x, w[None])


# ---------------------------------------------------------------- GPU: bf16 and the autotuned / TMA paths

@cuda_only
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_cuda_bf16(activation, bias, device):
    check(*inputs((33, 70), 130, torch.bfloat16, device, bias), activation)


@cuda_only
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu_squared", True), (None, False)], ids=str)
def test_cuda_bf16_autotuned(activation, bias, device):
    """Big enough to autotune: ragged rows of 1400 bytes (pointer kernel) and 16-byte aligned (TMA on Hopper)."""
    check(*inputs((1000, 700), 600, torch.bfloat16, device, bias), activation)
    check(*inputs((4, 512, 768), 1024, torch.bfloat16, device, bias), activation)


@cuda_only
def test_cuda_split_k_and_fp16(device):
    # dW of (3072, 768) over 8192 rows: few output tiles, long K -> split by the heuristic
    assert MM._split_k(3072, 768, 8192, device) > 1
    tol = dict(atol=5e-2, rtol=5e-2)
    check(*inputs((8192, 768), 3072, torch.bfloat16, device, scale=0.5), "gelu", tol=tol)
    check(*inputs((2, 300, 512), 1000, torch.float16, device), "relu_squared")


def test_plans_are_kept_per_kind_of_call(monkeypatch, device):
    """`matmul` works out what to launch once per key: the same call on fresh tensors reuses the plan, and
    what the plan depends on (a transposed operand, an input off a 16-byte boundary, a knob) makes another."""
    monkeypatch.setattr(MM, "_PLANS", {})
    a, b = torch.randn(40, 64, device=device), torch.randn(64, 8, device=device)
    for _ in range(2):
        a2, b2 = a.clone(), b.clone()  # fresh storage each time
        torch.testing.assert_close(MM.matmul(a2, b2)[0], a @ b)
    assert len(MM._PLANS) == 1
    torch.testing.assert_close(MM.matmul(a.t().contiguous().t(), b)[0], a @ b)  # column-major a
    flat = torch.randn(40 * 64 + 1, device=device)
    off = flat[1:].view(40, 64)  # four bytes past the boundary
    torch.testing.assert_close(MM.matmul(off, b)[0], off @ b)
    monkeypatch.setattr(MM, "SPLIT_K", 2)
    torch.testing.assert_close(MM.matmul(a, b)[0], a @ b)
    plans = list(MM._PLANS.values())  # in the order of their first calls
    assert [plan.split for plan in plans] == [1, 1, 1, 2]
    assert [plan.layout for plan in plans] == [0, 2, 0, 0]  # A column-major: layout bit 2


@cuda_only
def test_cuda_repeated_calls_launch_from_the_memo(device):
    """A call like one before launches straight from `runtime.launch_memo`'s memory (TMA forward and dx, and the
    pointer kernel's dW with split-K and row sums): right each time on fresh tensors, one entry per launch; an
    input off a 16-byte boundary takes the ordinary path, and is right too."""
    for memo in (MM._PLANS, MM._TMA_MEMO, MM._POINTER_MEMO, MM._SUM_MEMO):
        memo.clear()
    tol = dict(atol=5e-2, rtol=5e-2)
    assert MM._split_k(3072, 768, 8192, device) > 1
    for _ in range(3):
        check(*inputs((8192, 768), 3072, torch.bfloat16, device, scale=0.5), None, tol=tol)
    # forward and dx on the TMA kernel; dW on the pointer kernel, its split's partials and its row sums (db) summed
    assert [len(m) for m in (MM._PLANS, MM._TMA_MEMO, MM._POINTER_MEMO, MM._SUM_MEMO)] == [3, 2, 1, 2]
    x, w, b = inputs((64, 768), 256, torch.bfloat16, device)
    flat = torch.empty(64 * 768 + 8, device=device, dtype=torch.bfloat16)
    check(flat[1:64 * 768 + 1].view(64, 768).copy_(x), w, b, "gelu", tol=tol)  # two bytes past the boundary


def test_split_k_rule(monkeypatch):
    """dW's split of the K loop on 132 SMs: the split with the fullest waves of 128 x 256 tiles, net of the
    partials' traffic. The expected splits are the fastest of 1 to 8 measured on the H100 (GPU time of the
    kernel and the partials' sum, `probe.py dwsplit`), but at (3072, 768), where that probe (warm L2) had 5
    splits 9% faster and chapter 4's timings with a cold L2 had 3 splits 7% faster: 3 there."""
    monkeypatch.setattr(runtime, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    rows = 16384
    for (out_features, in_features), split in [((1536, 512), 5), ((512, 512), 8), ((2048, 512), 4),
                                                ((512, 2048), 4), ((256, 512), 8), ((2304, 768), 2),
                                                ((768, 768), 7), ((3072, 768), 3), ((768, 3072), 3),
                                                ((8192, 8192), 1), ((50304, 768), 1)]:
        assert MM._split_k(out_features, in_features, rows, cuda) == split, (out_features, in_features)
    assert MM._split_k(512, 512, 4095, cuda) == 1  # short K: nothing to split
    assert MM._split_k(512, 512, 8192, cuda) == 4  # capped at K // 2048
    assert MM._split_k(512, 512, rows, torch.device("cpu")) == 1


def test_dot_precision_follows_torch_setting():
    """The one switch for fp32 `tl.dot` in linear and attention: exact under "highest", TF32 otherwise."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert runtime.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert runtime.dot_precision(torch.float32) == "tf32"
        assert runtime.dot_precision(torch.bfloat16) == runtime.dot_precision(torch.float16) == "tf32"  # ignored
    finally:
        torch.set_float32_matmul_precision(before)


@cuda_only
def test_cuda_fp32_follows_torch_matmul_precision(device):
    assert runtime.dot_precision(torch.float32) == ("ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    check(*inputs((300, 256), 384, torch.float32, device), "gelu")


def test_double_backward_is_refused(device):
    x, w, b = inputs((4, 16), 8, torch.float32, device)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="LinearFunction: double backward"):
        torch.autograd.grad(linear(x, w, b, "gelu").sum(), x, create_graph=True)


@cuda_only
def test_transposed_gradient_past_2_to_the_31_elements():
    """The activation's backward reads dy through its strides: a transposed dy of (65536, 32800) puts its
    last columns more than 2**31 elements from its first, past what 32-bit column offsets reach."""
    M, N = 65536, 32800
    try:
        dy = torch.randn(N, M, device="cuda", dtype=torch.bfloat16).t()  # (M, N), column stride M
        s = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        dz, db = MM.activation_backward(dy, s, MM.ACTIVATIONS["relu"], bias_grad=True, bias_dtype=torch.float32)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    for cols in (slice(0, 64), slice(N - 64, N)):  # below and past 2**31 / M = 32768
        ref = dy[:, cols].float() * (s[:, cols] > 0)
        assert torch.equal(dz[:, cols], ref.to(torch.bfloat16))
        torch.testing.assert_close(db[cols], ref.sum(0), rtol=1e-4, atol=1e-2)

