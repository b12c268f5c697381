"""runtime's host-side helpers: the plain-Python cdiv and next_power_of_2 agree with Triton's."""

import triton

from triton_transformer import runtime


def test_cdiv_and_next_power_of_2_match_triton():
    for n in list(range(0, 4100)) + [2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert runtime.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 128, 1000):
            assert runtime.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert runtime.pow2_at_least_16(1) == 16 and runtime.pow2_at_least_16(17) == 32


def test_cuda_properties_asks_once_per_gpu(monkeypatch):
    """The SM count and capability the launchers read come from one query per GPU, cached by index."""
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: asked.append(index) or f"gpu{index}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    runtime._cuda_properties.cache_clear()
    try:
        assert runtime.cuda_properties(torch.device("cuda", 1)) == "gpu1"
        assert runtime.cuda_properties(torch.device("cuda", 1)) == "gpu1"
        assert runtime.cuda_properties(torch.device("cuda")) == "gpu3"  # no index: the current device
        assert asked == [1, 3]
    finally:
        runtime._cuda_properties.cache_clear()  # no fake left behind for later tests
