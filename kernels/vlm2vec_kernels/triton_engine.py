"""The Triton engine of the contrastive loss (CUDA; CPU tensors under TRITON_INTERPRET=1).

Implements the interface of `engine.py` (the math is there). GEMMs run through torch (cuBLAS), the
work around them in Triton kernels (`triton_kernels.py`):

- gradients in the forward (`inverse_norms`, `xent`, `finish`, `scale_grads`): per chunk of query rows
  one GEMM for the raw logits S = q_R c^T (fp32 out), one row kernel turning S into the loss and
  E = weight (P - Y) a rc in place, two GEMMs E c and E^T q into the fp32 gradients. One chunk covers
  every row while R x N stays within CHUNK_ELEMENTS (B <= 8192 at D <= 4096): the whole fwd+bwd is
  then 8 launches (3 GEMMs, 4 Triton kernels, one sum) and no host sync.
- the recompute path (`row_lse`, `softmax_grad`): one kernel over a (row blocks x column splits) grid
  for the row log-sum-exp plus a tiny merge kernel; the gradient writes P block by block (bounded by
  `p_block_bytes`) as P*col_scale and P*row_scale, then two cuBLAS GEMMs per block.

16-bit inputs: GEMMs in bf16 with fp32 accumulation and output (fp16 inputs are converted to bf16 for
the gradient GEMMs: fp16's range would flush small P to zero); logits and softmax in fp32. Under the
interpreter every operand is fp32 (its bf16 dot is wrong, and the CPU's mm has no fp32 output).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import triton

from .engine import NORM_EPS, Targets, inverse
from .triton_kernels import (
    finish_kernel,
    inverse_norms_kernel,
    lse_merge_kernel,
    row_lse_partial_kernel,
    scale_kernel,
    softmax_probs_kernel,
    xent_rows_kernel,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# both P blocks of the gemm path together (bf16: 2 x 16k x 32k); large blocks keep the GEMMs efficient
# and the fp32 read-modify-write of gq / gc per block small
DEFAULT_P_BLOCK_BYTES = 2**31
MIN_GEMM_ROWS = 4096  # P blocks of the gemm path keep at least this many rows (GEMM efficiency)
MAX_SPLITS = 64
# column splits of the forward even when row blocks alone fill the GPU: the programs running at
# once then cover ~SMs/16 row blocks x 16 column ranges and re-read q and c tiles from L2, not HBM
L2_SPLITS = 16
GROUP_M = 8
MERGE_BLOCK = 1024


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel configuration; `flatten` (row_lse only) lets
    triton pipeline across column tiles. Written as e.g. "128x256x64w8s3" (+ "f" for flatten)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    flatten: bool = False

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def spec(self) -> str:
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"
            f"{'f' if self.flatten else ''}"
        )

    @classmethod
    def parse(cls, spec: str) -> TileConfig:
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(f?)", spec.strip())
        if match is None:
            raise ValueError(f"tile config must look like 128x128x64w8s3 (f suffix: flatten), got {spec!r}")
        *numbers, flat = match.groups()
        return cls(*map(int, numbers), flatten=bool(flat))


# Recompute-path tile configurations, keyed by (kernel role, operand class). Every entry is compiled
# for sm_90 by vlm2vec_kernels/sm90_report.py (tests/test_sm90_compile.py) without a GPU. The 16-bit
# wide tiles were the fastest of `bench/loss_kernel.py --sweep` on an H100
# (bench/results/h100/engine_sweep.csv); "_narrow" tiles serve batches whose wide tiles cannot fill
# the GPU.
GPU_CONFIGS: dict[tuple[str, str], TileConfig] = {
    ("lse", "16bit"): TileConfig(128, 256, 64, 8, 3),
    ("lse_narrow", "16bit"): TileConfig(128, 64, 64, 4, 3),
    ("probs", "16bit"): TileConfig(256, 128, 64, 8, 3),
    ("probs_narrow", "16bit"): TileConfig(128, 64, 64, 4, 3),
    ("lse", "fp32"): TileConfig(128, 64, 32, 8, 3),
    ("lse_narrow", "fp32"): TileConfig(64, 64, 32, 4, 3),
    ("probs", "fp32"): TileConfig(128, 64, 32, 8, 3),
    ("probs_narrow", "fp32"): TileConfig(64, 64, 32, 4, 3),
}
# Alternatives timed by `bench/loss_kernel.py --sweep` on a GPU (not used unless chosen through
# VLM2VEC_TRITON_CONFIG or `config=`; results in bench/results/h100/).
SWEEP_CANDIDATES: dict[str, list[str]] = {
    "lse": ["128x128x64w8s3", "128x256x64w8s4", "256x128x64w8s3"],
    "probs": ["128x256x64w8s3", "128x128x64w8s3", "256x128x64w8s4"],
}


def _apply_env_overrides(configs: dict, spec: str) -> None:
    """VLM2VEC_TRITON_CONFIG="lse=128x256x64w8s3,probs:fp32=128x64x32w8s3": per-role tile configs for
    16-bit inputs (":fp32" for fp32 inputs), to tune on a GPU without editing this file."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = item.partition("=")
        role, _, operand = key.strip().partition(":")
        operand = operand or "16bit"
        if (role, operand) not in configs:
            raise ValueError(
                f"VLM2VEC_TRITON_CONFIG: unknown role {key!r}; known: "
                f"{sorted(f'{r}:{o}' for r, o in configs)}"
            )
        configs[(role, operand)] = TileConfig.parse(value)


_apply_env_overrides(GPU_CONFIGS, os.environ.get("VLM2VEC_TRITON_CONFIG", ""))

# The interpreter runs every program in Python: small tiles, few of them.
INTERPRETER_CONFIG = TileConfig(32, 32, 32, 1, 1)

KERNELS = {
    "lse": row_lse_partial_kernel,
    "lse_narrow": row_lse_partial_kernel,
    "probs": softmax_probs_kernel,
    "probs_narrow": softmax_probs_kernel,
}


def operand_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use 3xTF32 (near-fp32 accuracy on tensor cores); 16-bit ones ignore this."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer every kernel output goes through (tests poison it to catch unwritten lanes)."""
    return torch.empty(shape, dtype=dtype, device=device)


def grad_operand_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of P and of the q/c operands in the gradient products: bf16 for 16-bit inputs on the GPU
    (fp16's range would flush the small P = w * p of large mean-reduced batches to zero), fp32 for
    fp32 inputs and under the interpreter (whose bf16 dot is wrong)."""
    return torch.bfloat16 if _on_gpu(q) and q.dtype != torch.float32 else torch.float32


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda and not INTERPRET


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda" or INTERPRET:
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _pick_config(role: str, q: torch.Tensor, config: TileConfig | None) -> TileConfig:
    if config is not None:
        return config
    if not _on_gpu(q):
        return INTERPRETER_CONFIG
    return GPU_CONFIGS[(role, operand_class(q.dtype))]


def _common_constexprs(q: torch.Tensor, cfg: TileConfig, D: int) -> dict:
    return {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "EVEN_K": D % cfg.block_k == 0,
        "UPCAST": not _on_gpu(q),
        "DOT_PRECISION": dot_precision(q.dtype),
    }


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
    want = max(L2_SPLITS, triton.cdiv(_sm_count(device), row_blocks))
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
    lse = _new_buffer((M,), torch.float32, q.device)
    if M == 0:
        return lse
    role = "lse"
    if config is None and _on_gpu(q):
        wide = GPU_CONFIGS[("lse", operand_class(q.dtype))]
        if triton.cdiv(M, wide.block_m) * triton.cdiv(N, wide.block_n) < _sm_count(q.device):
            role = "lse_narrow"
    cfg = _pick_config(role, q, config)
    if splits is None:
        splits, tiles_per_split = choose_splits(M, N, cfg, q.device)
    else:
        col_tiles = triton.cdiv(N, cfg.block_n)
        tiles_per_split = triton.cdiv(col_tiles, max(1, min(splits, col_tiles)))
        splits = triton.cdiv(col_tiles, tiles_per_split)
    single = splits == 1
    part = lse if single else _new_buffer((2, splits, M), torch.float32, q.device)
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
        **_common_constexprs(q, cfg, D),
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


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (fp32) = or += a @ b; 16-bit a, b go through cuBLAS with an fp32 output (torch >= 2.8)."""
    if a.dtype == torch.float32:
        if accumulate:  # torch.addmm(out=) rather than addmm_: FlopCounterMode counts it
            torch.addmm(out, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
        return
    if _FP32_OUT_MM[0]:
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_MM[0] = False  # older torch: round each block product once, then add in fp32
    product = torch.mm(a, b)
    if accumulate:
        out.add_(product)
    else:
        out.copy_(product)


_FP32_OUT_MM = [True]


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
    gq = _new_buffer((M, D), torch.float32, q.device)
    gc = _new_buffer((N, D), torch.float32, q.device)
    if M == 0:
        return gq, gc.zero_()
    op_dtype = grad_operand_dtype(q)
    q_op, c_op = q.to(op_dtype), c.to(op_dtype)  # no copy unless fp16 (-> bf16) or interpreted 16-bit
    role = "probs"
    if config is None and _on_gpu(q):
        wide = GPU_CONFIGS[("probs", operand_class(q.dtype))]
        if triton.cdiv(M, wide.block_m) * triton.cdiv(N, wide.block_n) < 2 * _sm_count(q.device):
            role = "probs_narrow"
    cfg = _pick_config(role, q, config)
    elem = torch.finfo(op_dtype).bits // 8
    rows, cols = p_block_shape(M, N, elem, cfg.block_m, p_block_bytes, block_rows, block_cols)
    pq_buffer = _new_buffer((rows * cols,), op_dtype, q.device)
    pc_buffer = _new_buffer((rows * cols,), op_dtype, q.device)
    constexprs = _common_constexprs(q, cfg, D)
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
            _mm_into(gq[r0:r1], pq, c_op[c0:c1], accumulate=c0 > 0)
            _mm_into(gc[c0:c1], pc.t(), q_op[r0:r1], accumulate=r0 > 0)
    return gq, gc


# ----------------------------------------------------------------------------------------------------
# gradients in the forward

# One chunk of logits holds at most CHUNK_ELEMENTS fp32 values (256 MiB: one chunk up to B = 8192, so
# small batches run a fixed handful of launches) but at least MIN_CHUNK_ROWS rows: the dc GEMM reads
# and writes all of dc once per chunk, and taller chunks keep that traffic small against the GEMMs.
CHUNK_ELEMENTS = 2**26
MIN_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class RowConfig:
    """Launch shape of a row kernel: BLOCK_R rows per program, columns in blocks of at most
    max_block (a power of two)."""

    block_r: int
    max_block: int
    num_warps: int

    def block(self, n: int) -> int:
        return min(triton.next_power_of_2(max(n, 16)), self.max_block)


# GPU: a few rows per program and a whole D (<= 2048) or 1024 logits per block; these kernels are
# memory-bound. (xent with 2048-wide blocks spilled 8 bytes for 16-bit inputs: sm90_report.py.) The
# interpreter runs each program in Python: few, large programs.
ROW_CONFIGS = {"norms": RowConfig(4, 2048, 8), "xent": RowConfig(4, 1024, 8), "finish": RowConfig(4, 2048, 8)}
INTERPRETER_ROW_CONFIG = RowConfig(64, 1024, 1)
SCALE_BLOCK, INTERPRETER_SCALE_BLOCK = 4096, 2**16


def _row_config(role: str, x: torch.Tensor) -> RowConfig:
    return ROW_CONFIGS[role] if _on_gpu(x) else INTERPRETER_ROW_CONFIG


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _temperature_args(tau: float | torch.Tensor, dummy: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(tensor pointer, number, TAU_TENSOR): a tensor temperature is read (and checked) in the kernel."""
    if isinstance(tau, torch.Tensor):
        return tau, 0.0, True
    return dummy, inverse(tau, torch.float32), False


def inverse_norms(q: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / max(|x_i|, eps) per row of q and c, fp32: one launch."""
    q, c = _unit_stride(q), _unit_stride(c)
    (M, D), N = q.shape, c.shape[0]
    rq = _new_buffer((M,), torch.float32, q.device)
    rc = _new_buffer((N,), torch.float32, q.device)
    cfg = _row_config("norms", q)
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss and gradients at fixed scales (engine.py): per chunk S = q_R c^T (fp32), the row kernel
    (loss rows, E in place of S for fp32), dq_R = E c, dc (+)= E^T q_R."""
    q, c = _unit_stride(q), _unit_stride(c)
    (M, D), N = q.shape, c.shape[0]
    if _on_gpu(q):  # logits from the inputs as they are; gradient GEMMs in fp32 or bf16
        q_s, c_s = q, c
        op_dtype = grad_operand_dtype(q)
        q_op, c_op = q.to(op_dtype), c.to(op_dtype)
    else:  # the interpreter: fp32 everywhere (CPU mm has no fp32 output for 16-bit inputs)
        q_s = q_op = q.float()
        c_s = c_op = c.float()
        op_dtype = torch.float32
    want = want_dq or want_dc
    rows = chunk_rows(M, N)
    s_buffer = _new_buffer((rows, N), torch.float32, q.device)
    e_buffer = (
        s_buffer if op_dtype == torch.float32 or not want else _new_buffer((rows, N), op_dtype, q.device)
    )
    losses = _new_buffer((M,), torch.float32, q.device)
    dq = _new_buffer((M, D), torch.float32, q.device) if want_dq else None
    dc = _new_buffer((N, D), torch.float32, q.device) if want_dc else None
    tau_ptr, inv_tau, tau_tensor = _temperature_args(tau, losses)
    cfg = _row_config("xent", q)
    for r0 in range(0, M, rows):
        r1 = min(r0 + rows, M)
        s, e = s_buffer[: r1 - r0], e_buffer[: r1 - r0]
        _mm_into(s, q_s[r0:r1], c_s.T, accumulate=False)
        xent_rows_kernel[(triton.cdiv(r1 - r0, cfg.block_r),)](
            s, e, losses if rq is None else rq, losses if rc is None else rc, tau_ptr, inv_tau,
            losses if targets.index is None else targets.index, losses,
            r0, r1 - r0, N, s.stride(0), e.stride(0), targets.offset, targets.stride, weight,
            NORMALIZE=rq is not None, TAU_TENSOR=tau_tensor, HAS_TARGETS=targets.index is not None,
            WANT_GRAD=want, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block(N), num_warps=cfg.num_warps,
        )  # fmt: skip
        if want_dq:
            _mm_into(dq[r0:r1], e, c_op, accumulate=False)
        if want_dc:
            _mm_into(dc, e.T, q_op[r0:r1], accumulate=r0 > 0)
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
    q, c = _unit_stride(q), _unit_stride(c)
    (M, D), N = q.shape, c.shape[0]
    normalize = rq is not None
    q_work = dq is not None and (normalize or want_dtau)
    c_work = dc is not None and normalize
    if not (q_work or c_work):
        return dq, dc, None
    dots = _new_buffer((M,), torch.float32, q.device) if want_dtau else None
    dummy = dq if dq is not None else dc
    tau_ptr, inv_tau, tau_tensor = _temperature_args(tau, dummy)
    cfg = _row_config("finish", q)
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
    block = SCALE_BLOCK if _on_gpu(present[0][0]) else INTERPRETER_SCALE_BLOCK
    counts = [g.numel() for g, _ in present] + [0] * (3 - len(present))
    padded = present + [present[-1]] * (3 - len(present))  # unused segments: 0 elements
    args = [x for (g, out), n in zip(padded, counts) for x in (g, out, n)]
    blocks = sum(triton.cdiv(n, block) for n in counts)
    scale_kernel[(blocks,)](*args, grad_out.reshape(()), BLOCK=block)
    outs = iter(out for _, out in present)
    return [None if g is None else next(outs) for g in grads]
