"""Is Python slower inside a Jupyter kernel than in a script on the lent GPU machines? (GPU)

    python3 benchmarks/experiments/nbhost.py

The same host-bound calls (softmax and layer norm forward+backward) timed three ways: in this
process, in a Jupyter kernel started by nbclient (as scripts/execute_notebooks.py runs the
chapters), and in such a kernel that cannot import debugpy (ipykernel then runs without its debugger).

Asked because a chapter run measured our host-bound rows 1.5-2.5x slower than benchmarks/run.py did
minutes later on the same machine. Answer (H100 machine, Python 3.12, ipykernel 7.4, debugpy 1.8.22):
no. Layer norm forward+backward took 380 us of host time per call in the script, 193 in the kernel
and 264 in the kernel without debugpy; softmax's 100, 87 and 120 us. The lent machine's host is
noisy from one process to the next; the notebook itself costs nothing measurable.
"""
import os
import sys
import tempfile
import textwrap

CODE = textwrap.dedent('''
    import sys, time, torch, triton.testing
    import triton_transformer as tt
    torch.autograd.set_multithreading_enabled(False)
    mon = getattr(sys, "monitoring", None)
    tools = [mon.get_tool(i) for i in range(6)] if mon else None
    print("gettrace", sys.gettrace(), "| monitoring tools", tools, "| debugpy loaded", "debugpy" in sys.modules)
    dev = "cuda"
    xs = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True); dys = torch.randn_like(xs)
    x = torch.randn(16384, 768, device=dev, dtype=torch.bfloat16, requires_grad=True); dy = torch.randn_like(x)
    w = torch.ones(768, device=dev, dtype=torch.bfloat16, requires_grad=True); b = torch.zeros_like(w, requires_grad=True)
    def loop(n=300):
        s = 0
        for i in range(n * 1000):
            s += i
        return s
    cases = {"softmax": (lambda: tt.softmax(xs).backward(dys), [xs]),
             "layer_norm": (lambda: tt.layer_norm(x, (768,), w, b).backward(dy), [x, w, b]),
             "torch_ln": (lambda: torch.nn.functional.layer_norm(x, (768,), w, b).backward(dy), [x, w, b])}
    t0 = time.perf_counter(); loop(); print(f"pure-Python loop {1e3 * (time.perf_counter() - t0):.1f} ms")
    for name, (fn, grads) in cases.items():
        for _ in range(30):
            fn()
            for t in grads: t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(300):
            fn()
            for t in grads: t.grad = None
        host = (time.perf_counter() - t0) / 300
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median")
        print(f"{name}: host {1e6 * host:.1f} us/call, do_bench {1e3 * ms:.1f} us")
''')


def in_kernel(extra_path=None):
    import nbclient
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(CODE)]
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3")
    with client.setup_kernel(env=env):  # starts the kernel with this environment, shuts it down after
        client.execute_cell(nb.cells[0], 0)
    return "".join(o.get("text", "") for o in nb.cells[0].outputs if "text" in o) or str(nb.cells[0].outputs)[:2000]


if __name__ == "__main__":
    print("== script", flush=True)
    exec(CODE)
    print("== jupyter kernel", flush=True)
    print(in_kernel(), flush=True)
    shim = tempfile.mkdtemp()
    os.makedirs(os.path.join(shim, "debugpy"))
    with open(os.path.join(shim, "debugpy", "__init__.py"), "w") as f:
        f.write("raise ImportError('debugpy disabled for this kernel')\n")
    print("== jupyter kernel without debugpy", flush=True)
    print(in_kernel(shim), flush=True)
