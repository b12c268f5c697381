"""runtime's host-side helpers: the plain-Python cdiv and next_power_of_2 agree with Triton's."""

import pytest
import torch
import triton

from triton_transformer import runtime


def test_cdiv_and_next_power_of_2_match_triton():
    for n in list(range(0, 4100)) + [2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert runtime.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 128, 1000):
            assert runtime.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert runtime.pow2_at_least_16(1) == 16 and runtime.pow2_at_least_16(17) == 32


def test_cuda_properties_asks_once_per_gpu(monkeypatch):
    """The SM count and the compute capability every feature test reads come from one query per GPU, cached by index."""
    from types import SimpleNamespace

    import torch

    asked = []
    gpus = {1: SimpleNamespace(major=7, minor=5), 3: SimpleNamespace(major=9, minor=0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: asked.append(index) or gpus[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    runtime._cuda_properties.cache_clear()
    runtime._capability.cache_clear()
    try:
        assert runtime.cuda_properties(torch.device("cuda", 1)) is gpus[1]
        assert runtime.cuda_properties(torch.device("cuda", 1)) is gpus[1]
        assert runtime.cuda_properties(torch.device("cuda")) is gpus[3]  # no index: the current device
        assert runtime.capability(torch.device("cuda", 1)) == (7, 5) and runtime.capability(torch.device("cuda")) == (9, 0)
        assert runtime.capability(torch.device("cuda", 1)) < (8, 0) <= runtime.capability(torch.device("cuda", 3))
        assert asked == [1, 3]
    finally:
        runtime._cuda_properties.cache_clear()  # no fake left behind for later tests
        runtime._capability.cache_clear()


def test_exact_fp32_tries_a_short_list_of_configs():
    """Exact fp32 dots compile 4-10x slower than bf16 ones: their autotuners try only small tiles, others all."""
    import importlib

    attention = importlib.import_module("triton_transformer.attention")
    matmul = importlib.import_module("triton_transformer.matmul")
    lists = [(attention._fwd_configs(), attention._FWD_EXACT_FP32, 2), (attention._dkdv_configs(), attention._DKDV_EXACT_FP32, 2),
             (attention._dq_configs(), attention._DQ_EXACT_FP32, 2), (matmul._POINTER_CONFIGS, matmul._exact_fp32, 4)]
    for configs, keep, count in lists:
        prune = runtime.exact_fp32_pruner(keep)
        exact = prune(configs, {}, PRECISION="ieee")
        assert len(exact) == count and exact[0] is configs[0]  # the first config (runs everywhere) is among them
        assert prune(configs, {"PRECISION": "ieee"}) == exact  # passed positionally, the same
        assert prune(configs, {}, PRECISION="tf32") == configs  # tensor-core precisions: every config
    assert runtime.exact_fp32_pruner(lambda c: False)(lists[0][0], {}, PRECISION="ieee") == lists[0][0][:1]
    # the winner of a short list must not serve TF32 calls of the same shape (nor the reverse)
    for kernel in (attention._attn_fwd, attention._attn_bwd_dkdv, attention._attn_bwd_dq, matmul._matmul_kernel):
        assert "PRECISION" in kernel.keys, kernel.fn.__name__


def test_launch_key_separates_what_triton_specialises_on():
    """The cached launch path reuses a compiled kernel only for calls Triton would compile the same way."""
    base = torch.empty(64, dtype=torch.float32)
    tune = (("n", 2), ("BLOCK", 9))  # an autotuner key: the third argument, and a keyword argument

    def key(*args, **meta):
        types = tuple(map(type, args))
        return types, runtime._key_function(types, tune)(args, meta)

    reference = key(base, base, 768, 1e-5, True)
    assert reference[1][0] == base.get_device()  # first: the device of the first tensor (-1 on the CPU)
    assert key(base[4:], base, 768, 2e-5, True) == reference  # 16 bytes in: aligned; floats: only their type
    differ = [key(base[1:], base, 768, 1e-5, True),  # 4 bytes in: not 16-byte aligned
              key(base, base.half(), 768, 1e-5, True),  # another dtype
              key(base, base, 1, 1e-5, True), key(base, base, 770, 1e-5, True),  # == 1; not a multiple of 16
              key(base, base, 2**31 + 16, 1e-5, True),  # no longer 32 bits
              key(base, base, 784, 1e-5, True),  # the autotuner's key value
              key(base, base, 768, 1e-5, False),  # a bool's value
              key(base, base, 768, 1, True),  # an int where a float was
              key(base, base, 768, 1e-5, True, BLOCK=64)]  # a keyword the autotuner keys on
    for other in differ:
        assert other != reference
    assert len(set(differ)) == len(differ)


def test_launch_memo_launches_a_remembered_call_directly(monkeypatch):
    """`launch_memo`'s bookkeeping, with stand-ins for Triton's compiled kernel and for `launch` (on the CPU
    nothing is compiled; the GPU tests run the real thing, test_layernorm's memo test among them)."""
    launches, runs = [], []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            runs.append(args)

    class Launcher:
        def bound(self, grid, args, meta):  # (compiled, grid x, y, z, the arguments' fixed tail, device,
            return compiled, grid[0], 1, 1, ("TAIL",), 0, (0,)  # where the tensors sit)

    compiled, kernel = Compiled(), object()
    monkeypatch.setattr(runtime, "launch", lambda *call, **meta: launches.append(call) or compiled)
    monkeypatch.setattr(runtime, "FAST_LAUNCH", True)
    monkeypatch.setattr(runtime, "INTERPRET", False)
    monkeypatch.setitem(runtime._launchers, id(kernel), Launcher())
    monkeypatch.setattr(runtime, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    memo = {}
    runtime.launch_memo(memo, "k", kernel, (7,), "x", 1, BLOCK=4)  # the first call: the ordinary launch
    assert len(launches) == 1 and not runs and memo["k"][0] is compiled
    y = torch.zeros(3)
    runtime.launch_memo(memo, "k", kernel, (7,), y, 2, BLOCK=4)  # a call like it: straight to its kernel,
    assert len(launches) == 1  # its tensor passed as its address
    assert runs == [(7, 1, 1, 1234, "function", "metadata", None, None, None, y.data_ptr(), 2, "TAIL")]
    monkeypatch.setattr(runtime, "_current_device", lambda: 1)  # another GPU current: the ordinary launch
    runtime.launch_memo(memo, "k", kernel, (7,), "z", 3, BLOCK=4)
    assert len(launches) == 2 and len(runs) == 1
    runtime.launch_memo(memo, None, kernel, (7,), "z", 3, BLOCK=4)  # no key: launched, nothing remembered
    assert len(launches) == 3 and list(memo) == ["k"]
    monkeypatch.setattr(runtime, "MEMO_SIZE", 2)
    runtime.launch_memo(memo, "k2", kernel, (7,), "z", 3, BLOCK=4)
    runtime.launch_memo(memo, "k3", kernel, (7,), "z", 3, BLOCK=4)  # full: starts over
    assert list(memo) == ["k3"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_run_on_the_gpu_their_tensors_are_on():
    # Triton launches on the current device; the package's ops follow their tensors, as PyTorch's do.
    import torch.nn.functional as F
    import triton_transformer as tt

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = torch.randn(64, 300, device=dev, requires_grad=True)
    w = torch.randn(300, device=dev, requires_grad=True)
    torch.testing.assert_close(tt.softmax(x), torch.softmax(x, -1))
    torch.testing.assert_close(tt.layer_norm(x, (300,), w), F.layer_norm(x, (300,), w), rtol=1e-4, atol=1e-4)
    target = torch.randint(0, 300, (64,), device=dev)
    loss = tt.cross_entropy(x, target)
    loss.backward()
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, target).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)
    q = torch.randn(2, 3, 70, 64, device=dev, dtype=torch.bfloat16)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(tt.attention(q, q, q, causal=True), ref, rtol=2e-2, atol=2e-2)
    a = torch.randn(100, 64, device=dev, dtype=torch.bfloat16)
    b = torch.randn(96, 64, device=dev, dtype=torch.bfloat16)
    torch.testing.assert_close(tt.linear(a, b), F.linear(a, b), rtol=2e-2, atol=2e-1)
    assert torch.cuda.current_device() == 0


def test_check_tensor_checks_dimensions_on_its_fast_path(device):
    # A dtype and device accepted once take a shorter path at later calls; the number of dimensions is still
    # checked there, an int or a tuple of them.
    x = torch.zeros(2, 3, 4, 5, device=device)
    runtime.check_tensor("x", x, dtypes=runtime.FLOAT_DTYPES, ndim=4)
    runtime.check_tensor("x", x, ndim=(3, 4))
    with pytest.raises(ValueError, match="x must have 4 dimensions, got shape"):
        runtime.check_tensor("x", x[0], dtypes=runtime.FLOAT_DTYPES, ndim=4)
    with pytest.raises(ValueError, match="x must have 2 or 3 dimensions"):
        runtime.check_tensor("x", x, ndim=(2, 3))
