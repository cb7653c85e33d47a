"""GPU readiness without a GPU: every shipped kernel configuration compiles for the H100 (sm_90).

Runs bench/sm90_report.py (a developer tool, outside the shipped package) in a subprocess with
TRITON_INTERPRET=0 (under the interpreter that conftest selects, `@triton.jit` gives no compiler).
Checks Hopper HGMMA in every dot kernel's SASS, no register spills, shared memory within the SM, and
that nothing shipped is left out. The report table is printed with capture disabled and written to
the pytest temp dir, so it shows in CI logs with or without `-s`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from vlm2vec_kernels.triton_common import GPU_CONFIGS

REPORT = Path(__file__).resolve().parents[1] / "bench" / "sm90_report.py"

SHARED_LIMIT = 228 * 1024


def test_every_shipped_kernel_compiles_for_h100(tmp_path, capsys):
    report = tmp_path / "sm90_report.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, str(REPORT), "--json", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (tmp_path / "sm90_report.txt").write_text(proc.stdout)
    with capsys.disabled():
        print("\n" + proc.stdout)
    assert proc.returncode in (0, 1), f"sm90_report crashed:\n{proc.stderr[-4000:]}"
    rows = json.loads(report.read_text())

    compiled = {(r["kernel"], "fp32" if r["dtype"] == "fp32" else "16bit") for r in rows}
    assert set(GPU_CONFIGS) <= compiled, f"not compiled: {set(GPU_CONFIGS) - compiled}"
    assert {r["dtype"] for r in rows} >= {"bf16", "fp16", "fp32"}
    assert any(r["kernel"] == "lse_merge" for r in rows)
    fused = {"norms", "xent_rows", "finish", "scale"}  # the gradients-in-the-forward kernels
    assert fused <= {r["kernel"] for r in rows}, fused - {r["kernel"] for r in rows}
    for r in rows:
        name = f"{r['kernel']} {r['config']} {r['dtype']}"
        if r["needs_hgmma"]:
            assert r["hgmma"] > 0, f"{name}: matrix work did not become HGMMA"
        assert r["stack_bytes"] == 0, f"{name}: {r['stack_bytes']} bytes of register spills"
        assert 0 < r["registers"] <= 255, f"{name}: {r['registers']} registers"
        assert r["shared_bytes"] <= SHARED_LIMIT, f"{name}: {r['shared_bytes']} bytes of shared memory"
    assert proc.returncode == 0, "sm90_report flagged a problem the checks above missed"
