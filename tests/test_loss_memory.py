"""Peak memory of the torch path at B=8192, D=256, measured, not estimated.

Each measurement runs in a fresh Python process (so memory freed by an earlier step cannot hide a
later one) and reads the kernel's resident-set high-water mark: /proc/self/clear_refs resets VmHWM
right before the step and VmHWM is read right after (a 1 ms RSS sampling thread where clear_refs is
not writable). RSS counts every page torch touches, so it can only over-estimate the true peak.
The probe must first see one B x B fp32 matrix (256 MiB) when one is built; the loss's forward +
backward, gradients included, must stay under a quarter of that.

The second test compares with eager PyTorch (F.normalize + matmul + F.cross_entropy) at B=4096,
D=768, the shape ratio B/D of the CPU target B=8192, D=1536, in steady state: each side runs once at
full size first (thread pools, BLAS buffers, allocator), drops its gradients, and the next forward +
backward is measured, the returned gradients included. The probe is bench/loss_peak_cpu.py's (glibc's
mmap threshold fixed at 64 KiB so that freed temporaries leave the resident set at once).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vlm2vec_kernels import torch_engine

B, D = 8192, 256
MATRIX_MIB = B * B * 4 / 2**20  # 256 MiB

PROBE = r"""
import json, sys, threading, time
import torch
import vlm2vec_kernels

B, D, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def loss_step(n, reduction):
    q = torch.randn(n, D, requires_grad=True)
    c = torch.randn(n, D, requires_grad=True)

    def step():
        loss = vlm2vec_kernels.contrastive_loss(q, c, reduction=reduction, backend="torch")
        loss.backward(torch.ones_like(loss) if reduction == "none" else None)
        assert q.grad is not None and c.grad is not None and torch.isfinite(q.grad).all()

    return step


if what == "matrix":
    step = lambda: torch.ones(B, B).sum()
else:
    loss_step(64, what)()  # first-call set-up (thread pools, BLAS buffers) outside the measurement
    step = loss_step(B, what)

base = status_mib("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    peak, method = status_mib("VmHWM"), "VmHWM"
except OSError:
    samples, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            samples.append(status_mib("VmRSS"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    done.set()
    sampler.join()
    peak, method = max(samples + [status_mib("VmRSS")]), "sampled VmRSS"
print(json.dumps({"peak_delta_mib": peak - base, "method": method}))
"""


def measure(what: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(B), str(D), what], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_probe_sees_a_batch_by_batch_matrix():
    measured = measure("matrix")
    assert measured["peak_delta_mib"] >= 0.95 * MATRIX_MIB, measured


@pytest.mark.parametrize("reduction", ["mean", "none"])  # fused forward-backward / recomputing backward
def test_torch_path_peak_is_far_below_one_batch_by_batch_matrix(reduction):
    measured = measure(reduction)
    print(
        f"torch path B={B} D={D} reduction={reduction}: peak +{measured['peak_delta_mib']:.1f} MiB "
        f"({measured['method']}); one B x B fp32 matrix = {MATRIX_MIB:.0f} MiB"
    )
    assert measured["peak_delta_mib"] < MATRIX_MIB / 4, measured


RATIO_B, RATIO_D = 4096, 768
PEAK_BENCH = Path(__file__).resolve().parents[1] / "bench" / "loss_peak_cpu.py"


def measure_steady() -> dict:
    """Medians of one round of bench/loss_peak_cpu.py (each provider in a fresh process)."""
    result = subprocess.run(
        [sys.executable, str(PEAK_BENCH), "--B", str(RATIO_B), "--D", str(RATIO_D), "--rounds", "1",
         "--reps", "2", "--providers", "torch,eager", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_torch_path_peak_is_a_small_fraction_of_eager():
    """Measured, both sides: the torch path's peak is the returned gradients (2 * B * D fp32) plus the
    gradient pass's one spare chunk (its size from torch_engine's budget; no other temporary of note),
    eager's is several B x B matrices on top. The issue-12 measure: the peak beyond the returned
    gradients within 5% of eager's peak (B=8192, D=1536: bench/loss_peak_cpu.py)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs a writable /proc/self/clear_refs (VmHWM reset)")
    summary = measure_steady()
    eager = {"peak_delta_mib": summary["eager"]["steady"]}
    ours = {"peak_delta_mib": summary["torch"]["steady"]}
    grads_mib = 2 * RATIO_B * RATIO_D * 4 / 2**20
    step = torch_engine._chunk_rows(RATIO_B, RATIO_B)
    spare_mib = torch_engine._spare_rows(RATIO_B, RATIO_B, RATIO_D, step) * (RATIO_B + RATIO_D) * 4 / 2**20
    ratio = ours["peak_delta_mib"] / eager["peak_delta_mib"]
    print(
        f"B={RATIO_B} D={RATIO_D} fwd+bwd peak: torch path +{ours['peak_delta_mib']:.1f} MiB "
        f"(gradients {grads_mib:.0f} MiB + spare chunk {spare_mib:.1f} MiB), "
        f"eager +{eager['peak_delta_mib']:.1f} MiB: {ratio:.1%}"
    )
    assert ours["peak_delta_mib"] <= grads_mib + spare_mib + 2, (ours, grads_mib, spare_mib)
    assert ours["peak_delta_mib"] - grads_mib <= 0.05 * eager["peak_delta_mib"], (ours, eager)
    assert ratio <= 0.15, (ours, eager)
