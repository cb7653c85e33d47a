"""GradCache: a contrastive step over a large batch with the activation memory of one chunk.

The batch is encoded chunk by chunk. With `grad_cache=True` every chunk runs under non-reentrant
`torch.utils.checkpoint`: its activations are dropped as soon as its embeddings exist, so the first
pass needs the memory of a no-grad pass (it still records the autograd graph: a per-operation cost,
small next to real layers, ~10% of a tiny CPU model's step). The loss then sees the whole batch
(every query against every candidate, across processes). One backward call does the rest:
autograd computes the loss's gradient w.r.t. all embeddings, then reaches the chunks one at a time
(later chunks first) and, for each, re-runs its forward with the CPU and accelerator RNG state of
the first pass restored (`SameRandomness`), so dropout masks match, and back-propagates the cached
embedding gradient through it before the next chunk is recomputed. Peak: one chunk's activations.

Why one backward instead of one per chunk (the reference implementation's GradCache): every
parameter receives all chunks' contributions inside a single autograd pass, summed before its
gradient-accumulation hook fires once. Data-parallel engines therefore reduce gradients once per
step: DeepSpeed ZeRO-2/3 reduce-scatter in every backward call (per-chunk backwards cost a reduction
per chunk, measured in tests/test_train_deepspeed.py), DDP all-reduces once, and nothing needs
`no_sync` or `set_gradient_accumulation_boundary` (with which the per-chunk recipe gave other
parameters under ZeRO-3 in that test). The gradients equal the plain step's (same chunks, same RNG
stream) exactly.

Frozen vision towers: run the step inside `VLM2Vec.reuse_vision_features()` and the recompute replays
the image features of the first pass instead of running the tower again (one vision pass per step).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

Inputs = Mapping[str, Tensor]
Encoder = Callable[[Inputs], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "Encoder",
    "Inputs",
    "LossFn",
    "SameRandomness",
    "contrastive_step",
    "encode_chunks",
    "recomputing",
]

_RECOMPUTING = contextvars.ContextVar("vlm2vec_gradcache_recomputing", default=False)


def recomputing() -> bool:
    """True while a chunk's forward is re-run in backward (the second encoding of a GradCache step).

    `VLM2Vec.reuse_vision_features` replays image features only then: in the first pass every call must
    run the tower, even for an image seen earlier in the step, because under ZeRO-3 each tower run is a
    series of collectives that every rank has to issue alike (a cache hit on one rank only would skip
    them there)."""
    return _RECOMPUTING.get()


def _accelerator() -> tuple[str, list[int]]:
    """(device type, [current device index]) of the accelerator in use, or ("cuda", []) without one."""
    if torch.cuda.is_available():
        return "cuda", [torch.cuda.current_device()]
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type, [accelerator.current_device_index()]
    return "cuda", []


class SameRandomness:
    """Calls `encoder` with identical randomness every time: the first call records the CPU and the
    accelerator RNG state, later calls (autograd's recompute) replay it and then restore the caller's
    state, so dropout masks match between the first pass and the recompute, and the RNG stream after
    the step does not depend on whether the recompute ran."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.device_type, self.devices = _accelerator()
        self.state: tuple[Tensor, list[Tensor]] | None = None

    def _module(self):
        return getattr(torch, self.device_type)

    def __call__(self, inputs: Inputs) -> Tensor:
        if self.state is None:
            self.state = (torch.get_rng_state(), [self._module().get_rng_state(d) for d in self.devices])
            return self.encoder(inputs)
        token = _RECOMPUTING.set(True)
        try:
            with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
                torch.set_rng_state(self.state[0])
                for device, state in zip(self.devices, self.state[1]):
                    self._module().set_rng_state(state, device)
                return self.encoder(inputs)
        finally:
            _RECOMPUTING.reset(token)


def encode_chunks(encoder: Encoder, chunks: Sequence[Inputs], *, grad_cache: bool = True) -> Tensor:
    """Embeddings [sum of chunk rows, D] of `chunks`, concatenated in order.

    grad_cache=True: each chunk keeps no activations; backward recomputes it (same RNG state) once the
    embedding gradients are known. grad_cache=False: plain forward, every chunk's graph is kept (one
    chunk holding the whole batch is the ordinary full-batch step). Under no_grad both are the same."""
    if not chunks:
        raise ValueError("chunks is empty: need at least one chunk of inputs")
    if not grad_cache or not torch.is_grad_enabled():
        reps = [encoder(chunk) for chunk in chunks]
    else:
        # early stop off: the recompute runs each chunk's forward to the end, so module hooks that
        # pair up around forward (DeepSpeed ZeRO-3 gathers/releases parameters) always see both halves.
        # RNG: our own replay (torch's only covers devices of tensor arguments; inputs may sit on the CPU)
        with set_checkpoint_early_stop(False):
            reps = [
                checkpoint(SameRandomness(encoder), c, use_reentrant=False, preserve_rng_state=False)
                for c in chunks
            ]
    for i, rep in enumerate(reps):
        if rep.dim() != 2:
            raise ValueError(f"encoder must return [rows, D] embeddings; chunk {i} gave {tuple(rep.shape)}")
    return torch.cat(reps) if len(reps) > 1 else reps[0]


def contrastive_step(
    encoder: Encoder,
    query_chunks: Sequence[Inputs],
    cand_chunks: Sequence[Inputs],
    loss_fn: LossFn,
    *,
    grad_cache: bool = True,
) -> Tensor:
    """The loss of one batch, ready for a single `.backward()` (or `engine.backward(loss)`).

    query_chunks / cand_chunks: model inputs per chunk (sized separately, e.g. by
    `vlm2vec.data.ChunkCollator`); loss_fn(queries [Bq, D], candidates [Bc, D]) -> scalar, e.g. a
    `vlm2vec_kernels.contrastive_loss` partial with targets and the process group for cross-device
    negatives. Backward recomputes the chunks (grad_cache=True) or uses the kept graphs (False)."""
    queries = encode_chunks(encoder, query_chunks, grad_cache=grad_cache)
    candidates = encode_chunks(encoder, cand_chunks, grad_cache=grad_cache)
    loss = loss_fn(queries, candidates)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    return loss
