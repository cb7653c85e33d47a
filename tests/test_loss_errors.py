"""Bad input to contrastive_loss / ContrastiveLoss raises a ValueError or TypeError that names the
argument (and the shapes, where shapes are the problem) before any work is done."""

import re

import pytest
import torch
from vlm2vec_kernels import ContrastiveLoss, contrastive_loss

Q = torch.randn(4, 8)
C = torch.randn(12, 8)  # K = 2 hard negatives per query


def call(query=Q, candidates=C, temperature=0.05, **options):
    return contrastive_loss(query, candidates, temperature, backend="torch", **options)


CASES = {
    # embeddings
    "query not a tensor": (TypeError, "query must be a torch.Tensor", dict(query=Q.tolist())),
    "candidates not a tensor": (TypeError, "candidates must be a torch.Tensor", dict(candidates=None)),
    "integer query": (TypeError, "query must be float16.*torch.int64", dict(query=Q.long())),
    "integer candidates": (TypeError, "candidates must be float16.*torch.int32", dict(candidates=C.int())),
    "bool query": (TypeError, "query must be float16.*torch.bool", dict(query=Q > 0)),
    "1-D query": (ValueError, r"query must be 2-D.*\(8,\)", dict(query=Q[0])),
    "3-D candidates": (ValueError, r"candidates must be 2-D.*\(1, 12, 8\)", dict(candidates=C[None])),
    "empty query": (ValueError, r"query is empty \(shape \(0, 8\)\)", dict(query=Q[:0])),
    "empty candidates": (ValueError, r"candidates is empty \(shape \(0, 8\)\)", dict(candidates=C[:0])),
    "zero-width embeddings": (
        ValueError,
        r"query is empty \(shape \(4, 0\)\)",
        dict(query=Q[:, :0], candidates=C[:, :0]),
    ),
    "D mismatch": (
        ValueError,
        r"same embedding size D.*query \(4, 8\), candidates \(12, 7\)",
        dict(candidates=C[:, :7]),
    ),
    "dtype mismatch": (TypeError, "same dtype.*float32 and torch.float16", dict(candidates=C.half())),
    "different devices": (ValueError, "same device.*cpu and meta", dict(candidates=C.to("meta"))),
    "Bc not a multiple of Bq": (
        ValueError,
        r"candidates rows \(11\) must be a multiple of query rows \(4\).*pass targets",
        dict(candidates=C[:11]),
    ),
    # targets
    "targets not a tensor": (
        TypeError,
        "targets must be an integer torch.Tensor",
        dict(targets=[0, 3, 6, 9]),
    ),
    "float targets": (TypeError, "targets must have an integer dtype.*float32", dict(targets=torch.zeros(4))),
    "bool targets": (TypeError, "targets must have an integer dtype.*bool", dict(targets=torch.ones(4) > 0)),
    "targets too short": (
        ValueError,
        r"targets must have shape \(4,\).*got \(3,\)",
        dict(targets=torch.tensor([0, 3, 6])),
    ),
    "targets 2-D": (
        ValueError,
        r"targets must have shape \(4,\).*\(4, 1\)",
        dict(targets=torch.zeros(4, 1).long()),
    ),
    "target too large": (
        ValueError,
        r"targets must index candidates rows \[0, 12\).*\[0, 12\]",
        dict(targets=torch.tensor([0, 3, 6, 12])),
    ),
    "negative target": (
        ValueError,
        r"targets must index candidates rows \[0, 12\).*\[-1, 9\]",
        dict(targets=torch.tensor([-1, 3, 6, 9])),
    ),
    "targets on another device": (
        ValueError,
        "targets is on meta",
        dict(targets=torch.zeros(4, device="meta").long()),
    ),
    # temperature
    "zero temperature": (
        ValueError,
        "temperature must be positive and finite, got 0.0",
        dict(temperature=0.0),
    ),
    "negative temperature": (
        ValueError,
        "temperature must be positive and finite, got -0.1",
        dict(temperature=-0.1),
    ),
    "nan temperature": (
        ValueError,
        "temperature must be positive and finite, got nan",
        dict(temperature=float("nan")),
    ),
    "inf temperature": (
        ValueError,
        "temperature must be positive and finite, got inf",
        dict(temperature=float("inf")),
    ),
    "negative tensor temperature": (
        ValueError,
        "temperature must be positive and finite, got -0.5",
        dict(temperature=torch.tensor(-0.5)),
    ),
    "nan tensor temperature": (
        ValueError,
        "temperature must be positive and finite, got nan",
        dict(temperature=torch.tensor(float("nan"))),
    ),
    "temperature as a string": (
        TypeError,
        "temperature must be a float or a 0-dim tensor, got str",
        dict(temperature="0.05"),
    ),
    "temperature as a bool": (
        TypeError,
        "temperature must be a float or a 0-dim tensor, got bool",
        dict(temperature=True),
    ),
    "temperature with 2 elements": (
        TypeError,
        r"temperature tensor must be a one-element floating-point tensor, got shape \(2,\)",
        dict(temperature=torch.tensor([0.1, 0.2])),
    ),
    "integer tensor temperature": (
        TypeError,
        "temperature tensor must be a one-element floating-point tensor.*int64",
        dict(temperature=torch.tensor(1)),
    ),
    # options
    "unknown reduction": (
        ValueError,
        "reduction must be one of 'mean', 'sum', 'none', got 'avg'",
        dict(reduction="avg"),
    ),
    "normalize not a bool": (TypeError, "normalize must be a bool, got str", dict(normalize="yes")),
    "symmetric not a bool": (TypeError, "symmetric must be a bool, got int", dict(symmetric=1)),
    "group not a process group": (
        TypeError,
        "group must be a torch.distributed.ProcessGroup",
        dict(group="world"),
    ),
    # v3 options
    "matryoshka dims not increasing": (
        ValueError,
        r"matryoshka_dims must be strictly increasing, got \[4, 2\]",
        dict(matryoshka_dims=[4, 2]),
    ),
    "matryoshka dims repeated": (
        ValueError,
        r"strictly increasing, got \[2, 2\]",
        dict(matryoshka_dims=[2, 2]),
    ),
    "matryoshka dim above D": (
        ValueError,
        r"must lie in \[1, D=8\], got \[4, 9\]",
        dict(matryoshka_dims=[4, 9]),
    ),
    "matryoshka dim zero": (
        ValueError,
        r"must lie in \[1, D=8\], got \[0, 4\]",
        dict(matryoshka_dims=[0, 4]),
    ),
    "matryoshka dims empty": (
        TypeError,
        "matryoshka_dims must be a non-empty sequence",
        dict(matryoshka_dims=[]),
    ),
    "matryoshka dims floats": (TypeError, "matryoshka_dims must hold ints", dict(matryoshka_dims=[2.0, 4.0])),
    "matryoshka dims as an int": (TypeError, "non-empty sequence of ints, got 4", dict(matryoshka_dims=4)),
    "matryoshka weights wrong length": (
        ValueError,
        r"one weight per dim \(2\), got 3",
        dict(matryoshka_dims=[2, 8], matryoshka_weights=[1.0, 1.0, 1.0]),
    ),
    "matryoshka weight negative": (
        ValueError,
        r"finite and >= 0, got \[1.0, -0.5\]",
        dict(matryoshka_dims=[2, 8], matryoshka_weights=[1.0, -0.5]),
    ),
    "matryoshka weight nan": (
        ValueError,
        "finite and >= 0",
        dict(matryoshka_dims=[2, 8], matryoshka_weights=[1.0, float("nan")]),
    ),
    "matryoshka weights without dims": (
        ValueError,
        "matryoshka_weights needs matryoshka_dims",
        dict(matryoshka_weights=[1.0]),
    ),
    "candidate ids int32": (
        TypeError,
        "candidate_ids must have dtype torch.int64, got torch.int32",
        dict(candidate_ids=torch.arange(12, dtype=torch.int32)),
    ),
    "candidate ids float": (
        TypeError,
        "candidate_ids must have dtype torch.int64, got torch.float32",
        dict(candidate_ids=torch.zeros(12)),
    ),
    "candidate ids wrong length": (
        ValueError,
        r"candidate_ids must have shape \(12,\).*got \(4,\)",
        dict(candidate_ids=torch.arange(4)),
    ),
    "candidate ids 2-D": (
        ValueError,
        r"candidate_ids must have shape \(12,\).*got \(12, 1\)",
        dict(candidate_ids=torch.arange(12)[:, None]),
    ),
    "candidate ids a list": (
        TypeError,
        "candidate_ids must be an int64 torch.Tensor, got list",
        dict(candidate_ids=list(range(12))),
    ),
    "candidate ids on another device": (
        ValueError,
        "candidate_ids is on meta",
        dict(candidate_ids=torch.arange(12, device="meta")),
    ),
    "unknown positives mode": (
        ValueError,
        "positives must be one of 'mask', 'any', 'each', got 'all'",
        dict(candidate_ids=torch.arange(12), positives="all"),
    ),
    "positives without ids": (ValueError, "positives='any' needs candidate_ids", dict(positives="any")),
    "margin not a number": (
        TypeError,
        "false_negative_margin must be a float or None, got str",
        dict(false_negative_margin="0.1"),
    ),
    "margin infinite": (
        ValueError,
        "false_negative_margin must be finite, got inf",
        dict(false_negative_margin=float("inf")),
    ),
}


@pytest.mark.parametrize("case", CASES.keys())
def test_bad_input_raises_a_named_error(case):
    error, message, arguments = CASES[case]
    with pytest.raises(error, match=message):
        call(**arguments)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'torch', got 'cuda'"):
        contrastive_loss(Q, C, backend="cuda")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=re.escape("backend='triton' needs CUDA tensors (got cpu)")):
        contrastive_loss(Q, C, backend="triton")


def test_reference_is_not_a_backend():
    """The float64 reference is a test tool (`reference_contrastive_loss`), not a backend."""
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'torch', got 'reference'"):
        contrastive_loss(Q, C, backend="reference")


def test_triton_backend_refuses_float64():
    with pytest.raises(TypeError, match="backend='triton' supports float32, float16 and bfloat16.*float64"):
        contrastive_loss(Q.double(), C.double(), backend="triton")


def test_module_checks_its_options():
    with pytest.raises(ValueError, match="reduction must be one of"):
        ContrastiveLoss(reduction="max")
    with pytest.raises(ValueError, match="backend must be one of"):
        ContrastiveLoss(backend="jax")
    with pytest.raises(ValueError, match="temperature must be positive"):
        ContrastiveLoss(temperature=0.0, learnable_temperature=True)
    with pytest.raises(ValueError, match=r"candidates rows \(11\) must be a multiple"):
        ContrastiveLoss()(Q, C[:11])


def test_valid_call_with_the_same_inputs_succeeds():
    """The fixtures above are only wrong where each case says: unchanged, the call works."""
    loss = call()
    assert loss.shape == () and torch.isfinite(loss)
    assert call(targets=torch.tensor([0, 3, 6, 11]), temperature=torch.tensor([0.05])).shape == ()
    v3 = dict(matryoshka_dims=[2, 8], matryoshka_weights=[1.0, 0.5], candidate_ids=torch.arange(12) % 5)
    assert torch.isfinite(call(**v3, positives="each", false_negative_margin=0.1))
