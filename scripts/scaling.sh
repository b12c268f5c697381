#!/usr/bin/env bash
# Data-parallel scaling of the Triton model: one GPU, then N, with the same global batch.
#
#   bash scripts/scaling.sh 2                 # on a machine with 2 GPUs (extra train.py options may follow)
#
# Run 1: one process accumulating N micro-batches of 16 sequences per step. Run 2: N processes
# (DDP), one micro-batch each. Both see the same batches in the same order (train.py draws
# micro-batch r*A+m for process r), so their loss curves should agree, and per GPU they process
# the same 16 sequences per micro-batch, so tokens/s of run 2 over run 1 is the scaling.
# Each appends a train_run row (with "gpus" and "grad_accum") to benchmarks/results/<gpu>.jsonl
# and its log to benchmarks/results/train_logs/<gpu>/scaling/. Chapter 8 plots them.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
shift || true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
ARGS=(--bench --providers triton --steps 400 --warmup-steps 40 --eval-every 100 --eval-batches 8
      --sample-len 0 --ckpt-every 0 --no-progress "$@")
python3 -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${ARGS[@]}" --grad-accum "$N"
python3 -m torch.distributed.run --standalone --nproc_per_node="$N" train.py "${ARGS[@]}"
