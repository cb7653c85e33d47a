"""vlm2vec_kernels: the fused InfoNCE contrastive loss (Triton on GPU, chunked torch on CPU).

    from vlm2vec_kernels import contrastive_loss, ContrastiveLoss
    loss = contrastive_loss(query, candidates, temperature=0.02)   # [Bq, D], [Bq*(1+K), D]

Imports torch only; triton is imported lazily when the Triton backend is first used.
`reference_contrastive_loss` is the float64 formula with the whole logit matrix (tests, benchmarks).
"""

from .contrastive import ContrastiveLoss, contrastive_loss
from .reference import reference_contrastive_loss

__all__ = ["ContrastiveLoss", "contrastive_loss", "reference_contrastive_loss"]
