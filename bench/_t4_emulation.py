"""A T4's numerics on a CPU-only torch, for counting (bench/t4_budget.py): CUDA autocast's cast policy applied
to CPU tensors, and SDPA as the memory-efficient kernel (sm75 has no flash attention).

Why emulate: fake CUDA tensors can be made on a CPU-only torch, and CUDA autocast's kernels run on them, but
autograd on them aborts. So the training step runs on fake CPU tensors, under `torch.autocast("cpu", fp16)`,
with the AutocastCPU kernels replaced by CUDA's policy (`cuda_autocast_on_cpu`):

    lower_precision_fp  cast floating inputs to the autocast dtype (fp16): matmuls, convolutions, SDPA
    fp32                cast floating inputs to fp32: norms, upsampling, exp/log/pow, losses
    fp32_set_opt_dtype  softmax, sum, cumsum...: pass dtype=float32 unless the call gives one
    fp32_append_dtype   norm: redispatch to the dtype overload with float32
    promote             addcmul, index_put...: the widest floating dtype of the inputs

as torch's aten/src/ATen/autocast_mode.h lists them (AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, ...) and
registers them for CUDA, with the cast cache of fp32 leaves that require grad (the trainable weights, cast once
per autocast region, as `cached_cast` does), and the one device branch below autocast that changes memory:
softmax of fp16 into fp32 is one kernel on CUDA (softmax.cpp's half_to_float), with no fp32 copy of its input.
Every CPU-only autocast kernel becomes a fallthrough.

The table is the union over every torch from requirements.txt's lower bound (2.11, Colab's) up: SOME_TORCH
says which entries only some releases or builds register, READ_FROM which builds it was read from, and the
emulation applies those of the running torch's release (`in_this_release`). `cuda_policy_matches_dispatcher()`
checks the table and its conditions against the ops that have AutocastCUDA kernels in the running torch
(tests/bench/test_t4_budget.py runs it under `./run.sh test` and `test-colab`); bench/_t4_check.py runs a
forward both ways (CUDA's own kernels on fake CUDA tensors, the emulation on fake CPU tensors) and compares
every op's output dtypes.

`t4_attention()` routes `scaled_dot_product_attention` to `_scaled_dot_product_efficient_attention`, what SDPA's
CUDA dispatch picks on sm75 (no flash attention there): its saved tensors (output, logsumexp) and FLOPs are
the memory-efficient kernel's.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

# CUDA's autocast policy (aten/src/ATen/autocast_mode.h, autocast_mode.cpp's CUDA extras), the union over the
# torch releases from 2.11 up: SOME_TORCH names the entries that only some releases or builds register
READ_FROM = ("2.11.0+cu130", "2.12.1+cu130", "2.13.0+cpu", "2.14.1+cu130")  # the torch.__version__ of each
LOWER_PRECISION_FP = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    "cudnn_convolution", "cudnn_convolution_transpose",
    "_cudnn_rnn")  # casts the weights too and re-flattens them (native/cudnn/AutocastRNN.cpp); SD 1.5 has no RNN
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa", "linalg_matrix_sqrth")
FP32_SET_OPT_DTYPE = ("prod", "prod.dim_int", "prod.dim_Dimname", "softmax.int", "softmax.Dimname", "log_softmax.int",
                      "log_softmax.Dimname", "cumprod", "cumprod.dimname", "cumsum", "cumsum.dimname",
                      "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
                      "sum.dim_IntList", "sum.dim_DimnameList")
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype",
                     "norm.names_ScalarOpt_dim": "norm.names_ScalarOpt_dim_dtype"}
PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add")
BANNED = ("binary_cross_entropy",)  # CUDA autocast raises on it (unsafe in fp16)

POLICY = {**dict.fromkeys(LOWER_PRECISION_FP, "lower_precision_fp"), **dict.fromkeys(FP32, "fp32"),
          **dict.fromkeys(FP32_SET_OPT_DTYPE, "fp32_set_opt_dtype"),
          **dict.fromkeys(FP32_APPEND_DTYPE, "fp32_append_dtype"), **dict.fromkeys(PROMOTE, "promote"),
          **dict.fromkeys(BANNED, "banned")}

# The entries not every torch from 2.11 up registers for CUDA autocast: why, and whether this torch should
NAMED_TENSOR = tuple(n for n in POLICY if "imname" in n or ".names_" in n)
SOME_TORCH = {
    "rms_norm": "fp32 from torch 2.12 on (pytorch/pytorch issue 188955); 2.11 leaves it in its input's dtype",
    "_cudnn_rnn": "only builds with cuDNN register it: CUDA builds (PyPI's, Colab's), not the CPU build",
    "linalg_matrix_sqrth": "an op new in torch 2.14",
    **dict.fromkeys(NAMED_TENSOR, "a named-tensor overload: in torch 2.11 and 2.12, gone from aten in 2.13 "
                                  "(pytorch/pytorch PR 173895 removed named tensors)"),
}


def _release() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split(".")[:2])


def in_this_release(name: str) -> bool:
    """Whether CUDA autocast registers POLICY's `name` in a CUDA build of the running torch's release (SOME_TORCH;
    the rest: every release from 2.11 up)."""
    if name == "rms_norm":  # an old op, newly in the list
        return _release() >= (2, 12)
    if name in SOME_TORCH and name != "_cudnn_rnn":  # ops only some releases' aten has
        return _exists(name)
    return True


def _op(name: str):
    """'pow.Tensor_Scalar' -> torch.ops.aten.pow.Tensor_Scalar; 'linear' -> its default overload."""
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def ops_with_autocast_kernel(key: str) -> set[str]:
    """The aten ops (names without 'aten::') that have a kernel for `key` (AutocastCUDA, AutocastCPU) in this torch."""
    return {n[len("aten::"):] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, key)}


def cuda_policy_matches_dispatcher() -> tuple[set[str], set[str]]:
    """(ops CUDA autocast registers in this torch that POLICY lacks or says it does not register here, ops POLICY
    says it registers here that it does not): both empty when the table and SOME_TORCH's conditions hold for
    this torch (a CPU build registers no `_cudnn_rnn`)."""
    cudnn = torch.backends.cudnn.is_available()
    expected = {n for n in POLICY if in_this_release(n) and (n != "_cudnn_rnn" or cudnn)}
    registered = ops_with_autocast_kernel("AutocastCUDA")
    return registered - expected, expected - registered


# --------------------------------------------------------------------------------------------------
# The casts (cached_cast, is_eligible, promote_type of autocast_mode.h, for CPU tensors)
# --------------------------------------------------------------------------------------------------

_CACHE: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point() and t.dtype != torch.float64


def _cached_cast(to_type: torch.dtype, t):
    if not _eligible(t) or t.dtype == to_type:
        return t
    cacheable = (to_type == torch.get_autocast_dtype("cpu") and t.dtype == torch.float32 and t.requires_grad
                 and t.is_leaf and not t._is_view() and torch.is_autocast_cache_enabled())
    if not cacheable:
        return t.to(to_type)
    hit = _CACHE.get(id(t))
    if hit is not None and hit[0]() is t:
        return hit[1]
    cast = t.to(to_type)
    _CACHE[id(t)] = (weakref.ref(t), cast)
    return cast


def _cast_all(to_type, args, kwargs):
    return tree_map_only(torch.Tensor, lambda t: _cached_cast(to_type, t), (args, kwargs))


def _promote_type(args, kwargs) -> torch.dtype:
    current = torch.get_autocast_dtype("cpu")
    for t in tree_flatten((args, kwargs))[0]:
        if _eligible(t) and t.dtype == torch.float32:
            current = torch.float32
    return current


def _dtype_index(op) -> tuple[int, bool]:
    """(position of the op's `dtype` argument, whether it is keyword-only)."""
    i = [a.name for a in op._schema.arguments].index("dtype")
    return i, op._schema.arguments[i].kwarg_only


def _with_dtype(op, args, kwargs, dtype):
    """args, kwargs with the op's `dtype` argument set to `dtype`, unless the call sets it already (then None
    when the call gives none: the first value returned)."""
    i, kwarg_only = _dtype_index(op)
    given = kwargs.get("dtype") if kwarg_only or i >= len(args) else args[i]
    if given is not None:
        return given, args, kwargs
    if kwarg_only or i >= len(args):
        return None, args, {**kwargs, "dtype": dtype}
    return None, (*args[:i], dtype, *args[i + 1:]), kwargs


# softmax.cpp's CUDA branch: fp16 in, fp32 out in one kernel (half_to_float), no fp32 copy of the input
_HALF_TO_FLOAT = {"softmax.int": torch.ops.aten._softmax.default,
                  "log_softmax.int": torch.ops.aten._log_softmax.default}


def _lower_precision_fp(name, op, args, kwargs):
    args, kwargs = _cast_all(torch.get_autocast_dtype("cpu"), args, kwargs)
    return op(*args, **kwargs)


def _fp32(name, op, args, kwargs):
    args, kwargs = _cast_all(torch.float32, args, kwargs)
    return op(*args, **kwargs)


def _promote(name, op, args, kwargs):
    args, kwargs = _cast_all(_promote_type(args, kwargs), args, kwargs)
    return op(*args, **kwargs)


def _fp32_set_opt_dtype(name, op, args, kwargs):
    if not _eligible(args[0]):  # as autocast: an ineligible first argument leaves the call as it is
        return op(*args, **kwargs)
    given, new_args, new_kwargs = _with_dtype(op, args, kwargs, torch.float32)
    if given is None and name in _HALF_TO_FLOAT and args[0].dtype == torch.float16:
        return _HALF_TO_FLOAT[name](args[0], args[1], True)
    return op(*new_args, **new_kwargs)


def _fp32_append_dtype(name, op, args, kwargs):
    out = torch.float32 if _eligible(args[0]) else args[0].dtype
    # the dtype overloads have no defaults (p, keepdim): the call's arguments, the op's own defaults filled in
    kwargs = dict(kwargs)
    args = (*args, *(kwargs.pop(a.name) if a.name in kwargs else a.default_value
                     for a in op._schema.arguments[len(args):]))
    return _op(FP32_APPEND_DTYPE[name])(*args, **kwargs, dtype=out)


def _banned(name, op, args, kwargs):
    raise RuntimeError(f"torch.{name} is unsafe to autocast (CUDA autocast refuses it too)")


_CALLS = {"lower_precision_fp": _lower_precision_fp, "fp32": _fp32, "promote": _promote,
          "fp32_set_opt_dtype": _fp32_set_opt_dtype, "fp32_append_dtype": _fp32_append_dtype, "banned": _banned}
_NO_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _kernel(name: str, policy: str):
    """The AutocastCPU kernel that applies CUDA's `policy` to op `name`, then calls it below autocast (as the
    WrapFunction_ of autocast_mode.h does, with ExcludeDispatchKeyGuard)."""
    op, call = _op(name), _CALLS[policy]

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST_CPU):
            return call(name, op, args, kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_on_cpu():
    """Inside: `torch.autocast("cpu", dtype=torch.float16)` casts as CUDA autocast does (POLICY), for CPU and
    fake CPU tensors. Accelerate's fp16 forward enters exactly that context when its device is the CPU. The
    kernels are removed again on exit (torch restores its own)."""
    lib = torch.library.Library("aten", "IMPL")
    original_clear = torch.clear_autocast_cache

    def clear_autocast_cache():  # autocast.__exit__ at nesting 0: drop our cast cache with torch's
        _CACHE.clear()
        original_clear()

    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            policy = {n: p for n, p in POLICY.items() if in_this_release(n) and _exists(n)}
            for name in sorted(ops_with_autocast_kernel("AutocastCPU") - set(policy)):
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
            for name, kind in policy.items():
                lib.impl(name, _kernel(name, kind), "AutocastCPU")
        torch.clear_autocast_cache = clear_autocast_cache
        yield
    finally:
        torch.clear_autocast_cache = original_clear
        _CACHE.clear()
        lib._destroy()


def _exists(name: str) -> bool:
    packet, _, overload = name.partition(".")
    return hasattr(torch.ops.aten, packet) and (overload or "default") in getattr(torch.ops.aten, packet).overloads()


# --------------------------------------------------------------------------------------------------
# SDPA as the memory-efficient kernel
# --------------------------------------------------------------------------------------------------


def _sdpa_mem_efficient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                        enable_gqa=False):
    """What SDPA's CUDA dispatch runs on sm75: `_scaled_dot_product_efficient_attention`, with the logsumexp
    (saved for backward) computed only when a gradient is needed (attention.cpp, should_compute_logsumexp).
    An attention mask (CLIPSeg's text tower: causal and padding) becomes the kernel's additive bias, a boolean
    one first turned into 0 / -inf of the query's dtype, as attention.cpp's convert_boolean_attn_mask does; the
    bias is broadcast to (batch, heads, queries, keys) (its padding to 16 keys is left out: a few bytes)."""
    if enable_gqa:
        raise NotImplementedError("t4_attention: GQA is not emulated (neither SD 1.5 nor CLIPSeg uses it)")
    bias = None
    if attn_mask is not None:
        bias = attn_mask
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask.logical_not(), float("-inf"))
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    lse = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, lse, dropout_p,
                                                                  is_causal, scale=scale)[0]


@contextlib.contextmanager
def t4_attention(devices=("cpu",)):
    """Inside: `F.scaled_dot_product_attention` on tensors of `devices` runs the memory-efficient kernel (at the
    autograd key, where SDPA's own composite would choose its backend). Below autocast: inputs arrive cast."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for device in devices:
                lib.impl("scaled_dot_product_attention", _sdpa_mem_efficient, f"Autograd{device.upper()}")
        yield
    finally:
        lib._destroy()
