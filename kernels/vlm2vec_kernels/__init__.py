"""vlm2vec_kernels: the fused InfoNCE contrastive loss (Triton on GPU, chunked torch on CPU).

    from vlm2vec_kernels import contrastive_loss, ContrastiveLoss
    loss = contrastive_loss(query, candidates, temperature=0.02)   # [Bq, D], [Bq*(1+K), D]

Imports torch only; triton is imported lazily when the Triton backend is first used.
"""

from .contrastive import ContrastiveLoss, contrastive_loss
from .torch_ref import reference_contrastive_loss

__all__ = ["ContrastiveLoss", "contrastive_loss", "reference_contrastive_loss"]
