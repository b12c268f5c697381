"""Where the kernels run: the one place that decides between the GPU and the interpreter.

Importing `triton_transformer` imports this module first. Without a CUDA GPU it
sets ``TRITON_INTERPRET=1`` *before* Triton is imported, so every ``@triton.jit``
kernel runs on the CPU under Triton's interpreter (slow, but exact enough to
test). With a GPU the kernels are compiled as usual. Every chapter and test
starts by importing the package, so one notebook runs unchanged on a laptop,
on an H100 and in Colab.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import operator
import os
import sys
import warnings

import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton_transformer: no CUDA GPU, so the kernels must run under Triton's "
            "interpreter, but `triton` was imported before `triton_transformer` without "
            "TRITON_INTERPRET=1. Import triton_transformer first, or set TRITON_INTERPRET=1 "
            "in the environment."
        )
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (must follow the environment variable above)

#: True when kernels run in Triton's CPU interpreter instead of being compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:
    # The interpreter runs kernels as numpy: a kernel's deliberate -inf - -inf (masked lanes of an
    # online max) becomes a numpy RuntimeWarning on stderr, which a compiled kernel never prints.
    # Silence it so a chapter's output is the same on the CPU as on the GPU.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")

#: The device every tensor of a chapter or test is created on.
DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")


def default_dtype() -> torch.dtype:
    """The dtype a chapter benchmarks in: bf16 where the GPU has it, fp16 on older GPUs (T4), fp32 on CPU."""
    if DEVICE.type == "cpu":
        return torch.float32
    return torch.bfloat16 if SUPPORTS_BF16 else torch.float16


def device_name() -> str:
    """A human name for where the kernels run, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU (Triton interpreter)'."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return "CPU (Triton interpreter)"


def device_index(device: torch.device) -> int:
    """The index of a CUDA `device` ("cuda" alone: the current one), the key of the per-GPU caches below."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def cuda_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA `device` (SM count, compute capability), asked
    once per GPU: the query costs microseconds, and launchers consult it at every call."""
    return _cuda_properties(device_index(device))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    props = _cuda_properties(index)
    return props.major, props.minor


def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability (major, minor) of a CUDA `device`: (7, 5) a T4, (8, 0) an A100, (9, 0) an H100.

    Every feature test of the package asks this, cached per GPU: bf16 (8.0), the one-instruction tanh
    (7.5), TMA (9.0), and whether Triton compiles for the GPU at all (7.0)."""
    return _capability(device_index(device))


#: bf16 needs Ampere or newer; the interpreter computes bf16 wrongly (BOOK.md), so never there. Asked of the
#: compute capability, not of ``torch.cuda.is_bf16_supported()``, which says True on a T4 too (PyTorch
#: emulates bf16 there), where Triton's bf16 kernels fail in ptxas ("Feature '.bf16' requires .target sm_80").
SUPPORTS_BF16 = DEVICE.type == "cuda" and capability(DEVICE) >= (8, 0)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 on an H100 SXM), the unit persistent grids are sized in.

    4 under the interpreter, so that each persistent program there still walks several work items.
    """
    if device.type != "cuda":
        return 4
    return cuda_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on a CUDA `device`, as Triton checks a kernel against it
    (227 KB on an H100, 163 KB on an A100, 64 KB on a T4)."""
    return _shared_memory(device_index(device))


#: What `l2_cache_bytes` says under the interpreter: small, so that the CPU tests' little heads already split into
#: several groups of `attention._head_group`.
INTERPRETER_L2_BYTES = 64 * 1024


def l2_cache_bytes(device: torch.device) -> int:
    """Bytes of L2 cache of a CUDA `device` (50 MiB on an H100, 40 on an A100, 4 on a T4); INTERPRETER_L2_BYTES
    elsewhere."""
    if device.type != "cuda":
        return INTERPRETER_L2_BYTES
    return cuda_properties(device).L2_cache_size


def autotune(configs, key, exact_fp32=None, **kwargs):
    """`triton.autotune`, but with one config under the interpreter.

    The interpreter cannot benchmark (``do_bench`` needs a GPU), and more than one
    config makes the autotuner try. The first config of each list is therefore the
    one that must work everywhere, small enough for a T4's 64 KB of shared memory.
    Configs too big for the GPU at hand are skipped by the autotuner itself (it
    catches the out-of-resources error and moves on). ``TT_AUTOTUNE_CONFIGS=N`` keeps the first
    N configs of every list (the test suite uses 2 on a GPU; unset or 0: all).

    ``exact_fp32``, a predicate on configs, names the ones to try when the kernel's dots are exact
    fp32 (its ``PRECISION`` argument is "ieee", see `dot_precision`): see `exact_fp32_pruner`.
    """
    if INTERPRET:
        configs = configs[:1]
    elif int(os.environ.get("TT_AUTOTUNE_CONFIGS", "0")) > 0:
        # tests on a GPU set this: every new shape autotunes, and compiling every config of
        # every kernel for every test shape takes longer than the tests themselves
        configs = configs[: int(os.environ["TT_AUTOTUNE_CONFIGS"])]
    if exact_fp32 is not None:
        # The configs tried depend on PRECISION, so the winner does too: tune each precision on its own
        # (the autotuner's key already separates dtypes, not exact fp32 from TF32).
        key = key if "PRECISION" in key else [*key, "PRECISION"]
        if not INTERPRET:
            kwargs.setdefault("prune_configs_by", {"early_config_prune": exact_fp32_pruner(exact_fp32)})
    if not INTERPRET and "cache_results" in _AUTOTUNE_PARAMETERS:
        # Keep each tuning's winner in Triton's on-disk cache: the next process (the next `python train.py`,
        # each rank of a torchrun job) skips benchmarking every config of every kernel again.
        kwargs.setdefault("cache_results", True)
    if not INTERPRET and "do_bench" in _AUTOTUNE_PARAMETERS:
        kwargs.setdefault("do_bench", _tuning_bench)
    return triton.autotune(configs=configs, key=key, **kwargs)


def exact_fp32_pruner(keep):
    """An autotuner's `early_config_prune`: only the configs `keep` accepts when PRECISION is "ieee".

    Exact fp32 dots have no tensor-core instruction: Triton unrolls them into FMAs on the CUDA
    cores, and compiling that takes 4 to 10 times as long as the bf16 kernel of the same tile.
    Compiled ahead of time for an H100 (sm_90) by Triton 3.9 on two CPU cores
    (benchmarks/experiments/compile_times.py), the attention forward's nine configs took
    169 s in fp32 against 16 s in bf16, the dK/dV kernel's ten 381 s against 33, the matmul's
    eleven 92 s against 24: a first training step in exact fp32 spent many
    minutes compiling tiles that only the tensor cores make worth having. Other precisions keep
    every config; if `keep` accepts none, the first config (the one that runs everywhere) stays.
    """
    def prune(configs, named_args, **kwargs):
        if kwargs.get("PRECISION", named_args.get("PRECISION")) != "ieee":
            return configs
        return [c for c in configs if keep(c)] or configs[:1]

    return prune


_AUTOTUNE_PARAMETERS = inspect.signature(triton.autotune).parameters


def _tuning_bench(kernel_call, quantiles=None, **_):
    """How the autotuner times one config: 5 ms of warm-up and 20 ms of runs.

    Triton's default is 25 ms and 100 ms per config. With ~10 configs per kernel, a dozen kernels and a
    new key per shape, that was minutes before a first training step on the H100; ranking configs
    needs far fewer runs than publishing a number (benchmarks/ times the winners with the full default).
    """
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code.

    `triton.cdiv` computes the same, but it is also callable inside kernels, and that wrapper costs
    ~3 us a call on the host: a few of them per launch were a visible share of a small kernel's time.
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as `triton.next_power_of_2`, without its per-call cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def pow2_at_least_16(n: int) -> int:
    """The smallest power of two >= n and >= 16: a `tl.dot` tile edge, and the sizes autotuning keys round to.

    Autotuners re-tune for every new value of their key; keyed on exact sizes they would re-tune at every
    batch size and at every step of generation, so the kernels take these rounded sizes as key arguments.
    """
    return max(16, next_power_of_2(n))


#: (dtype, device) pairs that have passed `check_tensor`'s device and GPU-capability checks once.
_ACCEPTED: set = set()


def check_tensor(name: str, t: torch.Tensor, *, dtypes=None, device: torch.device | None = None, ndim=None,
                 dot: bool = False) -> None:
    """Raise a clear error when an input is not something our kernels accept.

    Catching these here, in Python, is what turns a crash deep inside Triton (or a
    silently wrong result) into a message that names the problem. `dot`: the tensor goes
    through `tl.dot`, which Triton's interpreter computes wrongly in bf16.

    Every public function checks its inputs on every call, so the common case is one set lookup:
    a tensor whose dtype and device passed the full checks before needs only its own layout checked.
    """
    if isinstance(t, torch.Tensor):
        where = t.device
        if ((t.dtype, where) in _ACCEPTED and (dtypes is None or t.dtype in dtypes)
                and (ndim is None or (t.dim() == ndim if isinstance(ndim, int) else t.dim() in ndim))
                and (device is None or where == device) and (not dot or not INTERPRET)
                and t.layout is torch.strided and not t.is_nested):
            return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {allowed}")
    if dot and INTERPRET and t.dtype is torch.bfloat16:
        # measured: linear and attention off by ~1e10 (torch.autocast("cpu") casts to bf16 by default)
        raise TypeError(f"{name} is bfloat16, which Triton's CPU interpreter multiplies wrongly in tl.dot; use "
                        "float32 or float16 on the CPU (bfloat16 runs on a GPU)")
    where = t.device
    if device is not None and where != device:
        raise ValueError(f"{name} is on {where} but the other inputs are on {device}")
    if where.type == "cuda":
        if INTERPRET:
            raise ValueError(f"{name} is on {where} but Triton runs in interpreter mode (CPU tensors only)")
    elif where.type == "cpu":
        if not INTERPRET:
            raise ValueError(f"{name} is on the CPU; Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)")
    else:  # meta (no data at all), mps, xpu...: memory the kernels, compiled for CUDA, cannot read
        raise ValueError(f"{name} is on {where}; the Triton kernels take CUDA tensors (CPU ones under the interpreter)")
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; the kernels take dense ones (.to_padded_tensor(0), with a mask)")
    if t.layout is not torch.strided:
        raise TypeError(f"{name} is a {str(t.layout).replace('torch.', '')} tensor; the kernels take dense (strided) "
                        "tensors (.to_dense())")
    if t.is_cuda and capability(where) < ((8, 0) if t.dtype is torch.bfloat16 else (7, 0)):
        props = _cuda_properties(t.get_device())
        if props.major < 7:  # what torch.compile says too: Triton has no code generator for older GPUs
            raise RuntimeError(f"{props.name} has compute capability {props.major}.{props.minor}; Triton compiles "
                               "kernels for 7.0 and newer (V100, T4, A100, H100...)")
        # PyTorch emulates bf16 on older GPUs (a T4); Triton compiles it only for sm_80 and newer
        raise TypeError(f"{name} is bfloat16, which the Triton kernels need a GPU of compute capability 8.0 or newer "
                        f"for; {props.name} is {props.major}.{props.minor}: use float16 or float32")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        allowed = ndim if isinstance(ndim, int) else " or ".join(map(str, ndim))
        raise ValueError(f"{name} must have {allowed} dimensions, got shape {tuple(t.shape)}")
    _ACCEPTED.add((t.dtype, where))


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_int(what: str, value) -> int:
    """`value` as a Python int if it is an integer (a numpy or torch integer included, as PyTorch's ops accept),
    else a TypeError naming `what`. A bool is refused: True for a dimension or a seed is a mistake."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {type(value).__name__}")


def positive_int(value) -> int | None:
    """`value` as a Python int if it is an integer >= 1 (numpy and torch integers included), else None: for sizes
    (heads, dimensions), whose callers name the argument and what it must divide in their own error."""
    try:
        n = as_int("", value)
    except TypeError:
        return None
    return n if n >= 1 else None


def as_float(what: str, value) -> float:
    """`value` as a Python float if it is a real number (numpy's, and a 0-dim real tensor, as PyTorch's ops
    take them), else a TypeError naming `what`."""
    if type(value) is float:  # the common case, before the general tests
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
            and not value.is_complex()):
        return float(value)
    raise TypeError(f"{what} must be a float, got {type(value).__name__}")


def shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """`t` viewed as `shape`, without a view op when it already has it (each op costs microseconds of host time).

    The public functions give a Function's (rows, N) result its caller's shape with this, *outside* the
    Function: autograd forbids modifying in place a view that a custom Function created and returned (it
    would bypass the Function's backward), so `y += r` on such a result would raise where PyTorch's works.
    """
    return t if t.shape == shape else t.view(shape)


def no_double_backward(backward):
    """Decorate an autograd.Function's backward whose kernels are not themselves differentiable.

    Under ``torch.autograd.grad(..., create_graph=True)`` (a gradient penalty, a Hessian-vector product)
    autograd runs the backward with gradients enabled and would record nothing of our kernels: the
    second-order terms would be missing from the result without a word. This raises instead.
    """
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{backward.__qualname__.split('.')[0]}: double backward (create_graph=True) is not supported: "
                "the backward's Triton kernels are not differentiable. Use the torch.nn.functional op where a "
                "second derivative is needed.")
        return backward(ctx, *grads)

    return checked


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for inputs of `dtype`: fp32 follows torch's setting, exact fp32
    ("highest", PyTorch's default) or TF32 ("high"/"medium"); 16-bit inputs ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ---------------------------------------------------------------- launching kernels with less Python

try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # an older Triton: no host-side TMA descriptors, none to launch with
    _TensorDescriptor = None


def _spec_source(i: int, kind: type) -> list[str]:
    """Python expressions for what Triton specialises a compiled kernel on, for argument ``a[i]`` of type `kind`.

    Tensors: dtype and 16-byte alignment. Integers: whether they are 1, divisible by 16, and fit in
    32 bits. Floats: nothing beyond their type. This is at least as fine as Triton's own
    specialisation, so two calls with the same key can share one compiled kernel.
    """
    a = f"a[{i}]"
    if issubclass(kind, torch.Tensor):
        return [f"{a}.dtype", f"not {a}.data_ptr() & 15"]
    if _TensorDescriptor is not None and issubclass(kind, _TensorDescriptor):
        # A TMA descriptor: Triton compiles for its dtype and rank (and its block shape, which the
        # autotuned config sets, already in the key); shape and strides are runtime values.
        return [f"{a}.base.dtype", f"len({a}.shape)"]
    if kind is int:
        return [f"{a} == 1", f"not {a} & 15", f"-2147483648 <= {a} < 2147483648"]
    if kind is float:
        return []
    return [a]  # a bool, or anything else: its value


def _key_function(types: tuple, tune_positions: tuple):
    """A function (args, meta) -> the cache key of a call whose arguments have these `types`.

    Written out as one expression per argument and compiled once per argument-type pattern,
    as Triton's own binder is: a loop that inspects each argument's type at every call cost
    microseconds per launch. The key's first value is the CUDA device of the first tensor
    (-1 without one); the autotuner's key values (the sizes it tunes for) end it, since they
    pick the config.
    """
    first = next((i for i, t in enumerate(types) if issubclass(t, torch.Tensor)
                  or (_TensorDescriptor is not None and issubclass(t, _TensorDescriptor))), None)
    exprs = ["-1" if first is None else
             f"a[{first}].get_device()" if issubclass(types[first], torch.Tensor) else f"a[{first}].base.get_device()"]
    for i, kind in enumerate(types):
        exprs += _spec_source(i, kind)
    exprs += [f"a[{i}]" if i < len(types) else f"m.get({name!r})" for name, i in tune_positions]
    namespace: dict = {}
    exec(f"def key(a, m):\n    return ({', '.join(exprs)},)\n", namespace)  # noqa: S102  (our own source)
    return namespace["key"]


#: The current CUDA device's index: torch's own query, without `torch.cuda.current_device`'s Python wrapper.
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


class _Launcher:
    """Launch one kernel, through Triton's own path the first time and a cached one afterwards.

    ``kernel[grid](...)`` re-derives the specialisation, binds arguments and looks
    up its cache on every call: tens of microseconds of Python, as long as a small
    kernel itself runs. Training a GPT launches hundreds of kernels per step, so
    we keep, per specialisation key, the compiled kernel and the tail of its
    argument list that is the same at every call (constexprs, the tuned config,
    defaults), and call its launcher directly. A callable `grid` is given the kernel's
    meta-parameters (constexprs and the tuned config), and its runtime arguments only if it asks for them.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.jit = kernel
        while not isinstance(self.jit, triton.runtime.jit.JITFunction):  # unwrap autotune / heuristics
            self.jit = self.jit.fn
        self.names = list(self.jit.arg_names)
        self.defaults = {p.name: p.default for p in self.jit.params if p.default is not inspect.Parameter.empty}
        # where the autotuner's key arguments sit in a call (len(names): passed by keyword, if at all)
        self.tune_positions = tuple((k, self.names.index(k) if k in self.names else len(self.names))
                                    for k in getattr(kernel, "keys", []))
        self.key_functions: dict = {}
        self.cache: dict = {}

    def _cache_key(self, args: tuple, meta: dict) -> tuple[int, tuple]:
        """(the CUDA device of the first tensor argument, -1 without one; the call's key in `cache`)."""
        types = tuple(map(type, args))
        key_of = self.key_functions.get(types)
        if key_of is None:
            key_of = self.key_functions[types] = _key_function(types, self.tune_positions)
        spec = key_of(args, meta)
        return spec[0], (types, spec, tuple(meta.items()))

    def __call__(self, grid, args: tuple, meta: dict):
        tensors_device, key = self._cache_key(args, meta)
        device = _current_device()
        if tensors_device != device:
            if tensors_device < 0:  # no CUDA tensor among the arguments: Triton's own path says what is wrong
                return self.kernel[grid](*args, **meta)
            # Triton launches on the current device, PyTorch ops run where their tensors are: follow the tensors.
            with torch.cuda.device(tensors_device):
                return self(grid, args, meta)
        hit = self.cache.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **meta)
            config = getattr(self.kernel, "best_config", None)
            consts = {**self.defaults, **meta, **(dict(config.kwargs) if config is not None else {})}
            tail = tuple(consts[n] for n in self.names[len(args):])
            tensors_at = tuple(i for i, kind in enumerate(key[0]) if issubclass(kind, torch.Tensor))
            self.cache[key] = (compiled, consts, tail, tensors_at)
            return compiled
        compiled, consts, tail, tensors_at = hit
        return _run(compiled, *self._grid(grid, consts, args), device, args, tail, tensors_at)

    def _grid(self, grid, consts: dict, args: tuple) -> tuple[int, int, int]:
        """The launch grid as three ints; a callable `grid` is given the kernel's meta-parameters."""
        if callable(grid):
            try:
                grid = grid(consts)
            except KeyError:  # a grid that reads runtime arguments too, Triton's `meta["n_elements"]` idiom
                grid = grid({**consts, **dict(zip(self.names, args))})
        return grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1

    def bound(self, grid, args: tuple, meta: dict):
        """What a call with these arguments launches, once it has been launched: (compiled kernel, the grid's
        three ints, the fixed tail of its arguments, the CUDA device, where its tensors sit), or None."""
        device, key = self._cache_key(args, meta)
        hit = self.cache.get(key)
        if hit is None:
            return None
        compiled, consts, tail, tensors_at = hit
        return (compiled, *self._grid(grid, consts, args), tail, device, tensors_at)


#: Pass the cached launches' tensors to Triton's launcher as their addresses (`_run`).
RAW_POINTERS = True


def _run(compiled, gx: int, gy: int, gz: int, device: int, args: tuple, tail: tuple, tensors_at: tuple = ()):
    """Launch a compiled kernel on the current stream of CUDA `device` with Triton's own launcher: the runtime
    arguments, then the fixed `tail` (constexprs, the tuned config, defaults). No launch hooks.

    The arguments at `tensors_at` (tensors) go as their addresses: Triton's launcher takes an int for a
    pointer as it is, while for a tensor it calls its data_ptr method and asks the driver what kind of
    memory the address is (cuPointerGetAttribute), for every pointer of every launch. That check is for
    a CPU tensor passed by mistake; these calls' tensors were checked by the public functions (CUDA, one
    device) and the same call's first launch went through Triton's own path. Measured on the H100 machines
    (`benchmarks/experiments/host_split.py`): attention's forward+backward, three launches, 270.6 us of host
    time against 285.5 with the tensors handed over as tensors.
    """
    if RAW_POINTERS and tensors_at:
        args = list(args)
        for i in tensors_at:
            args[i] = args[i].data_ptr()
    compiled.run(gx, gy, gz, torch._C._cuda_getCurrentRawStream(device), compiled.function, compiled.packed_metadata,
                 None, None, None, *args, *tail)
    return compiled


def _launcher_takes_all_arguments() -> bool:
    """The cached path passes every argument, constexprs included, as Triton 3.3+ does; check we have that."""
    try:
        return "*bound_args.values()" in inspect.getsource(triton.runtime.jit.JITFunction.run)
    except (OSError, TypeError):
        return False


#: False launches every kernel through Triton's ordinary path (set it to debug, or on an unknown Triton).
FAST_LAUNCH = _launcher_takes_all_arguments()
_launchers: dict = {}


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, with the per-call Python cost cut down after the first call.

    Triton launches on the current CUDA device; PyTorch ops run wherever their tensors are. So a
    kernel whose first tensor argument lives on another GPU is launched with that GPU made current.
    """
    if INTERPRET:
        return kernel[grid](*args, **meta)
    if not FAST_LAUNCH:
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return kernel[grid](*args, **meta)
        return kernel[grid](*args, **meta)
    launcher = _launchers.get(id(kernel))
    if launcher is None:
        launcher = _launchers[id(kernel)] = _Launcher(kernel)
    return launcher(grid, args, meta)


#: Entries a `launch_memo` memo keeps before it starts over (a workload of ever new shapes must not grow it forever).
MEMO_SIZE = 256


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None: skipped) starts on a 16-byte boundary, as `launch_memo` needs."""
    address = 0
    for t in tensors:
        if t is not None:
            address |= t.data_ptr()
    return not address & 15


def launch_from_memo(memo: dict, key, args: tuple):
    """`launch_memo`'s fast half: launch what `memo` holds under `key` with these runtime arguments and return
    the compiled kernel, or return None (nothing launched) when `key` is not there or was launched on another
    device. A caller whose keyword arguments cost time to build tries this first."""
    hit = memo.get(key)
    if hit is None:
        return None
    compiled, gx, gy, gz, tail, device, tensors_at = hit
    if _current_device() != device:
        return None
    return _run(compiled, gx, gy, gz, device, args, tail, tensors_at)


def launch_memo(memo: dict, key, kernel, grid, *args, **meta):
    """`launch`, remembering under the caller's `key` what the call launched, to launch it directly next time.

    `launch` works out at every call what Triton specialises a kernel on: each argument's type and,
    for tensors, dtype and 16-byte alignment, for integers whether they are 1, multiples of 16, 32-bit.
    That is about 5 us of Python a launch on a fast host and 13 on the lent H100 machines this book was
    measured on (`benchmarks/experiments/ln_floor.py`), where a layer norm's forward and backward (three
    launches) take 0.06 ms of GPU time. A caller that knows those facts more cheaply, from the shapes of a
    call it has seen before, names them in `key`: equal keys must mean arguments of the same types, dtypes
    and integer values, and the same grid. Tensor arguments must be 16-byte aligned: callers check the
    ones they did not allocate, and pass no key for a call where one is not. The next call with an equal
    key goes straight to Triton's compiled launcher, on the CUDA device of its first call. `key` None:
    `launch`, nothing remembered.
    """
    if key is None:
        return launch(kernel, grid, *args, **meta)
    compiled = launch_from_memo(memo, key, args)
    if compiled is not None:
        return compiled
    compiled = launch(kernel, grid, *args, **meta)
    if FAST_LAUNCH and not INTERPRET:
        bound = _launchers[id(kernel)].bound(grid, args, meta)
        if bound is not None:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[key] = bound
    return compiled
