"""The v3 options of contrastive_loss (Matryoshka prefixes, candidate ids with the three positive
modes, the false-negative margin, symmetric) against the float64 reference written row by row
(`reference_contrastive_loss`), plus their FLOP counts.

Fresh random inputs each run (seed in every failure message): odd D, prefixes that are multiples of
no block size, duplicate ids scattered over the whole candidate set (so they span the tiny chunks
forced here), rows whose every candidate but the target is masked; loss and the gradients of query,
candidates and a tensor temperature, for every reduction.
"""

import secrets

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from vlm2vec_kernels import contrastive, contrastive_loss, extended, reference_contrastive_loss, torch_engine

N_Q, K, D = 23, 2, 45
N_C = N_Q * (1 + K) + 4  # explicit targets: some candidates are nobody's positive


class Seeded:
    def __init__(self) -> None:
        self.seed = secrets.randbits(31)
        self.generator = torch.Generator().manual_seed(self.seed)


@pytest.fixture
def gen():
    return Seeded()


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 5 query rows (23 = 4 * 5 + 3): running sums, buffers and gradients cross chunks; the
    plain one-direction Matryoshka pass works on blocks of 2 rows within them (5 = 2 + 2 + 1)."""
    monkeypatch.setattr(torch_engine, "MAX_CHUNK_ELEMENTS", 5 * N_C)
    monkeypatch.setattr(extended, "BLOCK_ELEMENTS", 2 * N_C)


def make_batch(gen, dtype=torch.float32, n_ids=None):
    """Queries, candidates (each positive = query + noise), explicit targets and candidate ids with
    duplicates spread over all rows (n_ids distinct values)."""
    g = gen.generator
    q = torch.randn(N_Q, D, generator=g)
    c = torch.randn(N_C, D, generator=g)
    targets = torch.randperm(N_C, generator=g)[:N_Q]
    c[targets] = q + 1.5 * torch.randn(N_Q, D, generator=g)
    ids = torch.randint(0, n_ids or N_C // 3, (N_C,), generator=g)
    return q.to(dtype), c.to(dtype), targets, ids


def run(q, c, tau, upstream, backend="torch", reference_targets=None, **options):
    """(loss, dq, dc, dtau) of the library (float32 tau) and of the float64 reference (with
    `reference_targets` when the library call uses the default layout)."""
    out = []
    for name in ("lib", "ref"):
        dtype = torch.float64 if name == "ref" else q.dtype
        q_ = q.detach().to(dtype).requires_grad_()
        c_ = c.detach().to(dtype).requires_grad_()
        tau_ = torch.tensor(tau, dtype=torch.float64 if name == "ref" else torch.float32, requires_grad=True)
        if name == "ref":
            ref_options = dict(options, positives=options.get("positives") or "mask")
            if reference_targets is not None:
                ref_options["targets"] = reference_targets
            loss = reference_contrastive_loss(q_, c_, tau_, **ref_options)
        else:
            loss = contrastive_loss(q_, c_, tau_, backend=backend, **options)
        grads = torch.autograd.grad(loss, (q_, c_, tau_), upstream.to(loss.dtype) if loss.dim() else None)
        out.append((loss, *grads))
    out.append(_dtau_scale(q, c, tau, upstream, reference_targets, options))
    return out


def _dtau_scale(q, c, tau, upstream, reference_targets, options) -> float:
    """sum_i |w_i| |dloss_i/dtau| (w_i: row i's weight in the loss), from one temperature per row: the
    scale of the temperature gradient's terms, which cancel in the sum (as in test_loss_torch)."""
    row_taus = torch.full((q.shape[0], 1), tau, dtype=torch.float64, requires_grad=True)
    per_row = dict(options, reduction="sum", positives=options.get("positives") or "mask")
    if reference_targets is not None:
        per_row["targets"] = reference_targets
    loss = reference_contrastive_loss(q.double(), c.double(), row_taus, **per_row)
    (row_dtau,) = torch.autograd.grad(loss, row_taus)
    weights = {"mean": 1 / q.shape[0], "sum": 1.0}.get(options["reduction"])
    weights = upstream.double().abs() if weights is None else weights
    return (weights * row_dtau[:, 0].abs()).sum().item()


def assert_close(got, want, dtau_scale, seed, tol=(1e-4, 5e-5)):
    """Loss and gradients within tol of the reference's largest element; the temperature gradient
    within 1e-4 (or the gradient tolerance, if larger) of the magnitude of its terms."""
    loss_tol, grad_tol = tol
    for name, x, ref in zip(("loss", "dq", "dc", "dtau"), got, want):
        assert torch.isfinite(x).all(), f"{name} not finite (seed {seed})"
        atol = (loss_tol if name == "loss" else grad_tol) * max(ref.abs().max().item(), 1e-6)
        if name == "dtau":
            atol = max(1e-4, grad_tol) * max(dtau_scale, 1e-6)
        torch.testing.assert_close(
            x.double(), ref, rtol=loss_tol if name == "loss" else grad_tol, atol=atol,
            msg=lambda m, n=name: f"{n}: {m} (seed {seed})",
        )  # fmt: skip


OPTIONS = {
    "matryoshka": dict(matryoshka_dims=[7, 20, 45]),
    "matryoshka-without-D-weighted": dict(matryoshka_dims=[5, 33], matryoshka_weights=[0.5, 2.0]),
    "ids-mask": dict(positives="mask"),
    "ids-any": dict(positives="any"),
    "ids-each": dict(positives="each"),
    "margin": dict(false_negative_margin=0.05),
    "ids-each-margin-matryoshka": dict(positives="each", false_negative_margin=0.0, matryoshka_dims=[11, 45]),
    "ids-any-margin-matryoshka": dict(positives="any", false_negative_margin=-0.1, matryoshka_dims=[3, 29]),
}


# (normalize, symmetric, reduction) per option set: every reduction, both directions, raw dot products
VARIANTS = [
    (True, False, "mean"),
    (True, True, "none"),
    (False, True, "sum"),
    (True, False, "none"),
    (False, False, "sum"),
]


@pytest.mark.parametrize(
    "normalize, symmetric, reduction",
    VARIANTS,
    ids=[f"{'norm' if n else 'raw'}-{'symmetric' if s else 'onedir'}-{r}" for n, s, r in VARIANTS],
)
@pytest.mark.parametrize("case", OPTIONS.keys())
def test_torch_engine_matches_reference(gen, tiny_chunks, case, normalize, symmetric, reduction):
    q, c, targets, ids = make_batch(gen)
    if not normalize:
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    options = dict(
        OPTIONS[case], normalize=normalize, targets=targets, symmetric=symmetric, reduction=reduction
    )
    if case.startswith("ids"):
        options["candidate_ids"] = ids
    upstream = torch.randn(N_Q, generator=gen.generator)
    got, want, dtau_scale = run(q, c, 0.1, upstream, **options)
    assert_close(got, want, dtau_scale, gen.seed)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", ["matryoshka", "ids-each", "ids-any-margin-matryoshka"])
def test_symmetric_second_pass_matches_reference(gen, tiny_chunks, monkeypatch, case, reduction):
    """Batches whose logits do not fit one chunk (SYMMETRIC_ONE_PASS_ELEMENTS; here all of them) run
    the reverse direction as a chunked pass of its own."""
    monkeypatch.setattr(extended, "SYMMETRIC_ONE_PASS_ELEMENTS", 0)
    q, c, targets, ids = make_batch(gen)
    options = dict(OPTIONS[case], normalize=True, targets=targets, symmetric=True, reduction=reduction)
    if case.startswith("ids"):
        options["candidate_ids"] = ids
    got, want, dtau_scale = run(q, c, 0.1, torch.randn(N_Q, generator=gen.generator), **options)
    assert_close(got, want, dtau_scale, gen.seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_inputs_round_once(gen, tiny_chunks, dtype):
    q, c, targets, ids = make_batch(gen, dtype)
    options = dict(normalize=True, targets=targets, symmetric=True, reduction="mean", candidate_ids=ids,
                   positives="any", matryoshka_dims=[9, 45], false_negative_margin=0.1)  # fmt: skip
    got, want, dtau_scale = run(q, c, 0.1, None, **options)
    assert got[1].dtype == got[2].dtype == dtype
    assert_close(got, want, dtau_scale, gen.seed, tol=(1e-4, 8e-3))


@pytest.mark.parametrize("mode", ["mask", "any", "each"])
def test_rows_with_every_negative_masked(gen, tiny_chunks, mode):
    """A margin below -2 (cosines lie in [-1, 1]) drops every negative: each row keeps only its
    positives. "mask" then has loss 0 (the target alone), "any" too (its positives are the whole
    denominator), "each" has log 1 per positive; all gradients vanish. Rows whose ids make every
    candidate a positive behave the same."""
    q, c, targets, ids = make_batch(gen, n_ids=4)
    options = dict(normalize=True, targets=targets, symmetric=False, reduction="none", candidate_ids=ids,
                   positives=mode, false_negative_margin=-2.5)  # fmt: skip
    got, want, dtau_scale = run(q, c, 0.1, torch.ones(N_Q), **options)
    assert_close(got, want, dtau_scale, gen.seed)
    assert got[0].abs().max() < 1e-6 and got[1].abs().max() < 1e-6 and got[2].abs().max() < 1e-6
    same = torch.zeros(N_C, dtype=torch.long)  # one item: every candidate is every row's positive
    options.update(candidate_ids=same, false_negative_margin=None)
    got, want, dtau_scale = run(q, c, 0.1, torch.ones(N_Q), **options)
    assert_close(got, want, dtau_scale, gen.seed)


def test_default_layout_and_tensor_temperature_combine(gen, tiny_chunks):
    """Hard negatives in the default layout (no targets), ids, symmetric, Matryoshka."""
    q = torch.randn(N_Q, D, generator=gen.generator)
    c = torch.randn(N_Q * 3, D, generator=gen.generator)
    ids = torch.randint(0, 20, (N_Q * 3,), generator=gen.generator)
    positives = torch.arange(N_Q) * 3
    options = dict(normalize=True, symmetric=True, reduction="mean", candidate_ids=ids, positives="mask",
                   matryoshka_dims=[13, 45], targets=None)  # fmt: skip
    got, want, dtau_scale = run(q, c, 0.05, None, reference_targets=positives, **options)
    assert_close(got, want, dtau_scale, gen.seed)


def test_plain_call_is_unchanged_by_the_defaults(gen):
    """matryoshka_dims=[D] with weight 1, no ids, no margin: the same loss as the existing paths."""
    q, c, targets, _ = make_batch(gen)
    for symmetric in (False, True):
        a = contrastive_loss(q, c, 0.1, targets=targets, symmetric=symmetric)
        b = contrastive_loss(q, c, 0.1, targets=targets, symmetric=symmetric, matryoshka_dims=[D])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_backend_takes_the_options(gen, tiny_chunks):
    """backend="triton" (the interpreter here) with every option: the v3 pass runs in torch ops on the
    inputs' device, so the result is the reference's."""
    pytest.importorskip("triton")
    q, c, targets, ids = make_batch(gen)
    options = dict(normalize=True, targets=targets, symmetric=True, reduction="sum", candidate_ids=ids,
                   positives="each", matryoshka_dims=[9, 45], false_negative_margin=0.1)  # fmt: skip
    got, want, dtau_scale = run(q, c, 0.1, None, backend="triton", **options)
    assert_close(got, want, dtau_scale, gen.seed)


# ----------------------------------------------------------------------------------------------------
# FLOPs (fwd + bwd, counted by FlopCounterMode)


def _flops(B, d, **options):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, d, generator=gen).requires_grad_()
    c = torch.randn(B, d, generator=gen).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        contrastive_loss(q, c, 0.05, backend="torch", **options).backward()
    return counter.get_total_flops() / (B * B * d)


def test_matryoshka_takes_one_pass_over_D():
    """Dims (64, 128, 256, 512, 1536) at D = 1536: <= 6.5 B^2 D (a loop over the dims: 9.75)."""
    B, d = 256, 1536
    dims = [64, 128, 256, 512, 1536]
    ratio = _flops(B, d, matryoshka_dims=dims)
    print(f"matryoshka: {ratio:.3f} B^2 D")
    assert 6.0 <= ratio <= 6.5, ratio


def test_symmetric_takes_one_pass():
    """symmetric=True (B <= 16,384 on one process): the reverse rows are columns of the forward
    logits: 6 B^2 D, plain (the recompute path took 16) and with Matryoshka prefixes and ids."""
    B, d = 256, 192
    ids = torch.randint(0, 50, (B,), generator=torch.Generator().manual_seed(1))
    cases = (dict(), dict(matryoshka_dims=[64, 192]), dict(candidate_ids=ids, false_negative_margin=0.1))
    for options in cases:
        ratio = _flops(B, d, symmetric=True, **options)
        print(f"symmetric {list(options)}: {ratio:.3f} B^2 D")
        assert 6.0 <= ratio <= 6.1, (options, ratio)


def test_ids_and_margin_add_no_gemm():
    B, d = 256, 192
    ids = torch.randint(0, 50, (B,), generator=torch.Generator().manual_seed(1))
    for mode in ("mask", "any", "each"):
        ratio = _flops(B, d, candidate_ids=ids, positives=mode, false_negative_margin=0.1)
        assert 6.0 <= ratio <= 6.1, (mode, ratio)


# ----------------------------------------------------------------------------------------------------
# host syncs


class _Syncs(TorchDispatchMode):
    """Counts the aten ops that read a value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in ("aten._local_scalar_dense", "aten.item"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_v3_options_read_nothing_back(gen, monkeypatch, backend, reduction):
    """With the GPU's value checks (a tensor temperature and targets not read), every option together
    runs without a host sync, forward and backward, and gives the host-checked result exactly."""
    if backend == "triton":
        pytest.importorskip("triton")
    q, c, targets, ids = make_batch(gen)
    q.requires_grad_()
    tau = torch.tensor(0.1, requires_grad=True)
    options = dict(targets=targets, symmetric=True, reduction=reduction, candidate_ids=ids, positives="each",
                   matryoshka_dims=[9, 30, 45], false_negative_margin=0.1, backend=backend)  # fmt: skip
    upstream = torch.rand(N_Q) if reduction == "none" else None
    host = contrastive_loss(q, c, tau, **options)
    host_grads = torch.autograd.grad(host, (q, tau), upstream)
    monkeypatch.setattr(contrastive, "_reads_values_on_host", lambda tensor: False)
    with _Syncs() as syncs:
        device = contrastive_loss(q, c, tau, **options)
        device_grads = torch.autograd.grad(device, (q, tau), upstream)
    assert syncs.count == 0
    torch.testing.assert_close(device, host, rtol=0, atol=0)
    for got, want in zip(device_grads, host_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("symmetric", [False, True], ids=["onedir", "symmetric"])
def test_unchecked_out_of_range_targets_make_their_rows_nan(gen, monkeypatch, symmetric):
    """Targets not read on the host (a GPU): an out-of-range target makes its row NaN (ids and all)."""
    monkeypatch.setattr(contrastive, "_reads_values_on_host", lambda tensor: False)
    q, c, targets, ids = make_batch(gen)
    targets[[3, 11]] = torch.tensor([-1, N_C])
    options = dict(targets=targets, symmetric=symmetric, candidate_ids=ids, positives="any",
                   matryoshka_dims=[9, 45], false_negative_margin=0.1)  # fmt: skip
    losses = contrastive_loss(q, c, 0.1, reduction="none", **options)
    bad = torch.zeros(N_Q, dtype=torch.bool)
    bad[[3, 11]] = True
    assert torch.isnan(losses[bad]).all() and torch.isfinite(losses[~bad]).all()
    assert torch.isnan(contrastive_loss(q, c, 0.1, **options))


def test_module_takes_the_options(gen):
    """ContrastiveLoss fixes the v3 options (checked at construction) and takes candidate_ids per
    batch: the same value as the function."""
    from vlm2vec_kernels import ContrastiveLoss

    q, c, targets, ids = make_batch(gen)
    options = dict(matryoshka_dims=[9, 45], matryoshka_weights=[0.5, 1.0], positives="any",
                   false_negative_margin=0.1)  # fmt: skip
    module = ContrastiveLoss(0.1, backend="torch", **options)
    got = module(q, c, targets, candidate_ids=ids)
    want = contrastive_loss(q, c, 0.1, targets=targets, candidate_ids=ids, backend="torch", **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = contrastive_loss(q, c, 0.1, targets=targets, backend="torch", matryoshka_dims=[9, 45],
                             matryoshka_weights=[0.5, 1.0], false_negative_margin=0.1)  # fmt: skip
    torch.testing.assert_close(module(q, c, targets), plain, rtol=0, atol=0)  # no ids: no positives
    assert "matryoshka_dims=[9, 45]" in repr(module) and "positives='any'" in repr(module)
    with pytest.raises(ValueError, match="strictly increasing"):
        ContrastiveLoss(matryoshka_dims=[5, 5])
    with pytest.raises(ValueError, match="positives must be one of"):
        ContrastiveLoss(positives="some")
    with pytest.raises(ValueError, match="false_negative_margin must be finite"):
        ContrastiveLoss(false_negative_margin=float("inf"))
