"""Train the byte-level GPT built from triton_transformer's kernels.

    python train.py                            # this Python's stdlib sources, the seed's model, 2000 steps
    python train.py --data enwik8              # the seed's data set (downloaded once, checksummed, cached)
    python train.py --data book.txt            # any file
    python train.py --resume                   # continue runs/gpt/ckpt.pt exactly where it stopped
    torchrun --nproc_per_node=8 train.py       # data parallel, one process per GPU
    python train.py --bench --steps 2000       # triton vs torch, torch.compile (each also graphed) -> train_run rows
    python train.py --help                     # every option

Without a GPU it says so and trains a tiny configuration on the CPU. Everything
here is in triton_transformer/training.py; this file only calls it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton_transformer  # noqa: E402,F401  (chooses GPU or interpreter before triton is imported)
from triton_transformer import training  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(training.main())
