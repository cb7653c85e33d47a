"""The Matryoshka loss on the Triton backend: five launches for the whole fwd+bwd pass of one chunk.

extended.py hands a call here when `backend="triton"`, `matryoshka_dims` has at most MAX_DIMS prefixes
and no other v3 option is set (no ids, margin or symmetric; one process), and the logits of every
prefix fit one chunk (K M N <= CHUNK_ELEMENTS). Then, with the kernels of triton_prefix_kernels.py:

    prefix_norms (q and c) -> prefix_logits (S^k, one pass over D) -> prefix_rows (loss, H^k over S^k,
    the normalisation's sums) -> segment_grad twice (dq = H c, dc = H^T q per segment, the
    normalisation's Jacobian in the epilogue)

plus a zero fill (the column sums' atomics) and the sums of the row losses and dL/dtau terms. The
FLOPs are those of three GEMMs over d_K: 6 M N d_K. The prefixes and weights are scalar arguments and
every launch depends only on shapes: no host read, nothing data-dependent on the host.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from .engine import NORM_EPS, LossCall, Targets, inverse
from .rows import guard_infinite_candidates_
from .triton_common import INTERPRETER_ROW_CONFIG, ROW_CONFIGS, RowConfig, dot_precision, on_gpu, unit_stride
from .triton_prefix_kernels import (
    prefix_logits_kernel,
    prefix_norms_kernel,
    prefix_rows_kernel,
    segment_grad_kernel,
)

MAX_DIMS = 8  # the kernels take the prefixes as eight scalar arguments
CHUNK_ELEMENTS = 2**28  # K M N fp32 logits held at once (1 GiB)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps) of the dot kernels: on the GPU the largest without register
# spills on sm_90 (bench/sm90_report.py; the gradient kernel's dot is fp32, 3xTF32 for fp32 inputs);
# the interpreter: few, large programs
GPU_TILE = {"logits": (64, 64, 32, 4), "grad": (64, 64, 32, 4), "grad_fp32": (64, 64, 16, 4)}
INTERPRETER_TILE = (32, 32, 32, 1)
GPU_ROWS = RowConfig(4, 512, 4)  # prefix_rows_kernel (the xent row config spills here)


def applies(call: LossCall, query: Tensor, candidates: Tensor) -> bool:
    """Whether this call runs the Triton Matryoshka kernels (else extended.py's torch ops)."""
    from . import triton_engine

    return (
        call.engine is triton_engine
        and 0 < len(call.dims) <= MAX_DIMS
        and call.candidate_ids is None
        and call.margin is None
        and not call.symmetric
        and call.layout.group is None
        and len(call.dims) * query.shape[0] * candidates.shape[0] <= CHUNK_ELEMENTS
    )


def _padded(values: tuple, fill) -> list:
    return list(values) + [fill] * (MAX_DIMS - len(values))


def run(
    q: Tensor, c: Tensor, tau: float | Tensor, call: LossCall, weight: float | Tensor | None
) -> tuple[Tensor, list[Tensor] | None]:
    """(row losses sum_k w_k L^k [M] fp32, [dq, dc, dtau] in fp32 or None): the gradients of
    sum_i weight_i loss_i (weight a number or [M]); None: the forward alone."""
    q, c = unit_stride(q), unit_stride(c)
    gpu = on_gpu(q)
    if not gpu:  # the interpreter: fp32 operands (its bf16 dot is wrong)
        q, c = q.float(), c.float()
    (M, D), N = q.shape, c.shape[0]
    K, dims = len(call.dims), _padded(call.dims, call.dims[-1])
    weights = [float(w) for w in _padded(call.dim_weights, 0.0)]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    rq, rc = torch.empty((K, M), **f32), torch.empty((K, N), **f32)
    rows = ROW_CONFIGS["norms"] if gpu else INTERPRETER_ROW_CONFIG
    if call.normalize:
        grid = (triton.cdiv(M, rows.block_r) + triton.cdiv(N, rows.block_r),)
        prefix_norms_kernel[grid](
            q, c, rq, rc, M, N, q.stride(0), c.stride(0), NORM_EPS, *dims,
            K=K, BLOCK_R=rows.block_r, BLOCK_D=rows.block(D), num_warps=rows.num_warps,
        )  # fmt: skip
    bm, bn, bk, warps = GPU_TILE["logits"] if gpu else INTERPRETER_TILE
    precision = dot_precision(q.dtype)
    s = torch.empty((K, M, N), **f32)
    prefix_logits_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        q, c, s, M, N, q.stride(0), c.stride(0), *dims,
        K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=not gpu, DOT_PRECISION=precision, num_warps=warps,
    )  # fmt: skip
    stride = N // M if call.targets is None else 0
    targets = Targets(call.targets, call.layout.c_offset, stride, checked=call.targets_checked)
    losses = torch.empty((M,), **f32)
    want = weight is not None
    if isinstance(tau, Tensor):
        tau_ptr, inv_tau, tau_tensor = tau, 0.0, True
    else:
        tau_ptr, inv_tau, tau_tensor = losses, inverse(tau, torch.float32), False
    row_weight = isinstance(weight, Tensor)
    cx = torch.empty((K, M), **f32)
    cy = torch.zeros((K, N), **f32) if want and call.normalize else cx
    dt = torch.empty((M,), **f32)
    rcfg = GPU_ROWS if gpu else INTERPRETER_ROW_CONFIG
    prefix_rows_kernel[(triton.cdiv(M, rcfg.block_r),)](
        s, rq, rc, losses if targets.index is None else targets.index, tau_ptr, inv_tau,
        weight.to(torch.float32).contiguous() if row_weight else losses,
        1.0 if row_weight or not want else float(weight), losses, cx, cy, dt,
        M, N, targets.offset, targets.stride, *weights,
        K=K, NORMALIZE=call.normalize, TAU_TENSOR=tau_tensor, HAS_TARGETS=targets.index is not None,
        ROW_WEIGHT=row_weight, WANT_GRAD=want, BLOCK_R=rcfg.block_r, BLOCK_N=rcfg.block(N),
        num_warps=rcfg.num_warps,
    )  # fmt: skip
    if not want:
        if not call.normalize:
            guard_infinite_candidates_(losses, c)
        return losses, None
    dq, dc = torch.empty((M, D), **f32), torch.empty((N, D), **f32)
    # dq [M, D] = H c (H^k [M, N] row-major), dc [N, D] = H^T q (H read transposed)
    if gpu:
        bm, bn, bk, warps = GPU_TILE["grad_fp32" if q.dtype == torch.float32 else "grad"]
    operands = ((dq, q, c, cx, M, N, N, 1), (dc, c, q, cy, N, M, 1, N))
    for out, x, y, coef, p, q_len, stride_hp, stride_hq in operands:
        segment_grad_kernel[(triton.cdiv(p, bm), triton.cdiv(D, bn))](
            s, y, x, out, coef, p, q_len, D, stride_hp, stride_hq, y.stride(0), x.stride(0), *dims,
            K=K, NORMALIZE=call.normalize, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=precision,
            num_warps=warps,
        )  # fmt: skip
    if not call.normalize:  # an Inf candidate's -Inf logits would drop out of every lse
        guard_infinite_candidates_(losses, c)
    return losses, [dq, dc, dt.sum()]
