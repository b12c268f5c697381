"""Why do some linear backward tests fail on the GPU? Errors of every stage, fast launch on and off."""
import importlib
import sys

import torch

from triton_transformer import linear, runtime

MM = importlib.import_module("triton_transformer.matmul")
dev = runtime.DEVICE


def case(shape, out, act, fast):
    runtime.FAST_LAUNCH = fast
    torch.manual_seed(0)
    x = torch.randn(shape, device=dev)
    w = torch.randn(out, shape[-1], device=dev) / shape[-1] ** 0.5
    b = torch.randn(out, device=dev)
    x, w, b = (t.to(torch.bfloat16).requires_grad_() for t in (x, w, b))
    y = linear(x, w, b, act)
    try:
        saved = y.grad_fn.saved_tensors[2]
    except RuntimeError as e:
        print("  saved_tensors right after forward:", str(e)[:80], "| grad_fn", type(y.grad_fn).__name__,
              "| ctx attrs", sorted(k for k in dir(y.grad_fn) if not k.startswith('__'))[:40])
        saved = None
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    z64 = torch.nn.functional.linear(x64, w64, b64)
    y64 = {"relu_squared": torch.relu(z64) ** 2, "gelu": torch.nn.functional.gelu(z64, approximate="tanh")}[act]
    y64.backward(dy.double())
    # what the kernels saw: dz from the saved tensor, and dW from that dz
    x2 = x.detach().reshape(-1, shape[-1])
    dz_ref64 = (dy.double() * (2 * torch.relu(z64) if act == "relu_squared" else
                               torch.autograd.functional.vjp(lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
                                                             z64.detach(), torch.ones_like(z64))[1])).reshape(-1, out)
    if saved is None:  # recompute what the forward saved
        z = MM.matmul(x2, w.detach().t(), b.detach(), 0)[0]
        saved = z if act == "gelu" else (torch.relu(z.float()) ** 2).to(z.dtype)
    dz, _ = MM.activation_backward(dy.reshape(-1, out), saved, MM.ACTIVATIONS[act], False)
    dw_from_dz = MM.matmul(dz.t(), x2, out_dtype=torch.bfloat16)[0] if dz is not None else None
    def err(a, r):
        return f"{(a.double() - r.double()).abs().max().item():.4f} (|ref| max {r.abs().max().item():.2f})"
    print(f"{shape}x{out} {act} fast={fast}: y {err(y, y64)} dx {err(x.grad, x64.grad)} dW {err(w.grad, w64.grad)} "
          f"db {err(b.grad, b64.grad)} | dz vs exact {err(dz, dz_ref64)} | dW(bf16 dz) vs exact-dz dW "
          f"{err(dw_from_dz, dz_ref64.t() @ x2.double())} vs its own dz {err(dw_from_dz, dz.double().t() @ x2.double())}")


if __name__ == "__main__":
    print("torch", torch.__version__)
    for fast in (True, False, True):
        case((33, 70), 130, "relu_squared", fast)
        case((1000, 700), 600, "gelu", fast)
        case((1000, 700), 600, "relu_squared", fast)
    try:
        x = torch.randn(5, 16, device=dev, requires_grad=True)
        w = torch.randn(8, 16, device=dev)
        print("saved", [None if t is None else tuple(t.shape) for t in linear(x, w, None, "gelu").grad_fn.saved_tensors])
    except Exception as e:  # noqa: BLE001
        print("saved_tensors:", type(e).__name__, str(e)[:150])
    sys.stdout.flush()
