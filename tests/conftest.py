"""Test-wide setup. Triton's interpreter must be chosen before the first `import triton`, so it is
set here (an explicit TRITON_INTERPRET=0, as on the GPU machine, wins)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
