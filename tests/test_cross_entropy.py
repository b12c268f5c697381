"""Fused cross-entropy, forward and backward, against F.cross_entropy in float64."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, ON_GPU, cuda_only

from triton_transformer import cross_entropy

# the module itself (the package's `cross_entropy` name is the function), for monkeypatching its block limits
C = importlib.import_module("triton_transformer.cross_entropy")
S = importlib.import_module("triton_transformer.softmax")  # its row limits, which cross-entropy's rows share

SHAPES = [(1, 2), (3, 256), (17, 50304), (2, 5, 1000)]
REDUCTIONS = ["mean", "sum", "none"]
# relative precision of the stored gradient (one rounding to the dtype, two when backward scales it)
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_target(shape, n_cols, device, ignore_every=0, ignore_index=-100):
    target = torch.randint(0, n_cols, shape, device=device)
    if ignore_every:  # rows 1, 1 + ignore_every, ...: a single-row batch keeps its one row counted
        target.view(-1)[1::ignore_every] = ignore_index
    return target


def reference(logits, target, ignore_index=-100, reduction="mean"):
    """F.cross_entropy in float64, with the classes moved to where it wants them (flattened rows)."""
    loss = F.cross_entropy(logits.double().flatten(0, -2), target.flatten().long(), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.view(target.shape) if reduction == "none" else loss


def check(logits, target, ignore_index=-100, reduction="mean", upstream="random", **kw):
    """Loss and gradient against the float64 reference. upstream='ones' is plain loss.backward()."""
    x = logits.detach().requires_grad_()  # same strides as given (clone() would make gapped views contiguous)
    xr = logits.detach().clone()  # kept apart: inplace=True overwrites the storage it is given
    assert x.stride() == logits.stride()
    loss = cross_entropy(x * 1 if kw.get("inplace") else x, target, ignore_index, reduction, **kw)
    x64 = xr.double().requires_grad_()
    ref = reference(x64, target, ignore_index, reduction)

    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5, equal_nan=True)

    if upstream == "ones":
        dloss = torch.ones_like(loss)
    else:
        # "none": one upstream value per row, taken from a strided view (every other element)
        dloss = (torch.randn(*loss.shape, 2, device=loss.device)[..., 0] if reduction == "none"
                 else torch.tensor(2.5, device=loss.device))
    (grad,) = torch.autograd.grad(loss, x, dloss)
    (grad64,) = torch.autograd.grad(ref, x64, dloss.double())
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    rtol = GRAD_RTOL[logits.dtype]
    scale = float(grad64.abs().max()) if grad64.numel() else 1.0
    torch.testing.assert_close(grad.double(), grad64, rtol=rtol, atol=rtol * scale, equal_nan=True)
    return loss, grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, dtype, reduction, device):
    logits = (torch.randn(shape, device=device) * 3).to(dtype)
    target = make_target(shape[:-1], shape[-1], device, ignore_every=4)  # rows 1, 5, 9, ... ignored
    check(logits, target, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_backward_skips_the_scale(reduction, device):
    """loss.backward() sends an upstream gradient of exactly 1: the buffer is returned as written."""
    logits = torch.randn(6, 300, device=device)
    check(logits, make_target((6,), 300, device, ignore_every=5), reduction=reduction, upstream="ones")


def test_custom_ignore_index_inside_the_vocabulary(device):
    logits = torch.randn(2, 7, 50, device=device)
    target = make_target((2, 7), 50, device)
    target[0, :3] = 3
    for reduction in REDUCTIONS:
        check(logits, target, ignore_index=3, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_matches_pytorch(reduction, dtype, device):
    # 16-bit "mean" scales the gradient by 1 / count on its own path: a count of 0 must not make it NaN
    logits = torch.randn(2, 2, 33, device=device).to(dtype).requires_grad_()
    target = torch.full((2, 2), -100, device=device)
    loss = cross_entropy(logits, target, reduction=reduction)
    ref = reference(logits, target, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)  # 0 / 0, as PyTorch
    else:
        assert (loss == 0).all()
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("single_block", [True, False])
def test_long_rows_take_the_online_path(single_block, monkeypatch, device):
    """Rows longer than one block stream through the online logsumexp and a second pass."""
    monkeypatch.setattr(C, "MAX_FUSED_BLOCK", 2048 if single_block else 256)  # fp32 rows get half
    monkeypatch.setattr(C, "ONLINE_BLOCK", 128)
    assert C._launch_params(1000, 4)[1] is single_block
    for n_cols in (1000, 1024, 129):
        logits = torch.randn(5, n_cols, device=device) * 4
        target = make_target((5,), n_cols, device, ignore_every=3)
        target[1] = n_cols - 1  # a target in the last, partial block
        for reduction in REDUCTIONS if n_cols == 1000 else ["mean"]:
            check(logits, target, reduction=reduction)
    wide = torch.randn(2, 3, 2000, device=device)[:, :, ::2]  # (B, T, V) with column stride 2
    check(wide, make_target((2, 3), 1000, device, ignore_every=4), reduction="none")
    # more rows than the online path's persistent programs (16 in the interpreter): each program loops
    check(torch.randn(37, 300, device=device) * 4, make_target((37,), 300, device, ignore_every=3))


def test_rows_walked_by_looping_programs(monkeypatch, device):
    """A long row held as one block is walked by one program per SM (softmax's `row_loop`): with the
    threshold lowered, CPU-sized rows of one 8192-lane block loop too, several rows to a program."""
    monkeypatch.setattr(S, "ROW_LOOP_FROM", 64)
    for reduction in REDUCTIONS:
        check(torch.randn(11, 5000, device=device) * 4, make_target((11,), 5000, device, ignore_every=3),
              reduction=reduction)
    check(torch.randn(2, 7, 5000, device=device)[:, ::2], make_target((2, 4), 5000, device))  # strided rows


def test_rows_held_as_pieces(monkeypatch, device):
    """A long row that a power-of-two block pads heavily is held as pieces (chapter 1's `row_pieces`):
    targets in every piece and in the padding's neighbourhood, ignored rows, strided logits."""
    monkeypatch.setattr(S, "PIECES_FROM", 64)
    monkeypatch.setattr(S, "MIN_PIECE", 4)
    assert S.row_pieces(100, 128) == (64, 32, 4)
    for n_cols in (100, 80):
        logits = torch.randn(6, n_cols, device=device) * 4
        target = make_target((6,), n_cols, device, ignore_every=4)
        target[0], target[1], target[2] = 0, 70, n_cols - 1  # first piece, second, the last column
        for reduction in REDUCTIONS:
            check(logits, target, reduction=reduction)
    wide = torch.randn(2, 3, 200, device=device)[:, :, ::2]  # (B, T, V) with column stride 2
    check(wide, make_target((2, 3), 100, device, ignore_every=4), reduction="none")


def test_warps_per_row_held_whole():
    """The warp counts measured on the H100: 32 for a row of 32 768 lanes held whole, 16 for 65 536 (which
    spills at 32), one per 1024 lanes from 4 below that; the online path's blocks keep 8."""
    assert C._launch_params(32000) == (32768, True, 32)
    assert C._launch_params(50304) == (65536, True, 16)
    assert C._launch_params(16000) == (16384, True, 16)
    assert C._launch_params(1000) == (1024, True, 4)
    assert C._launch_params(128256) == (C.ONLINE_BLOCK, False, 8)


def test_non_contiguous_logits_and_targets(device):
    base = torch.randn(40, 781, device=device)
    target = make_target((40,), 781, device, ignore_every=7)
    check(base[::3], target[::3])                    # strided rows, read in place
    check(base[::3, ::2], target[::3] % 391)         # strided columns too
    check(base.t()[:100, :20].t(), target[:20] % 100)  # transposed: column stride 781
    btv = torch.randn(6, 2, 300, device=device).transpose(0, 1)  # (B, T, V) with batch stride 300
    check(btv, make_target((6, 2), 300, device, ignore_every=5).t(), reduction="none")
    check(torch.randn(1, 8, device=device).expand(4, 8), make_target((4,), 8, device))  # rows of stride 0


def test_target_dtypes(device):
    logits = torch.randn(5, 200, device=device)
    for dtype in (torch.int32, torch.uint8, torch.int16):
        check(logits, torch.randint(0, 200, (5,), device=device).to(dtype), reduction="sum")


def test_no_gradient_buffer_without_autograd(monkeypatch, device):
    calls = []
    forward = C.cross_entropy_forward

    def spy(*args, **kw):
        calls.append(kw.get("with_grad"))
        return forward(*args, **kw)

    monkeypatch.setattr(C, "cross_entropy_forward", spy)
    logits = torch.randn(3, 50, device=device, requires_grad=True)
    target = make_target((3,), 50, device)
    with torch.no_grad():
        loss = cross_entropy(logits, target)
    cross_entropy(logits.detach(), target)
    assert calls == [False, False] and not loss.requires_grad
    cross_entropy(logits, target)
    assert calls[-1] is True


def test_inplace_writes_the_gradient_into_the_logits(device):
    h = torch.randn(4, 3, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    target = make_target((4, 3), 40, device, ignore_every=5)
    for reduction in REDUCTIONS:
        check(torch.randn(4, 3, 40, device=device), target, reduction=reduction, inplace=True)

    # an LM head straight into the loss: the only safe place for inplace=True
    logits = h @ w.t()
    ptr = logits.data_ptr()
    loss = cross_entropy(logits, target, inplace=True)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference(h2 @ w2.t(), target).backward()
    torch.testing.assert_close(h.grad, h2.grad.float())
    torch.testing.assert_close(w.grad, w2.grad.float())
    assert logits.data_ptr() == ptr  # no new buffer: the gradient went where the logits were


def test_inplace_refuses_what_it_would_corrupt(device, monkeypatch):
    target = make_target((3,), 20, device)
    leaf = torch.randn(3, 20, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        cross_entropy(leaf, target, inplace=True)
    with pytest.raises(ValueError, match="contiguous"):
        cross_entropy((leaf * 1).t().contiguous().t(), target, inplace=True)
    # an operation that saved the logits for its own backward finds them modified, and says so
    logits = leaf.exp()  # exp saves its output
    loss = cross_entropy(logits, target, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # a call that raises on an out-of-range target leaves the logits as they were: the main kernel,
    # queued before the host reads the pre-pass's count, writes no gradient then (row held whole, and
    # the online path's blocks)
    for fused_block in (C.MAX_FUSED_BLOCK, 8):
        monkeypatch.setattr(C, "MAX_FUSED_BLOCK", fused_block)
        monkeypatch.setattr(C, "ONLINE_BLOCK", min(C.ONLINE_BLOCK, fused_block))
        logits = leaf * 1
        before = logits.detach().clone()
        with pytest.raises(ValueError, match="outside"):
            cross_entropy(logits, torch.tensor([0, 20, 1], device=device), inplace=True)
        assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("layout", ["a program per row", "looping programs", "looping, in pieces"])
def test_bad_target_leaves_inplace_logits_on_the_one_block_path(layout, monkeypatch, device):
    """Rows held whole (3000 columns: one a program, not a tile of short rows) store their gradient under the
    mask bound n_write, 0 after a bad target: the logits given with inplace=True must come out untouched."""
    if layout != "a program per row":
        monkeypatch.setattr(S, "ROW_LOOP_FROM", 64)
    if layout == "looping, in pieces":
        monkeypatch.setattr(S, "PIECES_FROM", 64)
        monkeypatch.setattr(S, "MIN_PIECE", 4)
        assert S.row_pieces(3000, 4096) == (2048, 1024, 0)
    logits = torch.randn(7, 3000, device=device, requires_grad=True) * 1
    before = logits.detach().clone()
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(logits, torch.tensor([0, 1, 2, 3000, 4, 2999, 6], device=device), inplace=True)
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp16_gradient_survives_a_loss_scale(reduction, device):
    # Mixed-precision training scales the loss (GradScaler: up to 2**16) so that small fp16 gradients
    # survive. PyTorch's fp32 loss scales the gradient before it is rounded to fp16; a loss that stored
    # p / N in fp16 would already have flushed every p below N * 6e-8 to zero (here about half the
    # entries). Storing p (fp16's subnormals reach 6e-8) loses only the few entries below that.
    torch.manual_seed(0)
    x = (torch.randn(512, 256, device=device) * 3).half().requires_grad_()
    target = make_target((512,), 256, device)
    scale = 2.0**16
    (cross_entropy(x, target, reduction=reduction) * scale).backward()
    xf = x.detach().float().requires_grad_()
    (F.cross_entropy(xf, target, reduction=reduction) * scale).backward()
    ref = xf.grad.half()
    lost = ((ref != 0) & (x.grad == 0)).float().mean().item()
    assert lost < 0.05, f"{lost:.1%} of the entries PyTorch keeps came out 0"
    per_row = 512 if reduction == "mean" else 1
    normal = ref.float().abs() >= 2.0**-14 * scale / per_row  # p itself a normal fp16 number
    torch.testing.assert_close(x.grad.float()[normal], ref.float()[normal], rtol=2e-3, atol=0)


def test_bad_target_inside_a_cuda_graph_spares_the_good_rows(device, monkeypatch):
    # While a CUDA graph is recorded nothing can be read back, so nothing raises: a bad target's loss is
    # NaN, and every other row's gradient must still be right (the main kernel writes them all).
    monkeypatch.setattr(C._BadTargetCount, "will_check", property(lambda self: False))
    monkeypatch.setattr(C._BadTargetCount, "check", lambda self, *a: None)
    logits = torch.randn(4, 30, device=device, requires_grad=True)
    target = torch.tensor([3, 30, 7, 1], device=device)  # row 1 is out of range
    loss = cross_entropy(logits, target, reduction="none")
    assert torch.isnan(loss[1]) and not torch.isnan(loss[[0, 2, 3]]).any()
    loss[[0, 2, 3]].sum().backward()
    good = torch.tensor([0, 2, 3], device=device)
    ref = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref[good], target[good], reduction="sum").backward()
    torch.testing.assert_close(logits.grad[good], ref.grad[good], rtol=1e-4, atol=1e-5)


def test_counts_over_several_pre_pass_programs(device):
    # More targets than one pre-pass program counts (STATS_BLOCK): the count of "mean" and the bad-target
    # check add up every program's slots, including the last, partly filled one.
    n = 2 * C.STATS_BLOCK + 37
    logits = torch.randn(n, 8, device=device)
    target = make_target((n,), 8, device, ignore_every=3)
    check(logits, target)
    check(logits, target, reduction="sum")
    bad = target.clone()
    bad[-1] = 8  # in the last program's block
    with pytest.raises(ValueError, match=rf"1 target\(s\) outside \[0, 8\).*at row {n - 1}"):
        cross_entropy(logits, bad)


@pytest.mark.parametrize("single_block", [True, False], ids=["one block", "online"])
def test_loss_sum_is_the_same_from_call_to_call(single_block, monkeypatch, device):
    # The programs' partial sums are added in slot order by whichever program finishes last, so the loss
    # does not depend on the order in which programs finish: repeated calls agree to the bit.
    if not single_block:
        monkeypatch.setattr(C, "MAX_FUSED_BLOCK", 256)
        monkeypatch.setattr(C, "ONLINE_BLOCK", 128)
    logits = torch.randn(60, 600, device=device)  # 15 programs of 4 rows; online: 16 looping over the rows
    target = make_target((60,), 600, device, ignore_every=5)
    for reduction in ("mean", "sum"):
        losses = [cross_entropy(logits, target, reduction=reduction) for _ in range(3)]
        assert all(torch.equal(loss, losses[0]) for loss in losses)
        torch.testing.assert_close(losses[0].double(), reference(logits, target, reduction=reduction),
                                   rtol=1e-5, atol=1e-5)


def test_backward_twice_raises(device):
    logits = torch.randn(3, 20, device=device, requires_grad=True)
    loss = cross_entropy(logits, make_target((3,), 20, device))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_empty_batch(device):
    logits = torch.randn(0, 7, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    assert torch.isnan(cross_entropy(logits, target))
    assert cross_entropy(logits, target, reduction="sum").item() == 0
    assert cross_entropy(logits, target, reduction="none").shape == (0,)


def test_bad_input_raises_clear_errors(device):
    logits = torch.randn(3, 10, device=device)
    with pytest.raises(ValueError, match=r"1 target\(s\) outside \[0, 10\).*target 10 at row 1"):
        cross_entropy(logits, torch.tensor([0, 10, 2], device=device))
    with pytest.raises(ValueError, match=r"2 target\(s\) outside.*target -1 at row 0"):
        cross_entropy(logits, torch.tensor([-1, -100, -5], device=device))
    with pytest.raises(ValueError, match="outside"):  # also without autograd, and for "none"
        with torch.no_grad():
            cross_entropy(logits, torch.tensor([0, 1, 99], device=device), reduction="none")
    with pytest.raises(ValueError, match="outside"):  # with autograd, checked once the main kernel is queued
        cross_entropy(torch.randn(3, 10, device=device, requires_grad=True), torch.tensor([0, 1, 10], device=device))
    with pytest.raises(TypeError, match="dtype float32"):
        cross_entropy(logits, torch.zeros(3, device=device))  # probabilities are not supported
    with pytest.raises(TypeError, match="dtype int64"):
        cross_entropy(torch.arange(6, device=device).reshape(2, 3), torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"expected target shape \(3,\)"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long, device=device), reduction="avg")
    with pytest.raises(ValueError, match="dimensions"):
        cross_entropy(logits[0], torch.tensor(0, device=device))
    with pytest.raises(ValueError, match="0 classes"):
        cross_entropy(torch.randn(3, 0, device=device), torch.zeros(3, dtype=torch.long, device=device))


@cuda_only
@pytest.mark.parametrize("shape", [(1024, 50304), (4096, 256), (16, 140000)], ids=str)
def test_cuda_bf16_benchmark_shapes(shape, device):
    """GPT-2's vocabulary (single block), byte vocabulary, and a row long enough for the online path."""
    logits = torch.randn(shape, device=device, dtype=torch.bfloat16) * 2
    target = make_target(shape[:-1], shape[-1], device, ignore_every=9)
    for reduction in REDUCTIONS:
        loss, grad = check(logits, target, reduction=reduction, upstream="ones")
    # and against PyTorch in bf16, the way a user would swap one for the other
    x = logits.clone().requires_grad_()
    F.cross_entropy(x, target).backward()
    y = logits.clone().requires_grad_()
    loss = cross_entropy(y, target)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.grad.float(), x.grad.float(), rtol=2e-2, atol=2e-2 * float(x.grad.abs().max()))


@cuda_only
@pytest.mark.parametrize("single_block", [True, False])
def test_cuda_both_paths_at_gpt2_vocab(single_block, device):
    logits = torch.randn(256, 50304, device=device, dtype=torch.bfloat16) * 3
    target = make_target((256,), 50304, device, ignore_every=11)
    ref = reference(logits, target)
    loss, grad, grad_scale = C.cross_entropy_forward(logits, target, with_grad=True, single_block=single_block)
    assert grad_scale is None  # bf16 folds the mean's 1/N into the stored gradient
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    x64 = logits.double().requires_grad_()
    reference(x64, target).backward()
    torch.testing.assert_close(grad.double(), x64.grad, rtol=1.6e-2, atol=1.6e-2 * float(x64.grad.abs().max()))


@pytest.mark.skipif(not ON_GPU, reason="peak memory is measured on a CUDA GPU")
def test_cuda_extra_memory_is_at_most_one_logits_buffer(device):
    logits = torch.randn(2048, 50304, device=device, dtype=torch.bfloat16, requires_grad=True)
    target = make_target((2048,), 50304, device)
    nbytes = logits.numel() * logits.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cross_entropy(logits, target).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= nbytes * 1.01 + 2**20, f"extra peak {extra / nbytes:.2f} x the logits"


def test_target_on_another_device_raises(device):
    with pytest.raises(ValueError, match="cross_entropy target is on meta"):
        cross_entropy(torch.randn(3, 5, device=device), torch.empty(3, dtype=torch.long, device="meta"))
