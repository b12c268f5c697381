"""Probe: are two torch.compile'd training runs of the PyTorch path bit-identical without CUDA graphs? (GPU)

    python3 benchmarks/experiments/compile_repeat.py

`tests/test_training.py::test_cuda_graph_steps_equal_eager_steps[False-0.0-True]` compares a torch.compile'd run
replayed as a CUDA graph against one run step by step, bit for bit. It failed once on the H100 (5 steps equal, the
6th 4.96226 against 4.96228). This runs the test's configuration twice per mode (eager steps, graphed steps) and
prints each run's losses: if two eager runs already differ, the compiled step itself is not deterministic. The
last two runs set `torch.use_deterministic_algorithms(True)`, which turns on Inductor's deterministic mode (no timing
of candidate configs, whose pick would change the order of a reduction's sums).

Measured alone on the H100 80GB HBM3 (torch 2.11.0+cu130, Triton 3.6.0): every run equal to every other of its
mode, eager and graphed steps equal too (6 train losses 5.52791 ... 4.96233, val 4.9033203); the deterministic mode's
two runs equal each other (4.96235, val 4.9030762; another reduction order than the default's). The test's
failure most likely came from sharing the GPU with the suite's other three test processes. Setting Inductor's
deterministic mode in the test did not make it exact: on a machine whose Inductor cache held the earlier calls'
compiles, the eager steps gave the deterministic mode's losses and the graphed steps the default mode's (from step 2
on, up to 1e-5 apart). The test now compares the torch.compile'd runs to 1e-4 and the others bit for bit.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_training import TINY  # noqa: E402

from triton_transformer import training  # noqa: E402
from triton_transformer.training import TrainConfig  # noqa: E402

tmp = Path(tempfile.mkdtemp())
corpus = tmp / "corpus.txt"
corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 3}\n\n" for i in range(2000)))
kw = dict(steps=6, batch_size=2, eval_every=6, sample_len=0, device="auto", use_triton=False, dropout=0.0,
          compile=True)
runs = {}
for name, graph, deterministic in [("eager a", False, False), ("eager b", False, False), ("graph a", True, False),
                                   ("graph b", True, False), ("eager det", False, True), ("graph det", True, True)]:
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch._dynamo.reset()
    r = training.train(TrainConfig(**{**TINY, "data": str(corpus), "out_dir": str(tmp / name.replace(" ", "_")),
                                      "cuda_graph": graph, **kw}))
    runs[name] = [row["loss"] for row in training.read_log(r.log_path) if row.get("loss") is not None] + [r.val_loss]
    print(f"{name:10s}", " ".join(f"{x:.7f}" for x in runs[name]), flush=True)
print("eager a == eager b:", runs["eager a"] == runs["eager b"], "| graph a == graph b:", runs["graph a"] == runs["graph b"],
      "| eager a == graph a:", runs["eager a"] == runs["graph a"], "| det eager == det graph:",
      runs["eager det"] == runs["graph det"])
