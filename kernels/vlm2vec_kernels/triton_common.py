"""What both launch paths of the Triton engine share: tile and row configurations, operand dtypes,
the choice between the GPU and the interpreter, and GEMMs with an fp32 output."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import triton

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
# for sm_90 by bench/sm90_report.py (tests/test_sm90_compile.py) without a GPU. The 16-bit
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


def operand_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use 3xTF32 (near-fp32 accuracy on tensor cores); 16-bit ones ignore this."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def grad_operand_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of P and of the q/c operands in the gradient products: bf16 for 16-bit inputs on the GPU
    (fp16's range would flush the small P = w * p of large mean-reduced batches to zero), fp32 for
    fp32 inputs and under the interpreter (whose bf16 dot is wrong)."""
    return torch.bfloat16 if on_gpu(q) and q.dtype != torch.float32 else torch.float32


def on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda and not INTERPRET


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda" or INTERPRET:
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def pick_config(role: str, q: torch.Tensor, config: TileConfig | None) -> TileConfig:
    if config is not None:
        return config
    if not on_gpu(q):
        return INTERPRETER_CONFIG
    return GPU_CONFIGS[(role, operand_class(q.dtype))]


def common_constexprs(q: torch.Tensor, cfg: TileConfig, D: int) -> dict:
    return {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "EVEN_K": D % cfg.block_k == 0,
        "UPCAST": not on_gpu(q),
        "DOT_PRECISION": dot_precision(q.dtype),
    }


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
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
# memory-bound. (xent with 2048-wide blocks spilled 8 bytes for 16-bit inputs: bench/sm90_report.py.)
# The interpreter runs each program in Python: few, large programs.
ROW_CONFIGS = {"norms": RowConfig(4, 2048, 8), "xent": RowConfig(4, 1024, 8), "finish": RowConfig(4, 2048, 8)}
INTERPRETER_ROW_CONFIG = RowConfig(64, 1024, 1)
SCALE_BLOCK, INTERPRETER_SCALE_BLOCK = 4096, 2**16


def row_config(role: str, x: torch.Tensor) -> RowConfig:
    return ROW_CONFIGS[role] if on_gpu(x) else INTERPRETER_ROW_CONFIG


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()
