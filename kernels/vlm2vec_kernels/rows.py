"""Row operations that the torch engine and the recompute path share (O(B*D) or O(B) work each).

Inverse norms and temperatures, row dot products, the normalisation's Jacobian, and the two ways a
bad input is folded into a NaN result without a host read (an out-of-range target, an Inf candidate).
Everything runs in the accumulation dtype (fp32, fp64 for fp64 inputs) on any device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .engine import NORM_EPS, accumulation_dtype, inverse

# Bound on the [rows, D] fp32 temporaries of row products whose rows must be promoted (16-bit rows).
# On a GPU one block covers every batch below 2**28 elements, so the op count does not grow with B.
# On the CPU blocks stay at 256 KiB: the host allocator then reuses freed chunks. Rows already in the
# accumulation dtype skip the blocks: one batched matrix product with no temporary.
ROW_BLOCK_ELEMENTS = 2**16
DEVICE_ROW_BLOCK_ELEMENTS = 2**28


def block_rows(x: Tensor) -> int:
    """Rows per block of x's [rows, D] fp32 temporaries (all rows unless huge on a GPU)."""
    elements = ROW_BLOCK_ELEMENTS if x.device.type == "cpu" else DEVICE_ROW_BLOCK_ELEMENTS
    return max(1, elements // x.shape[1])


def blocks(n: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def dots_in_one_op(x: Tensor, y: Tensor, dtype: torch.dtype) -> bool:
    """Whether <x_i, y_i> can run as one batched matrix product: both already in `dtype` (16-bit rows
    are promoted block by block instead) and with unit stride along D (else the product copies)."""
    return x.dtype == y.dtype == dtype and x.stride(1) == 1 and y.stride(1) == 1


def batched_dots(x: Tensor, y: Tensor) -> Tensor:
    """<x_i, y_i> [rows] as a batch of [1, D] x [D, 1] products: one op and no [rows, D] temporary
    (row blocks of elementwise products cost hundreds of small ops at large B on the CPU)."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def row_dots(g: Tensor, x: Tensor) -> Tensor:
    """<g_i, x_i> [rows] in g's dtype (x may be 16-bit: the product promotes to g's dtype)."""
    if dots_in_one_op(g, x, g.dtype):
        return batched_dots(g, x)
    step = block_rows(g)
    if g.shape[0] <= step:
        return (g * x).sum(1)
    out = torch.empty(g.shape[0], dtype=g.dtype, device=g.device)
    for block in blocks(g.shape[0], step):
        torch.sum(g[block] * x[block], 1, out=out[block])
    return out


def inverse_norm(x: Tensor) -> Tensor:
    """1 / max(|x_i|, eps) [rows] in the accumulation dtype (NaN rows stay NaN)."""
    norms = torch.linalg.vector_norm(x, dim=1, dtype=accumulation_dtype(x.dtype))
    return norms.clamp_min_(NORM_EPS).reciprocal_()


def project_(g: Tensor, x: Tensor, dots: Tensor, r: Tensor) -> Tensor:
    """The Jacobian of x / max(|x|, eps) applied in place: g_i -= <g_i, x_i> r_i^2 x_i, with
    r = inverse_norm(x) and dots = <g_i, x_i>. Rows with |x| <= eps get no term (the normalisation is
    constant there, as in F.normalize); NaN stays NaN."""
    coef = r.square().masked_fill_(r > 0.5 / NORM_EPS, 0.0).mul_(dots)
    return g.addcmul_(x, coef[:, None], value=-1)


def inverse_temperature(tau: float | Tensor, dtype: torch.dtype, checked: bool = False) -> float | Tensor:
    """1 / tau: a number, or a 0-dim tensor in `dtype`. An unchecked tensor (a device value nobody read)
    that is <= 0, Inf or NaN gives NaN without a host read: log(tau) is then NaN or +-Inf, and
    lerp(r, l, 0) = r + 0 * (l - r) turns that into NaN while returning r = 1/tau exactly otherwise."""
    if not isinstance(tau, Tensor):
        return inverse(tau, dtype)
    tau = tau.to(dtype)
    reciprocal = tau.reciprocal()
    return reciprocal if checked else torch.lerp(reciprocal, tau.log(), 0.0)


def clamp_targets(columns: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """(columns clamped into [0, n_cols), the rows whose column was out of range): targets not read on
    the host index a valid column, and the caller poisons those rows' scales with NaN."""
    clamped = columns.clamp(0, n_cols - 1)
    return clamped, clamped.ne(columns)


def guard_infinite_candidates_(loss: Tensor, c: Tensor) -> Tensor:
    """loss += 0 * sum(c): without normalisation an Inf candidate can give s = -Inf for every query,
    which a log-sum-exp rightly ignores; the loss must not look finite (normalised rows carry the NaN
    in their inverse norms instead)."""
    return loss.add_(c.sum(dtype=loss.dtype).mul_(0))


def nan_where(x: Tensor, bad: Tensor) -> Tensor:
    """x with NaN in the rows flagged by `bad` (in place)."""
    return x.masked_fill_(bad, math.nan)
