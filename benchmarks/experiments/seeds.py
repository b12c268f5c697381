"""How far apart do training runs land by chance? Chapter 8's comparison, repeated over seeds. (GPU)

    python3 benchmarks/experiments/seeds.py [STEPS] [SEED ...]     # default: 2000 steps, seeds 1337 1 2

Chapter 8 trains the same model on the Triton path and on the PyTorch path (same seed, data and
steps) and compares their validation losses; one run put the Triton model 1.6% above, the one
before 0.6% below. This trains both paths for each seed (train.py's defaults otherwise: the chapter's
configuration, no text samples) and prints every evaluation's validation loss, so that the gap between
the paths can be set against the spread of each path over seeds, and of one seed run twice (1337, the
default, is also the chapter's).
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from triton_transformer import training  # noqa: E402


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    seeds = [int(s) for s in sys.argv[2:]] or [1337, 1, 2]
    out = Path(tempfile.mkdtemp())
    finals = {}
    for seed in seeds:
        for provider in ("triton", "torch"):
            cfg = training.TrainConfig(steps=steps, seed=seed, sample_every=0, sample_len=0, progress=False,
                                       out_dir=str(out / f"{provider}-{seed}"), **training.PROVIDERS[provider])
            result = training.train(cfg)
            evals = [(r["step"], r["val_loss"]) for r in training.read_log(result.log_path)
                     if r.get("val_loss") is not None]
            finals[provider, seed] = result.val_loss
            print(f"seed {seed} {provider}: " + " ".join(f"{s}:{v:.4f}" for s, v in evals), flush=True)
    for provider in ("triton", "torch"):
        vals = [finals[provider, s] for s in seeds]
        print(f"{provider}: final val loss " + ", ".join(f"{v:.4f}" for v in vals)
              + f" (spread {100 * (max(vals) - min(vals)) / min(vals):.2f}%)")
    for seed in seeds:
        print(f"seed {seed}: triton {100 * (finals['triton', seed] / finals['torch', seed] - 1):+.2f}% from torch")


if __name__ == "__main__":
    main()
