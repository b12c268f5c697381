"""Can train.py replay a torch.compile'd step as a CUDA graph, and do its dropout masks still change per replay?

    TORCH_LOGS=recompiles python3 benchmarks/experiments/compile_graph.py

For each path (PyTorch's modules, or our Triton kernels) with dropout 0.1 and without, compiled: a small
model's `training.CudaGraphStep` runs its two eager warm-up calls, records, and replays three times on
the same batch with the same weights (no optimizer step). So the losses of the replays differ only if the
masks do: with dropout they must all differ, without it they must all be equal to one another and to an
eager call's. Printed: the losses and a verdict per case. Then `training.train` itself, compiled and
graphed, on train.py's tiny configuration.

Found with it (H100, torch 2.11): the cases above passed at once, but train() failed inside the capture.
TORCH_LOGS=recompiles said why: "GLOBAL_STATE changed: autocast_cache_enabled". The eager warm-up calls ran
autocast with its weight cache on and the recording with it off, so Dynamo recompiled the model during the
capture, whose CPU-to-GPU copies a capture forbids. CudaGraphStep now keeps the cache off in every call.
The next run recompiled again: "tensor 'x' stride mismatch at index 0. expected 129, actual 128". A batch's
x and y are views of one (B, T + 1) buffer, and the recorded inputs were contiguous clones of them; they
now keep the batch's strides.
"""
import tempfile

import torch

from triton_transformer import training
from triton_transformer.transformer import Transformer


def case(use_triton: bool, dropout: float) -> bool:
    torch.manual_seed(0)
    model = Transformer(num_tokens=256, max_seq_len=128, dim=128, depth=2, heads=4, dim_head=32, causal=True,
                        attn_dropout=dropout, ff_dropout=dropout, use_triton=use_triton).cuda()
    compiled = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    step = training.CudaGraphStep(compiled, params, torch.bfloat16, dropout=dropout > 0 and use_triton)
    x = torch.randint(0, 256, (8, 128), device="cuda")
    y = torch.randint(0, 256, (8, 128), device="cuda")
    losses = [float(step(x, y)) for _ in range(6)]  # 2 eager, 1 recording, 3 replays
    recorded = step.graph is not None
    replays = losses[3:]
    if dropout > 0:
        ok = recorded and len(set(replays)) == len(replays)
    else:
        ok = recorded and len(set(losses[1:])) == 1  # the first call compiles; its value may differ in the last bit
    step.release()
    print(f"triton={use_triton!s:5} dropout={dropout}: recorded={recorded} losses={[round(v, 5) for v in losses]} "
          f"-> {'ok' if ok else 'WRONG'}")
    return ok


def train_case() -> bool:
    cfg = training.TrainConfig(**{**training.TINY, "steps": 6, "eval_every": 6, "sample_len": 0, "progress": False,
                                  "compile": True, "cuda_graph": True, "device": "auto",
                                  "out_dir": tempfile.mkdtemp()})
    result = training.train(cfg)
    print(f"train(), compiled and graphed: val loss {result.val_loss:.5f} -> ok")
    return True


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    results = [case(t, p) for t in (False, True) for p in (0.1, 0.0)] + [train_case()]
    print("all ok" if all(results) else "SOME WRONG")
