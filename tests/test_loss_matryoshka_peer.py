"""The Matryoshka benchmark's peers (bench/loss_matryoshka.py) compute our loss: sentence-transformers'
MatryoshkaLoss around CachedMultipleNegativesRankingLoss, run for real on fixed embeddings, and the
loop over prefixes give the loss and gradients of contrastive_loss(matryoshka_dims=...) to fp32
precision; and `bench/loss_kernel.py --matryoshka` runs as a user runs it."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import loss_matryoshka as mrl  # noqa: E402

pytest.importorskip("sentence_transformers")

B, D, DIMS, TAU = 48, 40, [8, 24, 40], 0.05


def _loss_and_grads(fn, q0, c0):
    q, c = q0.clone().requires_grad_(), c0.clone().requires_grad_()
    loss = fn(q, c)
    loss.backward()
    return loss.detach(), q.grad, c.grad


@pytest.mark.parametrize("peer", ["mrl-st", "mrl-eager"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_peers_give_our_loss_and_gradients(peer, backend):
    """Same embeddings, prefixes and temperature (ST: scale = 1 / tau, cosine similarity; mini-batches
    of 16 rows, so its GradCache chunks and per-prefix backward really run): equal to fp32 rounding."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, D, generator=g)
    c = q + torch.randn(B, D, generator=g)
    ours = mrl.make_mrl_provider("mrl-fused" if backend == "triton" else "mrl-torch", DIMS, TAU)
    if peer == "mrl-st":
        theirs = lambda q, c: mrl.st_matryoshka(q, c, DIMS, TAU, mini_batch=16)()  # noqa: E731
    else:
        theirs = mrl.make_mrl_provider(peer, DIMS, TAU)
    want, got = _loss_and_grads(theirs, q, c), _loss_and_grads(ours, q, c)
    assert want[0] > 1.0  # a real loss (three prefixes, 48 candidates)
    for name, x, y in zip(("loss", "dq", "dc"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * y.abs().max().item(), msg=name)


def test_bench_matryoshka_runs(tmp_path):
    """The command as a user runs it: one row per provider, all ok, the peers' losses within fp32
    rounding of the torch engine's, and the ratio line last."""
    cmd = [
        sys.executable, "bench/loss_kernel.py", "--matryoshka", "8,24,40", "--device", "cpu", "--sizes", "64",
        "--dims", "40", "--cpu-budget-s", "0", "--no-plots", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "loss_kernel.csv")))
    assert {r["provider"] for r in rows} == {"mrl-torch", "mrl-eager", "mrl-st"}, rows
    for r in rows:
        assert r["status"] == "ok" and r["mode"] == "fwd+bwd", r
        assert float(r["loss_rel_diff"]) < 1e-5, r
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("matryoshka fwd+bwd B=64 D=40 vs mrl-torch") and "mrl-st" in last, last


def test_device_check_runs_the_matryoshka_case():
    """bench/device_check.sh parses and calls the benchmark with --matryoshka on the GPU."""
    script = REPO / "bench" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    assert "--matryoshka" in script.read_text()
