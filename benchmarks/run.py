"""Run the side-by-side benchmarks on a GPU and append the rows to benchmarks/results/<gpu>.jsonl.

    python benchmarks/run.py                 # every kernel family
    python benchmarks/run.py softmax layer_norm
    python benchmarks/run.py softmax --quick # one small case each, to check the runner
    python benchmarks/run.py softmax --dry-run  # measure and print, write nothing
    python benchmarks/run.py transformer --only transformer_train_step_dropout  # some cases of a family

Each family's cases live in triton_transformer/bench/<family>.py, so a chapter
that calls bench.show(<family>) measures exactly what this script records.
"""

import argparse
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_transformer  # noqa: E402  (chooses the device before triton is imported)
from triton_transformer import bench  # noqa: E402


def main() -> int:
    families = sorted(m.name for m in pkgutil.iter_modules(bench.__path__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernels", nargs="*", help=f"families to run (default: all of {families})")
    parser.add_argument("--quick", action="store_true", help="one small case per family")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write results")
    parser.add_argument("--only", nargs="+", default=(), metavar="KERNEL",
                        help="run only the cases of these kernel names (e.g. feed_forward_dropout)")
    args = parser.parse_args()
    unknown = set(args.kernels) - set(families)
    if unknown:
        parser.error(f"unknown kernel families {sorted(unknown)}; choose from {families}")
    if triton_transformer.runtime.DEVICE.type != "cuda":
        print("benchmarks/run.py needs a CUDA GPU: timings under the CPU interpreter mean nothing.")
        return 2
    print(bench.versions())
    for family in args.kernels or families:
        bench.measure(family, quick=args.quick, record=not args.dry_run, only=args.only)  # rows are written case by case
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
