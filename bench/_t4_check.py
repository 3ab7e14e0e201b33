"""The emulation of bench/_t4_emulation.py checked against CUDA's own autocast kernels: a forward runs on fake
CUDA tensors (CUDA autocast's kernels run on them even in a CPU-only torch; autograd does not, hence the
emulation) and on fake CPU tensors under the emulation, and every op that computes must give the same output
dtypes in the same order.

    result = check_against_cuda_autocast(run_forward)   # run_forward(device) builds and runs the forward
    result["mismatches"] == []

Two things a CPU-only torch needs for the CUDA run: `torch.autocast("cuda")` turns itself off without CUDA,
so `fp16_autocast` sets the autocast state directly; and Tensor.__getitem__ and .contiguous() take a CUDA
device guard in their Python bindings before dispatching, so on fake CUDA tensors they go through aten ops.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten

from _t4_emulation import cuda_autocast_on_cpu, t4_attention


# ops that only view or describe a tensor: same dtype in, same out, so they say nothing about casting (and
# `_getitem_by_ops` below reaches some indexings by other views than C++ does)
_VIEWS = {"device", "dim", "sym_size", "sym_stride", "view", "_unsafe_view", "alias", "slice", "select", "unsqueeze",
          "squeeze", "expand", "transpose", "t", "permute", "as_strided", "detach", "_reshape_alias", "split",
          "split_with_sizes", "unbind", "narrow", "lift_fresh"}


class DtypeTrace(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, output dtypes) of every aten op that computes (below autocast: the casts are `_to_copy`)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            dtypes = tuple(str(t.dtype).removeprefix("torch.") for t in tree_flatten(out)[0]
                           if isinstance(t, torch.Tensor))
            self.ops.append((name, dtypes))
        return out


@contextlib.contextmanager
def fp16_autocast(device: str):
    """`torch.autocast(device, torch.float16)`; for "cuda" on a CPU-only torch (which turns torch.autocast off
    there, with a warning) the same state set directly: enabled, fp16, one nesting level."""
    if device != "cuda" or torch.cuda.is_available():
        with torch.autocast(device, dtype=torch.float16):
            yield
        return
    prev, prev_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.float16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev)
        torch.set_autocast_dtype("cuda", prev_dtype)


def _getitem_by_ops(t: torch.Tensor, index):
    """`t[index]` through aten ops, for fake CUDA tensors on a CPU-only torch (Tensor.__getitem__'s C++ code
    takes a CUDA device guard first, which such a torch cannot make): ints, slices, None, Ellipsis and one
    integer tensor index last, as torch's indexing applies them."""
    index = index if isinstance(index, tuple) else (index,)
    real = sum(i is not None and i is not Ellipsis for i in index)
    out, dim = t, 0
    for k, i in enumerate(index):
        if i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif i is Ellipsis:
            dim += t.dim() - real
        elif isinstance(i, slice):
            start, stop, step = i.indices(out.shape[dim])
            if (start, stop, step) != (0, out.shape[dim], 1):
                out = torch.ops.aten.slice.Tensor(out, dim, start, stop, step)
            dim += 1
        elif isinstance(i, torch.Tensor) and i.dim() > 0 and k == len(index) - 1:
            out = torch.ops.aten.index.Tensor(out, [None] * dim + [i])
        else:
            out = out.select(dim, int(i))
    return out


def _contiguous_by_ops(t: torch.Tensor, memory_format=torch.contiguous_format):
    return torch.ops.aten.contiguous.default(t, memory_format=memory_format)


# Tensor methods whose Python bindings take a device guard before dispatching (so fail on fake CUDA tensors
# of a CPU-only torch), and the same through the dispatcher
_BY_OPS = {"__getitem__": _getitem_by_ops, "contiguous": _contiguous_by_ops}


@contextlib.contextmanager
def _fake_cuda_methods():
    originals = {name: getattr(torch.Tensor, name) for name in _BY_OPS}

    def routed(name):
        def method(self, *args, **kwargs):
            fn = _BY_OPS[name] if self.device.type == "cuda" else originals[name]
            return fn(self, *args, **kwargs)
        return method

    try:
        for name in _BY_OPS:
            setattr(torch.Tensor, name, routed(name))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def check_against_cuda_autocast(run_forward, *, emulate: bool = True) -> dict:
    """`run_forward(device)` builds fake inputs on `device` and runs a forward under `fp16_autocast(device)`.
    It runs twice: on "cuda" with CUDA's own autocast kernels, and on "cpu" under the emulation (emulate=False:
    under CPU autocast's own policy). Returns {"ops": number compared, "casts": `_to_copy` ops, "mismatches":
    the first few (index, cuda, emulated)}; an empty mismatch list means every op that computes gave the
    same dtypes in the same order."""
    traces = {}
    for device in ("cuda", "cpu"):
        trace = DtypeTrace()
        if device == "cuda":
            emulation = _fake_cuda_methods()
        else:  # emulate=False: CPU autocast's own policy, which the check must tell apart
            emulation = cuda_autocast_on_cpu() if emulate else contextlib.nullcontext()
        with emulation, t4_attention((device,)), torch.no_grad():
            with trace:
                run_forward(device)
        traces[device] = trace.ops
    cuda, cpu = traces["cuda"], traces["cpu"]
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(cuda, cpu)) if a != b]
    if len(cuda) != len(cpu):
        mismatches.append((min(len(cuda), len(cpu)), f"{len(cuda)} ops", f"{len(cpu)} ops"))
    return {"ops": len(cuda), "casts": sum(op == "_to_copy" for op, _ in cuda), "mismatches": mismatches[:5]}
