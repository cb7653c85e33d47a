"""The checkout installs and imports cleanly (the layout is explained in setup.py).

The repository's `kernels/` folder must never shadow the PyPI package `kernels`, which transformers
imports, when the checkout root is the working directory and the first entry of sys.path (pytest or
`python -m` from the root, a notebook in the checkout). And `kernels/` is its own distribution that
needs only torch + triton (+ numpy).
"""

import email
import os
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """A fresh interpreter whose working directory and sys.path[0] are the checkout root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_pypi_kernels_not_shadowed_from_checkout_root():
    try:
        distribution("kernels")
    except PackageNotFoundError:
        pytest.fail("the PyPI package `kernels` is not installed: the dev extras must bring it")
    proc = _run_from_root(
        """
        import sys, pathlib
        assert sys.path[0] == pathlib.Path.cwd().as_posix(), sys.path[:2]
        import transformers.activations                       # imports `kernels` through hub_kernels
        import kernels
        assert hasattr(kernels, "CUDAProperties"), kernels.__path__
        assert "site-packages" in kernels.__file__ or "dist-packages" in kernels.__file__, kernels.__file__
        import vlm2vec_kernels
        from vlm2vec_kernels import contrastive_loss
        here = pathlib.Path.cwd() / "kernels" / "vlm2vec_kernels"
        ours = pathlib.Path(vlm2vec_kernels.__file__).parent.resolve()
        assert ours == here.resolve(), ours
        assert contrastive_loss.__module__ == "vlm2vec_kernels.contrastive", contrastive_loss.__module__

        import torch
        from vlm2vec import VLM2Vec
        model = VLM2Vec.tiny("qwen2_vl")
        emb = model.encode(["a red square", "a blue circle"], [None, None], batch_size=2, show_progress=False)
        assert emb.shape[0] == 2 and torch.isfinite(emb).all()
        print("OK")
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
    # bitsandbytes' failed hub-kernel fetch is filtered (vlm2vec/__init__.py); nothing else should be
    assert "Failed to load CPU gemm_4bit_forward" not in proc.stderr, proc.stderr[-2000:]


def test_every_family_builds_from_checkout_root():
    proc = _run_from_root(
        """
        from vlm2vec import VLM2Vec, backbones
        names = backbones.tiny_families()
        assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "phi3_v"} <= set(names), names
        for family in names:
            VLM2Vec.tiny(family)
        print("OK", len(names))
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_kernels_distribution_requires_only_torch_triton_numpy(tmp_path):
    """Build the `kernels/` distribution's metadata (PEP 517 hook, no network) and read its requirements."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))",
            str(tmp_path),
        ],
        cwd=ROOT / "kernels",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    dist_info = tmp_path / proc.stdout.strip().splitlines()[-1]
    meta = email.message_from_string((dist_info / "METADATA").read_text())
    assert meta["Name"] == "vlm2vec-kernels"
    names = {
        req.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip()
        for req in meta.get_all("Requires-Dist")
    }
    assert names == {"torch", "triton", "numpy"}, names
    top = (
        (dist_info / "top_level.txt").read_text().split() if (dist_info / "top_level.txt").exists() else None
    )
    assert top in (None, ["vlm2vec_kernels"]), top
