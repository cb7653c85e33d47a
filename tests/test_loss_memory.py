"""Peak memory of the torch path at B=8192, D=256, measured, not estimated.

Each measurement runs in a fresh Python process (so memory freed by an earlier step cannot hide a
later one) and reads the kernel's resident-set high-water mark: /proc/self/clear_refs resets VmHWM
right before the step and VmHWM is read right after (a 1 ms RSS sampling thread where clear_refs is
not writable). RSS counts every page torch touches, so it can only over-estimate the true peak.
The probe must first see one B x B fp32 matrix (256 MiB) when one is built; the loss's forward +
backward, gradients included, must stay under a quarter of that.
"""

import json
import subprocess
import sys

import pytest

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
