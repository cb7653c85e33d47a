"""GradCache exactness: one GradCache step gives the parameter gradients of the plain step (fp32, dropout
on), on one process and on two (gloo, cross-device and hard negatives); the frozen vision tower of a real
tiny backbone runs once per chunk and step, not twice."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from vlm2vec_kernels import contrastive_loss

from vlm2vec.gradcache import contrastive_step, encode_chunks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class DropoutEncoder(nn.Module):
    """Token embeddings -> MLP with dropout -> masked mean -> L2 norm: small, real, random in train mode."""

    def __init__(self, vocab: int = 50, dim: int = 24, hidden: int = 40, p: float = 0.3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(p)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.down(self.drop(F.gelu(self.up(self.emb(inputs["input_ids"])))))
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return F.normalize((x * mask).sum(1) / mask.sum(1), dim=-1)


def make_rows(n: int, seed: int, vocab: int = 50, max_len: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    return {
        "input_ids": torch.randint(0, vocab, (n, max_len), generator=g),
        "attention_mask": (torch.arange(max_len)[None] < lengths[:, None]).long(),
    }


def chunked(rows: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Chunks of `size` rows, each cut to its own longest row (as the collator pads)."""
    n = rows["input_ids"].shape[0]
    out = []
    for s in range(0, n, size):
        part = {k: v[s : s + size] for k, v in rows.items()}
        width = int(part["attention_mask"].sum(1).max())
        out.append({k: v[:, :width] for k, v in part.items()})
    return out


def grads_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


def run_step(model, queries, cands, q_chunk, c_chunk, *, grad_cache, seed, group=None, targets=None):
    model.zero_grad(set_to_none=False)
    torch.manual_seed(seed)

    def loss_fn(q, c):
        return contrastive_loss(q, c, 0.05, normalize=False, targets=targets, group=group)

    loss = contrastive_step(
        model, chunked(queries, q_chunk), chunked(cands, c_chunk), loss_fn, grad_cache=grad_cache
    )
    loss.backward()
    return loss.detach(), grads_of(model)


def test_gradcache_step_equals_plain_step_with_dropout_and_hard_negatives():
    torch.manual_seed(0)
    model = DropoutEncoder().train()
    queries, cands = make_rows(7, seed=1), make_rows(21, seed=2)  # K = 2 hard negatives per query
    loss_gc, g_gc = run_step(model, queries, cands, 3, 4, grad_cache=True, seed=7)
    after_gc = torch.rand(4)  # the recompute leaves the RNG stream where the plain step leaves it
    loss_plain, g_plain = run_step(model, queries, cands, 3, 4, grad_cache=False, seed=7)
    assert torch.equal(torch.rand(4), after_gc)
    assert torch.equal(loss_gc, loss_plain)
    torch.testing.assert_close(g_gc, g_plain, rtol=1e-6, atol=1e-7)
    # dropout really acts: another RNG stream gives other gradients, so matching needs the restored state
    _, g_other = run_step(model, queries, cands, 3, 4, grad_cache=False, seed=8)
    assert (g_other - g_plain).abs().max() > 1e-3


def test_gradcache_matches_whole_batch_step_without_dropout():
    torch.manual_seed(0)
    model = DropoutEncoder().eval()
    queries, cands = make_rows(9, seed=3), make_rows(9, seed=4)
    targets = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    loss_gc, g_gc = run_step(model, queries, cands, 2, 4, grad_cache=True, seed=0, targets=targets)
    loss_full, g_full = run_step(model, queries, cands, 9, 9, grad_cache=False, seed=0, targets=targets)
    torch.testing.assert_close(loss_gc, loss_full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_gc, g_full, rtol=1e-5, atol=1e-6)
    assert g_full.abs().max() > 1e-2  # a real gradient, not zeros


def test_encode_chunks_rejects_bad_input():
    model = DropoutEncoder()
    with pytest.raises(ValueError, match="chunks is empty"):
        encode_chunks(model, [])
    with pytest.raises(ValueError, match=r"\[rows, D\]"):
        encode_chunks(lambda inputs: inputs["input_ids"].float().sum(1), chunked(make_rows(2, seed=0), 2))


# ------------------------------------------------------------------------------------ two processes
WORLD, LOCAL_Q, K = 2, 3, 1  # queries per rank, hard negatives per query


def _global_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return make_rows(WORLD * LOCAL_Q, seed=11), make_rows(WORLD * LOCAL_Q * (K + 1), seed=12)


def _local(rows: dict[str, torch.Tensor], rank: int, per_rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in rows.items()}


def _two_process_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        queries, cands = _global_batch()
        q, c = _local(queries, rank, LOCAL_Q), _local(cands, rank, LOCAL_Q * (K + 1))
        results = {}
        for mode in ("train", "eval"):
            torch.manual_seed(0)
            model = DropoutEncoder().train(mode == "train")
            for grad_cache in (True, False):
                loss, grads = run_step(
                    model, q, c, 2, 3, grad_cache=grad_cache, seed=100 + rank, group=dist.group.WORLD
                )
                dist.all_reduce(grads)  # data-parallel averaging, as DDP / DeepSpeed do
                dist.all_reduce(loss)
                results[(mode, grad_cache)] = (loss / WORLD, grads / WORLD)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
        dist.barrier()  # no rank tears gloo down while its peer is still in a collective
    finally:
        dist.destroy_process_group()


def test_gradcache_two_processes_cross_device_negatives(tmp_path):
    mp.spawn(_two_process_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "results.pt")
    # dropout on: GradCache == plain step on the same chunks, both over two processes
    loss_gc, g_gc = results[("train", True)]
    loss_plain, g_plain = results[("train", False)]
    torch.testing.assert_close(loss_gc, loss_plain, rtol=0, atol=0)
    torch.testing.assert_close(g_gc, g_plain, rtol=1e-6, atol=1e-7)
    # dropout off: two processes == one process on the concatenated batch (every candidate a negative)
    torch.manual_seed(0)
    model = DropoutEncoder().eval()
    queries, cands = _global_batch()
    loss_one, g_one = run_step(model, queries, cands, 6, 12, grad_cache=False, seed=0)
    loss_two, g_two = results[("eval", True)]
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_two, g_one, rtol=1e-5, atol=1e-6)
    assert g_one.abs().max() > 1e-2


# ------------------------------------------------------------------------------ real tiny backbone
@pytest.fixture(scope="module")
def tiny_qwen():
    from vlm2vec.model import VLM2Vec

    torch.manual_seed(0)
    model = VLM2Vec.tiny("qwen2_vl")
    model.add_lora(r=4, alpha=8, dropout=0.2)  # LoRA dropout: the backbone's forward is random ...
    for name, p in model.named_parameters():
        if "lora_B" in name:  # ... once B is non-zero (peft starts it at 0: dropout would only reach grads)
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    model.vision_tower.eval()
    return model


def _tiny_batch(model):
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    images = [Image.new("RGB", (56, 56), c) for c in colors]
    q_texts = [
        "<|image_1|> what color is this?",
        "find the matching red square",
        "<|image_1|> name the shape",
        "a caption about a blue circle",
    ]
    q_images = [images[0], None, images[1], None]
    represent = "<|image_1|> Represent the given image."
    c_texts = ["a red image", represent, "green", represent]
    c_images = [None, images[2], None, images[3]]
    q_chunks = [model.prepare(q_texts[i : i + 2], q_images[i : i + 2]) for i in (0, 2)]
    c_chunks = [model.prepare(c_texts[i : i + 2], c_images[i : i + 2]) for i in (0, 2)]
    return q_chunks, c_chunks


def _tiny_step(model, q_chunks, c_chunks, *, grad_cache, reuse, seed=3):
    model.zero_grad(set_to_none=True)
    calls = []
    first_block = next(model.vision_tower.children())
    handle = first_block.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(seed)
    try:
        ctx = model.reuse_vision_features() if reuse else torch.enable_grad()
        with ctx:
            loss = contrastive_step(
                model,
                q_chunks,
                c_chunks,
                lambda q, c: contrastive_loss(q, c, 0.05, normalize=False),
                grad_cache=grad_cache,
            )
            loss.backward()
    finally:
        handle.remove()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grads, len(calls)


def test_tiny_backbone_gradcache_exact_and_one_vision_pass(tiny_qwen):
    model = tiny_qwen
    q_chunks, c_chunks = _tiny_batch(model)
    chunks_with_images = sum("pixel_values" in ch for ch in q_chunks + c_chunks)
    assert chunks_with_images == 4

    g_plain, calls_plain = _tiny_step(model, q_chunks, c_chunks, grad_cache=False, reuse=False)
    g_reuse, calls_reuse = _tiny_step(model, q_chunks, c_chunks, grad_cache=True, reuse=True)
    g_rerun, calls_rerun = _tiny_step(model, q_chunks, c_chunks, grad_cache=True, reuse=False)
    assert calls_plain == chunks_with_images
    assert calls_reuse == chunks_with_images  # one vision pass per step: the recompute replays features
    assert calls_rerun == 2 * chunks_with_images  # without reuse the recompute runs the tower again
    assert g_plain.abs().max() > 0
    torch.testing.assert_close(g_reuse, g_plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_rerun, g_plain, rtol=1e-5, atol=1e-7)
    g_other, _ = _tiny_step(model, q_chunks, c_chunks, grad_cache=False, reuse=False, seed=4)
    assert (g_other - g_plain).abs().max() > 1e-4  # dropout acts: matching needs the restored RNG state


def test_tiny_backbone_gradcache_with_gradient_checkpointing(tiny_qwen):
    model = tiny_qwen
    q_chunks, c_chunks = _tiny_batch(model)
    g_plain, _ = _tiny_step(model, q_chunks, c_chunks, grad_cache=False, reuse=False)
    model.gradient_checkpointing_enable()
    try:
        g_ckpt, calls = _tiny_step(model, q_chunks, c_chunks, grad_cache=True, reuse=True)
    finally:
        model.hf_model.gradient_checkpointing_disable()
    assert calls == 4
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "phi3_v"])
@pytest.mark.parametrize("train_vision", [False, True])
def test_dummy_vision_pass_runs_the_tower_and_changes_nothing(name, train_vision):
    """`inputs["vision_dummies"] = n` (what the trainer sets on a rank whose chunk has fewer visual inputs
    than another rank's, for ZeRO-3): the vision path runs n more times, the embeddings and every
    gradient are bitwise those without it; a trainable tower gets exact-zero gradients from it."""
    from vlm2vec.model import DUMMY_VISION_KEY, VLM2Vec

    torch.manual_seed(0)
    model = VLM2Vec.tiny(name).train()
    model.enable_full_finetuning(train_vision=train_vision)
    texts = ["a caption about a red circle", "<|image_1|> what is shown?"]
    inputs = model.prepare(texts[:1])  # a text-only chunk
    calls = []
    first_block = next(model.vision_tower.children())
    handle = first_block.register_forward_hook(lambda *args: calls.append(1))

    def run(extra: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model({**inputs, **extra})
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    try:
        plain, plain_grads = run({})
        assert calls == []
        dummy, dummy_grads = run({DUMMY_VISION_KEY: 2})
    finally:
        handle.remove()
    assert len(calls) == 2  # the tower ran twice, on the dummy image
    assert torch.equal(dummy, plain)
    assert plain_grads and all(torch.equal(dummy_grads[n], g) for n, g in plain_grads.items())
    # parameters reached only through the dummy (a trainable tower; LLaVA's / Phi's projector): exact zeros
    extra = set(dummy_grads) - set(plain_grads)
    assert all(int((dummy_grads[n] != 0).sum()) == 0 for n in extra)
    if train_vision:
        assert extra
