"""runtime's host-side helpers: the plain-Python cdiv and next_power_of_2 agree with Triton's."""

import triton

from triton_transformer import runtime


def test_cdiv_and_next_power_of_2_match_triton():
    for n in list(range(0, 4100)) + [2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3]:
        assert runtime.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 128, 1000):
            assert runtime.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert runtime.pow2_at_least_16(1) == 16 and runtime.pow2_at_least_16(17) == 32
