"""Triton engine kernels against a float64 evaluation of the formula (engine.py's math).

The recompute kernels (`row_lse`, `softmax_grad`) here; the gradients-in-the-forward ones (`xent`,
`finish`, ...) also in tests/test_loss_torch.py::test_fused_engine_ops_match_formula.

On this CPU box the kernels run under TRITON_INTERPRET=1 (set by conftest). On a GPU machine with
TRITON_INTERPRET=0 (bench/device_check.sh) the same tests run compiled on CUDA tensors, plus sizes
that span several GPU tiles; VLM2VEC_TEST_DEVICE=cpu|cuda overrides the choice.
Every run draws fresh inputs (the seed is in each failure message); every buffer the launchers
allocate is poisoned with NaN so an unwritten element cannot pass.
"""

import math
import os
import random

import pytest
import torch
from vlm2vec_kernels import triton_engine as engine
from vlm2vec_kernels import triton_recompute
from vlm2vec_kernels.triton_common import TileConfig

_GPU_OK = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = os.environ.get("VLM2VEC_TEST_DEVICE", "cuda" if _GPU_OK else "cpu")
ON_GPU = DEVICE == "cuda"

# (M, N, D): odd sizes, masked and unmasked feature loops (BLOCK_K 32 under the interpreter), M=1, N=1
SIZES = [(37, 111, 40), (37, 111, 96), (1, 111, 40), (37, 1, 96)]
if ON_GPU:  # several 128-wide tiles, column splits, the unmasked GPU feature loop
    SIZES += [(1040, 1100, 1536)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# max |got - want| / max |want| for the gradients and max |got - want| for lse, per operand dtype.
# Under the interpreter every tile is upcast to fp32. On the GPU the gradient products of 16-bit
# inputs take P rounded to bf16 (as flash-attention's backward does); fp32 uses 3xTF32.
if ON_GPU:
    GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2.5e-2, torch.bfloat16: 2.5e-2}
    LSE_TOL = {torch.float32: 2e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}
else:
    GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
    LSE_TOL = {torch.float32: 2e-4, torch.float16: 2e-4, torch.bfloat16: 2e-4}


def reference(q, c, row_scale, col_scale, row_weight):
    """float64 lse, gq, gc straight from the definitions in vlm2vec_kernels/engine.py."""
    q, c = q.double(), c.double()
    rs, cs, w = row_scale.double(), col_scale.double(), row_weight.double()
    s = rs[:, None] * cs[None, :] * (q @ c.T)
    lse = torch.logsumexp(s, dim=1)
    p = w[:, None] * torch.exp(s - lse[:, None])
    gq = (p * cs[None, :]) @ c
    gc = (p * rs[:, None]).T @ q
    return lse, gq, gc


@pytest.fixture
def rng():
    """Fresh generator per test; the seed goes into failure messages for replay."""
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))


@pytest.fixture(autouse=True)
def poison_buffers():
    """Every buffer the launchers allocate starts as NaN: lanes a kernel forgets to write show up.
    torch's deterministic mode fills uninitialised memory (torch.empty) with NaN; warn_only keeps the
    ops that have no deterministic CUDA version running."""
    assert torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def make_inputs(gen, M, N, D, dtype, *, zero_weights=True):
    q = torch.randn(M, D, generator=gen).to(dtype)
    c = torch.randn(N, D, generator=gen).to(dtype)
    # inverse-norm-like scales of random size; logits then span roughly +-30
    row_scale = (0.5 + 1.5 * torch.rand(M, generator=gen)) / math.sqrt(D) * 4
    col_scale = 0.5 + torch.rand(N, generator=gen)
    row_weight = torch.rand(M, generator=gen)
    if zero_weights and M > 2:
        row_weight[torch.randperm(M, generator=gen)[: M // 4]] = 0.0
    return [t.to(DEVICE) for t in (q, c, row_scale, col_scale, row_weight)]


def assert_close_rel(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten or overflow)"
    err = (got.double().cpu() - want.cpu()).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max err {err:.3e} vs max |ref| {scale:.3e} (tol {tol})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,D", SIZES)
def test_row_lse_matches_float64(rng, M, N, D, dtype):
    q, c, rs, cs, _ = make_inputs(rng, M, N, D, dtype)
    want, _, _ = reference(q, c, rs, cs, torch.ones_like(rs))
    got = engine.row_lse(q, c, rs, cs)
    assert got.dtype == torch.float32 and got.device.type == DEVICE
    err = (got.double().cpu() - want.cpu()).abs().max().item()
    assert torch.isfinite(got).all() and err <= LSE_TOL[dtype], f"seed {rng.initial_seed()}: err {err:.3e}"


@pytest.mark.parametrize("splits", [1, 2, 3, 64])
def test_row_lse_any_split_count_gives_the_same_lse(rng, splits):
    """One split writes lse directly; several go through the merge kernel (3 leaves a ragged split)."""
    q, c, rs, cs, _ = make_inputs(rng, 37, 150, 40, torch.float32)
    want, _, _ = reference(q, c, rs, cs, torch.ones_like(rs))
    got = engine.row_lse(q, c, rs, cs, splits=splits)
    err = (got.double().cpu() - want.cpu()).abs().max().item()
    assert torch.isfinite(got).all(), f"seed {rng.initial_seed()}: non-finite lse"
    assert err <= LSE_TOL[torch.float32], f"seed {rng.initial_seed()}: lse err {err:.2e}"


@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,D", SIZES)
def test_softmax_grad_matches_float64(rng, M, N, D, dtype, blocks):
    q, c, rs, cs, w = make_inputs(rng, M, N, D, dtype)
    want_lse, want_gq, want_gc = reference(q, c, rs, cs, w)
    lse = want_lse.float().to(DEVICE)
    shape = {}
    if blocks == "several":  # several row and column blocks with ragged edges: accumulating GEMMs
        shape = {"block_rows": 32 if M < 1000 else 384, "block_cols": 64 if N < 1000 else 512}
    gq, gc = engine.softmax_grad(q, c, rs, cs, lse, w, **shape)
    assert gq.dtype == gc.dtype == torch.float32
    assert_close_rel(gq, want_gq, GRAD_TOL[dtype], f"seed {rng.initial_seed()} gq")
    assert_close_rel(gc, want_gc, GRAD_TOL[dtype], f"seed {rng.initial_seed()} gc")


@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_rectangular_tiles(rng, shape):
    """BLOCK_M != BLOCK_N: transposes and tile bookkeeping must not assume square tiles."""
    q, c, rs, cs, w = make_inputs(rng, 70, 45, 40, torch.float32)
    want_lse, want_gq, want_gc = reference(q, c, rs, cs, w)
    cfg = TileConfig(64, 16, 16, 4, 2) if shape == "tall" else TileConfig(16, 64, 32, 4, 2)
    lse = engine.row_lse(q, c, rs, cs, config=cfg)
    err = (lse.double().cpu() - want_lse.cpu()).abs().max().item()
    assert err <= LSE_TOL[torch.float32], f"seed {rng.initial_seed()}: lse err {err:.3e}"
    gq, gc = engine.softmax_grad(q, c, rs, cs, lse, w, config=cfg, block_rows=48, block_cols=32)
    assert_close_rel(gq, want_gq, GRAD_TOL[torch.float32], f"seed {rng.initial_seed()} gq")
    assert_close_rel(gc, want_gc, GRAD_TOL[torch.float32], f"seed {rng.initial_seed()} gc")


def test_confident_rows_keep_lse_precise(rng):
    """Normalised rows at 1/tau = 50 with near-duplicate positives: p -> 1, logits near 50."""
    M, D = 37, 96
    q = torch.nn.functional.normalize(torch.randn(M, D, generator=rng), dim=1)
    c = torch.cat([q + 0.01 * torch.randn(M, D, generator=rng), torch.randn(74, D, generator=rng)])
    rs = torch.full((M,), 50.0) / q.norm(dim=1)
    cs = 1.0 / c.norm(dim=1)
    q, c, rs, cs = (t.to(DEVICE) for t in (q, c, rs, cs))
    want, _, _ = reference(q, c, rs, cs, torch.ones_like(rs))
    got = engine.row_lse(q, c, rs, cs)
    assert want.min() > 45  # the case is what it claims to be
    assert (got.double().cpu() - want.cpu()).abs().max() <= LSE_TOL[torch.float32]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["q", "c"])
def test_non_finite_input_propagates(rng, bad, where):
    M, N, D = 37, 111, 40
    q, c, rs, cs, w = make_inputs(rng, M, N, D, torch.float32, zero_weights=False)
    (q if where == "q" else c)[5, 7] = bad
    lse = engine.row_lse(q, c, rs, cs)
    if where == "q":
        assert not torch.isfinite(lse[5]), "a non-finite query row gave a finite lse"
    else:
        assert not torch.isfinite(lse).any(), "a non-finite candidate left some lse finite"
    gq, gc = engine.softmax_grad(q, c, rs, cs, lse, w)
    assert not torch.isfinite(gq).all() and not torch.isfinite(gc).all(), "gradients finite"


LOSS_SIZES = [(37, 2, 96)] + ([(1000, 1, 1536)] if ON_GPU else [])


@pytest.mark.parametrize("symmetric", [False, True], ids=["fused", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Bq,K,D", LOSS_SIZES)
def test_contrastive_loss_on_this_engine_matches_float64(rng, Bq, K, D, dtype, symmetric):
    """The public loss (other module's orchestration) running on these kernels: loss and both input
    gradients against float64 autograd of normalise -> logits / tau -> cross-entropy."""
    from vlm2vec_kernels import contrastive_loss

    q = torch.randn(Bq, D, generator=rng).to(dtype).to(DEVICE).requires_grad_(True)
    c = torch.randn(Bq * (1 + K), D, generator=rng).to(dtype).to(DEVICE).requires_grad_(True)
    loss = contrastive_loss(q, c, temperature=0.05, symmetric=symmetric, backend="triton")
    loss.backward()
    q64 = q.detach().double().cpu().requires_grad_(True)
    c64 = c.detach().double().cpu().requires_grad_(True)
    logits = torch.nn.functional.normalize(q64, dim=1) @ torch.nn.functional.normalize(c64, dim=1).T / 0.05
    targets = torch.arange(Bq) * (1 + K)
    want = torch.nn.functional.cross_entropy(logits, targets)
    if symmetric:
        want = (want + torch.nn.functional.cross_entropy(logits[:, targets].T, torch.arange(Bq))) / 2
    want.backward()
    # the loss is fp32 math on exact inputs; 16-bit gradients are rounded once on return (and go
    # through bf16 P on the GPU)
    loss_tol = 2e-4 if dtype == torch.float32 else 1e-3
    grad_tol = 4e-4 if dtype == torch.float32 else 3e-2 if ON_GPU else 5e-3
    err = abs(loss.item() - want.item())
    assert err <= loss_tol * max(1.0, abs(want.item())), f"seed {rng.initial_seed()}: loss err {err:.2e}"
    assert_close_rel(q.grad.float(), q64.grad, grad_tol, f"seed {rng.initial_seed()} dq")
    assert_close_rel(c.grad.float(), c64.grad, grad_tol, f"seed {rng.initial_seed()} dc")


def test_p_blocks_stay_bounded():
    """The gemm path never holds more than its budget of P, nor all of B x B once B > 2 * 4096."""
    budget = 2**31
    for B in (1024, 16384, 65536, 2**20):
        rows, cols = triton_recompute.p_block_shape(B, B, 2, 256, budget)
        assert 2 * rows * cols * 2 <= budget, (B, rows, cols)
        assert rows == B or rows % 256 == 0
        if B > 2 * triton_recompute.MIN_GEMM_ROWS:
            assert rows * cols <= B * B // 4, (B, rows, cols)
    assert triton_recompute.p_block_shape(1024, 1024, 2, 256) == (1024, 1024)  # small batches: one block
    assert triton_recompute.p_block_shape(100, 300, 4, 32, block_rows=48, block_cols=64) == (48, 64)


def test_split_count_fills_the_gpu_and_stays_bounded():
    dev = torch.device("cpu")
    cfg = TileConfig(128, 64, 64, 4, 3)
    splits, per = triton_recompute.choose_splits(1024, 1024, cfg, dev)
    assert splits * per >= 1024 // 64 and (splits - 1) * per < 1024 // 64  # every tile, no empty split
    splits, _ = triton_recompute.choose_splits(2**20, 2**20, cfg, dev)
    assert splits <= triton_recompute.MAX_SPLITS


def test_bad_arguments_are_named():
    q, c, rs, cs = (
        t.to(DEVICE) for t in (torch.randn(4, 8), torch.randn(6, 8), torch.ones(4), torch.ones(6))
    )
    with pytest.raises(ValueError, match="share D"):
        engine.row_lse(q, c[:, :7], rs, cs)
    with pytest.raises(TypeError, match="same dtype"):
        engine.row_lse(q, c.half(), rs, cs)
    with pytest.raises(TypeError, match="col_scale must be float32"):
        engine.row_lse(q, c, rs, cs.double())
    with pytest.raises(ValueError, match="row_scale must have shape"):
        engine.row_lse(q, c, rs[:3], cs)
    with pytest.raises(TypeError, match="q must be float32"):
        engine.row_lse(q.long(), c, rs, cs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,D", SIZES)
def test_fused_kernels_match_float64(rng, monkeypatch, M, N, D, dtype):
    """inverse_norms + xent + finish over ragged chunks of 16 rows (poisoned buffers), explicit
    targets, against the formula: loss, both gradients with the normalisation's Jacobian, dL/dtau."""
    from vlm2vec_kernels.engine import Targets

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 16 * N)
    monkeypatch.setattr(engine, "MIN_CHUNK_ROWS", 16)
    q, c, _, _, _ = make_inputs(rng, M, N, D, dtype)
    index = torch.randint(0, N, (M,), generator=rng).to(DEVICE)
    weight, tau = 0.7, 0.2
    q64, c64 = q.double().cpu(), c.double().cpu()
    nq, nc = q64.norm(dim=1, keepdim=True), c64.norm(dim=1, keepdim=True)
    s = (q64 / nq) @ (c64 / nc).T / tau
    rows, cols = torch.arange(M), index.cpu()
    want_loss = weight * (torch.logsumexp(s, 1) - s[rows, cols]).sum()
    g = torch.softmax(s, 1)
    g[rows, cols] -= 1
    g *= weight / tau
    dqn, dcn = g @ (c64 / nc), g.T @ (q64 / nq)  # gradients of the normalised rows
    want_dq = (dqn - (dqn * q64 / nq).sum(1, keepdim=True) * q64 / nq) / nq
    want_dc = (dcn - (dcn * c64 / nc).sum(1, keepdim=True) * c64 / nc) / nc
    want_dtau = -(g * s).sum()  # sum_ij dL/ds_ij ds_ij/dtau with ds/dtau = -s / tau (g holds 1/tau)

    rq, rc = engine.inverse_norms(q, c)
    loss, dq, dc = engine.xent(q, c, rq, rc, tau, Targets(index, 0, 0, checked=True), weight, True, True)
    dq, dc, dtau = engine.finish(dq, q, rq, dc, c, rc, tau, True)
    tol = GRAD_TOL[dtype] if ON_GPU else 2e-5
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * max(1.0, abs(want_loss.item())) + LSE_TOL[dtype] * M
    assert_close_rel(dq, want_dq, tol, f"seed {rng.initial_seed()} dq")
    assert_close_rel(dc, want_dc, tol, f"seed {rng.initial_seed()} dc")
    assert abs(dtau.item() - want_dtau.item()) <= tol * (g.abs() * s.abs()).sum().item()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_fused_fwd_bwd_is_captured_by_a_cuda_graph(rng):
    """B=1024 (one chunk): the whole fwd+bwd has no host sync, so torch.cuda.graphs captures it, and a
    replay on new inputs gives what a plain call gives."""
    from vlm2vec_kernels import contrastive_loss

    q = torch.randn(1024, 1536, generator=rng).to(DEVICE, torch.bfloat16).requires_grad_()
    c = torch.randn(1024, 1536, generator=rng).to(DEVICE, torch.bfloat16).requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation) outside the capture
        for _ in range(2):
            q.grad = c.grad = None
            contrastive_loss(q, c, 0.02, backend="triton").backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    q.grad = c.grad = None
    with torch.cuda.graph(graph):
        loss = contrastive_loss(q, c, 0.02, backend="triton")
        loss.backward()
    with torch.no_grad():
        q.copy_(torch.randn(1024, 1536, generator=rng).to(DEVICE, torch.bfloat16))
        c.copy_(torch.randn(1024, 1536, generator=rng).to(DEVICE, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    q2, c2 = q.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    want = contrastive_loss(q2, c2, 0.02, backend="triton")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    # (cuBLAS may pick another algorithm inside the capture: one bf16 rounding step of slack)
    torch.testing.assert_close(q.grad.float(), q2.grad.float(), rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(c.grad.float(), c2.grad.float(), rtol=1e-2, atol=1e-6)
