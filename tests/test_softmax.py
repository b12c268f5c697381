"""Softmax forward and backward against torch.softmax (and a float64 reference)."""

import pytest
import torch
from conftest import DTYPES, cuda_only

import importlib

from triton_transformer import softmax
from triton_transformer.testing import tolerance
from triton.runtime.errors import OutOfResources  # (after the package, which sets the interpreter up first)

# the module itself (the package's `softmax` name is the function), for monkeypatching its block limits
S = importlib.import_module("triton_transformer.softmax")

SHAPES = [(1, 1), (3, 781), (7, 4097), (2, 3, 5, 33)]


def reference(x: torch.Tensor, dim: int = -1, causal: bool = False) -> torch.Tensor:
    """torch.softmax in float64, with the causal mask applied as -inf."""
    x64 = x.double()
    if causal:
        m, n = x.shape[-2:]
        hidden = torch.ones(m, n, dtype=torch.bool, device=x.device).triu(1)
        x64 = x64.masked_fill(hidden, float("-inf"))
    return torch.softmax(x64, dim=dim)


def check_fwd_bwd(x: torch.Tensor, dim: int = -1, causal: bool = False, dy: torch.Tensor | None = None):
    x = x.detach().requires_grad_()
    y = softmax(x, dim=dim, causal=causal)
    dy = torch.randn_like(y) if dy is None else dy
    (dx,) = torch.autograd.grad(y, x, dy)

    x64 = x.detach().double().requires_grad_()
    y64 = reference(x64, dim, causal)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())

    tol = tolerance(x.dtype)
    # values average 1/n over a row of n: an absolute tolerance made for values near 1 would pass a
    # kernel that dropped a whole column, so it shrinks with the row
    tol = dict(rtol=tol["rtol"], atol=tol["atol"] / max(1, x.shape[dim]))
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(dx.double(), dx64, **tol)
    # and against PyTorch in the input dtype, the way a user would swap one for the other
    xt = x.detach()
    if causal:
        m, n = x.shape[-2:]
        xt = xt.masked_fill(torch.ones(m, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    y_torch = torch.softmax(xt, dim)
    assert y_torch.dtype == x.dtype
    torch.testing.assert_close(y, y_torch, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, dtype, device):
    check_fwd_bwd(torch.randn(shape, device=device, dtype=dtype) * 3)
    x = torch.randn(shape, device=device, dtype=dtype)
    x[..., -1] = 4.0  # the last column (the masked tail's neighbour) dominates its row
    check_fwd_bwd(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal(dtype, device):
    check_fwd_bwd(torch.randn(2, 3, 17, 17, device=device, dtype=dtype), causal=True)
    # rectangular: more keys than queries, row i still sees columns 0..i
    check_fwd_bwd(torch.randn(5, 40, device=device, dtype=dtype), causal=True)
    # more queries than keys: rows past the last key see every column
    check_fwd_bwd(torch.randn(40, 5, device=device, dtype=dtype), causal=True)


def test_long_rows_take_the_online_path(monkeypatch, device):
    """Rows longer than one block stream through the two-pass online softmax."""
    monkeypatch.setattr(S, "MAX_FUSED_BLOCK", 256)
    monkeypatch.setattr(S, "ONLINE_BLOCK", 128)
    assert S._launch_params(1000)[1] is False
    check_fwd_bwd(torch.randn(3, 1000, device=device) * 5)
    # 60 rows: more than the online path's persistent programs, so each program loops over rows
    check_fwd_bwd(torch.randn(2, 30, 300, device=device), causal=True)


def test_rows_held_as_pieces(monkeypatch, device):
    """A long row whose power-of-two block pads it heavily is held as two or three power-of-two pieces."""
    assert S.row_pieces(50304, 65536) == (32768, 16384, 2048)
    assert S.row_pieces(32000, 32768) == (32768, 0, 0)   # little padding: one block
    assert S.row_pieces(20000, 32768) == (16384, 4096, 0)  # two equal last pieces merged
    assert S.row_pieces(12000, 16384) == (16384, 0, 0)   # a short row keeps one block
    x = torch.randn(2, 24577, device=device) * 4         # the real sizes: 16384 + 8192 + 1024
    assert S.row_pieces(24577, S._launch_params(24577, x.element_size())[0]) == (16384, 8192, 1024)
    check_fwd_bwd(x)
    # CPU-sized rows with the thresholds lowered: every piece boundary, masked tails, the causal mask
    monkeypatch.setattr(S, "PIECES_FROM", 64)
    monkeypatch.setattr(S, "MIN_PIECE", 4)
    assert S.row_pieces(100, 128) == (64, 32, 4) and S.row_pieces(80, 128) == (64, 16, 0)
    for n in (100, 80, 97):
        check_fwd_bwd(torch.randn(5, n, device=device) * 3)
    check_fwd_bwd(torch.randn(2, 120, 100, device=device), causal=True)
    x = torch.randn(3, 100, device=device)
    x[1] = float("-inf")  # a row of -inf is NaN, as in PyTorch
    assert torch.isnan(softmax(x)[1]).all()


def test_rows_walked_by_looping_programs(monkeypatch, device):
    """Long rows held whole are walked by one program per SM (`row_loop`): with the threshold lowered,
    CPU-sized rows loop too, several rows to a program (4 in the interpreter), causal and in pieces as well."""
    monkeypatch.setattr(S, "ROW_LOOP_FROM", 64)
    if device.type == "cpu":
        assert S.row_loop(11, 128, 128, 4, device) == ((4,), 1)
    assert S.row_loop(11, 32, 32, 4, device) == ((11,), 1)  # below the threshold: a program per row
    check_fwd_bwd(torch.randn(11, 100, device=device) * 3)
    check_fwd_bwd(torch.randn(3, 7, 90, device=device), causal=True)
    monkeypatch.setattr(S, "PIECES_FROM", 64)
    monkeypatch.setattr(S, "MIN_PIECE", 4)
    check_fwd_bwd(torch.randn(9, 100, device=device) * 3)  # pieces of 64 + 32 + 4
    check_fwd_bwd(torch.randn(40, 781, device=device)[::3, :500])  # strided rows


def test_row_loop_prefetches_what_shared_memory_holds(monkeypatch):
    """Stages = 1 + the rows that fit beside the reserve, at most 2 ahead; none fit: a program per row."""
    monkeypatch.setattr(S, "num_sms", lambda device: 132)
    gpu = torch.device("cuda", 0)  # only its type is read: shared memory and SMs are faked
    monkeypatch.setattr(S, "shared_memory", lambda device: 232448)  # an H100
    assert S.row_loop(8192, 65536, 51200, 2, gpu) == ((132,), 3)  # GPT-2's rows in pieces: 2 x 100 KB
    assert S.row_loop(8192, 32768, 32768, 4, gpu) == ((132,), 2)  # fp32 rows of 128 KB: one ahead
    assert S.row_loop(100, 32768, 32768, 2, gpu) == ((100,), 3)   # fewer rows than SMs
    assert S.row_loop(8192, 8192, 8192, 2, gpu) == ((8192,), 1)   # short rows: a program each
    monkeypatch.setattr(S, "shared_memory", lambda device: 166912)  # an A100: one row ahead
    assert S.row_loop(8192, 65536, 51200, 2, gpu) == ((132,), 2)
    monkeypatch.setattr(S, "shared_memory", lambda device: 65536)  # a T4
    assert S.row_loop(8192, 65536, 51200, 2, gpu) == ((8192,), 1)
    assert S.row_loop(8192, 32768, 20480, 2, gpu) == ((132,), 2)  # 20000 columns: pieces of 16384 + 4096


def test_row_loop_falls_back_when_shared_memory_runs_out(monkeypatch, device):
    """Should a compile of the loop take more shared memory than `row_loop` predicted (Triton raises
    OutOfResources), the call runs with a program per row, and later calls of that size go there directly."""
    calls = []
    real_launch = S.launch

    def launch(kernel, grid, *args, **meta):
        calls.append((grid, meta.get("ROW_STAGES")))
        if meta.get("ROW_STAGES", 1) > 1:
            raise OutOfResources(300 * 1024, 227 * 1024, "shared memory")
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(S, "launch", launch)
    monkeypatch.setattr(S, "row_loop", lambda n_rows, block, lanes, element_size, device: ((2,), 3))
    monkeypatch.setattr(S, "_NO_ROOM", set())
    x = torch.randn(7, 100, device=device)
    torch.testing.assert_close(softmax(x), torch.softmax(x, -1))
    assert calls == [((2,), 3), ((7,), 1)]
    calls.clear()
    torch.testing.assert_close(softmax(x), torch.softmax(x, -1))
    assert calls == [((7,), 1)]


def test_non_contiguous(device):
    base = torch.randn(40, 781, device=device)
    check_fwd_bwd(base[::3, :500])   # strided rows: handled without a copy
    check_fwd_bwd(base.t()[:100])    # transposed: columns are not contiguous, copied
    check_fwd_bwd(torch.randn(6, 5, 7, device=device), dim=1)  # softmax over a middle dimension
    # a non-contiguous upstream gradient (transposed storage) into the backward
    check_fwd_bwd(base[:7, :33], dy=torch.randn(33, 7, device=device).t())


def test_rows_of_all_minus_inf_match_pytorch(device):
    x = torch.randn(4, 33, device=device)
    x[1] = float("-inf")
    x[2, :10] = float("-inf")
    y, ref = softmax(x), torch.softmax(x, -1)
    assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()
    torch.testing.assert_close(y[[0, 2, 3]], ref[[0, 2, 3]])


@pytest.mark.parametrize("online", [False, True], ids=["one-block", "online"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_of_all_minus_inf_backward_match_pytorch(online, dtype, monkeypatch, device):
    """Forward and backward, NaN where PyTorch has NaN and the same values elsewhere, on both paths."""
    if online:
        monkeypatch.setattr(S, "MAX_FUSED_BLOCK", 256)
        monkeypatch.setattr(S, "ONLINE_BLOCK", 128)
    x = torch.randn(4, 1000, device=device, dtype=dtype)
    x[1] = float("-inf")
    x[2, :500] = float("-inf")
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ref = softmax(ours), torch.softmax(theirs, -1)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    tol = tolerance(dtype)
    tol = dict(rtol=tol["rtol"], atol=tol["atol"] / 1000)
    torch.testing.assert_close(y, ref, equal_nan=True, **tol)
    torch.testing.assert_close(ours.grad, theirs.grad, equal_nan=True, **tol)


def test_single_element_and_empty(device):
    assert softmax(torch.tensor(3.0, device=device)).item() == 1.0
    assert softmax(torch.empty(0, 5, device=device)).shape == (0, 5)
    for shape in ((0, 5), (5, 0)):  # empty but differentiable, as torch.softmax
        x = torch.empty(shape, device=device, requires_grad=True)
        softmax(x, causal=True).sum().backward()
        assert x.grad.shape == shape


def test_bad_input_raises_clear_errors(device):
    with pytest.raises(TypeError, match="dtype int64"):
        softmax(torch.arange(6, device=device).reshape(2, 3))
    with pytest.raises(IndexError, match="dim 2 is out of range"):
        softmax(torch.randn(2, 3, device=device), dim=2)
    with pytest.raises(ValueError, match="causal=True needs dim=-1"):
        softmax(torch.randn(2, 3, device=device), dim=0, causal=True)
    with pytest.raises(ValueError, match="causal=True needs dim=-1"):
        softmax(torch.randn(5, device=device), causal=True)


@cuda_only
def test_cuda_wide_rows_bf16(device):
    """The benchmark shapes themselves, including GPT-2's vocabulary row of 50304 (single block)."""
    # more rows than SMs: the looping programs (`row_loop`) walk several rows each, prefetching them
    for shape in [(64, 50304), (300, 50304), (280, 32000), (16, 140000)]:  # the last takes the online path
        check_fwd_bwd(torch.randn(shape, device=device, dtype=torch.bfloat16))
