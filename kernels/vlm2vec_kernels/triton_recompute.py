"""The recompute path's launchers of the Triton engine: `row_lse` and `softmax_grad` (engine.py).

One kernel over a (row blocks x column splits) grid for the row log-sum-exp plus a tiny merge kernel;
the gradient writes P block by block (bounded by `p_block_bytes`) as P*col_scale and P*row_scale, then
two cuBLAS GEMMs per block.
"""

from __future__ import annotations

import torch
import triton

from .triton_common import (
    DEFAULT_P_BLOCK_BYTES,
    GPU_CONFIGS,
    GROUP_M,
    INTERPRET,
    L2_SPLITS,
    MAX_SPLITS,
    MERGE_BLOCK,
    MIN_GEMM_ROWS,
    TileConfig,
    common_constexprs,
    grad_operand_dtype,
    mm_into,
    on_gpu,
    operand_class,
    pick_config,
    sm_count,
)
from .triton_kernels import lse_merge_kernel, row_lse_partial_kernel, softmax_probs_kernel


def _check_inputs(q, c, row_scale, col_scale, lse=None, row_weight=None):
    """Validate the engine arguments; returns q, c with a unit stride along D and the given vectors
    (row_scale, col_scale[, lse][, row_weight]) contiguous."""
    for name, t in (("q", q), ("c", c)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [rows, D], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"q and c must share D: q {tuple(q.shape)} vs c {tuple(c.shape)}")
    if q.dtype != c.dtype:
        raise TypeError(f"q and c must have the same dtype: q {q.dtype} vs c {c.dtype}")
    if c.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"c must have at least one row and D >= 1, got c {tuple(c.shape)}")
    vectors = {"row_scale": (row_scale, q.shape[0]), "col_scale": (col_scale, c.shape[0])}
    if lse is not None:
        vectors["lse"] = (lse, q.shape[0])
    if row_weight is not None:
        vectors["row_weight"] = (row_weight, q.shape[0])
    for name, (t, n) in vectors.items():
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {getattr(t, 'shape', type(t))}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    for name, t in list(vectors.items()) + [("c", (c, 0))]:
        if t[0].device != q.device:
            raise ValueError(f"{name} is on {t[0].device} but q is on {q.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton engine needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if q.stride(1) != 1:
        q = q.contiguous()
    if c.stride(1) != 1:
        c = c.contiguous()
    return q, c, *(t.contiguous() for t, _ in vectors.values())


def choose_splits(M: int, N: int, cfg: TileConfig, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split): enough column splits that row blocks x splits fills every SM,
    and at least L2_SPLITS for L2 reuse on large batches."""
    row_blocks = triton.cdiv(M, cfg.block_m)
    col_tiles = triton.cdiv(N, cfg.block_n)
    want = max(L2_SPLITS, triton.cdiv(sm_count(device), row_blocks))
    splits = max(1, min(col_tiles, want, MAX_SPLITS))
    tiles_per_split = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split


def row_lse(
    q: torch.Tensor,
    c: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    *,
    config: TileConfig | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """lse_i = log sum_j exp(row_scale_i * col_scale_j * <q_i, c_j>), fp32 [M].

    `config` / `splits` override the tile configuration and the number of column splits (tests and
    benchmarks); by default the narrow tile is used where wide tiles cannot fill the GPU.
    """
    q, c, row_scale, col_scale = _check_inputs(q, c, row_scale, col_scale)
    M, D = q.shape
    N = c.shape[0]
    lse = torch.empty((M,), dtype=torch.float32, device=q.device)
    if M == 0:
        return lse
    role = "lse"
    if config is None and on_gpu(q):
        wide = GPU_CONFIGS[("lse", operand_class(q.dtype))]
        if triton.cdiv(M, wide.block_m) * triton.cdiv(N, wide.block_n) < sm_count(q.device):
            role = "lse_narrow"
    cfg = pick_config(role, q, config)
    if splits is None:
        splits, tiles_per_split = choose_splits(M, N, cfg, q.device)
    else:
        col_tiles = triton.cdiv(N, cfg.block_n)
        tiles_per_split = triton.cdiv(col_tiles, max(1, min(splits, col_tiles)))
        splits = triton.cdiv(col_tiles, tiles_per_split)
    single = splits == 1
    part = lse if single else torch.empty((2, splits, M), dtype=torch.float32, device=q.device)
    row_lse_partial_kernel[(splits, triton.cdiv(M, cfg.block_m))](
        q,
        c,
        row_scale,
        col_scale,
        part,
        lse,
        M,
        N,
        D,
        q.stride(0),
        c.stride(0),
        tiles_per_split,
        WRITE_LSE=single,
        FLATTEN=cfg.flatten,
        **common_constexprs(q, cfg, D),
        **cfg.launch_options(),
    )
    if not single:
        lse_merge_kernel[(triton.cdiv(M, MERGE_BLOCK),)](part, lse, M, splits, BLOCK=MERGE_BLOCK)
    return lse


def softmax_grad(
    q: torch.Tensor,
    c: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    lse: torch.Tensor,
    row_weight: torch.Tensor,
    *,
    p_block_bytes: int = DEFAULT_P_BLOCK_BYTES,
    block_rows: int | None = None,
    block_cols: int | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gq [M, D], gc [N, D]) in fp32 for P = row_weight * exp(s - lse); see engine.py.

    `p_block_bytes` bounds the P blocks, `block_rows`/`block_cols` set them exactly (tests).
    """
    q, c, row_scale, col_scale, lse, row_weight = _check_inputs(q, c, row_scale, col_scale, lse, row_weight)
    return _softmax_grad_gemm(
        q, c, row_scale, col_scale, lse, row_weight, p_block_bytes, block_rows, block_cols, config
    )


def p_block_shape(
    M: int,
    N: int,
    elem_bytes: int,
    block_m: int,
    p_block_bytes: int = DEFAULT_P_BLOCK_BYTES,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[int, int]:
    """(rows, cols) of the gemm path's P blocks: both blocks (P*col_scale, P*row_scale) within
    p_block_bytes, at most 32768 columns, and at most a quarter of the rows once that still leaves
    MIN_GEMM_ROWS (mid-size batches then hold a quarter of B x B, not all of it)."""
    cols = min(block_cols or 32768, N)
    if block_rows is None:
        rows = max(block_m, p_block_bytes // (2 * elem_bytes * cols) // block_m * block_m)
        rows = min(rows, max(MIN_GEMM_ROWS, triton.cdiv(triton.cdiv(M, 4), block_m) * block_m))
    else:
        rows = block_rows
    rows = min(rows, M)
    if rows * cols >= 2**31:
        raise ValueError(f"P block {rows} x {cols} too large for int32 offsets; lower p_block_bytes")
    return rows, cols


def _softmax_grad_gemm(
    q, c, row_scale, col_scale, lse, row_weight, p_block_bytes, block_rows, block_cols, config
):
    """P in [rows x cols] blocks (two scaled copies), then cuBLAS: gq[r] (+)= Pq @ c[cols] and
    gc[cols] (+)= Pc^T @ q[r]. The first block along the sum writes, the later ones accumulate."""
    M, D = q.shape
    N = c.shape[0]
    gq = torch.empty((M, D), dtype=torch.float32, device=q.device)
    gc = torch.empty((N, D), dtype=torch.float32, device=q.device)
    if M == 0:
        return gq, gc.zero_()
    op_dtype = grad_operand_dtype(q)
    q_op, c_op = q.to(op_dtype), c.to(op_dtype)  # no copy unless fp16 (-> bf16) or interpreted 16-bit
    role = "probs"
    if config is None and on_gpu(q):
        wide = GPU_CONFIGS[("probs", operand_class(q.dtype))]
        if triton.cdiv(M, wide.block_m) * triton.cdiv(N, wide.block_n) < 2 * sm_count(q.device):
            role = "probs_narrow"
    cfg = pick_config(role, q, config)
    elem = torch.finfo(op_dtype).bits // 8
    rows, cols = p_block_shape(M, N, elem, cfg.block_m, p_block_bytes, block_rows, block_cols)
    pq_buffer = torch.empty((rows * cols,), dtype=op_dtype, device=q.device)
    pc_buffer = torch.empty((rows * cols,), dtype=op_dtype, device=q.device)
    constexprs = common_constexprs(q, cfg, D)
    for r0 in range(0, M, rows):
        r1 = min(r0 + rows, M)
        for c0 in range(0, N, cols):
            c1 = min(c0 + cols, N)
            size = (r1 - r0) * (c1 - c0)
            pq = pq_buffer[:size].view(r1 - r0, c1 - c0)
            pc = pc_buffer[:size].view(r1 - r0, c1 - c0)
            grid = (triton.cdiv(r1 - r0, cfg.block_m) * triton.cdiv(c1 - c0, cfg.block_n),)
            softmax_probs_kernel[grid](
                q[r0:r1],
                c[c0:c1],
                row_scale[r0:r1],
                col_scale[c0:c1],
                lse[r0:r1],
                row_weight[r0:r1],
                pq,
                pc,
                r1 - r0,
                c1 - c0,
                D,
                q.stride(0),
                c.stride(0),
                pq.stride(0),
                GROUP_M=GROUP_M,
                **constexprs,
                **cfg.launch_options(),
            )
            mm_into(gq[r0:r1], pq, c_op[c0:c1], accumulate=c0 > 0)
            mm_into(gc[c0:c1], pc.t(), q_op[r0:r1], accumulate=r0 > 0)
    return gq, gc
