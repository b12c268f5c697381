"""Side-by-side benchmarks: every provider of one case measured in one process.

Each kernel family has a module here (``bench/softmax.py`` ...) with a
``cases(quick=False)`` generator of `Case` objects. The same cases feed

* ``python benchmarks/run.py softmax`` on a GPU, which appends rows to
  ``benchmarks/results/<gpu>.jsonl`` (the format of BOOK.md), and
* ``bench.show("softmax")`` in a chapter, which measures live on a GPU and, on a
  CPU, plots the committed rows and says which GPU they came from.

Timing is `triton.testing.do_bench` (median of many runs, L2 flushed between
them); it needs a GPU, so nothing here is ever timed under the interpreter. Each
row's `ms` is that wall time, launches included; `gpu_ms` is the GPU's own time
for the same call, recorded as a CUDA graph (`measure_gpu_ms`), as a diagnostic.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import runtime
from ..dropout import replayable_seeds

#: One colour per provider in every plot of the book.
PROVIDER_COLORS = {
    "triton": "#2a7ab9",
    "torch": "#e8833a",
    "torch.compile": "#5aa156",
    # the same two replayed as CUDA graphs (training steps), in lighter shades of their colours
    "torch graph": "#f5bf8f",
    "torch.compile graph": "#a9d3a1",
    "cublas": "#8c6bb1",
    "sdpa": "#c44e52",
    "naive": "#8c8c8c",
    "liger": "#937860",
    # Not a competitor but the floor of a memory-bound operation: `x.clone()`, which reads and writes
    # the same bytes as the kernel must, timed the same way (launch and L2 flush included).
    "copy": "#b0b0b0",
}
PROVIDER_ORDER = list(PROVIDER_COLORS)

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


#: GPT-2's dropout probability: the dropout cases of the families (a transformer step, a feed-forward) use it
DROPOUT = 0.1


@dataclasses.dataclass
class Case:
    """One benchmark point: a kernel, a pass and a shape, with one callable per provider.

    ``providers`` maps a provider name to a zero-argument function that runs the
    operation once (for ``fwdbwd``: forward, then backward). ``bytes`` is the
    minimum the operation must move through DRAM and ``flops`` its useful work;
    either may be None. ``grad_to_none`` lists tensors whose ``.grad`` is reset
    between runs so backward does not accumulate.
    """

    kernel: str
    pass_: str
    shape: list
    dtype: torch.dtype
    providers: dict[str, Callable[[], object]]
    bytes: float | None = None
    flops: float | None = None
    grad_to_none: list | None = None
    extra: dict | None = None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def versions() -> dict:
    import triton

    return {"gpu": runtime.device_name(), "torch": torch.__version__, "triton": triton.__version__}


def measure_ms(fn: Callable[[], object], grad_to_none=None) -> float:
    """Median milliseconds of `fn` on the GPU (do_bench flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def rounds(cases: dict, n: int = 3) -> dict:
    """`measure_ms` of every case in us, `n` rounds with the cases interleaved (so that a slow spell of the host
    or the GPU's clock falls on all of them alike): {case: [one time a round]}. For the probes of
    `benchmarks/experiments`, which compare variants of a kernel side by side in one process."""
    times = {key: [] for key in cases}
    for _ in range(n):
        for key, fn in cases.items():
            times[key].append(measure_ms(fn) * 1e3)
    return times


def measure_gpu_ms(fn: Callable[[], object], grad_to_none=None, reps: int = 20) -> float | None:
    """Milliseconds the GPU spends in one call of `fn`, without the host's launch cost; None if unmeasurable.

    `measure_ms` times what a user waits for, Python and launches included: for a kernel of a few
    tens of microseconds that can be mostly host time. Here `fn` is recorded `reps` times into one
    CUDA graph, each time after the same L2 flush do_bench does, and a second graph holds the flushes
    alone; their replay times differ by `reps` calls of `fn` as the GPU runs them. A provider whose
    call cannot be recorded (it reads a value back to the host, say) gets None. Rows carry this as
    `gpu_ms`, a diagnostic next to `ms`: where the two differ, the host is the bottleneck. Our dropouts
    are recorded as a training step records them, keyed from memory (`dropout.replayable_seeds`).
    """
    def calls(with_fn: bool):
        for _ in range(reps):
            flush.zero_()
            if with_fn:
                for t in grad_to_none or []:
                    t.grad = None  # each recorded backward writes a fresh gradient, none accumulates
                fn()

    stream = torch.cuda.current_stream()
    try:
        if _reads_back(fn):  # inside the try: the finally below drops the gradients the probe wrote
            return None
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=runtime.DEVICE)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        base = torch.zeros(1, dtype=torch.int64, device=runtime.DEVICE)
        with replayable_seeds(base), torch.cuda.stream(side):  # recording wants its warm-up off the default stream
            calls(True)
        torch.cuda.current_stream().wait_stream(side)
        graphs = {}
        for with_fn in (True, False):
            graphs[with_fn] = torch.cuda.CUDAGraph()
            with replayable_seeds(base), torch.cuda.graph(graphs[with_fn]):
                calls(with_fn)
        times = {True: [], False: []}
        for _ in range(5):
            for with_fn, graph in graphs.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                torch.cuda.synchronize()
                times[with_fn].append(start.elapsed_time(end))
    except Exception:  # noqa: BLE001  (a diagnostic: any failure to record means "not measured")
        # A recording that fails midway leaves its recording stream current (torch.cuda.graph's exit
        # raises before it restores the stream): put ours back, then clear the random generator's mark.
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        _clear_rng_capture_mark()
        return None
    finally:
        for t in grad_to_none or []:
            t.grad = None
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return max(0.0, (median[True] - median[False]) / reps)


def _reads_back(fn: Callable[[], object]) -> bool:
    """Whether `fn` waits for the GPU (`.item()`, a copy to the host): such a call cannot be recorded.

    Asked before recording, with PyTorch's sync debug mode raising on a synchronising call, because
    a recording that fails midway leaves damage behind (see `_clear_rng_capture_mark`).
    """
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        # PyTorch warns, every time, that its sync debug mode is a prototype: noise in every chapter's output.
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except Exception:  # noqa: BLE001  (the sync check's error, or any other: either way, not recordable)
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return False


def _clear_rng_capture_mark() -> None:
    """After a failed recording: make torch.randn on the GPU work again.

    Beginning a capture marks PyTorch's CUDA random generator as recording; only a capture that
    ends cleanly unmarks it, so after a failed one every later random op raises "Offset increment
    outside graph capture". Recording one small graph that succeeds clears the mark.
    """
    try:
        scratch = torch.zeros(1, device=runtime.DEVICE)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            scratch.add_(1)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001  (best effort: the measurement it follows has already failed)
        pass


def for_profiler(*calls: Callable[[], object]) -> None:
    """Run `calls` once to warm up (compiling, autotuning), then once more between cudaProfilerStart and
    cudaProfilerStop: under ``ncu --profile-from-start off`` (Nsight Compute) only the second round is profiled.
    The probes of `benchmarks/experiments` that read how busy a kernel keeps the tensor cores use it."""
    for profiled in (False, True):
        if profiled:
            torch.cuda.cudart().cudaProfilerStart()
        for call in calls:
            call()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak GPU memory (GiB) allocated while `fn` runs once: everything the process holds at the time
    (the inputs, and whatever earlier cases or a notebook left allocated) plus what the call adds.
    Compare providers of one case, measured one after the other in one process, not across runs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def run_case(case: Case) -> list[dict]:
    """Measure every provider of `case` (one after the other, same process) and return BOOK.md rows.

    Backward runs on the calling thread (autograd multithreading off) for every provider: on the
    lent H100's virtual machine, handing each backward to autograd's device thread and back cost
    ~0.1 ms of wall time per call, which swamped sub-millisecond kernels.
    """
    rows = []
    for provider, fn in case.providers.items():
        try:
            with torch.autograd.set_multithreading_enabled(False):
                getattr(fn, "prepare", lambda: None)()  # a provider's own warm-up, outside the timing
                ms = measure_ms(fn, case.grad_to_none)
                for t in case.grad_to_none or []:
                    t.grad = None  # the peak below counts what one call allocates, not a leftover gradient
                mem = peak_gib(fn)
                recorded = getattr(fn, "peak_bytes", lambda: None)()
                if recorded is not None:  # a CUDA graph's replay hides its peak; the provider kept the recording's
                    mem = recorded / 2**30
                for t in case.grad_to_none or []:
                    t.grad = None
                # whole-model steps replay graphs of their own (a graph cannot record a replay)
                gpu_ms = measure_gpu_ms(fn, case.grad_to_none) if recorded is None and "tokens" not in (
                    case.extra or {}) else None
                getattr(fn, "release", lambda: None)()  # what the provider holds on to (a recorded graph)
        except Exception as err:  # a provider that cannot run this case (e.g. torch.compile OOM) is reported, not fatal
            print(f"  {case.kernel} {case.pass_} {case.shape} {provider}: failed: {type(err).__name__}: {err}"[:300])
            continue
        row = {
            "kernel": case.kernel,
            "pass": case.pass_,
            "shape": list(case.shape),
            "dtype": dtype_name(case.dtype),
            "provider": provider,
            "ms": round(ms, 5),
            "GBps": round(case.bytes / ms / 1e6, 1) if case.bytes else None,
            "TFLOPs": round(case.flops / ms / 1e9, 1) if case.flops else None,
            "peak_GiB": round(mem, 4),
            "gpu_ms": None if gpu_ms is None else round(gpu_ms, 5),
            **(case.extra or {}),
            **versions(),
        }
        if "tokens" in row:  # whole-model cases: throughput from the tokens one call processes
            row["tokens_per_s"] = round(row["tokens"] / (ms / 1000))
        rows.append(row)
        print(f"  {row['kernel']:<22} {row['pass']:<6} {str(row['shape']):<24} {provider:<14} "
              f"{ms:9.4f} ms  {row['GBps'] or '':>8} GB/s  {row['TFLOPs'] or '':>7} TFLOP/s  {mem:7.3f} GiB"
              + (f"  (GPU {gpu_ms:.4f} ms)" if gpu_ms is not None else ""))
    return rows


def cases_of(kernel: str, quick: bool = False) -> Iterable[Case]:
    """The `cases()` generator of `triton_transformer.bench.<kernel>`."""
    module = importlib.import_module(f"{__name__}.{kernel}")
    return module.cases(quick=quick)


_WARM = False


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy for `seconds`, once per process, before the first timing.

    An idle GPU runs at low clocks and takes a moment to raise them, so the first case of a run
    may read slow. The suspect that prompted this: softmax at (4096, 1024), the first row of its
    run, read 0.087 ms, where chapter 1's simpler step-1 kernel took ~0.011 ms on the same shape.
    """
    global _WARM
    if _WARM or runtime.DEVICE.type != "cuda":
        return
    import time

    a = torch.randn(4096, 4096, device=runtime.DEVICE, dtype=runtime.default_dtype())  # bf16, or fp16 on a T4
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    _WARM = True


def measure(kernel: str, quick: bool = False, record: bool | None = None, only: Iterable[str] = ()) -> list[dict]:
    """Run every case of `kernel` on the GPU (`only`: just the cases of these kernel names); return the rows.

    With `record` each case's rows are appended to the results file as soon as they are measured, so a
    run cut short by a time limit keeps what it measured. By default a chapter records only when
    scripts/execute_notebooks.py runs it (it sets TT_RECORD_BENCH=1), and quick runs never do.
    """
    if runtime.DEVICE.type != "cuda":
        raise RuntimeError("benchmarks need a CUDA GPU; on CPU use bench.load() to read committed results")
    if record is None:
        record = os.environ.get("TT_RECORD_BENCH") == "1" and not quick
    warm_up_gpu()
    rows, matched = [], 0
    for case in cases_of(kernel, quick):
        if only and case.kernel not in only:
            continue
        matched += 1
        case_rows = run_case(case)
        if record and case_rows:
            print(f"  recorded {len(case_rows)} rows in {append(case_rows)}")
        rows += case_rows
        torch.cuda.empty_cache()
    if only and not matched:
        print(f"  no case of {kernel} is named {', '.join(only)}: nothing measured")
    return rows


# ---------------------------------------------------------------- results files

def results_file(gpu: str | None = None) -> Path:
    gpu = gpu or runtime.device_name()
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in gpu)
    return RESULTS_DIR / f"{slug}.jsonl"


def append(rows: list[dict], path: Path | None = None) -> Path:
    """Append rows to the results file of the GPU they were measured on."""
    if not rows:
        return results_file()
    path = path or results_file(rows[0]["gpu"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


#: Kernels a family's cases yield beyond its own name and its "<family>_..." variants.
FAMILY_ALIASES = {"linear": ("feed_forward", "feed_forward_dropout")}


def _key(row: dict) -> tuple:
    # a scaling run (several GPUs, micro-batches) is not the same measurement as the 1-GPU comparison
    return (row["kernel"], row["pass"], json.dumps(row["shape"]), row["dtype"], row["provider"], row["gpu"],
            row.get("causal"), row.get("gpus", 1), row.get("grad_accum", 1), row.get("scaling", False))


def load(kernel: str | Iterable[str] | None = None, gpu: str | None = None) -> list[dict]:
    """Committed rows (the newest for each kernel/pass/shape/dtype/provider/gpu), optionally filtered.

    A family name also selects its variants: "linear" loads "linear" and "linear_gelu" rows, and the
    "feed_forward" rows that its live measurement (`measure("linear")`) yields too.
    """
    kernels = {kernel} if isinstance(kernel, str) else (set(kernel) if kernel else None)
    if kernels:
        kernels |= {alias for k in kernels for alias in FAMILY_ALIASES.get(k, ())}
    latest: dict[tuple, dict] = {}
    for path in sorted(RESULTS_DIR.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if kernels and not any(row["kernel"] == k or row["kernel"].startswith(k + "_") for k in kernels):
                continue
            if gpu and row["gpu"] != gpu:
                continue
            latest[_key(row)] = row
    return list(latest.values())


def results(kernel: str | list[str], quick: bool = False, live: bool | None = None) -> list[dict]:
    """A chapter's benchmark rows: measured live on a GPU, else the committed ones of one GPU (said which)."""
    kernels = [kernel] if isinstance(kernel, str) else list(kernel)
    live = runtime.DEVICE.type == "cuda" if live is None else live
    if live:
        return [r for k in kernels for r in measure(k, quick=quick)]
    rows = load(kernels)
    if not rows:
        print(f"No committed results for {kernels} in {RESULTS_DIR}; run benchmarks/run.py on a GPU.")
        return rows
    gpus = sorted({r["gpu"] for r in rows})
    here = runtime.device_name() if runtime.DEVICE.type == "cuda" else None
    gpu = here if here in gpus else gpus[0]  # this GPU's own rows when it has any
    rows = [r for r in rows if r["gpu"] == gpu]
    print(f"{'Plotting' if here else 'No GPU here: plotting'} committed results measured on {gpu} "
          f"(torch {rows[0]['torch']}, triton {rows[0]['triton']}).")
    return rows


def wall_and_gpu(kernel: str, shapes: list | None = None, gpu: str = "NVIDIA H100 80GB HBM3") -> list[dict]:
    """Print the newest committed rows of `kernel` on `gpu` (optionally only `shapes`): `ms` against `gpu_ms`.

    `ms` is what a caller waits for, Python and launches included; `gpu_ms` the GPU's own time for the
    same call. Where the first is much larger, the host is the bottleneck. Reads committed results
    only, so a chapter prints the same table on any machine. Returns the rows printed.
    """
    rows = [r for r in load(kernel, gpu=gpu) if r.get("gpu_ms") is not None
            and (shapes is None or r["shape"] in [list(s) for s in shapes])]
    rows.sort(key=lambda r: (r["kernel"], r["shape"], r["pass"], PROVIDER_ORDER.index(r["provider"])
                             if r["provider"] in PROVIDER_ORDER else len(PROVIDER_ORDER)))
    print(f"{'pass':8}{'shape':>16}{'provider':>15}{'ms':>9}{'gpu_ms':>9}  ({gpu}, newest committed rows)")
    for r in rows:
        print(f"{r['pass']:8}{'x'.join(map(str, r['shape'])):>16}{r['provider']:>15}{r['ms']:9.4f}{r['gpu_ms']:9.4f}")
    return rows


def show(kernel: str | list[str], metric: str = "GBps", quick: bool = False, live: bool | None = None, **plot_kw):
    """What a chapter's benchmark cell calls: `results` (live on a GPU, committed on a CPU), plotted.

    Returns the rows it plotted.
    """
    rows = results(kernel, quick=quick, live=live)
    if rows:
        plot(rows, metric=metric, **plot_kw)
    return rows


# ---------------------------------------------------------------- plots

METRIC_LABELS = {
    "GBps": "GB/s (higher is better)",
    "TFLOPs": "TFLOP/s (higher is better)",
    "ms": "time, ms (lower is better)",
    "peak_GiB": "peak memory, GiB (lower is better)",
    "tokens_per_s": "tokens/s (higher is better)",
}


def plot(rows: list[dict], metric: str = "GBps", passes: list[str] | None = None, title: str | None = None,
         hline: float | None = None, hline_label: str | None = None, ax=None):
    """Grouped bars: one group per shape, one bar per provider, one panel per pass. Same colours everywhere."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(metric) is not None]
    if not rows:
        print(f"nothing to plot for metric {metric}")
        return None
    passes = passes or [p for p in ("fwd", "bwd", "fwdbwd") if any(r["pass"] == p for r in rows)]
    kernels = sorted({r["kernel"] for r in rows})
    panels = [(k, p) for k in kernels for p in passes if any(r["kernel"] == k and r["pass"] == p for r in rows)]
    if ax is None:
        fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 4.6 * len(panels)), 3.8), squeeze=False)
        axes = axes[0]
    else:
        fig, axes = ax.figure, [ax]
    for a, (kernel, pass_) in zip(axes, panels):
        sel = [r for r in rows if r["kernel"] == kernel and r["pass"] == pass_]
        shapes = []
        for r in sel:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
        providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in sel)]
        providers += sorted({r["provider"] for r in sel} - set(providers))
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                for r in sel:
                    if r["provider"] == prov and r["shape"] == shape:
                        xs.append(j + (i - (len(providers) - 1) / 2) * width)
                        ys.append(r[metric])
            a.bar(xs, ys, width, label=prov, color=PROVIDER_COLORS.get(prov))
        a.set_xticks(range(len(shapes)))
        a.set_xticklabels(["×".join(str(s) for s in shape) for shape in shapes], rotation=20, fontsize=8)
        a.set_ylabel(METRIC_LABELS.get(metric, metric))
        a.set_title(f"{kernel} {pass_}", fontsize=10)
        if hline:
            a.axhline(hline, color="k", linestyle="--", linewidth=1)
            if hline_label:
                a.text(a.get_xlim()[0], hline, " " + hline_label, va="bottom", fontsize=8)
        a.grid(axis="y", alpha=0.3)
    # One legend for every panel, in a row under them: inside a panel it hid the bars behind it.
    entries = {}
    for a in axes:
        for handle, label in zip(*a.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(entries.values(), entries.keys(), loc="lower center", ncol=len(entries), fontsize=8, frameon=False)
    r0 = rows[0]
    fig.suptitle(title or f"{r0['gpu']} · {r0['dtype']} · torch {r0['torch']} · triton {r0['triton']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend
    return fig

