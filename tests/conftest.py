"""Shared test set-up: the package is imported first, so it chooses GPU or interpreter before triton loads."""

import importlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# On a GPU, autotune over the first two configs of each kernel only (runtime.autotune reads this at
# import): the whole suite then fits in minutes. TT_AUTOTUNE_CONFIGS=0 tests with every config.
os.environ.setdefault("TT_AUTOTUNE_CONFIGS", "2")

import triton_transformer  # noqa: E402,F401  (sets TRITON_INTERPRET=1 when there is no GPU)
from triton_transformer import runtime  # noqa: E402

import torch  # noqa: E402

ON_GPU = runtime.DEVICE.type == "cuda"

#: dtypes every kernel is tested in here: bf16 only on a GPU (the interpreter computes bf16 wrongly).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if runtime.SUPPORTS_BF16 else [])

cuda_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton)")


def assert_close_named(actual, expected, name, **tolerances):
    """torch.testing.assert_close whose failure names the tensor and still shows the mismatch."""
    torch.testing.assert_close(actual, expected, msg=lambda message: f"{name}: {message}", **tolerances)


def count_launches(monkeypatch, kernel):
    """A list that gets one entry per launch of `kernel` through runtime.launch (which forwards them).

    `runtime.launch_memo` launches a call it has seen before without `launch`: while counting, every module of
    the package that imported it passes each call to `launch` instead (no key, nothing remembered)."""
    calls, launch = [], runtime.launch

    def counting(k, grid, *args, **meta):
        calls.extend([1] if k is kernel else [])
        return launch(k, grid, *args, **meta)
    monkeypatch.setattr(runtime, "launch", counting)
    memo = runtime.launch_memo
    for name, module in list(sys.modules.items()):
        if name.startswith("triton_transformer") and getattr(module, "launch_memo", None) is memo:
            monkeypatch.setattr(module, "launch_memo", lambda m, key, *args, **meta: memo(m, None, *args, **meta))
    return calls


def dropout_calls(monkeypatch):
    """A list that gets one entry per run of the dropout kernel's host function (forward or backward)."""
    dropout_module = importlib.import_module("triton_transformer.dropout")  # the package's `dropout` is the function
    calls, forward = [], dropout_module.dropout_forward
    monkeypatch.setattr(dropout_module, "dropout_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


@pytest.fixture
def device():
    return runtime.DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
