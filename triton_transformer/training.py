"""Training the GPT: data, configuration, the loop, checkpoints and DDP.

`train.py` at the repository root is a thin command line over this module, and
the last chapter of the book calls the same functions, so what the book shows
is what ``python train.py`` runs. Read it top to bottom:

1. **Data.** A byte-level corpus as one ``uint8`` array split into train and
   validation: the Python standard library's own sources (every machine with
   Python has them, so the default run needs no download), the Hutter Prize
   file enwik8 (the seed's data set, downloaded once and checksummed), or any
   file you point at.
2. **Batches** are a pure function of ``(seed, step, micro-batch index)``. No
   stateful sampler means nothing to save: a resumed run draws exactly the
   batches the uninterrupted run would have drawn, and a step's global batch is
   the same whether one GPU accumulates it or eight GPUs share it.
3. **The step**: bf16 autocast (fp16 with a loss scaler on GPUs without bf16),
   gradient accumulation with the loss divided by the number of micro-batches,
   gradient clipping, AdamW, warmup then cosine decay.
4. **Around the step**: a progress bar with loss, tokens/s and MFU; validation
   loss in bits per byte; a sample of generated text; a JSON-lines log;
   checkpoints written atomically; Ctrl-C saves before exiting.
5. **Data parallel** under ``torchrun``: one process per GPU, each with its own shard of
   every step's batch (a flat gradient buffer averaged in buckets by all-reduces recorded in
   the step's CUDA graph, DistributedDataParallel otherwise), rank 0 logging and checkpointing.
6. **Benchmark rows**: `benchmark` trains one configuration with one provider
   (triton; torch and torch.compile, each also replayed as a CUDA graph) and returns a
   ``train_run`` results row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

# NVLink SHARP (NVLS) collectives hang or fail on some lent multi-GPU hosts; plain
# ring/tree all-reduce is as fast for a model this size. Set before any process group.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import runtime  # noqa: E402
from .attention import MAX_HEAD_DIM  # noqa: E402
from .dropout import draw_seed, replayable_seeds  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TOKENS = 256  # bytes


class TrainingError(Exception):
    """An error the user can fix (bad data path, corrupt checkpoint...): train.py prints it without a traceback."""


class DataError(TrainingError):
    pass


class CheckpointError(TrainingError):
    pass


# ============================================================================ configuration

def default_cache_dir() -> str:
    """Where corpora are cached: $TRITON_TRANSFORMER_CACHE, else ~/.cache/triton_transformer."""
    env = os.environ.get("TRITON_TRANSFORMER_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "triton_transformer")


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on. The defaults are the seed's model (dim 512, depth 6, 8 heads of 64, 1024 bytes
    of context) trained as a causal byte-level GPT on one GPU."""

    # data
    data: str = "stdlib"            # "stdlib", "enwik8" or a path to a file
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    val_fraction: float = 0.05      # the last 5% of the corpus validates (enwik8: the seed's fixed 90M/5M split)
    # model
    dim: int = 512
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    seq_len: int = 1024
    ff_mult: int = 4
    dropout: float = 0.0            # attention and feed-forward dropout; 0 for pre-training on this much data
    use_triton: bool = True
    compile: bool = False
    cuda_graph: bool = True         # replay each step's forward+backward as one CUDA graph (see CudaGraphStep)
    data_parallel: str = "auto"     # several processes: "flat" (bucketed all-reduces of one flat gradient buffer,
                                    # recorded in the step's graph), "ddp", or
                                    # "auto" (flat when the step can be a CUDA graph, else ddp)
    # optimisation
    batch_size: int = 16            # sequences per micro-batch per process (the seed: 4, accumulated 4 times)
    grad_accum: int = 1             # micro-batches per optimizer step
    steps: int = 2000               # optimizer steps; the cosine schedule ends here
    lr: float = 1e-3
    min_lr_ratio: float = 0.1       # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # max global gradient norm; 0 turns clipping off
    dtype: str = "auto"             # auto (bf16 if the GPU has it, else fp16), bf16, fp16, fp32
    # evaluation, logging, checkpoints
    eval_every: int = 250
    eval_batches: int = 16          # validation micro-batches (the same windows every time, for every provider)
    sample_every: int = 1000        # 0: only at the end
    sample_len: int = 256           # bytes generated
    prompt_len: int = 128           # bytes of validation text the sample continues
    temperature: float = 0.8
    top_k: int | None = None
    log_every: int = 10
    ckpt_every: int = 500           # 0: only at the end (and on Ctrl-C)
    out_dir: str = "runs/gpt"
    seed: int = 1337
    stop_at: int | None = None      # stop (with a checkpoint) after this step, as if interrupted
    device: str = "auto"            # auto, cuda, cpu
    progress: bool = True


#: A configuration that trains in seconds on a CPU (the fallback without a GPU, and the chapter on CPU).
TINY = dict(dim=64, depth=2, heads=2, dim_head=32, seq_len=128, batch_size=8, grad_accum=1, steps=200,
            warmup_steps=10, lr=2e-3, eval_every=100, eval_batches=4, sample_every=0, sample_len=64, prompt_len=32,
            log_every=10, ckpt_every=0, use_triton=False)

#: Fields a resumed run may change; every other field comes from the checkpoint, so the run continues exactly.
#: How the run computes and reports (the path, evaluation, samples, logs) continues as the checkpoint says unless
#: given again on train.py's command line; where it writes, on which device, when it stops and whether a
#: progress bar shows belong to the new invocation (`_INVOCATION`).
RESUMABLE_OVERRIDES = {"use_triton", "compile", "cuda_graph", "data_parallel", "out_dir", "progress", "eval_every",
                       "eval_batches", "sample_every", "sample_len", "prompt_len", "temperature", "top_k", "log_every", "ckpt_every", "stop_at",
                       "device", "cache_dir"}
_INVOCATION = {"out_dir", "progress", "stop_at", "device", "cache_dir"}

#: How each benchmark provider trains: the Triton model (its step replayed as a CUDA graph, as train.py runs it),
#: the PyTorch path eager and compiled as PyTorch runs them by default (each kernel launched from the host), and
#: the same two replayed as CUDA graphs by the same `CudaGraphStep`, so that launch cost is no part of the margin.
PROVIDERS = {
    "triton": dict(use_triton=True, compile=False, cuda_graph=True),
    "torch": dict(use_triton=False, compile=False, cuda_graph=False),
    "torch.compile": dict(use_triton=False, compile=True, cuda_graph=False),
    "torch graph": dict(use_triton=False, compile=False, cuda_graph=True),
    "torch.compile graph": dict(use_triton=False, compile=True, cuda_graph=True),
}


# ============================================================================ data

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
# The MD5 of the *extracted* 100,000,000-byte file as Matt Mahoney publishes it (mattmahoney.net/dc/textdata.html).
# We could not download the file while writing this, so we check the published MD5 and the length rather than a
# SHA-256 of our own making; both are checked after extraction, and a mismatch deletes the bad copy.
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
ENWIK8_SPLIT = (90_000_000, 95_000_000)  # the seed's split: [0, 90M) train, [90M, 95M) validation (95M+: test)


@dataclasses.dataclass
class Corpus:
    name: str
    train: np.ndarray  # uint8, one byte per token
    val: np.ndarray

    def __repr__(self):
        return f"Corpus({self.name!r}, train={len(self.train):,} bytes, val={len(self.val):,} bytes)"


def _atomic_write_array(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name in the same directory, then rename: a half-written cache never looks valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def stdlib_files(root: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """The standard library's .py files in a fixed (sorted, relative-path) order, without site-packages."""
    import sysconfig

    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library directory {root} does not exist; pass --data PATH")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(cache_dir: str | os.PathLike, val_fraction: float = 0.05,
                  root: str | os.PathLike | None = None) -> Corpus:
    """The standard library's sources, concatenated as bytes and cached as one .npy.

    The file list differs between Python versions and distributions, so the cache's
    name carries a fingerprint of the list (paths and sizes): a different Python
    builds its own cache instead of silently reusing another's.
    """
    root, files = stdlib_files(root)
    fingerprint = hashlib.sha1()
    for p in files:
        fingerprint.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\n".encode())
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = Path(cache_dir) / f"stdlib-py{version}-{fingerprint.hexdigest()[:12]}.npy"
    if not path.exists():
        data = np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)
        _atomic_write_array(path, data)
    data = np.load(path, mmap_mode="r")
    return _split(f"stdlib (Python {version}, {len(files)} files)", data, val_fraction)


def _split(name: str, data: np.ndarray, val_fraction: float) -> Corpus:
    n_val = int(len(data) * val_fraction)
    if not 0 < n_val < len(data):
        raise DataError(f"{name} has {len(data):,} bytes: too few to split into training and validation "
                        f"(val_fraction={val_fraction})")
    return Corpus(name, data[:-n_val], data[-n_val:])


def verify_enwik8(path: Path) -> None:
    """Check the extracted enwik8 against its published length and MD5; raise DataError if it does not match."""
    size = path.stat().st_size
    if size != ENWIK8_SIZE:
        raise DataError(f"{path} has {size:,} bytes, enwik8 has {ENWIK8_SIZE:,}: delete it and run again")
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            md5.update(chunk)
    if md5.hexdigest() != ENWIK8_MD5:
        raise DataError(f"{path} has MD5 {md5.hexdigest()}, enwik8's published MD5 is {ENWIK8_MD5}: "
                        "delete it and run again")


def enwik8_corpus(cache_dir: str | os.PathLike) -> Corpus:
    """enwik8, downloaded once from mattmahoney.net into the cache, checked, split 90M/5M as the seed did."""
    cache = Path(cache_dir)
    raw = cache / "enwik8"
    verified = cache / "enwik8.verified"  # written after the MD5 passed once, so later runs skip hashing 100 MB
    if not (raw.exists() and verified.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        zpath = cache / "enwik8.zip"
        if not zpath.exists():
            tmp = zpath.with_name(f"enwik8.zip.{os.getpid()}.tmp")
            print(f"downloading {ENWIK8_URL} (36 MB) to {zpath}")
            try:
                with urllib.request.urlopen(ENWIK8_URL, timeout=60) as r, open(tmp, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise DataError(f"could not download {ENWIK8_URL} ({err}). Without network, put enwik8.zip "
                                f"(or the extracted enwik8) in {cache} yourself, or use --data stdlib") from err
            os.replace(tmp, zpath)
        if not raw.exists():
            try:
                with zipfile.ZipFile(zpath) as z, z.open("enwik8") as src, open(raw.with_suffix(".tmp"), "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
            except (zipfile.BadZipFile, KeyError, OSError) as err:
                zpath.unlink(missing_ok=True)
                raise DataError(f"{zpath} is not a valid enwik8.zip ({err}); deleted it, run again to "
                                "download it afresh") from err
            os.replace(raw.with_suffix(".tmp"), raw)
        try:
            verify_enwik8(raw)
        except DataError:
            raw.unlink(missing_ok=True)
            raise
        verified.write_text(ENWIK8_MD5 + "\n")
    data = np.memmap(raw, dtype=np.uint8, mode="r")
    a, b = ENWIK8_SPLIT
    return Corpus("enwik8", data[:a], data[a:b])


def file_corpus(path: str | os.PathLike, val_fraction: float = 0.05) -> Corpus:
    """Any file, read as bytes (memory-mapped, not copied): the last `val_fraction` validates."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--data {str(path)!r}: no such file. Use 'stdlib' (the default), 'enwik8' or the path "
                        "of a text file")
    if not p.is_file():
        raise DataError(f"--data {str(path)!r} is not a file (a directory?). Use 'stdlib', 'enwik8' or the path "
                        "of a text file")
    if p.stat().st_size == 0:
        raise DataError(f"--data {str(path)!r} is empty")
    return _split(p.name, np.memmap(p, dtype=np.uint8, mode="r"), val_fraction)


#: The corpora `--data` names; anything else is a file path.
NAMED_CORPORA = ("stdlib", "enwik8")


def load_corpus(data: str, cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.05) -> Corpus:
    """'stdlib', 'enwik8' (`NAMED_CORPORA`) or a file path -> Corpus."""
    cache_dir = cache_dir or default_cache_dir()
    if data == "stdlib":
        return stdlib_corpus(cache_dir, val_fraction)
    if data == "enwik8":
        return enwik8_corpus(cache_dir)
    return file_corpus(data, val_fraction)


# ============================================================================ batches

def batch_starts(n: int, seq_len: int, batch_size: int, seed: int, step: int, index: int) -> np.ndarray:
    """Window starts of micro-batch `index` of optimizer step `step`: a pure function of its arguments.

    numpy's SeedSequence mixes the three integers into an independent stream, so
    no sampler state has to be saved for an exact resume, and micro-batch j of a
    step is the same whichever process computes it.
    """
    rng = np.random.default_rng([seed, step, index])
    return rng.integers(0, n - seq_len, size=batch_size)  # each window needs seq_len + 1 bytes


def val_starts(n: int, seq_len: int, count: int) -> np.ndarray:
    """Evenly spaced validation windows: the same for every run, seed and provider, so losses compare."""
    return np.linspace(0, n - seq_len - 1, count).astype(np.int64)


def get_batch(data: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device):
    """Inputs x = bytes [s, s+T) and labels y = bytes [s+1, s+T+1) of each window, as int64 on `device`."""
    windows = torch.from_numpy(data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    if device.type == "cuda":
        # pinned, so the copy is queued without the host waiting; the host gathers the next batch while the GPU steps
        windows = windows.pin_memory().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def corpus_fingerprint(corpus: Corpus) -> str:
    """A digest of the bytes a run trains and validates on, kept in its checkpoints.

    The checkpoint names its data ('stdlib', 'enwik8' or a path), but the bytes behind a name can change: an
    edited file, another Python's standard library. Resuming on other bytes gives other batches, so the run
    would not continue as it began; comparing digests lets the resume say so. Hashing reads the corpus once
    (about a second per GB).
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in (corpus.train, corpus.val):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(memoryview(np.ascontiguousarray(part)))
    return digest.hexdigest()


def check_corpus(corpus: Corpus, cfg: TrainConfig) -> None:
    for split, arr in (("train", corpus.train), ("validation", corpus.val)):
        if len(arr) < cfg.seq_len + 1:
            raise DataError(f"{corpus.name}: the {split} split has {len(arr):,} bytes, fewer than one window of "
                            f"seq_len + 1 = {cfg.seq_len + 1}; use a bigger file or a smaller --seq-len")


# ============================================================================ model, optimizer, schedule

def build_model(cfg: TrainConfig) -> torch.nn.Module:
    from .transformer import Transformer

    return Transformer(num_tokens=NUM_TOKENS, max_seq_len=cfg.seq_len, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                       dim_head=cfg.dim_head, causal=True, ff_mult=cfg.ff_mult, attn_dropout=cfg.dropout,
                       ff_dropout=cfg.dropout, use_triton=cfg.use_triton)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying LayerNorm gains and biases pulls them to 0 for no gain."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}  # one kernel for all parameters instead of a loop
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at 0-based `step`: linear warmup to 1, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg: TrainConfig):
    # A plain function (not a callable object) so that the scheduler's state_dict holds no config object.
    def factor(step: int) -> float:
        return lr_factor(step, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). bf16 where the GPU has it; fp16 (with a GradScaler) on older GPUs."""
    if device.type != "cuda":
        return None  # CPU: fp32 (the interpreter computes bf16 wrongly; CPU autocast would only be slower)
    choice = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if cfg.dtype not in choice:
        raise TrainingError(f"--dtype {cfg.dtype!r}: choose auto, bf16, fp16 or fp32")
    # Not torch.cuda.is_bf16_supported(): it says True on a T4, where PyTorch emulates bf16 and Triton cannot compile it.
    major, minor = runtime.capability(device)
    if cfg.dtype == "auto":
        return torch.bfloat16 if major >= 8 else torch.float16
    if cfg.dtype == "bf16" and major < 8 and (cfg.use_triton or cfg.compile):  # torch.compile writes Triton too
        raise TrainingError(f"--dtype bf16: Triton kernels need a GPU of compute capability 8.0 or newer for "
                            f"bf16 ({runtime.cuda_properties(device).name} is {major}.{minor}); use --dtype fp16")
    return choice[cfg.dtype]


# ============================================================================ FLOPs and MFU

#: Dense bf16 (fp16 where the GPU has no bf16) tensor-core peak FLOP/s, by a substring of the device name.
#: First match wins, so the more specific names come first. Unknown GPUs get no MFU.
PEAK_FLOPS = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("V100", 125e12),   # fp16
    ("T4", 65e12),      # fp16
]


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def matmul_params(model: torch.nn.Module, num_tokens: int = NUM_TOKENS) -> int:
    """Parameters that take part in a matmul per token: every matrix except embedding tables (lookups).

    The output projection to `num_tokens` logits is a matmul even when it shares
    its weight with the token embedding, so it is counted in that case too.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen, n, head = set(), 0, False
    for p in model.parameters():
        if id(p) in seen or p.dim() < 2:
            continue
        seen.add(id(p))
        if id(p) in embeddings:
            continue
        n += p.numel()
        head |= p.shape[0] == num_tokens
    if not head:  # tied head: the logits matmul uses the token embedding's (num_tokens, dim) matrix
        dims = [p.shape[1] for p in model.parameters() if id(p) in embeddings and p.shape[0] == num_tokens]
        n += num_tokens * dims[0] if dims else 0
    return n


def flops_per_token(n_matmul_params: int, depth: int, seq_len: int, attn_dim: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (2 forward, 4 backward) plus causal attention.

    Attention's QK^T and PV cost 2 * 2 * T * d FLOPs per token and layer forward,
    three times that forward + backward, and causal masking halves the useful
    part (the book counts useful FLOPs): 6 * L * T * d.
    """
    return 6 * n_matmul_params + 6 * depth * seq_len * attn_dim


# ============================================================================ checkpoints

def _rng_state() -> dict:
    """Every RNG a step may draw from, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _log_step(line: str) -> float:
    """The step of a log.jsonl row; infinity (dropped on resume) for a blank or torn one (a crash mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names: the file itself, or a run directory's ckpt.pt."""
    path = Path(path)
    return path / "ckpt.pt" if path.is_dir() else path


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where the checkpoint before `path` is kept: ckpt.pt -> ckpt.prev.pt."""
    p = Path(path)
    return p.with_name(p.stem + ".prev" + p.suffix)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write `state` so that a crash at any moment leaves a loadable checkpoint.

    torch.save goes to ``ckpt.pt.tmp`` in the same directory (so the renames below
    stay on one file system), is flushed to disk, and only then replaces
    ``ckpt.pt`` with one atomic ``os.replace``. The checkpoint it replaces is kept
    as ``ckpt.prev.pt``: a second name for it (a hard link, or a copy where the file
    system has none) is put in place first, with its own atomic rename, so that
    ``ckpt.pt`` exists at every moment. A failed or interrupted write leaves ckpt.pt untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if path.exists():
        prev = previous_checkpoint(path)
        prev_tmp = prev.with_name(prev.name + ".tmp")
        prev_tmp.unlink(missing_ok=True)
        try:
            os.link(path, prev_tmp)
        except OSError:
            shutil.copyfile(path, prev_tmp)
        os.replace(prev_tmp, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (the renames above) to disk where the OS allows it (not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


CHECKPOINT_KEYS = ("step", "config", "model", "optimizer", "scheduler", "scaler", "rng")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load(weights_only=True) with a clear CheckpointError naming the file (and its predecessor) on failure."""
    path = Path(path)
    if not path.exists():
        prev = previous_checkpoint(path)
        hint = f" (the previous one, {prev}, exists: pass --resume {prev})" if prev.exists() else ""
        raise CheckpointError(f"no checkpoint at {path}{hint}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise ValueError(f"missing {missing}")
    except Exception as err:
        prev = previous_checkpoint(path)
        hint = (f" The previous checkpoint {prev} is kept: resume from it with --resume {prev}."
                if prev.exists() else " Delete it to start afresh.")
        raise CheckpointError(f"checkpoint {path} is corrupt or not a training checkpoint "
                              f"({type(err).__name__}: {str(err)[:200]}).{hint}") from err
    return state


# ============================================================================ distributed

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: join the process group (NCCL on GPUs, gloo on CPUs)."""
    want = cfg.device
    if want == "auto":
        want = "cuda" if runtime.DEVICE.type == "cuda" else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda, but no CUDA GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device(want))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group, if any. train() stays in it, so that `compare` can train several runs in one
    torchrun job without tearing the group down and rendezvousing again between them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _start_average(t: torch.Tensor, d: Dist):
    """Start averaging `t` in place over the processes; returns the function that finishes it.

    With NCCL the collective runs on its own stream and the finisher makes the current stream wait for it
    (the host does not wait): work queued in between, the rest of a backward, overlaps it.
    """
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # NCCL divides as it reduces: no second pass over the buffer
        return dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True).wait
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)  # gloo has no AVG

    def finish():
        work.wait()
        t.div_(d.world)
    return finish


def _all_reduce(t: torch.Tensor, d: Dist, op="avg") -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        if op == "avg":
            _start_average(t, d)()
        else:
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return t


#: Gradients are averaged over the processes in buckets of about this many bytes, each as soon as the backward
#: has finished it, so that most of the communication overlaps the rest of the backward (DDP's default: 25 MB).
BUCKET_BYTES = 16 * 2**20


# ============================================================================ the loop

@dataclasses.dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None          # nats per byte
    val_bpb: float | None           # bits per byte
    tokens_per_s: float | None      # steady state (after the first logged interval), all processes together
    mfu: float | None
    flops_per_token: float
    params: int
    interrupted: bool
    dtype: str                      # what the matmuls ran in: bfloat16, float16 (autocast) or float32
    log: list                       # the rows written to log.jsonl by this call
    samples: list                   # generated texts, by step
    log_path: Path | None
    checkpoint: Path | None
    config: TrainConfig


@torch.no_grad()
def evaluate(model, corpus: Corpus, cfg: TrainConfig, d: Dist, amp) -> float:
    """Mean validation loss (nats per byte) over the fixed validation windows, shared out over the processes."""
    was_training = model.training
    model.eval()
    starts = val_starts(len(corpus.val), cfg.seq_len, cfg.eval_batches * cfg.batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=d.device)  # sum of losses, number of batches
    for j in range(d.rank, cfg.eval_batches, d.world):
        x, y = get_batch(corpus.val, starts[j * cfg.batch_size:(j + 1) * cfg.batch_size], cfg.seq_len, d.device)
        with amp():
            loss = model(x, labels=y)
        total[0] += loss.double()
        total[1] += 1
    _all_reduce(total, d, "sum")
    model.train(was_training)
    return (total[0] / total[1]).item()


def sample_prompt(corpus: Corpus, cfg: TrainConfig) -> bytes:
    """`prompt_len` bytes of validation text, starting after the first newline so the sample starts on a line."""
    n = max(1, min(cfg.prompt_len, cfg.seq_len // 2))  # prompt + sample must fit the model's context
    head = bytes(corpus.val[: 4 * n + 1])
    start = head.find(b"\n") + 1 if b"\n" in head[: 3 * n] else 0
    return bytes(corpus.val[start:start + n])


@torch.no_grad()
def generate_text(model, prompt: bytes, n: int, cfg: TrainConfig, device: torch.device, amp) -> str:
    """Continue `prompt` by `n` bytes with model.generate; decode as UTF-8 (invalid bytes shown as U+FFFD)."""
    was_training = model.training
    model.eval()
    x = torch.tensor(list(prompt), dtype=torch.long, device=device)[None]
    # Sampling draws from torch's generators, as dropout does: forked, so that whether and how a run
    # samples (options a resume may change) leaves the training's random numbers as they were.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), amp():
        out = model.generate(x, n, temperature=cfg.temperature, top_k=cfg.top_k)
    model.train(was_training)
    out = out[0].tolist()
    new = out[len(prompt):] if len(out) == len(prompt) + n else out[-n:]  # whether or not generate returns the prompt
    return bytes(new).decode("utf-8", errors="replace")


class CudaGraphStep:
    """Forward, loss and backward of one batch, recorded once as a CUDA graph and replayed every step after.

    Why: the Triton path launches a few hundred kernels per step of the seed's model, each from Python. A
    launch costs tens of microseconds of CPU time, so on a slow host the GPU spends much of the step waiting
    for the next kernel. A CUDA graph records the whole sequence of launches once; a replay submits all of them
    with one call and the CPU time per step no longer depends on the number of kernels.

    What a replay assumes, and how this class keeps it true:

    * the same addresses: every input goes through ``static_x``/``static_y`` (the new batch is copied in), the
      activations and gradients live in the graph's private memory pool, and the optimizer updates the
      parameters in place;
    * nothing chooses on the host: Triton autotunes and compiles (and torch.compile compiles) during the first
      `warmup` calls, which run eagerly, and no kernel of the step reads a value back to the CPU;
    * the gradients are *written* by a replay, into tensors that were None when the graph was recorded, and
      `__call__` re-attaches them to the parameters should anything have set ``.grad`` to None. With several
      micro-batches per step (`micro_batches`) or several processes they live in one flat buffer instead (each
      ``.grad`` a view of it), zeroed before a step's first micro-batch, outside the graph: the recorded
      backward adds into it, so replays accumulate the micro-batches' gradients as eager backwards would;
    * new dropout masks at every replay, although a kernel's arguments are recorded once: with ``dropout=True``
      every call writes a fresh seed, drawn from torch's CPU generator, into the one-element tensor
      ``seed_base``, and the forward and backward run inside `dropout.replayable_seeds`, so the Triton
      kernels read their Philox key from it when they run (PyTorch's own dropout is recorded with a device-side
      offset that each replay advances). Eager calls key their masks the same way, so a step draws the same
      masks recorded or not, and a resumed run, whose generator the checkpoint restores, draws the masks the
      run it continues would have.

    `unsupported` says when a run cannot be graphed; training then runs eagerly.

    Several processes: DDP's all-reduce hooks are built for eager steps, so the flat buffer is averaged over the
    processes here, with `start_average(tensor)` (which starts the collective and returns the function that
    waits for it), no copies. With one micro-batch per step the buffer goes in buckets of about `BUCKET_BYTES`,
    each started by a hook as soon as the backward has written its last gradient, and the step waits for them
    at its end: the collectives are recorded with the backward, and a replay overlaps them with the rest of
    it. With several micro-batches the graph is the same for every one of them, so the whole buffer is averaged
    after the last replay instead. With ``record=False`` every call runs eagerly (the same semantics without a
    GPU; the tests use it on CPU).
    """

    def __init__(self, forward, params, amp_dtype: torch.dtype | None, warmup: int = 2, start_average=None,
                 record: bool = True, micro_batches: int = 1, dropout: bool = False):
        """`forward(x, labels=y)` returns the loss; `params` are the parameters it trains. Each of a step's
        `micro_batches` calls backpropagates its loss divided by their number, so the gradients they add up
        to are those of the mean loss. `dropout`: the forward draws dropout masks (see the class docstring)."""
        self.forward, self.params, self.amp_dtype, self.warmup = forward, list(params), amp_dtype, warmup
        self.start_average, self.record, self.micro_batches = start_average, record, micro_batches
        self.seed_base = torch.zeros(1, dtype=torch.int64, device=self.params[0].device) if dropout else None
        self.calls, self.graph, self.peak_bytes, self.flat, self.buckets, self.hooks = 0, None, None, None, [], []
        if start_average is not None or micro_batches > 1:
            dtypes = {p.dtype for p in self.params}
            if len(dtypes) != 1:
                raise TrainingError(f"one flat gradient buffer needs parameters of one dtype, got {dtypes}")
            self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=dtypes.pop(),
                                    device=self.params[0].device)
            sizes = [p.numel() for p in self.params]
            self.grads = [g.view_as(p) for g, p in zip(self.flat.split(sizes), self.params)]
        if start_average is not None and micro_batches == 1:
            self._make_buckets(sizes)

    def _make_buckets(self, sizes: list[int]) -> None:
        """Cut the flat buffer into buckets of whole parameters, from its end: the backward produces the last
        layers' gradients first. A hook on each parameter starts its bucket once all of them are written."""
        limit = max(1, BUCKET_BYTES // self.flat.element_size())
        ends = list(itertools.accumulate(sizes))
        end, members = ends[-1] if ends else 0, []
        for i in reversed(range(len(sizes))):
            members.append(i)
            start = ends[i] - sizes[i]
            if end - start >= limit or i == 0:
                self.buckets.append((self.flat[start:end], members))
                end, members = start, []
        self.bucket_of = {i: b for b, (_, members) in enumerate(self.buckets) for i in members}
        self.collecting = False
        self.hooks = [p.register_post_accumulate_grad_hook(lambda _, i=i: self._gradient_written(i))
                      for i, p in enumerate(self.params)]

    def release(self) -> None:
        """Free the recorded graph and take the hooks off the parameters (train() calls this as it ends).

        A graph that recorded collectives must go before its process group does: NCCL keeps resources for them
        until the graph is destroyed. Without this, a 4-GPU run (H200s, torch 2.11) trained to the end and then
        did not exit; with it, it does.
        """
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.graph is not None:
            torch.cuda.synchronize()
            self.graph.reset()
            self.graph = None

    def _gradient_written(self, i: int) -> None:
        if not self.collecting:  # a backward that is not this step's (the hooks stay on the parameters)
            return
        b = self.bucket_of[i]
        self.left[b] -= 1
        if self.left[b] == 0:
            self._start_bucket(b)

    def _start_bucket(self, b: int) -> None:
        self.left[b] = -1  # started
        self.finishers.append(self.start_average(self.buckets[b][0]))

    @staticmethod
    def unsupported(cfg: TrainConfig, device: torch.device, amp_dtype) -> str | None:
        """Why this run cannot use a CUDA graph, or None if it can."""
        # torch.compile'd steps record too: measured on the H100 (benchmarks/experiments/compile_graph.py), both
        # paths compiled, with dropout and without, record, and their replays draw new masks each time.
        reasons = [(device.type != "cuda", "no CUDA device"), (amp_dtype == torch.float16, "fp16 loss scaling")]
        return next((why for bad, why in reasons if bad), None)

    def _forward_backward(self, x, y) -> torch.Tensor:
        if self.flat is not None:
            for p, g in zip(self.params, self.grads):
                p.grad = g  # the backward adds into the flat buffer, in place
        # autocast's weight cache must stay off while recording: cached casts would outlive the graph's pool. Off in
        # the eager calls too: torch.compile guards on it, and a change at recording would recompile the model
        # inside the capture, which fails (the cached casts would save a step's few casts of each weight, no more).
        amp = (torch.autocast(x.device.type, dtype=self.amp_dtype, cache_enabled=False) if self.amp_dtype
               else contextlib.nullcontext())
        seeds = replayable_seeds(self.seed_base) if self.seed_base is not None else contextlib.nullcontext()
        with amp, seeds:
            loss = self.forward(x, labels=y)
        self.left, self.finishers = [len(members) for _, members in self.buckets], []
        self.collecting = bool(self.buckets)
        try:
            (loss / self.micro_batches if self.micro_batches > 1 else loss).backward()
        finally:
            self.collecting = False
        if self.flat is not None and any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise TrainingError("autograd replaced a gradient instead of accumulating into the flat buffer")
        for b, left in enumerate(self.left):
            if left > 0:  # a parameter the loss does not reach: its bucket starts now, in the same order everywhere
                self._start_bucket(b)
        for finish in self.finishers:  # the step's own stream waits for every bucket (the host does not)
            finish()
        self.finishers = []  # (the collectives' handles: a recording's would otherwise outlive it)
        return loss.detach()

    def _reduce(self, loss: torch.Tensor, last: bool) -> torch.Tensor:
        if self.start_average is not None and not self.buckets and last:
            self.start_average(self.flat)()  # several micro-batches: averaged after the last, outside the graph
        return loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor, first: bool = True, last: bool = True) -> torch.Tensor:
        """Run forward and backward on (x, y), the `first` and/or `last` micro-batch of a step; returns the loss
        (a tensor the next call overwrites)."""
        if self.seed_base is not None:
            self.seed_base.fill_(draw_seed())  # this call's dropout masks (a replay reads it; see the class docstring)
        if self.flat is not None and first:
            self.flat.zero_()  # a new step: its micro-batches' gradients add up from zero
        if self.graph is None and (self.calls < self.warmup or not self.record):
            self.calls += 1
            return self._reduce(self._forward_backward(x, y), last)
        if self.graph is None:
            # The batch's own strides, not clone()'s contiguous ones: x and y are views of one (B, T + 1) buffer,
            # and torch.compile guards on strides (a contiguous copy recompiled the model inside the capture)
            self.static_x, self.static_y = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                                            .copy_(t) for t in (x, y))
            if self.flat is None:
                for p in self.params:
                    p.grad = None  # recorded as fresh tensors in the graph's pool, written by every replay
            self.graph = torch.cuda.CUDAGraph()
            # The step's memory peak, taken while recording: a replay reuses the graph's private pool, which
            # max_memory_allocated does not see filling up again (it resets the device's peak statistics).
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.cuda.graph(self.graph):
                self.static_loss = self._forward_backward(self.static_x, self.static_y)
            self.peak_bytes = torch.cuda.max_memory_allocated()
            if self.flat is None:
                self.grads = [p.grad for p in self.params]
        else:
            self.static_x.copy_(x, non_blocking=True)
            self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()  # recording runs nothing: the first replay computes the recorded step
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g
        return self._reduce(self.static_loss, last)


def train_step(model, optimizer, scheduler, scaler, data: np.ndarray, cfg: TrainConfig, d: Dist, amp, step: int,
               params, graphed: CudaGraphStep | None = None,
               seed_base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step: `grad_accum` micro-batches per process, clip, AdamW, schedule.

    Returns the step's mean loss and the gradient's norm before clipping (None without clipping), as
    0-dim tensors on the device: reading them with .item() would wait for the GPU, so the loop does that
    only when it logs. `seed_base`: eager steps with dropout key their masks from it (see `train`).
    """
    loss_sum = torch.zeros((), device=d.device)
    for m in range(cfg.grad_accum):
        j = d.rank * cfg.grad_accum + m  # global micro-batch index: the same batches for any number of processes
        x, y = get_batch(data, batch_starts(len(data), cfg.seq_len, cfg.batch_size, cfg.seed, step, j),
                         cfg.seq_len, d.device)
        if graphed is not None:  # the recorded forward and backward (+ the all-reduce after the last)
            loss_sum += graphed(x, y, first=m == 0, last=m == cfg.grad_accum - 1).float()
            continue
        # DDP all-reduces gradients during backward; only the last micro-batch needs to
        sync = m == cfg.grad_accum - 1 or d.world == 1
        if seed_base is not None:  # eager steps key their dropout masks as CudaGraphStep does (see train)
            seed_base.fill_(draw_seed())
        seeds = replayable_seeds(seed_base) if seed_base is not None else contextlib.nullcontext()
        with contextlib.nullcontext() if sync else model.no_sync():
            with amp(), seeds:
                loss = model(x, labels=y)
            # the mean over the whole batch, not the sum of the micro-batches' means
            scaler.scale(loss / cfg.grad_accum).backward()
        loss_sum += loss.detach().float()
    grad_norm = None
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones (a no-op without fp16)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # the norm before clipping
    scaler.step(optimizer)  # with fp16: skipped if a gradient overflowed, and the scale shrinks
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return loss_sum / cfg.grad_accum, grad_norm


def _merge_resume_config(cfg: TrainConfig, saved: dict, say) -> TrainConfig:
    """The checkpoint's config, with only the fields that cannot change the training trajectory taken from `cfg`.

    A config from train.py's command line records the options given (`cfg.explicit`): of the resumable fields,
    one not given again keeps the checkpoint's value (a run trained with --use-triton resumes on the Triton path
    without being told twice), except those of `_INVOCATION`. A config built in Python overrides all of them.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = dict(saved)
    ignored = []
    explicit = getattr(cfg, "explicit", None)
    for f in dataclasses.fields(TrainConfig):
        new = getattr(cfg, f.name)
        if f.name not in saved:
            merged[f.name] = new
        elif f.name in RESUMABLE_OVERRIDES:
            if explicit is None or f.name in explicit or f.name in _INVOCATION:
                merged[f.name] = new
        elif (f.name == "data" and explicit is not None and "data" in explicit and saved["data"] != new
              and saved["data"] not in NAMED_CORPORA and not Path(saved["data"]).exists()):
            # a relative path from another directory: the checkpoint's digest still tells whether it is the same
            say(f"the checkpoint's data {saved['data']!r} is not found from here: reading --data {new!r}")
            merged["data"] = new
        elif saved[f.name] != new and f.name in (explicit or ()):
            ignored.append(f"{f.name}={new!r} (checkpoint: {saved[f.name]!r})")
    if ignored:
        say("resuming with the checkpoint's settings; ignored " + ", ".join(ignored))
    return TrainConfig(**{k: v for k, v in merged.items() if k in names})


class _StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the loop to stop after the current step and save.

    Saving at a step boundary is what keeps the resume exact. In a single process
    the handler then steps aside, so a second Ctrl-C raises KeyboardInterrupt at
    once. Under torchrun it stays: the agent forwards the terminal's Ctrl-C to
    every worker a second time (and SIGKILLs them 30 s later), which must not
    abort the save that the first one asked for.
    """

    def __init__(self, say, step_aside: bool = True):
        self.requested = False
        self.say = say
        self.step_aside = step_aside
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # not allowed here (e.g. some embedded interpreters)
                    pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            return
        self.requested = True
        if self.step_aside:
            signal.signal(signum, self.previous[signum])
        self.say(f"{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping"
                 + (" (Ctrl-C again quits at once)" if self.step_aside else ""))

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _PlainBar:
    """Stands in for tqdm where it is not installed: the postfix is printed at each log step instead."""

    def __init__(self, total, initial=0, disable=False, **kwargs):
        self.n, self.total, self.disable = initial, total, disable

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s, refresh=True):
        if not self.disable:
            print(f"step {self.n}/{self.total}: {s}", flush=True)

    def write(self, s):
        print(s, flush=True)

    def close(self):
        pass


def _progress_bar(**kwargs):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(**kwargs)
    return tqdm(**kwargs)


def check_config(cfg: TrainConfig) -> None:
    """A clear TrainingError for settings that cannot train, before anything is read or written.

    Without it they surfaced as tracebacks from deep inside (a learning rate the optimizer refuses, heads of
    0 dividing by zero), as a run that "finished" with NaN losses (a batch of 0 sequences), or as a crash at
    the first text sample, after the steps before it were trained and before they were saved (top_k 0).
    """
    def need(ok: bool, what: str):
        if not ok:
            raise TrainingError(what)

    for name in ("dim", "depth", "heads", "dim_head", "seq_len", "ff_mult", "batch_size", "grad_accum", "steps",
                 "eval_batches", "log_every"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "sample_every", "sample_len", "prompt_len", "ckpt_every"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    need(0.0 <= cfg.dropout < 1.0, f"--dropout must be in [0, 1), got {cfg.dropout}")
    fp32_max = torch.finfo(torch.float32).max  # the optimizer keeps lr, decay and clip norm as fp32 numbers
    need(0 < cfg.lr < fp32_max, f"--lr must be a positive finite number, got {cfg.lr}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(0 <= cfg.weight_decay < fp32_max and 0 <= cfg.grad_clip < fp32_max,
         f"--weight-decay and --grad-clip must be finite numbers, 0 or more, got {cfg.weight_decay}, {cfg.grad_clip}")
    need(0.0 <= cfg.beta1 < 1.0 and 0.0 <= cfg.beta2 < 1.0, f"--beta1 and --beta2 must be in [0, 1), got "
                                                           f"{cfg.beta1}, {cfg.beta2}")
    need(0 <= cfg.seed < 2**31, f"--seed must be in [0, 2**31), got {cfg.seed}")  # + rank: numpy's seed range
    need(not cfg.use_triton or cfg.dim_head <= MAX_HEAD_DIM,
         f"--dim-head {cfg.dim_head} is past the {MAX_HEAD_DIM} the Triton attention kernels hold in registers "
         "(--no-use-triton runs any size)")
    need(cfg.temperature >= 0, f"--temperature must be 0 (greedy) or more, got {cfg.temperature}")
    need(cfg.top_k is None or cfg.top_k >= 1, f"--top-k must be at least 1, got {cfg.top_k}")
    need(cfg.stop_at is None or cfg.stop_at >= 1, f"--stop-at must be at least 1, got {cfg.stop_at}")
    need(cfg.val_fraction > 0, f"val_fraction must be positive, got {cfg.val_fraction}")


def train(cfg: TrainConfig, resume: bool | str | os.PathLike | None = None) -> TrainResult:
    """Train (or resume) one run; see the module docstring. `resume`: True for out_dir/ckpt.pt, or a path."""
    d = setup_distributed(cfg)  # joins the process group under torchrun and stays in it (see shutdown_distributed)
    bar = graphed = None
    try:

        def say(msg):
            if d.main:
                (bar.write if bar is not None else print)(msg)

        # ---- resume: the checkpoint's config wins (except run-control fields)
        state = None
        if resume:
            ckpt_path = Path(cfg.out_dir) / "ckpt.pt" if resume is True else checkpoint_file(resume)
            state = load_checkpoint(ckpt_path)
            cfg = _merge_resume_config(cfg, state["config"], say)
        check_config(cfg)
        if cfg.device == "auto" and d.device.type == "cpu" and cfg.use_triton and d.main:
            say("note: no GPU, so the Triton kernels run in Triton's CPU interpreter (slow; --no-use-triton is faster)")
        if d.device.type == "cpu" and cfg.dtype in ("bf16", "fp16") and d.main:
            say(f"note: --dtype {cfg.dtype} is not used on the CPU, which trains in fp32 (the interpreter computes "
                "bf16 dots wrongly, and CPU autocast would only be slower)")
        if state is None and cfg.data not in NAMED_CORPORA and Path(cfg.data).exists():
            # the checkpoint names the file by its absolute path: a resume from another directory finds it
            cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))

        # ---- data (rank 0 builds any cache first, the others then read it)
        if d.main:
            corpus = load_corpus(cfg.data, cfg.cache_dir, cfg.val_fraction)
        if d.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if not d.main:
            corpus = load_corpus(cfg.data, cfg.cache_dir, cfg.val_fraction)
        check_corpus(corpus, cfg)
        fingerprint = corpus_fingerprint(corpus) if d.main else None

        # ---- model, optimizer, schedule, precision
        torch.manual_seed(cfg.seed)  # the same initial weights for every provider and world size
        raw_model = build_model(cfg).to(d.device)
        optimizer = make_optimizer(raw_model, cfg, d.device)
        scheduler = make_scheduler(optimizer, cfg)
        amp_dtype = autocast_dtype(cfg, d.device)
        scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)

        def amp():
            if amp_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=d.device.type, dtype=amp_dtype)

        step, elapsed_before, tokens_seen = 0, 0.0, 0
        log_from, loss_since_log = 0, 0.0
        # dropout draws from here: seeded per rank so the processes do not share masks
        torch.manual_seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        if state is not None:
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
            # the training loss of the steps since the last log row: the first row after resuming averages
            # the same steps, with the same values, as it would have without the stop
            log_from, loss_since_log = int(state.get("log_from", step)), float(state.get("loss_since_log", 0.0))
            tokens_seen = int(state.get("tokens", 0))
            rngs = state["rng"]
            if len(rngs) == d.world:
                _set_rng_state(rngs[d.rank])
            else:
                per_process = cfg.batch_size * cfg.seq_len * cfg.grad_accum
                say(f"note: the checkpoint was written by {len(rngs)} processes, this run has {d.world}: each "
                    f"step now trains on {per_process * d.world:,} tokens instead of {per_process * len(rngs):,} "
                    "(the batch is per process), and random states are reseeded, so dropout masks differ "
                    "from the original run")
            saved_print = state.get("data_fingerprint")
            if d.main and saved_print is not None and saved_print != fingerprint:
                say(f"warning: the data ({corpus.name}) is not the data this run trained on (its bytes differ from "
                    "those the checkpoint recorded): the run goes on, but its batches from here are not the ones "
                    "it would have seen, so it will not match an uninterrupted run")
            if cfg.stop_at is not None and cfg.stop_at <= step:
                raise TrainingError(f"--stop-at {cfg.stop_at}: the checkpoint is already at step {step}; a resumed "
                                    "run can only stop later")
            say(f"resumed from {ckpt_path} at step {step}")
            if step >= cfg.steps:
                say(f"note: the checkpoint is at step {step}, the last of its run: nothing left to train (the run's "
                    "length, which its learning-rate schedule ends at, cannot change on resume)")
            del state

        model = raw_model
        if cfg.compile:
            model = torch.compile(model)
        # The step: a recorded CUDA graph where possible; under several processes, gradients averaged in buckets
        # of a flat buffer, recorded with the backward ("flat", what a graph needs), or by DDP ("ddp").
        why_not = CudaGraphStep.unsupported(cfg, d.device, amp_dtype) if cfg.cuda_graph else "--no-cuda-graph"
        # (torch.compile under several processes goes through DDP: the flat buffer's path is not tried with it)
        flat = d.world > 1 and (cfg.data_parallel == "flat"
                                or (cfg.data_parallel == "auto" and why_not is None and not cfg.compile))
        if flat and (amp_dtype == torch.float16 or cfg.compile):
            raise TrainingError("--data-parallel flat runs without fp16 loss scaling or torch.compile; "
                                "use --data-parallel ddp")
        grad_params = [p for p in raw_model.parameters() if p.requires_grad]
        # Our kernels key their dropout masks from a seed base; PyTorch's dropout draws from its own generator
        triton_dropout = cfg.dropout > 0 and cfg.use_triton
        if flat:
            import torch.distributed as dist

            for p in raw_model.parameters():  # every process starts from rank 0's weights, as DDP would
                dist.broadcast(p.data, 0)
            graphed = CudaGraphStep(model, grad_params, amp_dtype, start_average=lambda t: _start_average(t, d),
                                    record=why_not is None, micro_batches=cfg.grad_accum, dropout=triton_dropout)
        elif why_not is None and d.world == 1:
            graphed = CudaGraphStep(model, grad_params, amp_dtype, micro_batches=cfg.grad_accum,
                                    dropout=triton_dropout)
        elif d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        # Eager steps key their dropout masks as a recorded step does (CudaGraphStep: one seed per micro-batch
        # into a base, the forward inside replayable_seeds), so whether a step is replayed changes no mask.
        # (torch.compile traces the forward; there dropout keeps drawing a seed per call. PyTorch's own dropout
        # reads no base: it draws from its generator, recorded or not.)
        seed_base = (torch.zeros(1, dtype=torch.int64, device=d.device)
                     if graphed is None and triton_dropout and not cfg.compile else None)
        if graphed is None or not graphed.record:
            if d.device.type == "cuda" and cfg.cuda_graph:
                say(f"note: each step runs eagerly, not as a CUDA graph ({why_not or 'DDP'})")

        n_params = sum(p.numel() for p in raw_model.parameters())
        if hasattr(raw_model, "flops_per_token"):  # the model's own count (the same formula)
            fpt = float(raw_model.flops_per_token(cfg.seq_len, training=True))
        else:
            fpt = flops_per_token(matmul_params(raw_model), cfg.depth, cfg.seq_len, cfg.heads * cfg.dim_head)
        peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world
        prompt = sample_prompt(corpus, cfg)
        sample_len = max(0, min(cfg.sample_len, cfg.seq_len - len(prompt)))  # 0: no samples

        # ---- outputs (rank 0 only)
        out = Path(cfg.out_dir)
        log_path, ckpt_path_out = out / "log.jsonl", out / "ckpt.pt"
        if d.main:
            try:  # a file in the way, a read-only place: one clear line before any training, not a traceback
                out.mkdir(parents=True, exist_ok=True)
                kept = []
                if step > 0 and log_path.exists():  # drop rows a crashed run wrote after its last checkpoint
                    kept = [ln for ln in log_path.read_text().splitlines() if _log_step(ln) <= step]
                elif (out / "ckpt.pt").exists() and step == 0:
                    say(f"note: {out} holds a checkpoint; starting afresh and overwriting it (--resume continues it)")
                log_path.write_text("".join(k + "\n" for k in kept))
            except (FileExistsError, NotADirectoryError):
                raise TrainingError(f"--out-dir {out}: it, or a folder above it, is a file, not a directory") from None
            except OSError as err:
                raise TrainingError(f"cannot write the run's log and checkpoint in {out} "
                                    f"({err.strerror or err}); choose another --out-dir") from None
            say(f"{corpus} · model {n_params / 1e6:.2f}M parameters · {tokens_per_step:,} tokens/step · "
                f"{'triton' if cfg.use_triton else 'pytorch'} path{' + torch.compile' if cfg.compile else ''} · "
                f"{str(amp_dtype or torch.float32).replace('torch.', '')} · {d.device}"
                f"{f' x {d.world} processes' if d.world > 1 else ''}")
            if cfg.use_triton and d.device.type == "cuda":
                # Without this line the bar sits at step 0 for minutes on a fresh machine, like a hang.
                say("the first steps compile and autotune the Triton kernels for this GPU: minutes on a fresh "
                    "machine, seconds once Triton's cache (~/.triton) holds them")

        rows, samples = [], []
        # the loss window starts at the last log row (before a stop, when resumed); the clock at this step
        last = dict(step=log_from, clock_step=step, time=time.perf_counter())
        t_start = time.perf_counter()
        steady, intervals = dict(tokens=0, time=0.0), 0
        loss_sum = torch.full((), loss_since_log, device=d.device)
        train_loss = val_loss = tps = mfu = None
        interrupted = False

        def checkpoint_state() -> dict:
            rngs = [_rng_state()]
            if d.world > 1:
                import torch.distributed as dist

                rngs = [None] * d.world
                dist.all_gather_object(rngs, _rng_state())
            # the loss summed since the last log row (averaged over processes, as the log row will be)
            since_log = _all_reduce(loss_sum.clone(), d).item()
            return {"format": "triton_transformer.training/1", "step": step, "config": dataclasses.asdict(cfg),
                    "log_from": last["step"], "loss_since_log": since_log,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                    "tokens": tokens_seen, "elapsed": elapsed_before + time.perf_counter() - t_start,
                    "world_size": d.world, "data_fingerprint": fingerprint}

        def save():
            st = checkpoint_state()  # every rank takes part in gathering the random states
            if d.main:
                save_checkpoint(st, ckpt_path_out)

        def pause():
            """Time spent evaluating, sampling or saving is not training time: stop the tokens/s clock."""
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            return time.perf_counter()

        bar = _progress_bar(total=cfg.steps, initial=step, disable=not (d.main and cfg.progress), dynamic_ncols=True,
                            mininterval=1.0, desc="train")
        with _StopRequest(say, step_aside=d.world == 1) as stop:
            while step < cfg.steps:
                step_loss, grad_norm = train_step(model, optimizer, scheduler, scaler, corpus.train, cfg, d, amp,
                                                  step, grad_params, graphed, seed_base)
                loss_sum += step_loss
                step += 1
                tokens_seen += tokens_per_step
                bar.update(1)

                # ---- around the step
                final = step == cfg.steps
                do_eval = final or bool(cfg.eval_every and step % cfg.eval_every == 0)
                do_sample = sample_len > 0 and (final or bool(cfg.sample_every and step % cfg.sample_every == 0))
                # (a stop between log rows writes none: the checkpoint carries the loss since the last row, and
                # the resumed run's next row is the one the uninterrupted run writes)
                do_log = do_eval or do_sample or step % cfg.log_every == 0
                row = None
                if do_log:
                    # .item() waits for the GPU: the only synchronisation in a logged step replayed as a CUDA
                    # graph (an eager step also waits in tt.cross_entropy for its bad-target count)
                    train_loss = _all_reduce(loss_sum, d).item() / (step - last["step"])
                    loss_sum.zero_()
                    now = time.perf_counter()
                    tps = (step - last["clock_step"]) * tokens_per_step / (now - last["time"])
                    intervals += 1
                    if intervals > 1:  # the first interval holds compilation and warm-up: not steady state
                        steady["tokens"] += (step - last["clock_step"]) * tokens_per_step
                        steady["time"] += now - last["time"]
                    mfu = fpt * tps / (peak * d.world) if peak else None
                    # this step's gradient norm before clipping (the same on every process: after the all-reduce);
                    # an fp16 step skipped for overflow has none
                    norm = grad_norm.item() if grad_norm is not None else math.nan
                    row = {"step": step, "loss": round(train_loss, 5), "val_loss": None, "val_bpb": None,
                           "lr": scheduler.get_last_lr()[0], "grad_norm": round(norm, 5) if math.isfinite(norm) else None,
                           "tokens_per_s": round(tps, 1),
                           "mfu": round(mfu, 4) if mfu is not None else None, "tokens": tokens_seen,
                           "time": round(elapsed_before + now - t_start, 3)}
                    last.update(step=step, clock_step=step, time=now)
                    bar.set_postfix_str(f"loss {train_loss:.3f} · {tps:,.0f} tok/s"
                                        + (f" · MFU {mfu:.1%}" if mfu is not None else ""), refresh=False)
                paused = None
                if do_eval:
                    paused = pause()
                    val_loss = evaluate(raw_model, corpus, cfg, d, amp)
                    row.update(val_loss=round(val_loss, 5), val_bpb=round(val_loss / math.log(2), 5))
                    say(f"step {step}: train loss {train_loss:.4f} · val loss {val_loss:.4f} "
                        f"= {val_loss / math.log(2):.4f} bits/byte")
                if do_sample and d.main:
                    paused = paused or pause()
                    text = generate_text(raw_model, prompt, sample_len, cfg, d.device, amp)
                    samples.append({"step": step, "prompt": prompt.decode("utf-8", errors="replace"), "text": text})
                    row.update(prompt=samples[-1]["prompt"], sample=text)
                    say(f"--- sample at step {step} ---\n{prompt.decode('utf-8', errors='replace')}"
                        f"\u2502{text}\n---")
                if row is not None and d.main:
                    rows.append(row)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                # Stop where every process stops at the same step: a single process checks its flag every
                # step; under DDP the processes agree (a collective) at logged steps, which all of them share.
                stop_now = step == cfg.stop_at
                if d.world == 1:
                    stop_now |= stop.requested
                elif do_log:
                    flag = torch.tensor([float(stop.requested)], device=d.device)
                    stop_now |= bool(_all_reduce(flag, d, "max").item())
                if final or stop_now or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                    paused = paused or pause()
                    save()
                    if stop_now and not final:
                        interrupted = True
                        say(f"stopped at step {step}; checkpoint {ckpt_path_out} (continue with --resume)")
                        break
                if paused is not None:
                    last["time"] += time.perf_counter() - paused
        tps_steady = steady["tokens"] / steady["time"] if steady["time"] > 0 else tps
        mfu_steady = fpt * tps_steady / (peak * d.world) if peak and tps_steady else None
        return TrainResult(step=step, train_loss=train_loss, val_loss=val_loss,
                           val_bpb=val_loss / math.log(2) if val_loss is not None else None,
                           tokens_per_s=tps_steady, mfu=mfu_steady, flops_per_token=fpt, params=n_params,
                           interrupted=interrupted, dtype=str(amp_dtype or torch.float32).replace("torch.", ""),
                           log=rows, samples=samples,
                           log_path=log_path if d.main else None,
                           checkpoint=ckpt_path_out if d.main else None, config=cfg)
    finally:
        if bar is not None:
            bar.close()
        if graphed is not None:
            try:
                graphed.release()
            except Exception as err:  # never in place of the error that ended the run, if one did
                print(f"train: freeing the step's CUDA graph failed: {type(err).__name__}: {err}", file=sys.stderr)


# ============================================================================ benchmark rows and logs

TRAIN_LOGS_DIR = REPO_ROOT / "benchmarks" / "results" / "train_logs"


def train_run_row(result: TrainResult, provider: str, gpus: int = 1) -> dict:
    """A results row (benchmarks/results/*.jsonl's format) for one training run (kernel "train_run", pass "fwdbwd")."""
    from . import bench

    cfg = result.config
    tps = result.tokens_per_s
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * gpus
    return {
        "kernel": "train_run", "pass": "fwdbwd",
        "shape": [cfg.batch_size * cfg.grad_accum * gpus, cfg.seq_len, cfg.dim, cfg.depth, NUM_TOKENS],
        "dtype": result.dtype, "provider": provider,
        "ms": round(1e3 * tokens_per_step / tps, 3) if tps else None,  # per optimizer step
        "GBps": None,
        "TFLOPs": round(result.flops_per_token * tps / 1e12, 1) if tps else None,
        "val_loss": round(result.val_loss, 5) if result.val_loss is not None else None,
        "val_bpb": round(result.val_bpb, 5) if result.val_bpb is not None else None,
        "tokens_per_s": round(tps, 1) if tps else None,
        "mfu": round(result.mfu, 4) if result.mfu is not None else None,
        "steps": result.step, "gpus": gpus, "grad_accum": cfg.grad_accum, "seed": cfg.seed, "data": cfg.data,
        "params": result.params, "heads": cfg.heads, "dim_head": cfg.dim_head,
        **bench.versions(),
    }


def run_dir(out_root: str | os.PathLike, provider: str) -> Path:
    """Where `benchmark` puts one provider's log and checkpoint: <out_root>/<provider, dots and spaces as
    underscores>."""
    return Path(out_root) / _log_stem(provider).replace(".", "_")


def _log_stem(provider: str) -> str:
    """A provider's name in a committed training log's file name: spaces as underscores (`committed_logs` reads
    them back)."""
    return provider.replace(" ", "_")


def benchmark(provider: str, cfg: TrainConfig | None = None, *, record: bool = True, out_root: str = "runs/bench",
              scaling: bool = False, **overrides) -> dict:
    """Train `cfg` from scratch with one provider; return its train_run row (appended to the results if `record`).

    The run's log is copied to benchmarks/results/train_logs/<gpu>/<provider>.jsonl
    when recorded, so the chapter can plot the curves on a machine without a GPU.
    """
    from . import bench

    if provider not in PROVIDERS:
        raise TrainingError(f"provider {provider!r}: choose from {list(PROVIDERS)}")
    cfg = dataclasses.replace(cfg or TrainConfig(), **overrides, **PROVIDERS[provider],
                              out_dir=str(run_dir(out_root, provider)), stop_at=None)
    result = train(cfg)
    if result.interrupted:
        raise TrainingError(f"the {provider} run stopped at step {result.step} of {cfg.steps}: no results row "
                            "recorded (a benchmark row needs the whole run)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    row = train_run_row(result, provider, gpus=world)
    if scaling:
        row["scaling"] = True
    if record and result.log_path is not None:  # rank 0
        bench.append([row])
        # scaling runs (scripts/scaling.sh) are kept apart from the provider comparison's logs
        stem = _log_stem(provider)
        name = f"scaling/{stem}_{world}gpus_accum{cfg.grad_accum}.jsonl" if scaling else f"{stem}.jsonl"
        dest = TRAIN_LOGS_DIR / bench.results_file(row["gpu"]).stem / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(Path(result.log_path).read_text())
    if result.log_path is not None:
        print(f"{provider}: val loss {row['val_loss']} ({row['val_bpb']} bits/byte), {row['tokens_per_s']} tokens/s"
              + (f", MFU {row['mfu']:.1%}" if row["mfu"] else ""))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def compare(cfg: TrainConfig | None = None, providers=tuple(PROVIDERS), *, record: bool = True,
            out_root: str = "runs/bench", scaling: bool = False, **overrides):
    """Train the same configuration (seed, data, steps) once per provider, one after the other; return the rows."""
    return [benchmark(p, cfg, record=record, out_root=out_root, scaling=scaling, **overrides) for p in providers]


def read_log(path: str | os.PathLike) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def committed_logs(gpu: str | None = None) -> tuple[str | None, dict[str, list[dict]]]:
    """(gpu, {provider: rows}) of the training logs committed under benchmarks/results/train_logs/."""
    if not TRAIN_LOGS_DIR.is_dir():
        return None, {}
    dirs = sorted(p for p in TRAIN_LOGS_DIR.iterdir() if p.is_dir() and (gpu is None or p.name == gpu))
    if not dirs:
        return None, {}
    logs = {p.stem.replace("_", " "): read_log(p) for p in sorted(dirs[0].glob("*.jsonl"))}
    return dirs[0].name, logs


def scaling_runs(gpu: str | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Committed data-parallel scaling runs (``scripts/scaling.sh``): their train_run rows and logs, by name."""
    from . import bench

    rows = [r for r in bench.load("train_run", gpu=gpu) if r.get("scaling")]
    logs = {}
    for path in sorted(TRAIN_LOGS_DIR.glob("*/scaling/*.jsonl")) if TRAIN_LOGS_DIR.is_dir() else []:
        if gpu is None or path.parent.parent.name == bench.results_file(gpu).stem:
            logs[path.stem] = read_log(path)
    return rows, logs


def plot_curves(logs: dict[str, list[dict]], title: str = ""):
    """Training loss and validation bits per byte against step, one line per provider (the book's colours)."""
    import matplotlib.pyplot as plt

    from .bench import PROVIDER_COLORS

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in logs.items():
        color = PROVIDER_COLORS.get(name)
        tr = [r for r in rows if r.get("loss") is not None]
        va = [r for r in rows if r.get("val_bpb") is not None]
        a.plot([r["step"] for r in tr], [r["loss"] / math.log(2) for r in tr], label=name, color=color, lw=1)
        b.plot([r["step"] for r in va], [r["val_bpb"] for r in va], "o-", label=name, color=color, ms=3)
    a.set_title("training loss", fontsize=10)
    b.set_title("validation loss", fontsize=10)
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ============================================================================ command line

def argument_parser() -> argparse.ArgumentParser:
    """train.py's options. Defaults of None mean "from TrainConfig", or from the tiny CPU preset without a GPU."""
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a causal byte-level GPT built from triton_transformer's kernels.",
        epilog="examples:\n"
               "  python train.py                          # stdlib sources, seed config, 2000 steps\n"
               "  python train.py --data enwik8 --steps 20000\n"
               "  python train.py --resume                 # continue runs/gpt/ckpt.pt exactly\n"
               "  torchrun --nproc_per_node=8 train.py     # data parallel, one process per GPU\n"
               "  python train.py --bench --steps 2000     # triton vs torch, torch.compile, each also graphed")
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'stdlib' (default: this Python's standard library sources), 'enwik8' "
                                  "(downloaded, checksummed, cached), or the path of a text file")
    g.add_argument("--cache-dir", help=f"where corpora are cached (default {default_cache_dir()})")
    g = p.add_argument_group("model")
    for name in ("dim", "depth", "heads", "dim-head", "seq-len", "ff-mult"):
        g.add_argument(f"--{name}", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--use-triton", action=B, help="Triton kernels (default on a GPU) or the PyTorch path")
    g.add_argument("--compile", action=B, help="torch.compile the model")
    g.add_argument("--cuda-graph", action=B, help="replay each step as a CUDA graph (default on where possible)")
    g.add_argument("--data-parallel", choices=["auto", "flat", "ddp"],
                   help="under torchrun: a flat gradient buffer averaged in buckets as the backward finishes them "
                        "(flat, which a CUDA graph can record) or DistributedDataParallel (ddp); auto picks flat "
                        "when the step is a graph")
    g = p.add_argument_group("optimisation")
    for name in ("batch-size", "grad-accum", "steps", "warmup-steps", "seed", "stop-at"):
        g.add_argument(f"--{name}", type=int)
    for name in ("lr", "min-lr-ratio", "weight-decay", "beta1", "beta2", "grad-clip"):
        g.add_argument(f"--{name}", type=float)
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"])
    g = p.add_argument_group("evaluation, logging, checkpoints")
    for name in ("eval-every", "eval-batches", "sample-every", "sample-len", "prompt-len", "top-k", "log-every",
                 "ckpt-every"):
        g.add_argument(f"--{name}", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--out-dir", help="log.jsonl and ckpt.pt go here (default runs/gpt)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue exactly from OUT_DIR/ckpt.pt, or from CKPT (a file, or a run's directory; the "
                        "run continues there)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT_DIR that already holds a run (without it, train.py refuses)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"])
    g.add_argument("--progress", action=B, help="show the progress bar")
    g = p.add_argument_group("benchmark")
    g.add_argument("--bench", action="store_true", help="train once per provider and append train_run rows to "
                                                        "benchmarks/results/<gpu>.jsonl")
    g.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS),
                   help="which to train (quote the graphed ones: --providers triton 'torch.compile graph')")
    g.add_argument("--no-record", action="store_true", help="with --bench: print the rows, write nothing")
    g.add_argument("--scaling", action="store_true", help="with --bench: a data-parallel scaling run "
                                                          "(scripts/scaling.sh), kept apart from the comparison")
    return p


def _silent(*args, **kwargs):
    pass


def config_from_args(args: argparse.Namespace, say=print) -> TrainConfig:
    """TrainConfig from parsed options: the defaults on a GPU; without one, the tiny CPU preset (said out loud)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if given.get("device") == "cuda" and runtime.DEVICE.type != "cuda":
        if runtime.HAS_CUDA:  # a GPU, but the kernels were sent to the interpreter
            raise TrainingError("--device cuda, but TRITON_INTERPRET=1 is set, so the kernels run on the CPU; unset "
                                "it to train on the GPU")
        raise TrainingError("--device cuda, but no CUDA GPU is available (without --device, train.py trains a tiny "
                            "configuration on the CPU)")
    on_gpu = runtime.DEVICE.type == "cuda" and given.get("device") != "cpu"
    if on_gpu:
        cfg = TrainConfig(**given)
        cfg.explicit = set(given)  # what the user asked for: --resume warns when it cannot honour these
        return cfg
    preset = {k: v for k, v in TINY.items() if k not in given}
    use_triton = given.get("use_triton", False)
    why = "--device cpu" if runtime.DEVICE.type == "cuda" else "No CUDA GPU found"
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        say = _silent
    if getattr(args, "resume", None):  # the checkpoint's configuration replaces the preset (_merge_resume_config)
        say(f"{why}: resuming on the CPU with the checkpoint's configuration"
            + (" (the Triton kernels run in Triton's slow CPU interpreter)." if use_triton else
               " (a run trained on the Triton path resumes on it, in Triton's slow CPU interpreter)."))
    else:
        say(f"{why}: training a tiny configuration on the CPU "
            f"(dim {given.get('dim', TINY['dim'])}, depth {given.get('depth', TINY['depth'])}, "
            f"seq {given.get('seq_len', TINY['seq_len'])}, {given.get('steps', TINY['steps'])} steps) with "
            + ("the Triton kernels in Triton's CPU interpreter (slow)." if use_triton else
               "the PyTorch path (use_triton=False; --use-triton runs the Triton kernels in the slow interpreter).")
            + " This checks the pipeline end to end; real training needs a GPU.")
    cfg = TrainConfig(**{**preset, **given, "device": "cpu"})
    cfg.explicit = set(given)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # matrices this small: more threads only add synchronisation (and spin-waits)
    return cfg


def main(argv=None) -> int:
    """Entry point of train.py. User errors (TrainingError) exit with a message, never a traceback."""
    args = argument_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.bench:
            if args.resume:
                raise TrainingError("--bench trains from scratch; it cannot --resume")
            if cfg.device == "cpu" and not args.no_record:
                raise TrainingError("--bench records GPU throughput and needs a CUDA GPU (--no-record to try it "
                                    "on the CPU anyway)")
            compare(cfg, providers=args.providers, record=not args.no_record, scaling=args.scaling)
        else:
            run = None  # the directory of the run --resume PATH continues
            if args.resume not in (None, True):
                # --resume PATH continues the run where it was written (not in the default runs/gpt, whose own
                # checkpoint and log it would replace), unless --out-dir says where
                run = checkpoint_file(args.resume).parent
                if args.out_dir is None:
                    cfg.out_dir = str(run)
            existing = Path(cfg.out_dir) / "ckpt.pt"
            same_run = args.resume is True or (run is not None and Path(cfg.out_dir).resolve() == run.resolve())
            if not same_run and not args.overwrite and existing.exists():
                raise TrainingError(f"{cfg.out_dir} already holds a run ({existing}): --resume continues it, "
                                    "--out-dir DIR starts a new run elsewhere, --overwrite replaces it")
            result = train(cfg, resume=args.resume)
            if result.log_path is not None and result.val_bpb is not None and not result.interrupted:
                print(f"done: step {result.step}, val {result.val_bpb:.4f} bits/byte; log {result.log_path}, "
                      f"checkpoint {result.checkpoint}")
            if result.interrupted and result.step != result.config.stop_at:
                return 130  # stopped by Ctrl-C or SIGTERM (saved, resumable): not a success for a script's `&&`
    except TrainingError as err:
        raise SystemExit(f"train.py: error: {err}") from None
    except KeyboardInterrupt:
        print("train.py: interrupted (no checkpoint written for the unfinished step)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        shutdown_distributed()
    return 0
