"""The benchmark runner's timing helpers (GPU only) and its committed-results path (CPU)."""

import torch
from conftest import cuda_only

from triton_transformer import bench, runtime, softmax


def test_committed_rows_load_and_name_their_gpu(capsys):
    rows = bench.results("softmax", live=False)
    assert rows and len({r["gpu"] for r in rows}) == 1
    assert rows[0]["gpu"] in capsys.readouterr().out


def test_wall_and_gpu_prints_committed_rows_with_both_times(capsys):
    rows = bench.wall_and_gpu("softmax", shapes=[(4096, 4096)])
    assert rows and all(r["shape"] == [4096, 4096] and r["gpu_ms"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "gpu_ms" in out and "4096x4096" in out and len(out.splitlines()) == len(rows) + 1


def test_a_family_loads_every_kernel_its_live_run_measures():
    # measure("linear") also yields feed_forward cases; the committed view of the family shows them too
    kernels = {r["kernel"] for r in bench.load("linear")}
    assert {"linear", "linear_gelu", "feed_forward"} <= kernels and not any(k.startswith("softmax") for k in kernels)


def test_scaling_rows_do_not_replace_the_one_gpu_comparison(tmp_path, monkeypatch):
    base = {"kernel": "train_run", "pass": "fwdbwd", "shape": [32, 1024, 512, 6, 256], "dtype": "bfloat16",
            "provider": "triton", "gpu": "G", "ms": 1.0}
    rows = [dict(base, gpus=1, grad_accum=1), dict(base, gpus=1, grad_accum=2, scaling=True),
            dict(base, gpus=2, grad_accum=1, scaling=True), dict(base, gpus=1, grad_accum=1, ms=2.0)]
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    bench.append(rows, tmp_path / "G.jsonl")
    loaded = bench.load("train_run")
    assert sorted((r["gpus"], r["grad_accum"], r.get("scaling", False), r["ms"]) for r in loaded) == [
        (1, 1, False, 2.0), (1, 2, True, 1.0), (2, 1, True, 1.0)]  # the newest 1-GPU row, and both scaling rows


def test_rounds_interleave_the_cases_and_report_microseconds(monkeypatch):
    timed = []
    monkeypatch.setattr(bench, "measure_ms", lambda fn: timed.append(fn) or {"a": 0.5, "b": 0.25}[fn])
    assert bench.rounds({"first": "a", "second": "b"}, n=3) == {"first": [500.0] * 3, "second": [250.0] * 3}
    assert timed == ["a", "b"] * 3  # every round times each case once, in order


@cuda_only
def test_gpu_time_is_positive_and_at_most_the_wall_time(device):
    x = torch.randn(4096, 4096, device=device, dtype=runtime.default_dtype())
    # Other test processes may share the GPU (the suite runs four on one): the best of three of each,
    # since interference only ever adds time. A GPU time that counted the L2 flushes would be ~4x the wall.
    gpus = [bench.measure_gpu_ms(lambda: softmax(x)) for _ in range(3)]
    wall = min(bench.measure_ms(lambda: softmax(x)) for _ in range(3))
    assert None not in gpus and 0 < min(gpus) <= 1.5 * wall, (gpus, wall)


@cuda_only
def test_gpu_time_of_a_backward_and_of_what_cannot_be_recorded(device):
    x = torch.randn(2048, 1024, device=device, requires_grad=True)
    assert bench.measure_gpu_ms(lambda: softmax(x).sum().backward(), grad_to_none=[x]) > 0
    assert x.grad is None  # gradients dropped afterwards, as run_case expects
    assert bench.measure_gpu_ms(lambda: softmax(x).sum().item()) is None  # a readback cannot be recorded
    torch.cuda.synchronize()
    # and the GPU is left usable: our kernels and PyTorch's random generator (which a failed recording
    # leaves marked as recording, so that every later torch.randn raises)
    assert torch.isfinite(softmax(x)).all() and torch.randn(8, device=device).isfinite().all()


@cuda_only
def test_a_failed_recording_leaves_the_stream_and_random_generator_usable(device):
    x = torch.randn(64, device=device)

    def fails_while_recording():  # no readback, so the up-front check lets it through to the recording
        y = softmax(x)
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # illegal while recording: the recording fails midway
        return y

    before = torch.cuda.current_stream()
    assert bench.measure_gpu_ms(fails_while_recording) is None
    assert torch.cuda.current_stream() == before  # not the failed recording's stream
    assert torch.randn(8, device=device).isfinite().all()
