"""What one contrastive_loss call costs, counted rather than timed: FLOPs, launches and host syncs.

A small batch is launch-bound on a GPU (B=1024, D=1536 on an H100: ~16 us of math), so every op the
call dispatches costs about as much as the real work, and a device->host read stalls the whole
queue; a large batch is compute-bound, so every FLOP beyond the useful 6 B^2 D (S = q c^T, then
P c and P^T q: what eager does) is time lost. Counted on the CPU:

- FLOPs: torch.utils.flop_counter.FlopCounterMode around forward + backward (aten GEMMs) plus the
  tl.dot work of Triton kernels under the interpreter (every `dot` it executes, 2 M N K).
- Launches: Triton kernel launches plus aten compute ops (a TorchDispatchMode; views, copies and
  allocations excluded, and nothing inside a Triton launch, where the interpreter moves data).
- Host syncs: aten ops that read a value back (`.item()`).
"""

import collections
import contextlib
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from vlm2vec_kernels import contrastive, contrastive_loss, triton_engine, triton_recompute

B = 1024
# The Triton cases run under the interpreter on CPU tensors here, compiled on CUDA tensors on a GPU
# machine (bench/device_check.sh: TRITON_INTERPRET=0, VLM2VEC_TEST_DEVICE=cuda).
_GPU_OK = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
TRITON_DEVICE = os.environ.get("VLM2VEC_TEST_DEVICE", "cuda" if _GPU_OK else "cpu")
SMALL = 48  # value-check tests: the interpreter runs the recompute kernels slowly
SYNC_OPS = {"aten._local_scalar_dense", "aten.item"}
NOT_LAUNCHES = {
    "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
    "aten.copy_", "aten._to_copy", "aten.clone", "aten.lift_fresh", "aten.detach",
}  # fmt: skip
# the launcher modules and the kernels each one launches
TRITON_LAUNCHERS = {
    module: [name for name in vars(module) if name.endswith("_kernel")]
    for module in (triton_engine, triton_recompute)
}


class LaunchCounter(TorchDispatchMode):
    """aten compute ops (by name) and Triton launches (as "triton.<kernel>") of what runs inside."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not self.in_launch and not func.is_view and name not in NOT_LAUNCHES:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def launches(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in SYNC_OPS)

    def syncs(self) -> int:
        return sum(n for op, n in self.ops.items() if op in SYNC_OPS)


class _CountedKernel:
    def __init__(self, kernel, name: str, counter: LaunchCounter) -> None:
        self.kernel, self.name, self.counter = kernel, name, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counter.ops[f"triton.{self.name}"] += 1
            outer, self.counter.in_launch = self.counter.in_launch, True
            try:
                return launch(*args, **kwargs)
            finally:
                self.counter.in_launch = outer

        return run


@pytest.fixture
def counter(monkeypatch):
    counter = LaunchCounter()
    for module, names in TRITON_LAUNCHERS.items():
        for name in names:
            monkeypatch.setattr(module, name, _CountedKernel(getattr(module, name), name, counter))
    return counter


@contextlib.contextmanager
def dot_flops():
    """Counts 2 M N K for every tl.dot the Triton interpreter executes: yields a one-element list."""
    from triton.runtime.interpreter import InterpreterBuilder

    total, original = [0], InterpreterBuilder.create_dot

    def counted(self, a, b, d, *args):
        m, k = a.data.shape[-2:]
        total[0] += 2 * m * k * b.data.shape[-1] * math.prod(a.data.shape[:-2])
        return original(self, a, b, d, *args)

    InterpreterBuilder.create_dot = counted
    try:
        yield total
    finally:
        InterpreterBuilder.create_dot = original


def make_inputs(
    d: int, k: int = 0, *, explicit_targets=False, tensor_tau=False, dtype=torch.float32, n: int = B,
    backend: str = "torch",
):  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    c = torch.randn(n * (1 + k), d, generator=gen).to(device, dtype).requires_grad_()
    targets = torch.randint(0, c.shape[0], (n,), generator=gen).to(device) if explicit_targets else None
    tau = torch.tensor(0.05, device=device, requires_grad=True) if tensor_tau else 0.05
    return q, c, tau, targets


def fwd_bwd(backend: str, d: int, k: int = 0, upstream=None, **options):
    explicit, tensor_tau = options.pop("explicit_targets", False), options.pop("tensor_tau", False)
    dtype = options.pop("dtype", torch.float32)
    q, c, tau, targets = make_inputs(
        d, k, explicit_targets=explicit, tensor_tau=tensor_tau, dtype=dtype, backend=backend
    )

    def run():
        loss = contrastive_loss(q, c, tau, targets=targets, backend=backend, **options)
        loss.backward(upstream)
        return loss

    return run, (q, c)


# ----------------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_path_does_the_useful_work_only(backend):
    """mean reduction, B=1024, D=256: 6 B^2 D (three GEMMs), at most 6.1 B^2 D counted, fwd+bwd."""
    d = 256
    run, (q, c) = fwd_bwd(backend, d)
    with FlopCounterMode(display=False) as aten, dot_flops() as dots:
        run()
    total = aten.get_total_flops() + dots[0]
    print(f"{backend}: {total / (B * B * d):.3f} B^2 D (aten {aten.get_total_flops():,}, tl.dot {dots[0]:,})")
    assert q.grad is not None and c.grad is not None
    assert 6 * B * B * d <= total <= 6.1 * B * B * d, total / (B * B * d)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's dots")
def test_dot_counter_sees_triton_dots():
    """The counter above can fail: the recompute path's row_lse kernel does its GEMM work in tl.dot."""
    m, n, d = 64, 96, 32
    q, c = torch.randn(m, d), torch.randn(n, d)
    with dot_flops() as dots:
        triton_engine.row_lse(q, c, torch.ones(m), torch.ones(n))
    assert dots[0] >= 2 * m * n * d, dots[0]


# ----------------------------------------------------------------------------------------------------
# launches and host syncs

TRITON_CASES = {
    # name: (K, options, bound on launches per fwd+bwd)
    "default": (0, dict(), 10),
    "hard negatives": (1, dict(), 10),
    "targets": (1, dict(explicit_targets=True), 10),
    "no normalisation": (0, dict(normalize=False), 10),
    "tensor temperature": (0, dict(tensor_tau=True), 10),
    "bf16": (0, dict(dtype=torch.bfloat16), 10),
}


@pytest.mark.parametrize("case", TRITON_CASES.keys())
def test_triton_backend_launches_per_call(counter, device_checks, case):
    """B=1024 on the Triton backend, value checks as on a GPU: at most 10 launches per fwd+bwd (one
    chunk: 3 GEMMs, the norm, row, finish and backward-scale kernels, one sum, autograd's root
    gradient), no host sync."""
    k, options, bound = TRITON_CASES[case]
    run, (q, c) = fwd_bwd("triton", 64, k, **options)
    with counter:
        run()
    print(f"{case}: {counter.launches()} launches {dict(counter.ops)}")
    assert any(op.startswith("triton.") for op in counter.ops), "no Triton launch seen"
    assert counter.launches() <= bound, dict(counter.ops)
    assert counter.syncs() == 0, dict(counter.ops)
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


TORCH_CASES = {
    # name: (K, options, bound); one chunk at B=1024, D=64 (counts when set: 44, 48, 27, 54, 71; the
    # symmetric case took 71 on the recompute path, 68 in extended.py's one pass)
    "default": (1, dict(), 48),
    "targets": (1, dict(explicit_targets=True), 52),
    "no normalisation": (1, dict(normalize=False), 30),
    "tensor temperature": (1, dict(tensor_tau=True), 58),
    "symmetric (one pass)": (1, dict(symmetric=True), 75),
}


@pytest.mark.parametrize("case", TORCH_CASES.keys())
def test_torch_backend_ops_per_call(counter, device_checks, case):
    """The torch engine's ops per fwd+bwd stay a handful (each waits for both threads of a loaded CPU)."""
    k, options, bound = TORCH_CASES[case]
    run, _ = fwd_bwd("torch", 64, k, **options)
    with counter:
        run()
    print(f"{case}: {counter.launches()} ops {dict(counter.ops)}")
    assert counter.launches() <= bound, dict(counter.ops)
    assert counter.syncs() == 0, dict(counter.ops)


@pytest.fixture
def device_checks(monkeypatch):
    """Value checks as for GPU tensors (folded into the result, nothing read back), on the CPU."""
    monkeypatch.setattr(contrastive, "_reads_values_on_host", lambda tensor: False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction, symmetric", [("mean", False), ("mean", True), ("none", False)])
def test_device_value_checks_read_nothing_back_and_change_nothing(
    counter, monkeypatch, backend, reduction, symmetric
):
    """Tensor temperature (learnable) and explicit targets: with the GPU's checks no op reads a value
    back, and the loss and gradients are those of the host-checked call."""
    q, c, tau, targets = make_inputs(32, 2, explicit_targets=True, tensor_tau=True, n=SMALL, backend=backend)
    upstream = torch.rand(SMALL, device=q.device) if reduction == "none" else None
    options = dict(targets=targets, symmetric=symmetric, reduction=reduction, backend=backend)
    if q.is_cuda:
        pytest.skip("CUDA tensors are never read back: nothing to compare with")
    host = contrastive_loss(q, c, tau, **options)
    host_grads = torch.autograd.grad(host, (q, c, tau), upstream)
    monkeypatch.setattr(contrastive, "_reads_values_on_host", lambda tensor: False)
    with counter:
        device = contrastive_loss(q, c, tau, **options)
        device_grads = torch.autograd.grad(device, (q, c, tau), upstream)
    assert counter.syncs() == 0, dict(counter.ops)
    torch.testing.assert_close(device, host, rtol=0, atol=0)
    for got, want in zip(device_grads, host_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["fused", "recompute"])
@pytest.mark.parametrize("bad", [0.0, -0.5, math.inf, math.nan])
def test_device_checked_bad_temperature_gives_nan(device_checks, backend, symmetric, bad):
    q, c, _, _ = make_inputs(16, 1, n=SMALL, backend=backend)
    tau = torch.tensor(bad, device=q.device, requires_grad=True)
    loss = contrastive_loss(q, c, tau, symmetric=symmetric, backend=backend)
    dq, dtau = torch.autograd.grad(loss, (q, tau))
    assert torch.isnan(loss), f"temperature {bad}: loss {loss.item()}"
    assert not torch.isfinite(dq).all() and not torch.isfinite(dtau), f"temperature {bad}: finite gradients"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["onedir", "symmetric"])
def test_device_checked_bad_targets_make_their_rows_nan(device_checks, backend, symmetric):
    q, c, _, targets = make_inputs(16, 1, explicit_targets=True, n=SMALL, backend=backend)
    bad_rows = [3, 40]
    targets[bad_rows[0]], targets[bad_rows[1]] = -1, c.shape[0]
    options = dict(targets=targets, symmetric=symmetric, backend=backend)
    losses = contrastive_loss(q, c, 0.05, reduction="none", **options)
    bad = torch.zeros(SMALL, dtype=torch.bool)
    bad[bad_rows] = True
    losses = losses.cpu()
    assert torch.isnan(losses[bad]).all() and torch.isfinite(losses[~bad]).all()
    (dq,) = torch.autograd.grad(losses.sum(), q)
    assert not torch.isfinite(dq.cpu()[bad]).any(), "the bad rows' gradients look valid"
    loss = contrastive_loss(q, c, 0.05, **options)  # mean: the fused path unless symmetric
    (dq,) = torch.autograd.grad(loss, q)
    assert torch.isnan(loss) and not torch.isfinite(dq).all()
