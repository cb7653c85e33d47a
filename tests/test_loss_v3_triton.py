"""The Matryoshka loss on the Triton backend (triton_prefix.py): values against the float64 reference,
and what one fwd+bwd launches (B = 1024, five prefixes, a tensor temperature).

Runs under TRITON_INTERPRET=1 on CPU tensors here (small sizes for the value checks: the interpreter
runs every program in Python); on a GPU machine the same cases run compiled on CUDA tensors.
"""

import pytest
import torch
from test_loss_overhead import LaunchCounter, _CountedKernel, device_checks, dot_flops  # noqa: F401
from test_loss_v3 import Seeded, assert_close, run

triton_prefix = pytest.importorskip("vlm2vec_kernels.triton_prefix")

# (dims, weights, normalize, reduction, explicit targets): boundaries on and off the 32-wide tiles,
# D beyond the largest prefix, one prefix, raw dot products, every reduction
CASES = {
    "5dims-mean": ((16, 32, 48, 64, 96), None, True, "mean", False),
    "unaligned-weighted-sum": ((7, 20, 45), (0.5, 1.0, 2.0), True, "sum", True),
    "without-D-none": ((24, 40), (2.0, 1.0), True, "none", False),
    "raw-none": ((33, 96), None, False, "none", True),
    "one-prefix-mean": ((96,), None, True, "mean", True),
}


@pytest.fixture
def gen():
    return Seeded()


def _batch(gen, n_q, k, d, explicit):
    g = gen.generator
    n_c = n_q * (1 + k)
    q, c = torch.randn(n_q, d, generator=g), torch.randn(n_c, d, generator=g)
    targets = torch.randperm(n_c, generator=g)[:n_q] if explicit else torch.arange(n_q) * (1 + k)
    c[targets] = q + 1.5 * torch.randn(n_q, d, generator=g)
    return q, c, targets


@pytest.fixture
def counter(monkeypatch):
    counter = LaunchCounter()
    from vlm2vec_kernels import triton_engine

    for module in (triton_prefix, triton_engine):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, _CountedKernel(getattr(module, name), name, counter))
    return counter


@pytest.mark.parametrize("case", CASES.keys())
def test_matches_reference(gen, counter, case):
    """Loss and every gradient element (query, candidates, temperature) against float64, with the
    tolerances of tests/test_loss_v3.py; the prefix kernels ran (not the torch ops)."""
    dims, weights, normalize, reduction, explicit = CASES[case]
    q, c, targets = _batch(gen, 21, 2, 96, explicit)
    if not normalize:
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    upstream = torch.randn(q.shape[0], generator=gen.generator)
    options = dict(
        matryoshka_dims=list(dims), normalize=normalize, symmetric=False, reduction=reduction,
        targets=targets if explicit else None,
    )  # fmt: skip
    if weights is not None:
        options["matryoshka_weights"] = list(weights)
    with counter:
        got, want, dtau_scale = run(
            q, c, 0.05, upstream, backend="triton", reference_targets=None if explicit else targets, **options
        )
    assert counter.ops["triton.prefix_rows_kernel"] >= 1, dict(counter.ops)
    assert_close(got, want, dtau_scale, gen.seed)


def test_six_flops_per_logit_and_feature():
    """The three dot kernels together: 6 M N d_K multiply-adds counted as FLOPs (tl.dot in the
    interpreter), the FLOPs of three GEMMs whatever the number of prefixes (tiles divide every d_k)."""
    M, N, D = 64, 64, 128
    q, c = torch.randn(M, D, requires_grad=True), torch.randn(N, D, requires_grad=True)
    with dot_flops() as flops:
        loss = triton_prefix_loss(q, c, [32, 64, 128])
        loss.backward()
    assert flops[0] == 6 * M * N * D, flops[0] / (M * N * D)


def triton_prefix_loss(q, c, dims):
    from vlm2vec_kernels import contrastive_loss

    return contrastive_loss(q, c, torch.tensor(0.05), backend="triton", matryoshka_dims=dims)


def test_launches_per_call(counter, device_checks):  # noqa: F811
    """B = 1024, five prefixes (64, 128, 256, 512, 1536 at D = 1536 on a GPU), a tensor temperature: at
    most 14 launches per fwd+bwd (11 when written) and no host sync (extended.py's torch ops: 273)."""
    from test_loss_overhead import TRITON_DEVICE

    # the interpreter: D = 96 (the same launches; D = 1536 takes it minutes)
    dims = [64, 128, 256, 512, 1536] if TRITON_DEVICE == "cuda" else [16, 32, 48, 64, 96]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1024, dims[-1], generator=gen).to(TRITON_DEVICE).requires_grad_()
    c = torch.randn(1024, dims[-1], generator=gen).to(TRITON_DEVICE).requires_grad_()
    tau = torch.tensor(0.05, device=TRITON_DEVICE, requires_grad=True)
    from vlm2vec_kernels import contrastive_loss

    with counter:
        contrastive_loss(q, c, tau, backend="triton", matryoshka_dims=dims).backward()
    print(f"matryoshka (triton): {counter.launches()} launches {dict(counter.ops)}")
    assert counter.ops["triton.prefix_logits_kernel"] == 1, dict(counter.ops)
    assert counter.launches() <= 14, dict(counter.ops)
    assert counter.syncs() == 0, dict(counter.ops)
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all() and torch.isfinite(tau.grad)


# candidate_ids in "mask" mode on the Triton backend: the fused row kernel masks the target's copies
# (not extended.py's torch ops); chunks of 7 rows so that masks, running sums and gradients cross them
MASK_CASES = {
    "default-layout-mean": (True, "mean", False),
    "targets-sum": (True, "sum", True),
    "raw-targets-mean": (False, "mean", True),
}


@pytest.mark.parametrize("case", MASK_CASES.keys())
def test_masked_copies_run_the_fused_row_kernel(gen, counter, monkeypatch, case):
    from vlm2vec_kernels import triton_engine

    monkeypatch.setattr(triton_engine, "CHUNK_ELEMENTS", 7 * 63)
    monkeypatch.setattr(triton_engine, "MIN_CHUNK_ROWS", 1)
    normalize, reduction, explicit = MASK_CASES[case]
    q, c, targets = _batch(gen, 21, 2, 40, explicit)
    if not normalize:
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    # about a third of the candidates share an id with another (across chunks): copies of a target
    # leave its row's softmax; a row whose every candidate is its target's copy keeps only the target
    ids = torch.randint(0, 40, (c.shape[0],), generator=gen.generator)
    ids[targets[:3]] = 99
    upstream = torch.randn(q.shape[0], generator=gen.generator)
    options = dict(
        candidate_ids=ids,
        normalize=normalize,
        symmetric=False,
        reduction=reduction,
        targets=targets if explicit else None,
    )
    with counter:
        got, want, dtau_scale = run(
            q, c, 0.05, upstream, backend="triton", reference_targets=None if explicit else targets, **options
        )
    assert counter.ops["triton.xent_rows_kernel"] >= 3, dict(counter.ops)  # 3 chunks of 7 rows
    assert_close(got, want, dtau_scale, gen.seed)


def test_masked_copies_launch_like_the_plain_loss(counter, device_checks):  # noqa: F811
    """B = 1024 with ids: the same launches as without them (the fused path), no host sync."""
    from test_loss_overhead import TRITON_DEVICE
    from vlm2vec_kernels import contrastive_loss

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1024, 64, generator=gen).to(TRITON_DEVICE).requires_grad_()
    c = torch.randn(1024, 64, generator=gen).to(TRITON_DEVICE).requires_grad_()
    tau = torch.tensor(0.05, device=TRITON_DEVICE, requires_grad=True)
    ids = torch.randint(0, 700, (1024,), generator=gen).to(TRITON_DEVICE)
    launches = []
    for options in (dict(), dict(candidate_ids=ids)):
        counter.ops.clear()
        q.grad = c.grad = tau.grad = None  # (else the second backward adds into them: 3 more ops)
        with counter:
            contrastive_loss(q, c, tau, backend="triton", **options).backward()
        launches.append(counter.launches())
        assert counter.syncs() == 0, dict(counter.ops)
    print(f"plain / ids-mask (triton): {launches} launches")
    assert launches[1] == launches[0], launches
