#!/usr/bin/env bash
# Data-parallel scaling of the Triton model on one machine with several GPUs.
#
#   bash scripts/scaling.sh 2                 # GPU counts first, then any extra train.py options
#   bash scripts/scaling.sh 2 4 --steps 800
#
# Short runs of the seed's model, 16 sequences per GPU per micro-batch:
#   1. one GPU, one micro-batch per step: the single-GPU throughput (a CUDA graph, as train.py runs it);
# and for each N given:
#   2. N GPUs, one micro-batch each: N times the tokens per step (a CUDA graph that records the gradients'
#      all-reduces, started bucket by bucket during the backward);
#   3. one GPU accumulating N micro-batches: the same global batch as run 2, drawn in the same order, so
#      its loss curve must lie on run 2's (the graph replayed once per micro-batch).
# Scaling efficiency = tokens/s of run 2 / (N x run 1). Each run appends a train_run row (with "gpus",
# "grad_accum" and "scaling") to benchmarks/results/<gpu>.jsonl and its log to
# benchmarks/results/train_logs/<gpu>/scaling/. Chapter 8 plots them.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=()
while [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; do
    COUNTS+=("$1")
    shift
done
[[ ${#COUNTS[@]} -gt 0 ]] || COUNTS=(2)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
ARGS=(--bench --scaling --providers triton --steps 400 --warmup-steps 40 --eval-every 100 --eval-batches 8
      --sample-len 0 --ckpt-every 0 --no-progress "$@")
RUN=(python3 -m torch.distributed.run --standalone)
"${RUN[@]}" --nproc_per_node=1 train.py "${ARGS[@]}"
for N in "${COUNTS[@]}"; do
    "${RUN[@]}" --nproc_per_node="$N" train.py "${ARGS[@]}"
    "${RUN[@]}" --nproc_per_node=1 train.py "${ARGS[@]}" --grad-accum "$N"
done
