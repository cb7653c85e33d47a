"""Very confident rows (p_t = 1 - 1e-7 at most) on every path: the loss and the gradients of such a
row are ~1e-7, so forming E_it = p_it - 1 (p_it rounded at 6e-8 in fp32) or the loss as lse - l_t
(both ~1/tau, rounded at their ulp) loses them whole. The paths form the positives' share from the
negatives' mass instead (-sum_{j not in P} p, softplus / sigmoid of lse_neg - lse_pos); checked here
against float64 to a relative tolerance per row: the candidate-id modes and the margin (torch ops,
on both backends) and the Triton row kernel of the plain loss (under TRITON_INTERPRET=1 here).
"""

import pytest
import torch
from vlm2vec_kernels import contrastive_loss, reference_contrastive_loss

N_Q, N_C, D = 6, 14, 24
TARGETS = torch.arange(N_Q) * 2  # every other candidate is a positive, the rest are negatives
MAX_OFF_TARGET = 1e-7  # 1 - p_t of the least confident row


def _batch(seed: int, with_ids: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries, candidates (each positive almost its query: cosine ~0.999) and, `with_ids`, ids that
    make the next candidate a second copy of each positive (also close to its query)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N_Q, D, generator=g, dtype=torch.float64)
    c = torch.randn(N_C, D, generator=g, dtype=torch.float64)
    copies = [TARGETS, TARGETS + 1] if with_ids else [TARGETS]
    for rows in copies:
        c[rows] = q + 0.03 * torch.randn(N_Q, D, generator=g, dtype=torch.float64)
    if not with_ids:
        return q, c, None
    ids = torch.arange(N_C)
    ids[TARGETS + 1] = ids[TARGETS]
    return q, c, ids


def _confident_tau(q: torch.Tensor, c: torch.Tensor, ids: torch.Tensor | None, dims: list[int]) -> float:
    """The temperature at which the least confident positive (of every prefix) has 1 - p =
    MAX_OFF_TARGET against the negatives (bisection in float64 on the cosines)."""
    unit = torch.nn.functional.normalize
    s = torch.stack([unit(q[:, :d], dim=1) @ unit(c[:, :d], dim=1).T for d in dims])
    positive = torch.zeros(s.shape[1:], dtype=torch.bool).scatter_(1, TARGETS[:, None], True)
    if ids is not None:
        positive = ids[TARGETS][:, None] == ids[None, :]
    lo, hi = 1e-3, 1.0
    for _ in range(60):
        tau = (lo * hi) ** 0.5
        neg = torch.logsumexp((s / tau).masked_fill(positive, -torch.inf), 2, keepdim=True)
        off = torch.sigmoid(neg - s / tau)[positive.expand_as(s)]
        lo, hi = (tau, hi) if off.max() < MAX_OFF_TARGET else (lo, tau)
    return lo


def _loss_and_grads(q, c, tau, dtype, reference, **options):
    q = q.to(dtype).requires_grad_()
    c = c.to(dtype).requires_grad_()
    tau = torch.tensor(tau, dtype=dtype, requires_grad=True)
    fn = reference_contrastive_loss if reference else contrastive_loss
    loss = fn(q, c, tau, targets=TARGETS, reduction="sum", normalize=True, symmetric=False, **options)
    return (loss, *torch.autograd.grad(loss, (q, c, tau)))


def _assert_rows_close(name, got, want, rtol):
    """Relative error of each row (its norm) within rtol: the rows of a confident batch differ in
    scale by orders of magnitude, so a tolerance on the largest would hide the small ones."""
    got, want = got.double().reshape(want.shape[0], -1), want.reshape(want.shape[0], -1)
    err = (got - want).norm(dim=1) / want.norm(dim=1)
    scale = want.norm(dim=1).tolist()
    assert (err < rtol).all(), f"{name}: relative error per row {err.tolist()} (scale {scale})"


CASES = {
    "plain": dict(),  # the fused engines (torch_engine.xent, triton xent_rows_kernel)
    "ids-mask": dict(candidate_ids=True, positives="mask"),  # the fused engines, copies masked
    "ids-any": dict(candidate_ids=True, positives="any"),
    "ids-each": dict(candidate_ids=True, positives="each"),
    "margin": dict(false_negative_margin=0.0),
    "margin-ids-mask": dict(candidate_ids=True, false_negative_margin=0.1),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES.keys())
@pytest.mark.parametrize("seed", [0, 1])
def test_confident_rows_keep_their_gradients(case, backend, seed):
    """Loss, dL/dtau (1e-4 relative), the target candidates' and the queries' gradients (2e-3
    relative per row: fp32 logits l ~ 1/tau ~ 30 carry 2e-6 absolute each, and each normalisation's
    Jacobian cancels ~97% of a gradient that points along its row) against float64. The old forms
    miss the gradients by 10-100% (p_t - 1) and the loss by the ulp of 1/tau (lse - l_t)."""
    if backend == "triton":
        pytest.importorskip("triton")
    options = dict(CASES[case])
    q, c, ids = _batch(seed, options.pop("candidate_ids", False))
    tau = _confident_tau(q, c, ids, options.get("matryoshka_dims", [D]))
    if ids is not None:
        options["candidate_ids"] = ids
    reference = dict(options, positives=options.get("positives", "mask"))
    want = _loss_and_grads(q, c, tau, torch.float64, True, **reference)
    got = _loss_and_grads(q, c, tau, torch.float32, False, backend=backend, **options)
    loss, dq, dc, dtau = got
    assert 0 < want[0] < 10 * N_Q * MAX_OFF_TARGET, want[0]  # really that confident
    # the fused engines round -log p_max (or log sum) at the ulp of 1, by design; ids alone in "mask"
    # mode run the fused path too (the copies masked in its row pass)
    if case in ("plain", "ids-mask"):
        assert abs(loss.double() - want[0]) <= N_Q * 2 * 2**-24, (loss.item(), want[0].item())
    else:
        _assert_rows_close("loss", loss[None], want[0][None], 1e-4)
    _assert_rows_close("dc at the targets", dc[TARGETS], want[2][TARGETS], 2e-3)
    _assert_rows_close("dq", dq, want[1], 2e-3)
    _assert_rows_close("dtau", dtau[None], want[3][None], 1e-4)
