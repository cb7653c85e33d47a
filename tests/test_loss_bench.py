"""The GPU-only parts of bench/loss_kernel.py (the engine sweep that bench/device_check.sh runs) call
the Triton engine by name: run every sweep case once under the interpreter, at a tiny size, so that a
renamed engine function breaks CI here instead of a scarce GPU session."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import loss_kernel  # noqa: E402
from vlm2vec_kernels import triton_engine as eng  # noqa: E402


def test_every_sweep_case_runs():
    B, D = 64, 32
    q, c = torch.randn(B, D), torch.randn(B, D)
    rs = torch.full((B,), 1.0 / loss_kernel.TAU) / q.norm(dim=1)
    cs = 1.0 / c.norm(dim=1)
    w = torch.full((B,), 1.0 / B)
    lse = eng.row_lse(q, c, rs, cs)
    cases = loss_kernel._sweep_cases(eng, q, c, rs, cs, lse, w) | loss_kernel._fused_sweep_cases(eng, q, c)
    assert len(cases) >= 10
    for fn in cases.values():
        fn()  # raises on a stale name or signature
    # the lse the sweep times is the real one: log-sum-exp of the scaled cosine logits
    expected = torch.logsumexp((q * rs[:, None]) @ (c * cs[:, None]).T, dim=1)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)
