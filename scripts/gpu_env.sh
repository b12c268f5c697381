# Source this at the start of a run on the lent GPU machine (no network there):
#   source scripts/gpu_env.sh && python3 -m pytest tests && python3 benchmarks/run.py && python3 scripts/execute_notebooks.py
# It installs the carried wheels (Jupyter kernel, nbclient, matplotlib...: ../shared/tools/gpu-wheels
# downloads them into .whl/) next to the machine's own torch and triton, and puts the repo on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared multi-GPU hosts (the device notes say why).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
# Triton's kernels and autotuning results, and inductor's, in an ignored folder of the tree: the lent
# machine keeps it between calls while it stays warm, so a second call (a chapter re-run) starts compiled.
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
