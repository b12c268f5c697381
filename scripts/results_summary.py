"""Summarise the committed H100 results: a Markdown table and a speed-up plot for the intro and README.

    python scripts/results_summary.py        # prints the table, writes book/images/results.png

One headline case per kernel, read from the H100's file in benchmarks/results/ (the newest row of each).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADLINES = [  # (kernel, pass, shape, baseline providers)
    ("softmax", "fwd", [4096, 4096]),
    ("softmax", "fwd", [8192, 50304]),
    ("softmax", "fwdbwd", [4096, 4096]),
    ("layer_norm", "fwd", [16384, 768]),
    ("layer_norm", "fwdbwd", [16384, 768]),
    ("dropout", "fwd", [16777216]),
    ("dropout", "fwdbwd", [16777216]),
    ("linear", "fwd", [16384, 768, 3072]),
    ("linear", "fwdbwd", [16384, 768, 3072]),
    ("linear_gelu", "fwd", [16384, 768, 3072]),
    ("attention_causal", "fwdbwd", [8, 12, 1024, 64]),
    ("cross_entropy", "fwdbwd", [8192, 50304]),
    ("transformer_train_step", "fwdbwd", [16, 1024, 512, 6, 256]),
    ("transformer_train_step", "fwdbwd", [16, 1024, 768, 12, 50304]),
    ("transformer_train_step_dropout", "fwdbwd", [16, 1024, 512, 6, 256]),  # p = 0.1, the step replayed as a graph
    ("train_run", "fwdbwd", [16, 1024, 512, 6, 256]),  # 2000 steps of train.py's loop, evaluation included
]
BASELINES = ["torch", "torch.compile", "cublas", "sdpa"]
GPU = "NVIDIA H100 80GB HBM3"


def main() -> None:
    import triton_transformer  # noqa: F401
    from triton_transformer import bench

    rows = bench.load(gpu=GPU)
    table = ["| kernel (pass) | shape | Triton ms | Triton GPU ms | vs eager | vs compile | vs cuBLAS, SDPA | % of copy speed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    bars = []
    for kernel, pass_, shape in HEADLINES:
        by = {r["provider"]: r for r in rows if r["kernel"] == kernel and r["pass"] == pass_ and r["shape"] == shape}
        if "triton" not in by:
            continue
        for b in ("torch", "torch.compile"):  # training steps: the baselines replayed as CUDA graphs too, as ours is
            if f"{b} graph" in by:
                by[b] = by[f"{b} graph"]
        t = by["triton"]["ms"]
        ratio = {b: by[b]["ms"] / t for b in BASELINES if b in by}
        library = ratio.get("cublas", ratio.get("sdpa"))
        cells = [f"{ratio[b]:.2f}x" if b in ratio else "" for b in ("torch", "torch.compile")]
        cells.append(f"{library:.2f}x" if library else "")
        # memory-bound rows: Triton's speed as a share of a copy of the same bytes (`copy`, the floor), both
        # timed from the host as do_bench does; a call this short also carries its host overhead, so a few
        # percent above 100% is a kernel as fast as the copy, not faster
        cells.append(f"{by['copy']['ms'] / t:.0%}" if "copy" in by else "")
        gpu_ms = by["triton"].get("gpu_ms")  # the GPU's own time (no host): where it is far below ms, the host bound the call
        table.append(f"| {kernel} ({pass_}) | {'×'.join(map(str, shape))} | {t:.3g} | "
                     + (f"{gpu_ms:.3g}" if gpu_ms else "") + " | " + " | ".join(cells) + " |")
        bars.append((f"{kernel} {pass_}\n{'x'.join(map(str, shape))}", ratio))
    r0 = next(r for r in rows if r["provider"] == "triton")
    print(f"Measured on {r0['gpu']}, torch {r0['torch']}, triton {r0['triton']}, bf16. "
          "Speed-up = the provider's time / Triton's time (above 1: Triton is faster). % of copy speed = "
          "the time of `x.clone()` of the same bytes / Triton's time, both as do_bench times a call: 100% is a kernel as "
          "fast as a copy (a few percent above it is the host's noise, not a kernel faster than a copy). Triton GPU ms = "
          "the same call replayed as a CUDA graph, without the host's launch cost: where it is far below Triton ms, the "
          "host, not the kernels, set the wall time. Training steps: Triton's step is replayed as a CUDA graph, and so are "
          "eager's and torch.compile's in the rows that measured them that way (providers `torch graph` and "
          "`torch.compile graph`), which the ratios then use.\n")
    print("\n".join(table))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.2))
    width = 0.8 / len(BASELINES)
    for i, b in enumerate(BASELINES):
        xs = [j + (i - 1.5) * width for j, (_, s) in enumerate(bars) if b in s]
        ys = [s[b] for _, s in bars if b in s]
        ax.barh(xs, ys, width, label=f"vs {b}", color=bench.PROVIDER_COLORS[b])
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([name for name, _ in bars], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", linewidth=1)
    ax.set_xlabel("Triton speed-up (time of baseline / time of Triton; > 1 means Triton is faster)")
    ax.set_title(f"{r0['gpu']} · bf16 · torch {r0['torch']} · triton {r0['triton']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = ROOT / "book" / "images" / "results.png"
    fig.savefig(out, dpi=110)
    print(f"\n(plot: {out.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
