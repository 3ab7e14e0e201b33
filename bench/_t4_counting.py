"""Counting what a step costs without running it: models of the real size made of fake tensors (shapes and dtypes,
no memory, no values), torch's memory tracker and FLOP counter around the step (bench/t4_budget.py).

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    unet = fake_copy(meta_built_unet, mode)          # every parameter and buffer a fake CPU tensor
    with mode, Counted(unet, optimizer) as counted:  # MemTracker + FlopCounterMode + stand-in values
        step()
    counted.peak_gib(), counted.parts_gib(), counted.tflop()

Models are built on the meta device with the project's own builders (helpers.tiny.shapes.real_size_models:
diffusers' IP-Adapter loader, the text-image block), which takes well under a second, then copied to fake
tensors: FakeTensorMode computes every op's output shape and dtype from torch's meta kernels.
"""

from __future__ import annotations

import gc

import torch
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

GIB = 2**30
PARTS = {"parameters": _MemRefType.PARAM, "buffers": _MemRefType.BUFFER, "gradients": _MemRefType.GRAD,
         "optimizer_state": _MemRefType.OPT, "activations": _MemRefType.ACT, "backward_temporaries": _MemRefType.TEMP,
         "other": _MemRefType.OTH}


def fake_copy(module: torch.nn.Module, mode, device: str = "cpu") -> torch.nn.Module:
    """`module` with every parameter and buffer replaced, in place, by a fake tensor of the same shape, strides,
    dtype and requires_grad on `device` (module.to() cannot swap fake parameters; this sets them directly)."""
    with mode:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device)
                    m._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=device)
    return module


class StandInValues(TorchDispatchMode):
    """Fake tensors hold no values, so reading one (`.item()`, `bool()`) has nothing to read: here it reads True
    for a bool, 1 for an optimizer's step count and 0 otherwise. The branches that ask take their usual way:
    training_step's finite-loss check passes, GradScaler finds no inf (0) and steps, AdamW's bias correction
    1 - beta ** step is not 0, DDIM's `prev_timestep >= 0` holds. No count depends on the values read.

    optimizers: those whose state's "step" tensors are the counts."""

    def __init__(self, *optimizers):
        super().__init__()
        self.optimizers = optimizers

    def _is_step_count(self, t) -> bool:
        return any(t is state.get("step") for opt in self.optimizers for state in opt.state.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype == torch.bool:
                return True
            value = 1 if self._is_step_count(t) else 0
            return float(value) if t.is_floating_point() else value
        return func(*args, **(kwargs or {}))


class FrozenAwareMemTracker(MemTracker):
    """torch's MemTracker with three changes, none to what it counts. It hooks gradients only of parameters
    that require grad: the stock tracker registers a gradient hook on every parameter of every module it sees,
    which raises on a frozen one. A module called again as a root (the UNet in the next denoising step) starts
    new module statistics instead of raising (the stock one asks for `reset_mod_stats` between iterations).
    And it keeps the global peak only: the stock one also updates the peak of every active module after every
    op, a loop over all ~800 modules of the UNet per op (~80% of a step's counting time); only the global
    peak and its parts are read here.

    And before each recomputation of a gradient-checkpointed block it runs Python's cyclic garbage collector.
    The tracker's own module hooks (ModTracker's multi-grad hooks on every module's outputs) put the autograd
    nodes of each recomputed block in reference cycles, which keep that block's recomputed activations alive
    until the collector happens to run: without it the count would vary by a gigabyte from run to run, and
    with the collector off checkpointing would seem to save nothing. A run without the tracker has no such
    cycles (checked on a small checkpointed MLP: collected here, the count is what it is without them)."""

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._track_grad),
                        p.register_post_accumulate_grad_hook(lambda q: self._track_grad(q.grad)))
        return memory

    def _track_grad(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _pre_fw_hook(self, module, inputs) -> None:
        name = self._mod_tracker.get_known_fqn(module)
        seen = module in self.memory_tracking
        if seen and not self._mod_tracker.is_bw and set(self._mod_tracker.parents) - {name} == {"Global"}:
            self.reset_mod_stats()
        if seen and self._mod_tracker.is_bw and self._ac_mod is None:
            gc.collect()  # a checkpointed block is about to be recomputed: see the class docstring
        super()._pre_fw_hook(module, inputs)


class Counted:
    """Memory (FrozenAwareMemTracker) and FLOPs (FlopCounterMode) of what runs inside, with stand-in values.
    `external`: modules and optimizers that exist before (their parameters, buffers and states are counted
    from the start). Use inside the FakeTensorMode the models were made in."""

    def __init__(self, *external):
        self.memory = FrozenAwareMemTracker()
        self.memory.track_external(*external)
        self.flops = FlopCounterMode(display=False)
        self.values = StandInValues(*(e for e in external if isinstance(e, torch.optim.Optimizer)))

    def __enter__(self) -> "Counted":
        gc.freeze()  # what exists before (models, optimizer) is left out of the collections the tracker runs
        self.flops.__enter__()
        self.memory.__enter__()
        self.values.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.values.__exit__(*exc)
        self.memory.__exit__(*exc)
        self.flops.__exit__(*exc)
        gc.unfreeze()

    def _peak(self) -> dict:
        snaps = self.memory.get_tracker_snapshot("peak")
        return next(iter(snaps.values()), {})  # one device

    def peak_gib(self) -> float:
        """The highest total, as torch.cuda.max_memory_allocated counts it (block sizes rounded up to 512 B)."""
        return self._peak().get("Total", 0) / GIB

    def parts_gib(self) -> dict[str, float]:
        """The peak's parts: parameters, buffers, gradients, optimizer state, activations (forward outputs kept
        for backward, and anything made in the forward), backward temporaries, other (external tensors)."""
        peak = self._peak()
        return {name: peak.get(ref, 0) / GIB for name, ref in PARTS.items()}

    def tflop(self) -> float:
        """Matrix-multiply, convolution and attention FLOPs (FlopCounterMode's formulas; elementwise ops and
        norms are not counted: a few percent of a UNet's)."""
        return self.flops.get_total_flops() / 1e12
