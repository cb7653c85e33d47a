"""Cross-rank negatives: 2 real processes over gloo on the CPU against one process on the whole batch.

Scalar one-directional cases run the gradients-in-the-forward path (candidates gathered, their
gradients reduce-scattered once in the forward), symmetric and per-row cases the recompute path.

Every case splits a global batch (queries and candidates, each rank keeping its own hard negatives)
between the ranks; each rank calls contrastive_loss(group=WORLD) on its rows and backpropagates. The
documented convention must then hold exactly:
  mean/sum: the average of the returned values is the global loss, and each rank's gradients divided
            by the world size (DDP's averaging) are the global gradients of its rows; the averaged
            temperature gradient is the global one.
  none:     the concatenated rows are the global per-row losses; with the global upstream gradient
            split by rank, each rank's gradients are the global ones (and the temperature gradients
            sum to the global one).
The global truth is the float64 reference on the concatenated batch. One spawn runs all cases.
The Triton case runs under the interpreter on CPU tensors here; on a GPU machine
(VLM2VEC_TEST_DEVICE=cuda, TRITON_INTERPRET=0) both ranks put it on the one GPU and gloo moves it.
"""

import os
import secrets
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from vlm2vec_kernels import contrastive_loss, reference_contrastive_loss

WORLD = 2
SPAWN_TIMEOUT_S = 600  # a hung collective fails the test instead of the CI job
_GPU_OK = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
TRITON_DEVICE = os.environ.get("VLM2VEC_TEST_DEVICE", "cuda" if _GPU_OK else "cpu")


def _triton_importable() -> bool:
    try:
        from vlm2vec_kernels import triton_engine  # noqa: F401
    except Exception:
        return False
    return True


def make_cases(seed: int) -> list[dict]:
    """Global batches and how they are split. `q_rows` / `c_rows`: rows per rank; `targets`: local."""
    gen = torch.Generator().manual_seed(seed)
    specs = [
        # name, q_rows, negatives per query (per rank), explicit targets, symmetric, reduction, normalize,
        # dtype
        ("K0-mean", (6, 6), (0, 0), False, False, "mean", True, torch.float32),
        ("K2-mean", (5, 5), (2, 2), False, False, "mean", True, torch.float32),
        ("K2-symmetric-mean", (5, 5), (2, 2), False, True, "mean", True, torch.float32),
        ("K0-symmetric-sum", (4, 4), (0, 0), False, True, "sum", True, torch.float32),
        ("K1-symmetric-none", (4, 4), (1, 1), False, True, "none", True, torch.float32),
        ("K1-none-raw", (3, 3), (1, 1), False, False, "none", False, torch.float32),
        ("targets-symmetric-mean", (5, 5), (1, 1), True, True, "mean", True, torch.float32),
        ("uneven-K2-symmetric-mean-raw", (5, 3), (2, 2), False, True, "mean", False, torch.float32),
        ("uneven-mixedK-targets-sum", (3, 6), (2, 0), True, True, "sum", True, torch.float32),
        ("bf16-K1-symmetric-mean", (4, 4), (1, 1), False, True, "mean", True, torch.bfloat16),
        ("bf16-uneven-K1-targets-mean", (4, 3), (1, 1), True, False, "mean", True, torch.bfloat16),
        ("uneven-mixedK-targets-sum-raw", (3, 6), (2, 0), True, False, "sum", False, torch.float32),
        ("fp64-uneven-K1-symmetric-none", (2, 5), (1, 1), False, True, "none", True, torch.float64),
    ]
    cases = []
    for name, q_rows, negatives, explicit, symmetric, reduction, normalize, dtype in specs:
        d = 24
        c_rows = [n * (1 + k) + (2 if explicit else 0) for n, k in zip(q_rows, negatives)]
        q = torch.randn(sum(q_rows), d, generator=gen)
        c = torch.randn(sum(c_rows), d, generator=gen)
        local_targets = []
        for n, k, n_c in zip(q_rows, negatives, c_rows):
            if explicit:
                local_targets.append(torch.randperm(n_c, generator=gen)[:n])
            else:
                local_targets.append(torch.arange(n) * (1 + k))
        offsets = [0, c_rows[0]]
        global_targets = torch.cat([t + o for t, o in zip(local_targets, offsets)])
        c[global_targets] = q + 1.5 * torch.randn(
            q.shape, generator=gen
        )  # a peaked but not saturated softmax
        cases.append(
            dict(
                name=name,
                q=_rescale(q, gen).to(dtype),
                c=_rescale(c, gen).to(dtype),
                q_rows=q_rows,
                c_rows=c_rows,
                local_targets=local_targets if explicit else None,
                global_targets=global_targets,
                symmetric=symmetric,
                reduction=reduction,
                normalize=normalize,
                tau=0.07,
                upstream=torch.randn(sum(q_rows), generator=gen),
                backend="torch",
            )
        )
    # the v3 options (extended.py): ids all-gathered with the candidates, duplicates across ranks
    v3_specs = [  # name, the case it extends, options
        ("v3-K2-symmetric-mean-matryoshka-ids-any-margin", 2,
         dict(matryoshka_dims=[5, 17, 24], positives="any", false_negative_margin=0.05)),
        ("v3-K1-symmetric-none-ids-each", 4, dict(positives="each")),
        ("v3-K2-mean-ids-each-margin", 1, dict(positives="each", false_negative_margin=0.0)),
        ("v3-uneven-targets-symmetric-sum-matryoshka-mask-margin", 8,
         dict(matryoshka_dims=[7, 20], matryoshka_weights=[0.5, 1.5], positives="mask",
              false_negative_margin=0.0)),
        ("v3-bf16-uneven-targets-mean-matryoshka", 10, dict(matryoshka_dims=[9, 24])),
        ("v3-uneven-targets-sum-raw-matryoshka-ids-mask", 11,
         dict(matryoshka_dims=[3, 24], positives="mask")),
    ]  # fmt: skip
    for name, base, options in v3_specs:
        case = dict(cases[base], name=name)
        if "positives" in options:
            case["ids"] = torch.randint(0, sum(case["c_rows"]) // 3, (sum(case["c_rows"]),), generator=gen)
        case["v3"] = options
        cases.append(case)
    # ids alone in "mask" mode: the fused path, the ids gathered beside the candidates
    masked = dict(cases[1], name="K2-mean-ids-mask", v3=dict(positives="mask"))
    masked["ids"] = torch.randint(0, sum(masked["c_rows"]) // 3, (sum(masked["c_rows"]),), generator=gen)
    cases.append(masked)
    if _triton_importable():  # the Triton engine under the interpreter, small: both paths
        cases.append(dict(cases[2], name="triton-K2-symmetric-mean", backend="triton"))
        cases.append(dict(cases[1], name="triton-K2-mean", backend="triton"))
        cases.append(dict(cases[8], name="triton-uneven-mixedK-targets-sum-onedir", symmetric=False,
                          backend="triton"))  # fmt: skip
        cases.append(dict(masked, name="triton-K2-mean-ids-mask", backend="triton"))
    return cases


def _rescale(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rows of norm 0.8-1.2, so logits stay moderate with and without normalisation."""
    return torch.nn.functional.normalize(x, dim=1) * (0.8 + 0.4 * torch.rand(len(x), 1, generator=gen))


def _rank_slices(rows: tuple[int, int], rank: int) -> slice:
    start = sum(rows[:rank])
    return slice(start, start + rows[rank])


def _worker(rank: int, port: int, seed: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in make_cases(seed):
            rows_q, rows_c = _rank_slices(case["q_rows"], rank), _rank_slices(case["c_rows"], rank)
            device = TRITON_DEVICE if case["backend"] == "triton" else "cpu"
            q = case["q"][rows_q].clone().to(device).requires_grad_()
            c = case["c"][rows_c].clone().to(device).requires_grad_()
            tau = torch.tensor(
                case["tau"],
                dtype=torch.promote_types(q.dtype, torch.float32),
                device=device,
                requires_grad=True,
            )
            targets = None if case["local_targets"] is None else case["local_targets"][rank].to(device)
            v3 = dict(case.get("v3", {}))
            if "ids" in case:
                v3["candidate_ids"] = case["ids"][rows_c].to(device)
            loss = contrastive_loss(
                q,
                c,
                tau,
                normalize=case["normalize"],
                targets=targets,
                symmetric=case["symmetric"],
                reduction=case["reduction"],
                group=dist.group.WORLD,
                backend=case["backend"],
                **v3,
            )
            upstream = None
            if case["reduction"] == "none":
                upstream = case["upstream"][rows_q].to(device, loss.dtype)
            loss.backward(upstream)
            results[case["name"]] = {
                name: x.detach().cpu()
                for name, x in dict(loss=loss, dq=q.grad, dc=c.grad, dtau=tau.grad).items()
            }
        results["checks"] = _single_rank_checks(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer is still in a collective
    finally:
        dist.destroy_process_group()


def _single_rank_checks(rank: int) -> dict:
    """A one-rank group gives the single-process result; bad cross-rank input fails on every rank."""
    own = [dist.new_group([r]) for r in range(WORLD)][rank]  # every rank creates every group
    q, c = torch.randn(5, 8), torch.randn(10, 8)
    grouped = contrastive_loss(q, c, symmetric=True, group=own, backend="torch")
    plain = contrastive_loss(q, c, symmetric=True, backend="torch")
    checks = {"one_rank_group_matches": torch.allclose(grouped, plain, rtol=1e-6, atol=1e-6)}
    d = 8 if rank == 0 else 9  # embedding size differs across ranks: every rank must refuse it
    try:
        contrastive_loss(torch.randn(2, d), torch.randn(2, d), group=dist.group.WORLD, backend="torch")
        checks["d_mismatch"] = "no error"
    except ValueError as error:
        checks["d_mismatch"] = str(error)
    return checks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    seed = secrets.randbits(31)
    out_dir = str(tmp_path_factory.mktemp("dist"))
    workers = mp.spawn(_worker, args=(_free_port(), seed, out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo workers did not finish within {SPAWN_TIMEOUT_S} s (seed {seed})")
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    return seed, {case["name"]: case for case in make_cases(seed)}, ranks


TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def _global_truth(case: dict) -> tuple:
    """Loss and gradients of the float64 reference on the whole batch, and the scale of the
    temperature gradient (sum_i |w_i| |dloss_i/dtau|, from one temperature per row)."""
    q = case["q"].double().requires_grad_()
    c = case["c"].double().requires_grad_()
    tau = torch.tensor(case["tau"], dtype=torch.float64, requires_grad=True)
    options = dict(normalize=case["normalize"], targets=case["global_targets"], symmetric=case["symmetric"])
    options.update(case.get("v3", {}))
    if "ids" in case:
        options["candidate_ids"] = case["ids"]
    loss = reference_contrastive_loss(q, c, tau, reduction=case["reduction"], **options)
    upstream = case["upstream"].double() if case["reduction"] == "none" else None
    loss.backward(upstream)
    row_taus = torch.full((len(q), 1), case["tau"], dtype=torch.float64, requires_grad=True)
    reference_contrastive_loss(q.detach(), c.detach(), row_taus, reduction="sum", **options).backward()
    weights = {"mean": 1 / len(q), "sum": 1.0}.get(case["reduction"], upstream)
    dtau_scale = (weights * row_taus.grad[:, 0]).abs().sum().item()
    return loss.detach(), q.grad, c.grad, tau.grad, dtau_scale


def test_every_case_ran(distributed_run):
    _, cases, ranks = distributed_run
    for results in ranks:
        assert set(cases) <= set(results), "a case is missing from a rank's results"


@pytest.mark.parametrize("name", [c["name"] for c in make_cases(0)])
def test_matches_single_process_on_the_concatenated_batch(distributed_run, name):
    seed, cases, ranks = distributed_run
    case = cases[name]
    loss, dq, dc, dtau, dtau_scale = _global_truth(case)
    tol = TOLERANCE[case["q"].dtype]
    if case["backend"] == "triton" and TRITON_DEVICE == "cuda":
        tol = 2e-4  # the compiled engine's fp32 (3xTF32) accuracy, as in tests/test_triton_engine.py
    got = [r[name] for r in ranks]
    msg = f"{name} (seed {seed})"

    def close(actual, expected, what, scale=None):
        expected = expected.double()
        atol = tol * (scale or max(expected.abs().max().item(), 1e-3))
        torch.testing.assert_close(
            actual.double(), expected, rtol=tol, atol=atol, msg=lambda m: f"{m}\n{what}: {msg}"
        )

    if case["reduction"] == "none":
        close(torch.cat([g["loss"] for g in got]), loss, "per-row losses")
        scale = 1.0
        close(sum(g["dtau"] for g in got), dtau, "temperature gradient (sum over ranks)", dtau_scale)
    else:
        close(sum(g["loss"] for g in got) / WORLD, loss, "rank-averaged loss")
        scale = 1.0 / WORLD  # DDP averages gradients over ranks
        close(sum(g["dtau"] for g in got) / WORLD, dtau, "rank-averaged temperature gradient", dtau_scale)
    for rank, g in enumerate(got):
        assert g["dq"].dtype == case["q"].dtype and g["dc"].dtype == case["c"].dtype
        rows_q, rows_c = _rank_slices(case["q_rows"], rank), _rank_slices(case["c_rows"], rank)
        # tolerances scale with the whole batch's largest gradient (a rank may hold only tiny ones)
        close(g["dq"] * scale, dq[rows_q], f"query gradient of rank {rank}", dq.abs().max().item())
        close(g["dc"] * scale, dc[rows_c], f"candidate gradient of rank {rank}", dc.abs().max().item())


def test_single_rank_group_and_cross_rank_errors(distributed_run):
    _, _, ranks = distributed_run
    for rank, results in enumerate(ranks):
        checks = results["checks"]
        assert checks["one_rank_group_matches"], f"rank {rank}: a one-rank group changed the loss"
        assert "embedding size D differs across ranks: [8, 9]" in checks["d_mismatch"]
