"""The Triton engine of the contrastive loss (CUDA; CPU tensors under TRITON_INTERPRET=1).

Implements the interface of `engine.py` (the math is there). GEMMs run through torch (cuBLAS), the
work around them in Triton kernels (`triton_kernels.py`):

- gradients in the forward (`inverse_norms`, `xent`, `finish`, `scale_grads`, here): per chunk of
  query rows one GEMM for the raw logits S = q_R c^T (fp32 out), one row kernel turning S into the
  loss and E = weight (P - Y) a rc in place, two GEMMs E c and E^T q into the fp32 gradients. One
  chunk covers every row while R x N stays within CHUNK_ELEMENTS (B <= 8192 at D <= 4096): the whole
  fwd+bwd is then 8 launches (3 GEMMs, 4 Triton kernels, one sum) and no host sync.
- the recompute path (`row_lse`, `softmax_grad`): `triton_recompute.py`.

Tile configurations and operand choices: `triton_common.py`. 16-bit inputs: GEMMs in bf16 with fp32
accumulation and output (fp16 inputs are converted to bf16 for the gradient GEMMs: fp16's range would
flush small P to zero); logits and softmax in fp32. Under the interpreter every operand is fp32 (its
bf16 dot is wrong, and the CPU's mm has no fp32 output).
"""

from __future__ import annotations

import torch
import triton

from .engine import NORM_EPS, Targets, inverse
from .triton_common import (
    INTERPRETER_SCALE_BLOCK,
    SCALE_BLOCK,
    grad_operand_dtype,
    mm_into,
    on_gpu,
    row_config,
    unit_stride,
)
from .triton_kernels import finish_kernel, inverse_norms_kernel, scale_kernel, xent_rows_kernel
from .triton_recompute import row_lse, softmax_grad

__all__ = [
    "OPERANDS_IN_INPUT_DTYPE",
    "finish",
    "inverse_norms",
    "row_lse",
    "scale_grads",
    "softmax_grad",
    "xent",
]

# GEMMs run in the inputs' dtype (bf16 for 16-bit inputs): the recompute path hands over rows in it
OPERANDS_IN_INPUT_DTYPE = True

# ----------------------------------------------------------------------------------------------------
# gradients in the forward

# One chunk of logits holds at most CHUNK_ELEMENTS fp32 values (256 MiB: one chunk up to B = 8192, so
# small batches run a fixed handful of launches) but at least MIN_CHUNK_ROWS rows: the dc GEMM reads
# and writes all of dc once per chunk, and taller chunks keep that traffic small against the GEMMs.
CHUNK_ELEMENTS = 2**26
MIN_CHUNK_ROWS = 4096


def _temperature_args(tau: float | torch.Tensor, dummy: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(tensor pointer, number, TAU_TENSOR): a tensor temperature is read (and checked) in the kernel."""
    if isinstance(tau, torch.Tensor):
        return tau, 0.0, True
    return dummy, inverse(tau, torch.float32), False


def inverse_norms(q: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / max(|x_i|, eps) per row of q and c, fp32: one launch."""
    q, c = unit_stride(q), unit_stride(c)
    (M, D), N = q.shape, c.shape[0]
    rq = torch.empty((M,), dtype=torch.float32, device=q.device)
    rc = torch.empty((N,), dtype=torch.float32, device=q.device)
    cfg = row_config("norms", q)
    grid = (triton.cdiv(M, cfg.block_r) + triton.cdiv(N, cfg.block_r),)
    inverse_norms_kernel[grid](
        q, c, rq, rc, M, N, D, q.stride(0), c.stride(0), NORM_EPS,
        BLOCK_R=cfg.block_r, BLOCK_D=cfg.block(D), num_warps=cfg.num_warps,
    )  # fmt: skip
    return rq, rc


def chunk_rows(M: int, N: int) -> int:
    """Query rows per logit chunk (see CHUNK_ELEMENTS)."""
    return min(M, max(CHUNK_ELEMENTS // N, MIN_CHUNK_ROWS))


def xent(
    q: torch.Tensor,
    c: torch.Tensor,
    rq: torch.Tensor | None,
    rc: torch.Tensor | None,
    tau: float | torch.Tensor,
    targets: Targets,
    weight: float,
    want_dq: bool,
    want_dc: bool,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss and gradients at fixed scales (engine.py): per chunk S = q_R c^T (fp32), the row kernel
    (loss rows, E in place of S for fp32; with `ids` the target's copies masked), dq_R = E c,
    dc (+)= E^T q_R."""
    q, c = unit_stride(q), unit_stride(c)
    (M, D), N = q.shape, c.shape[0]
    if on_gpu(q):  # logits from the inputs as they are; gradient GEMMs in fp32 or bf16
        q_s, c_s = q, c
        op_dtype = grad_operand_dtype(q)
        q_op, c_op = q.to(op_dtype), c.to(op_dtype)
    else:  # the interpreter: fp32 everywhere (CPU mm has no fp32 output for 16-bit inputs)
        q_s = q_op = q.float()
        c_s = c_op = c.float()
        op_dtype = torch.float32
    want = want_dq or want_dc
    rows = chunk_rows(M, N)
    s_buffer = torch.empty((rows, N), dtype=torch.float32, device=q.device)
    e_buffer = (
        s_buffer
        if op_dtype == torch.float32 or not want
        else torch.empty((rows, N), dtype=op_dtype, device=q.device)
    )
    losses = torch.empty((M,), dtype=torch.float32, device=q.device)
    dq = torch.empty((M, D), dtype=torch.float32, device=q.device) if want_dq else None
    dc = torch.empty((N, D), dtype=torch.float32, device=q.device) if want_dc else None
    tau_ptr, inv_tau, tau_tensor = _temperature_args(tau, losses)
    cfg = row_config("xent", q)
    for r0 in range(0, M, rows):
        r1 = min(r0 + rows, M)
        s, e = s_buffer[: r1 - r0], e_buffer[: r1 - r0]
        mm_into(s, q_s[r0:r1], c_s.T, accumulate=False)
        xent_rows_kernel[(triton.cdiv(r1 - r0, cfg.block_r),)](
            s, e, losses if rq is None else rq, losses if rc is None else rc, tau_ptr, inv_tau,
            losses if targets.index is None else targets.index, losses if ids is None else ids, losses,
            r0, r1 - r0, N, s.stride(0), e.stride(0), targets.offset, targets.stride, weight,
            NORMALIZE=rq is not None, TAU_TENSOR=tau_tensor, HAS_TARGETS=targets.index is not None,
            HAS_IDS=ids is not None, WANT_GRAD=want, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block(N),
            num_warps=cfg.num_warps,
        )  # fmt: skip
        if want_dq:
            mm_into(dq[r0:r1], e, c_op, accumulate=False)
        if want_dc:
            mm_into(dc, e.T, q_op[r0:r1], accumulate=r0 > 0)
    return losses.sum(), dq, dc


def finish(
    dq: torch.Tensor | None,
    q: torch.Tensor,
    rq: torch.Tensor | None,
    dc: torch.Tensor | None,
    c: torch.Tensor,
    rc: torch.Tensor | None,
    tau: float | torch.Tensor,
    want_dtau: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The normalisation's Jacobian in place and dL/dtau (engine.py): one launch, + one sum for dtau."""
    q, c = unit_stride(q), unit_stride(c)
    (M, D), N = q.shape, c.shape[0]
    normalize = rq is not None
    q_work = dq is not None and (normalize or want_dtau)
    c_work = dc is not None and normalize
    if not (q_work or c_work):
        return dq, dc, None
    dots = torch.empty((M,), dtype=torch.float32, device=q.device) if want_dtau else None
    dummy = dq if dq is not None else dc
    tau_ptr, inv_tau, tau_tensor = _temperature_args(tau, dummy)
    cfg = row_config("finish", q)
    grid = ((triton.cdiv(M, cfg.block_r) if q_work else 0) + (triton.cdiv(N, cfg.block_r) if c_work else 0),)
    finish_kernel[grid](
        dummy if dq is None else dq, q, dummy if rq is None else rq,
        dummy if dc is None else dc, c, dummy if rc is None else rc,
        dummy if dots is None else dots, tau_ptr, inv_tau, M, N, D, q.stride(0), c.stride(0),
        HAS_Q=q_work, HAS_C=c_work, NORMALIZE=normalize, WANT_DOTS=want_dtau, TAU_TENSOR=tau_tensor,
        BLOCK_R=cfg.block_r, BLOCK_D=cfg.block(D), num_warps=cfg.num_warps,
    )  # fmt: skip
    return dq, dc, None if dots is None else dots.sum()


def _output(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return g if g.dtype == dtype else torch.empty_like(g, dtype=dtype)


def scale_grads(
    grads: list[torch.Tensor | None], grad_out: torch.Tensor, dtypes: list[torch.dtype]
) -> list[torch.Tensor | None]:
    """dq, dc, dtau times grad_out, each rounded once to its dtype (in place where it is the
    buffer's): one launch."""
    present = [(g, _output(g, dtype)) for g, dtype in zip(grads, dtypes) if g is not None]
    if not present:
        return [None, None, None]
    block = SCALE_BLOCK if on_gpu(present[0][0]) else INTERPRETER_SCALE_BLOCK
    counts = [g.numel() for g, _ in present] + [0] * (3 - len(present))
    padded = present + [present[-1]] * (3 - len(present))  # unused segments: 0 elements
    args = [x for (g, out), n in zip(padded, counts) for x in (g, out, n)]
    blocks = sum(triton.cdiv(n, block) for n in counts)
    scale_kernel[(blocks,)](*args, grad_out.reshape(()), BLOCK=block)
    outs = iter(out for _, out in present)
    return [None if g is None else next(outs) for g in grads]
