"""What every op owes a PyTorch user beyond its values on ordinary inputs: NaN and extreme values behave as in
PyTorch, results may be modified in place, and a second derivative is refused out loud, never dropped."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import triton_transformer as tt
from conftest import cuda_only

S = importlib.import_module("triton_transformer.softmax")
C = importlib.import_module("triton_transformer.cross_entropy")


def test_nan_in_a_long_row_makes_the_row_nan(monkeypatch, device):
    """The online path's running max must not drop a NaN (the GPU's max instruction returns the other operand)."""
    monkeypatch.setattr(S, "MAX_FUSED_BLOCK", 256)
    monkeypatch.setattr(S, "ONLINE_BLOCK", 128)
    monkeypatch.setattr(C, "MAX_FUSED_BLOCK", 256)
    monkeypatch.setattr(C, "ONLINE_BLOCK", 128)
    x = torch.randn(3, 1000, device=device)
    x[0, 7] = float("nan")    # in the first block, where the running max starts at -inf
    x[1, 997] = float("nan")  # in the last, partial block
    y = tt.softmax(x)
    assert y[:2].isnan().all() and not y[2].isnan().any()
    loss = tt.cross_entropy(x, torch.tensor([0, 1, 2], device=device), reduction="none")
    assert loss[:2].isnan().all() and loss[2].isfinite()


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "online"])
def test_cross_entropy_of_huge_equal_logits(long_rows, monkeypatch, device):
    """Logits of -1e9 (a row masked by adding a large negative number): loss log V and gradient
    softmax - onehot, as F.cross_entropy; computed as (m + log d) - x_y the log V would round away."""
    if long_rows:
        monkeypatch.setattr(C, "MAX_FUSED_BLOCK", 64)
        monkeypatch.setattr(C, "ONLINE_BLOCK", 32)
    logits = torch.full((2, 100), -1e9, device=device, requires_grad=True)
    target = torch.tensor([0, 99], device=device)
    loss = tt.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss, torch.full((2,), math.log(100), device=device))
    loss.sum().backward()
    ref = torch.full((2, 100), 0.01, device=device)
    ref[0, 0] = ref[1, 99] = 0.01 - 1
    torch.testing.assert_close(logits.grad, ref)


@pytest.mark.parametrize("activation", ["relu", "relu_squared"])
def test_relu_keeps_nan_as_torch(activation, device):
    """relu(NaN) is NaN in torch; its backward passes the gradient on at a NaN (relu) or gives NaN (relu^2)."""
    x = torch.tensor([[float("nan"), 1.0], [2.0, -1.0]], device=device, requires_grad=True)
    w = torch.eye(2, device=device)
    act = {"relu": F.relu, "relu_squared": lambda z: F.relu(z) ** 2}[activation]
    dy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device)
    y = tt.linear(x, w, activation=activation)
    y_ref = act(F.linear(x, w))
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    (dx,), (dx_ref,) = torch.autograd.grad(y, x, dy), torch.autograd.grad(y_ref, x, dy)
    torch.testing.assert_close(dx, dx_ref, equal_nan=True)
    y_ff = tt.feed_forward(x, w, None, w, None, activation)
    torch.testing.assert_close(y_ff, F.linear(act(F.linear(x, w)), w), equal_nan=True)


def test_results_may_be_modified_in_place(device):
    """As with F.linear, F.layer_norm and F.cross_entropy(reduction="none"), `y += r` on a result (of any shape)
    works, and the gradients are those of the out-of-place expression. (softmax and attention_qkv save their
    output for the backward, so there, as in PyTorch, an in-place change of it is an error.)"""
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    w = torch.randn(6, 8, device=device, requires_grad=True)
    w1, w2 = torch.randn(16, 8, device=device), torch.randn(8, 16, device=device)
    n = torch.ones(8, device=device)
    t = torch.tensor([[1, 2, 3], [4, 5, 6]], device=device)
    cases = {
        "linear": (lambda: tt.linear(x, w), lambda: F.linear(x, w)),
        "linear 2-D": (lambda: tt.linear(x[0], w), lambda: F.linear(x[0], w)),
        "feed_forward": (lambda: tt.feed_forward(x, w1, None, w2, None, None),
                         lambda: F.linear(F.linear(x, w1), w2)),
        "layer_norm": (lambda: tt.layer_norm(x, (8,), n), lambda: F.layer_norm(x, (8,), n)),
        "add_layer_norm y": (lambda: tt.add_layer_norm(x, x, (8,), n)[0], lambda: F.layer_norm(x + x, (8,), n)),
        "cross_entropy none": (lambda: tt.cross_entropy(x, t, reduction="none"),
                               lambda: F.cross_entropy(x.flatten(0, 1), t.flatten(), reduction="none").view(2, 3)),
    }
    for name, (ours, ref) in cases.items():
        y, y_ref = ours(), ref()
        y.mul_(2).add_(1)
        y_ref = y_ref * 2 + 1
        torch.testing.assert_close(y, y_ref, msg=name)
        dy = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, (x, w), dy, allow_unused=True)[0],
                                   torch.autograd.grad(y_ref, (x, w), dy, allow_unused=True)[0], msg=name)


def test_add_layer_norm_output_has_the_sums_dtype(device):
    """y = layer_norm(x + r) has h's dtype by default (the promoted one), as layer_norm(x + r) would."""
    y, h = tt.add_layer_norm(torch.randn(2, 8, device=device).half(), torch.randn(2, 8, device=device), 8)
    assert h.dtype == y.dtype == torch.float32


def test_double_backward_is_refused(device):
    """create_graph=True through a Triton backward raises, naming the op, instead of silently dropping the
    second-order terms (the backward's kernels record nothing for autograd)."""
    x = torch.randn(2, 8, device=device, requires_grad=True)
    q = torch.randn(1, 1, 4, 16, device=device, requires_grad=True)
    eye = torch.eye(8, device=device)
    ops = {  # Function name: (call, the input differentiated)
        "SoftmaxFunction": (lambda: tt.softmax(x), x),
        "LayerNormFunction": (lambda: tt.layer_norm(x, (8,)), x),
        "AddLayerNormFunction": (lambda: tt.add_layer_norm(x, x, (8,))[0], x),
        "DropoutFunction": (lambda: tt.dropout(x, 0.5, seed=1), x),
        "LinearFunction": (lambda: tt.linear(x, eye), x),
        "FeedForwardFunction": (lambda: tt.feed_forward(x, eye, None, eye, None), x),
        "AttentionFunction": (lambda: tt.attention(q, q, q), q),
        "PackedAttentionFunction": (lambda: tt.attention_qkv(q.reshape(1, 4, 16).repeat(1, 1, 3), 1), q),
        "CrossEntropyFunction": (lambda: tt.cross_entropy(x, torch.tensor([1, 2], device=device)), x),
    }
    for name, (op, inp) in ops.items():
        y = op()
        w = torch.randn_like(y)  # an upstream gradient that does not itself require grad
        with pytest.raises(RuntimeError, match=f"{name}: double backward"):
            torch.autograd.grad((y * w).sum(), inp, create_graph=True)
        torch.autograd.grad((op() * w).sum(), inp)  # once is fine


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_bad_arguments_raise_clear_errors(device):
    """Arguments of the wrong type or range are refused up front, not truncated or met by an error from deep
    inside (the audit's list: a float dim, a float ignore_index or seed, a bool for heads, a model config that
    only failed at its first forward, generation arguments that silently did something else)."""
    x = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="dim must be an int"):
        tt.softmax(x, 1.0)
    with pytest.raises(IndexError, match="dim 1 is out of range"):
        tt.softmax(torch.tensor(3.0, device=device), dim=1)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        tt.cross_entropy(x, torch.tensor([1, 2], device=device), ignore_index=1.5)
    q = torch.randn(1, 1, 4, 16, device=device)
    with pytest.raises(TypeError, match="seed must be an int"):
        tt.attention(q, q, q, dropout_p=0.5, seed=1.5)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        tt.attention(q, q, q, dropout_p="0.1")
    with pytest.raises(ValueError, match="heads a positive int"):
        tt.attention_qkv(torch.randn(1, 4, 48, device=device), True)
    with pytest.raises(ValueError, match="unknown activation"):
        tt.linear(x, torch.randn(3, 8, device=device), activation=["relu"])
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        tt.linear(torch.tensor(1.0, device=device), torch.randn(3, 1, device=device))
    for bad in (dict(heads=0), dict(dim=1.5), dict(attn_dropout=1.5), dict(depth=-1)):
        with pytest.raises(ValueError, match="TransformerConfig: "):
            tt.Transformer(**{**dict(num_tokens=16, max_seq_len=8, dim=16, depth=1, heads=2, dim_head=8), **bad})
    for odd, match in ((torch.randn(2, 8, device="meta"), "is on meta; the Triton kernels take CUDA tensors"),
                       (x.cpu().to_sparse().to(device), "is a sparse_coo tensor"),
                       (torch.nested.as_nested_tensor([x[0].cpu(), x[1, :3].cpu()]).to(device), "is a nested tensor")):
        for op in (lambda t: tt.softmax(t), lambda t: tt.linear(t, torch.randn(3, 8, device=device))):
            with pytest.raises((TypeError, ValueError), match=match):
                op(odd)
    for call, err, match in ((lambda: tt.dropout(x, 0.5, training="False"), TypeError, "training must be a bool"),
                             (lambda: tt.dropout(x, 0.5, seed=True), TypeError, "seed must be an int"),
                             (lambda: tt.dropout(x, "0.5"), TypeError, "dropout probability must be a float"),
                             (lambda: tt.layer_norm(x, 8, eps="1e-5"), TypeError, "eps must be a float"),
                             (lambda: tt.attention(q, q, q, scale="a"), TypeError, "scale must be a float"),
                             (lambda: tt.attention_qkv(torch.randn(1, 4, 48, device=device), 1, scale="a"),
                              TypeError, "scale must be a float"),
                             (lambda: tt.Transformer(num_tokens=16, max_seq_len=8, dim=16, depth=1, heads=2,
                                                     dim_head=8, attn_dropout="0.1"), ValueError, "attn_dropout")):
        with pytest.raises(err, match=match):
            call()
    # a target dtype narrower than ignore_index: the bad target is found in int64, as the kernel compares
    with pytest.raises(ValueError, match="e.g. target 255 at row 1"):
        tt.cross_entropy(x[:, :5].repeat(2, 1)[:3], torch.tensor([1, 255, 1], dtype=torch.uint8, device=device),
                         ignore_index=-1)
    assert torch.equal(tt.dropout(torch.ones(4, device=device), torch.tensor(0.5), seed=1),  # a 0-dim p, as F's
                       tt.dropout(torch.ones(4, device=device), 0.5, seed=1))
    np = pytest.importorskip("numpy")  # numpy and torch integers are ints, as PyTorch's ops take them
    assert tt.softmax(x, np.int64(1)).shape == x.shape
    assert tt.layer_norm(x, np.int64(8)).shape == tt.layer_norm(x, [np.int64(8)]).shape == x.shape
    tt.cross_entropy(x, torch.tensor([1, 2], device=device), ignore_index=np.int64(-100))
    tt.attention(q, q, q, dropout_p=np.float32(0.1), seed=np.int64(3))
    model = tt.Transformer(num_tokens=16, max_seq_len=8, dim=np.int64(16), depth=1, heads=2, dim_head=8,
                           causal=True).to(device)
    ids = torch.randint(0, 16, (2, 6), device=device)
    with pytest.raises(TypeError, match="mask must be a tensor"):
        model(ids, mask=[[True] * 6] * 2)
    with pytest.raises(TypeError, match="int64 or int32"):
        model(ids.to(torch.uint8))
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        model(ids, labels=ids.float())
    loss = model(ids, labels=ids.int())  # int32 labels on both paths (F.cross_entropy itself takes no int32)
    torch.testing.assert_close(model(ids, labels=ids.int(), use_triton=False), loss)
    assert model.generate(ids[:, :2], np.int64(1)).shape == (2, 3)
    for kwargs, match in ((dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=1, temperature=-1.0),
                          "temperature"), (dict(max_new_tokens=1, top_k=0), "top_k")):
        with pytest.raises(ValueError, match=match):
            model.generate(ids[:, :2], **kwargs)


def test_dropout_of_every_element_keeps_nan_as_torch(device):
    """p = 1 multiplies by 0 as F.dropout does: a NaN or inf input (or upstream gradient) gives NaN, not 0."""
    x = torch.tensor([float("nan"), float("inf"), 1.0], device=device, requires_grad=True)
    y = tt.dropout(x, 1.0)
    y.backward(torch.tensor([float("nan"), 1.0, 1.0], device=device))
    torch.testing.assert_close(y, F.dropout(x.detach(), 1.0), equal_nan=True)
    torch.testing.assert_close(x.grad, torch.tensor([float("nan"), 0.0, 0.0], device=device), equal_nan=True)


@pytest.mark.skipif(not tt.runtime.INTERPRET, reason="the CPU interpreter's bf16 tl.dot")
def test_bf16_dots_under_the_interpreter_are_refused():
    """Triton's interpreter gets bf16 tl.dot wrong by orders of magnitude (linear ~1e10 off): the kernels that
    multiply refuse bf16 there (torch.autocast("cpu") picks bf16 by default), the memory-bound ones compute it."""
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    q = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    for op in (lambda: tt.linear(x, x[:8]), lambda: tt.feed_forward(x, x, None, x.t(), None),
               lambda: tt.attention(q, q, q), lambda: tt.attention_qkv(torch.randn(1, 8, 48).bfloat16(), 1)):
        with pytest.raises(TypeError, match="bfloat16, which Triton's CPU interpreter multiplies wrongly"):
            op()
    model = tt.Transformer(num_tokens=16, max_seq_len=8, dim=16, depth=1, heads=1, dim_head=16)
    ids = torch.randint(0, 16, (1, 8))
    with torch.autocast("cpu"), pytest.raises(TypeError, match="interpreter multiplies wrongly"):
        model(ids, labels=ids)
    torch.testing.assert_close(tt.softmax(x).float(), torch.softmax(x.float(), -1), atol=1e-2, rtol=1e-2)


@cuda_only
def test_bf16_before_ampere_and_gpus_before_volta_are_clear_errors(monkeypatch, device):
    """On a T4 (Colab's free GPU) PyTorch emulates bf16 and torch.cuda.is_bf16_supported() says True, but Triton
    compiles bf16 only for sm_80 and newer: ptxas failed deep inside the first launch. The H100 plays a T4 here."""
    from types import SimpleNamespace

    from triton_transformer import runtime

    monkeypatch.setattr(runtime, "_capability", lambda index: (7, 5))
    monkeypatch.setattr(runtime, "_cuda_properties", lambda index: SimpleNamespace(name="Tesla T4", major=7, minor=5))
    monkeypatch.setattr(runtime, "_ACCEPTED", set())  # forget the dtypes this GPU passed as an H100
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    for op in (lambda: tt.softmax(x), lambda: tt.layer_norm(x, 64), lambda: tt.dropout(x, 0.1),
               lambda: tt.linear(x, x), lambda: tt.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=device))):
        with pytest.raises(TypeError, match=r"bfloat16, .*compute capability 8.0 or newer.*Tesla T4 is 7.5"):
            op()
    tt.softmax(x.half())  # fp16 is what such a GPU runs
    # and a GPU Triton cannot compile for at all (Kaggle's P100) is named as such, whatever the dtype
    monkeypatch.setattr(runtime, "_capability", lambda index: (6, 0))
    monkeypatch.setattr(runtime, "_cuda_properties", lambda index: SimpleNamespace(name="Tesla P100", major=6, minor=0))
    monkeypatch.setattr(runtime, "_ACCEPTED", set())  # the fp16 the T4 accepted above is not a P100's
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(RuntimeError, match="Tesla P100 has compute capability 6.0; Triton compiles kernels for 7.0"):
            tt.softmax(x.to(dtype))
