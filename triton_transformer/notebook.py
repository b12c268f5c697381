"""Small helpers the chapters call: show the package's own source, print the setup."""

from __future__ import annotations

import inspect

from . import runtime


def source(obj) -> str:
    """The source of a function, class or ``@triton.jit`` kernel, as it is in the package now."""
    fn = getattr(obj, "fn", obj)  # triton.autotune wraps a JITFunction, which wraps the Python function
    fn = getattr(fn, "fn", fn)
    return inspect.getsource(fn)


def show_source(*objs) -> None:
    """Render the package's source of each object as a highlighted code block.

    Chapters show the production kernel this way, read from the package when the
    cell runs, so the book can never drift from the code it documents.
    """
    from IPython.display import Markdown, display

    for obj in objs:
        display(Markdown(f"```python\n{source(obj).rstrip()}\n```"))


def describe_setup() -> str:
    """One line saying where the kernels run, with versions."""
    import torch
    import triton

    return (f"kernels run on: {runtime.device_name()} · torch {torch.__version__} · triton {triton.__version__}"
            f" · benchmark dtype {str(runtime.default_dtype()).replace('torch.', '')}")
