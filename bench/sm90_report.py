"""Compile every shipped Triton kernel configuration for the H100 (sm_90) without a GPU and report it.

For each configuration: registers, spill stack, shared memory and the number of Hopper HGMMA
instructions in the SASS (via the cuobjdump / nvdisasm shipped in triton's wheel). Pointer and
stride arguments carry the 16-byte divisibility that triton's JIT specialises on at run time (the
pipeliner needs it to issue async copies), so the report matches what a GPU would compile.

    TRITON_INTERPRET=0 python bench/sm90_report.py [--json report.json]

Must run with TRITON_INTERPRET unset or 0 (under the interpreter `@triton.jit` gives no compiler).
A developer tool (it calls cuobjdump / nvdisasm): it lives in bench/, outside the shipped package, and
reads the shipped configurations from `vlm2vec_kernels.triton_common`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

SHARED_LIMIT_BYTES = 228 * 1024  # H100: 228 KB of shared memory per SM (227 KB usable per block)
SM90 = ("cuda", 90, 32)

_INT_ARGS = {
    "M", "N", "D", "R", "row0", "n_a", "n_b", "n_t", "t_offset", "t_stride",
    "stride_q", "stride_c", "stride_p", "stride_s", "stride_e", "tiles_per_split", "splits",
    "P", "Q", "stride_hp", "stride_hq", "stride_y", "stride_x", *(f"D{k}" for k in range(8)),
}  # fmt: skip
_FLOAT_ARGS = {"eps", "inv_tau", "weight", *(f"W{k}" for k in range(8))}
# integer arguments that are multiples of 16 in the shapes we ship for (D = 1536, 3584, ...)
_DIVISIBLE_INTS = {"D", "stride_q", "stride_c", "stride_p", "stride_s", "stride_e"}


@dataclass
class CompileReport:
    kernel: str
    config: str
    dtype: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    hgmma: int
    needs_hgmma: bool

    def problems(self) -> list[str]:
        """What is wrong for an H100: missing tensor-core work, spills, too much shared memory."""
        out = []
        if self.needs_hgmma and self.hgmma == 0:
            out.append("no HGMMA instructions (matrix work not on Hopper tensor cores)")
        if self.stack_bytes != 0:
            out.append(f"{self.stack_bytes} bytes of stack (register spills)")
        if self.shared_bytes > SHARED_LIMIT_BYTES:
            out.append(f"{self.shared_bytes} bytes of shared memory > {SHARED_LIMIT_BYTES}")
        return out


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in triton's wheel at {path}")
    return path


def _signature(fn, pointer_types: dict[str, str], constexprs: dict) -> tuple[dict, dict]:
    """Triton signature strings and divisibility attributes for `fn`'s arguments."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in _INT_ARGS:
            signature[name] = "i32"
            if name in _DIVISIBLE_INTS:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = pointer_types[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def shipped_configurations() -> list[dict]:
    """Every (kernel, tile config, dtype, specialisation) the launchers can send to an H100."""
    from vlm2vec_kernels.triton_common import GPU_CONFIGS, GROUP_M, MERGE_BLOCK, dot_precision
    from vlm2vec_kernels.triton_kernels import lse_merge_kernel, row_lse_partial_kernel, softmax_probs_kernel

    kernels = {
        "lse": row_lse_partial_kernel,
        "lse_narrow": row_lse_partial_kernel,
        "probs": softmax_probs_kernel,
        "probs_narrow": softmax_probs_kernel,
    }

    torch_names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    out = []
    for (role, operand), cfg in GPU_CONFIGS.items():
        dtypes = ["bf16", "fp16"] if operand == "16bit" else ["fp32"]
        fn = kernels[role]
        for dtype in dtypes:
            import torch

            precision = dot_precision(getattr(torch, torch_names[dtype]))
            pointer_types = {n: "*fp32" for n in fn.arg_names}
            # the gemm path's P buffers are bf16 for both 16-bit input types (grad_operand_dtype)
            p_type = "*fp32" if dtype == "fp32" else "*bf16"
            pointer_types.update(q_ptr=f"*{dtype}", c_ptr=f"*{dtype}", pq_ptr=p_type, pc_ptr=p_type)
            variants = [{"WRITE_LSE": False}, {"WRITE_LSE": True}] if role.startswith("lse") else [{}]
            for extra in variants:
                for even_k in (True, False):
                    if not even_k and dtype == "fp16":
                        continue  # same code as bf16; the masked-K variant is checked there
                    constexprs = {
                        "BLOCK_M": cfg.block_m,
                        "BLOCK_N": cfg.block_n,
                        "BLOCK_K": cfg.block_k,
                        "EVEN_K": even_k,
                        "UPCAST": False,
                        "DOT_PRECISION": precision,
                        **extra,
                    }
                    if "GROUP_M" in fn.arg_names:
                        constexprs["GROUP_M"] = GROUP_M
                    if "GRAD_BF16" in fn.arg_names:
                        constexprs["GRAD_BF16"] = dtype != "fp32"
                    label = (
                        f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
                        f"{'' if even_k else ' maskK'}"
                        f"{' lse' if extra.get('WRITE_LSE') else ''}"
                    )
                    out.append(
                        {
                            "fn": fn,
                            "kernel": role,
                            "config": label,
                            "dtype": dtype,
                            "pointer_types": pointer_types,
                            "constexprs": constexprs,
                            "options": cfg.launch_options(),
                            "needs_hgmma": True,
                        }
                    )
    out += _fused_configurations()
    out += _prefix_configurations()
    out.append(
        {
            "fn": lse_merge_kernel,
            "kernel": "lse_merge",
            "config": f"BLOCK {MERGE_BLOCK} w4",
            "dtype": "fp32",
            "pointer_types": {"part_ptr": "*fp32", "lse_ptr": "*fp32"},
            "constexprs": {"BLOCK": MERGE_BLOCK},
            "options": {"num_warps": 4, "num_stages": 1},
            "needs_hgmma": False,
        }
    )
    return out


def _fused_configurations() -> list[dict]:
    """The gradients-in-the-forward kernels (no matrix work: no HGMMA expected), at D = 1536 with
    their GPU row configs, for every dtype and every constexpr branch the launchers take."""
    from vlm2vec_kernels import triton_kernels as k
    from vlm2vec_kernels.triton_common import ROW_CONFIGS, SCALE_BLOCK

    out = []

    def add(fn, role, label, dtype, pointers, constexprs, num_warps):
        pointer_types = {n: "*fp32" for n in fn.arg_names} | pointers
        out.append(
            {"fn": fn, "kernel": role, "config": label, "dtype": dtype, "pointer_types": pointer_types,
             "constexprs": constexprs, "options": {"num_warps": num_warps, "num_stages": 1},
             "needs_hgmma": False}
        )  # fmt: skip

    norms, xent, finish = ROW_CONFIGS["norms"], ROW_CONFIGS["xent"], ROW_CONFIGS["finish"]
    for dtype in ("bf16", "fp16", "fp32"):
        label = f"R{norms.block_r} D{norms.block(1536)} w{norms.num_warps}"
        add(k.inverse_norms_kernel, "norms", label, dtype,
            {"q_ptr": f"*{dtype}", "c_ptr": f"*{dtype}"},
            {"BLOCK_R": norms.block_r, "BLOCK_D": norms.block(1536)}, norms.num_warps)  # fmt: skip
        # ids: candidate_ids in "mask" mode (the target's copies masked in the row kernel)
        for normalize, want, ids in ((True, True, False), (False, True, False), (True, False, False),
                                     (True, True, True)):  # fmt: skip
            e_type = "*fp32" if dtype == "fp32" else "*bf16"
            label = f"R{xent.block_r} N{xent.max_block} w{xent.num_warps} norm={normalize:d} grad={want:d}"
            label += " ids=1" if ids else ""
            add(k.xent_rows_kernel, "xent_rows", label, dtype,
                {"e_ptr": e_type, "t_ptr": "*i64", "ids_ptr": "*i64"},
                {"NORMALIZE": normalize, "TAU_TENSOR": not want, "HAS_TARGETS": normalize, "HAS_IDS": ids,
                 "WANT_GRAD": want, "BLOCK_R": xent.block_r, "BLOCK_N": xent.max_block},
                xent.num_warps)  # fmt: skip
        add(k.finish_kernel, "finish", f"R{finish.block_r} D{finish.block(1536)} w{finish.num_warps}", dtype,
            {"q_ptr": f"*{dtype}", "c_ptr": f"*{dtype}"},
            {"HAS_Q": True, "HAS_C": True, "NORMALIZE": True, "WANT_DOTS": True, "TAU_TENSOR": True,
             "BLOCK_R": finish.block_r, "BLOCK_D": finish.block(1536)}, finish.num_warps)  # fmt: skip
        add(
            k.scale_kernel,
            "scale",
            f"BLOCK {SCALE_BLOCK} w4",
            dtype,
            {"a_out_ptr": f"*{dtype}", "b_out_ptr": f"*{dtype}"},
            {"BLOCK": SCALE_BLOCK},
            4,
        )
    return out


def _prefix_configurations() -> list[dict]:
    """The Matryoshka kernels (triton_prefix.py) at K = 5 prefixes with their GPU launch shapes; the
    two dot kernels must run on HGMMA."""
    import torch
    from vlm2vec_kernels import triton_prefix as tp
    from vlm2vec_kernels import triton_prefix_kernels as k
    from vlm2vec_kernels.triton_common import ROW_CONFIGS, dot_precision

    norms, rows = ROW_CONFIGS["norms"], tp.GPU_ROWS
    out = []

    def add(fn, label, dtype, pointers, constexprs, num_warps, num_stages, hgmma):
        out.append(
            {"fn": fn, "kernel": fn.__name__.removesuffix("_kernel"), "config": label, "dtype": dtype,
             "pointer_types": {n: "*fp32" for n in fn.arg_names} | pointers, "constexprs": constexprs,
             "options": {"num_warps": num_warps, "num_stages": num_stages}, "needs_hgmma": hgmma}
        )  # fmt: skip

    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        inputs = {"q_ptr": f"*{dtype}", "c_ptr": f"*{dtype}"}
        precision = dot_precision(torch_dtype)
        add(k.prefix_norms_kernel, f"K5 R{norms.block_r} D{norms.block(1536)} w{norms.num_warps}", dtype,
            inputs, {"K": 5, "BLOCK_R": norms.block_r, "BLOCK_D": norms.block(1536)}, norms.num_warps, 1,
            False)  # fmt: skip
        bm, bn, bk, warps = tp.GPU_TILE["logits"]
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_PRECISION": precision}
        add(k.prefix_logits_kernel, f"K5 {bm}x{bn}x{bk} w{warps}", dtype, inputs,
            {"K": 5, "UPCAST": False, **tile}, warps, 3, True)  # fmt: skip
        bm, bn, bk, warps = tp.GPU_TILE["grad_fp32" if dtype == "fp32" else "grad"]
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_PRECISION": precision}
        for normalize in (True, False):
            add(k.segment_grad_kernel, f"K5 {bm}x{bn}x{bk} w{warps} norm={normalize:d}", dtype,
                {"y_ptr": f"*{dtype}", "x_ptr": f"*{dtype}"}, {"K": 5, "NORMALIZE": normalize, **tile},
                warps, 3, True)  # fmt: skip
    for normalize, want in ((True, True), (False, True), (True, False)):
        add(k.prefix_rows_kernel, f"K5 R{rows.block_r} N{rows.max_block} w{rows.num_warps} "
            f"norm={normalize:d} grad={want:d}", "fp32", {"t_ptr": "*i64"},
            {"K": 5, "NORMALIZE": normalize, "TAU_TENSOR": True, "HAS_TARGETS": normalize,
             "ROW_WEIGHT": not normalize, "WANT_GRAD": want, "BLOCK_R": rows.block_r,
             "BLOCK_N": rows.max_block}, rows.num_warps, 1, False)  # fmt: skip
    return out


def compile_one(entry: dict) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(entry["fn"], entry["pointer_types"], entry["constexprs"])
    src = ASTSource(fn=entry["fn"], signature=signature, constexprs=entry["constexprs"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget(*SM90), options=entry["options"])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("nvdisasm"), cubin], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    static_shared = re.search(r"SHARED:(\d+)", usage)
    shared = int(compiled.metadata.shared) + (int(static_shared.group(1)) if static_shared else 0)
    return CompileReport(
        kernel=entry["kernel"],
        config=entry["config"],
        dtype=entry["dtype"],
        registers=int(regs.group(1)) if regs else -1,
        stack_bytes=int(stack.group(1)) if stack else -1,
        shared_bytes=shared,
        hgmma=len(re.findall(r"\bHGMMA\.", sass)),
        needs_hgmma=entry["needs_hgmma"],
    )


def _compile_index(index: int) -> CompileReport:
    return compile_one(shipped_configurations()[index])


def compile_all(jobs: int = 1) -> list[CompileReport]:
    """Compile every shipped configuration, `jobs` at a time (ptxas is single-threaded)."""
    count = len(shipped_configurations())
    if jobs <= 1:
        return [_compile_index(i) for i in range(count)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_index, range(count)))


def format_table(reports: list[CompileReport]) -> str:
    head = (
        f"{'kernel':<12} {'config':<28} {'dtype':<5} {'regs':>4} {'shared KB':>9} {'stack':>5} "
        f"{'HGMMA':>5}  status"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        status = "; ".join(r.problems()) or "ok"
        hgmma = str(r.hgmma) if r.needs_hgmma else "-"
        lines.append(
            f"{r.kernel:<12} {r.config:<28} {r.dtype:<5} {r.registers:>4} "
            f"{r.shared_bytes / 1024:>9.1f} {r.stack_bytes:>5} {hgmma:>5}  {status}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="also write the reports to this JSON file")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="parallel compilations (default: min(4, CPUs))",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("sm90_report: set TRITON_INTERPRET=0 (the interpreter cannot compile)", file=sys.stderr)
        return 2
    import triton

    reports = compile_all(args.jobs)
    print(f"sm_90 compile report (triton {triton.__version__}, no GPU needed)")
    print(format_table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"problems": r.problems()} for r in reports], f, indent=1)
    return 1 if any(r.problems() for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
