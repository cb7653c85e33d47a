"""One GradCache training step: our step against a reference-style step, and an ablation table.

    python bench/train_step.py                      # tiny Qwen2-VL + LoRA on the CPU (about a minute)
    python bench/train_step_device.py               # a Qwen2-VL-2B-sized model on a GPU (no weights needed)

Every variant encodes the same variable-length batch (queries and image/text targets, lengths from a
few tokens to hundreds) with GradCache chunks, computes InfoNCE over the whole batch, back-propagates
and reduces the trainable gradients across the process group. They differ in four switches:

    padding     chunk: each chunk padded to its own longest row, rows sorted by length (ours)
                batch: the whole batch padded to its longest row, then cut into chunks (reference)
    vision      once: the frozen vision tower's first-pass features replayed in the recompute (ours)
                twice: the tower runs in the no-grad pass and again in the re-forward (reference)
    loss        fused: vlm2vec_kernels.contrastive_loss, no B x B matrix (ours)
                eager: scores = q @ c.T / tau; cross_entropy (reference)
    backward    single: one backward call recomputes the chunks; gradients reduced once (ours)
                per_chunk: backward per chunk, gradients reduced after the query side and again after
                the candidate side (the reference's DDP arrangement)

"reference-style" switches all four to the reference's choice; each ablation row switches one of ours.
Peak memory: CUDA max_memory_allocated, or on the CPU the high-water mark of tensor storage allocated
during the step (tracked per storage through a TorchDispatchMode); model weights are not included.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = os.path.dirname(os.path.abspath(__file__))

OURS = dict(padding="chunk", vision="once", loss="fused", backward="single")
VARIANTS: dict[str, dict[str, str]] = {
    "ours": OURS,
    "reference-style": dict(padding="batch", vision="twice", loss="eager", backward="per_chunk"),
    "ours, whole-batch padding": {**OURS, "padding": "batch"},
    "ours, vision tower twice": {**OURS, "vision": "twice"},
    "ours, eager B x B loss": {**OURS, "loss": "eager"},
    "ours, per-chunk backward (2 reductions)": {**OURS, "backward": "per_chunk"},
}
WORDS = (
    "red green blue small large square circle image photo caption dog cat city night rain street "
    "shape colour bright dark water tree house window car people sign text chart table page"
).split()


# ---------------------------------------------------------------------------------------------- batch
def make_batch(n: int, seed: int, image_size: int, max_words: int):
    """n queries and n positives; lengths vary from 2 to max_words words; half the rows carry an image."""
    from PIL import Image, ImageDraw

    from vlm2vec.data import ContrastiveBatch

    rng = random.Random(seed)

    def text(prefix: str) -> str:
        words = int(2 + (max_words - 2) * rng.random() ** 2)
        return prefix + " ".join(rng.choice(WORDS) for _ in range(words))

    def image():
        img = Image.new("RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in range(3)))
        a, b = image_size // 4, image_size * 3 // 4
        ImageDraw.Draw(img).ellipse([a, a, b, b], fill=tuple(rng.randrange(256) for _ in range(3)))
        return img

    q_img = [image() if i % 2 == 0 else None for i in range(n)]
    c_img = [image() if i % 2 == 1 else None for i in range(n)]
    q_txt = [text("<|image_1|> Represent the image with the question: " if im else "Find: ") for im in q_img]
    c_txt = ["<|image_1|> Represent the given image." if im else text("") for im in c_img]
    return ContrastiveBatch(q_txt, q_img, c_txt, c_img, torch.arange(n), ["bench"] * n)


def _pad_to(inputs: dict, length: int, pad_id: int, side: str) -> dict:
    """Pad every [N, L] token-level tensor of a chunk to `length` (whole-batch padding)."""
    width = inputs["input_ids"].shape[1]
    if width == length:
        return inputs
    out = dict(inputs)
    for key, value in inputs.items():
        token_level = isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == width
        if token_level and key != "pixel_values":
            fill = pad_id if key == "input_ids" else 0
            pad = torch.full((value.shape[0], length - width), fill, dtype=value.dtype)
            out[key] = torch.cat([pad, value] if side == "left" else [value, pad], dim=1)
    return out


def prepare(model, batch, chunk: int, padding: str):
    """(query chunks, candidate chunks, targets) with per-chunk or whole-batch padding."""
    from vlm2vec.data import ChunkCollator

    prepared = ChunkCollator(
        model, query_chunk_size=chunk, cand_chunk_size=chunk, sort_by_length=padding == "chunk"
    )(batch)
    q, c = prepared.query_chunks, prepared.cand_chunks
    if padding == "batch":
        pad_id = model.processor.tokenizer.pad_token_id
        longest = max(x["input_ids"].shape[1] for x in q + c)
        q = [_pad_to(x, longest, pad_id, model.padding_side) for x in q]
        c = [_pad_to(x, longest, pad_id, model.padding_side) for x in c]
    return q, c, prepared.targets


# ----------------------------------------------------------------------------------------------- step
def eager_loss(q, c, targets, temperature: float, group):
    """The reference implementation's loss: full score matrix, no-grad all_gather of other ranks' rows."""
    world = dist.get_world_size(group) if group is not None else 1
    if world > 1:
        rank = dist.get_rank(group)
        parts = [torch.empty_like(c) for _ in range(world)]
        dist.all_gather(parts, c.detach().contiguous(), group=group)
        parts[rank] = c
        c, targets = torch.cat(parts), targets + rank * c.shape[0]
    scores = q @ c.T / temperature
    loss = F.cross_entropy(scores.float(), targets.to(scores.device))
    return loss * world


def fused_loss(q, c, targets, temperature: float, group):
    from vlm2vec_kernels import contrastive_loss

    return contrastive_loss(q, c, temperature, normalize=False, targets=targets.to(q.device), group=group)


def reduce_gradients(params: list[torch.Tensor], group) -> None:
    """All-reduce (average) the trainable gradients as one flat buffer, as DDP's reducer does."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_step(
    model, params, q_chunks, c_chunks, targets, switches: dict[str, str], group, temperature: float = 0.02
) -> float:
    """One step of the variant `switches` (gradients left in .grad, reduced across `group`)."""
    from vlm2vec.gradcache import contrastive_step

    loss_of = fused_loss if switches["loss"] == "fused" else eager_loss
    reuse = model.reuse_vision_features() if switches["vision"] == "once" else _nothing()
    device = model.device
    with reuse:
        if switches["backward"] == "single":
            loss = contrastive_step(
                model, q_chunks, c_chunks, lambda q, c: loss_of(q, c, targets, temperature, group)
            )
            loss.backward()
            reduce_gradients(params, group)
            return float(loss.detach())
        states, reps = [], []  # reference GradCache: no-grad pass, cached grads, per-chunk backward
        with torch.no_grad():
            for inputs in q_chunks + c_chunks:
                states.append(_rng_state(device))
                reps.append(model(inputs))
        n_q = len(q_chunks)
        q = torch.cat(reps[:n_q]).requires_grad_()
        c = torch.cat(reps[n_q:]).requires_grad_()
        loss = loss_of(q, c, targets, temperature, group)
        loss.backward()
        sizes = [len(r) for r in reps]
        cached = list(q.grad.split(sizes[:n_q])) + list(c.grad.split(sizes[n_q:]))
        for side in (range(n_q), range(n_q, len(reps))):
            for k in side:
                _set_rng_state(states[k], device)
                (model((q_chunks + c_chunks)[k]) * cached[k]).sum().backward()
            reduce_gradients(params, group)  # after the query side, and again after the candidates
        return float(loss.detach())


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class StoragePeak(TorchDispatchMode):
    """High-water mark of tensor storage bytes allocated inside the block (CPU tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


# ---------------------------------------------------------------------------------------- measurement
@dataclass
class Row:
    variant: str
    seconds: float
    samples_per_s: float
    peak_mb: float
    loss: float
    tokens: int  # token positions the encoder processes per pass (padding included)


class Variant:
    """One variant's prepared inputs and its timed / memory-tracked step."""

    def __init__(self, model, batch, name: str, chunk: int, group):
        self.model, self.name, self.group = model, name, group
        self.switches = VARIANTS[name]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.q, self.c, self.targets = prepare(model, batch, chunk, self.switches["padding"])
        self.tokens = sum(int(x["input_ids"].numel()) for x in self.q + self.c)
        self.times: list[float] = []
        self.loss = float("nan")

    def once(self) -> float:
        for p in self.params:
            p.grad = None
        return train_step(self.model, self.params, self.q, self.c, self.targets, self.switches, self.group)

    def timed(self) -> None:
        device = self.model.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        self.loss = self.once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.times.append(time.perf_counter() - t0)

    def peak_bytes(self) -> int:
        device = self.model.device
        for p in self.params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            self.once()
            return torch.cuda.max_memory_allocated(device) - base
        tracker = StoragePeak()
        with tracker:
            self.once()
        return tracker.peak


def measure_all(model, batch, chunk: int, repeats: int, group) -> list[Row]:
    """Warm up every variant, then time them round-robin (load from other processes hits all alike);
    a variant's time is the fastest of its repeats."""
    variants = [Variant(model, batch, name, chunk, group) for name in VARIANTS]
    for v in variants:
        v.once()
    for _ in range(repeats):
        for v in variants:
            torch.manual_seed(1)
            v.timed()
    rows = []
    for v in variants:
        seconds = min(v.times)
        rows.append(Row(v.name, seconds, len(batch) / seconds, v.peak_bytes() / 2**20, v.loss, v.tokens))
        print(f"  {v.name}: {rows[-1].samples_per_s:.2f} samples/s, {rows[-1].peak_mb:.1f} MiB", flush=True)
    return rows


ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
SIZES = {
    # Qwen/Qwen2-VL-2B-Instruct config.json dimensions
    "qwen2_vl_2b": dict(
        text=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_parameters=ROPE,
        ),
        vision=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=1536,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    ),
    # Qwen/Qwen2-VL-7B-Instruct
    "qwen2_vl_7b": dict(
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            rope_parameters=ROPE,
        ),
        vision=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=3584,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    ),
}


def build_sized_qwen2_vl(size: str, device: torch.device, dtype: torch.dtype):
    """A VLM2Vec around a randomly initialised Qwen2-VL of a real size (the reference's 4..1280 merged
    image tokens per image), built by the family's own builder; a tiny tokenizer stands in."""
    from vlm2vec.backbones import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, ProcessorSettings
    from vlm2vec.model import VLM2Vec, resolve_attn_implementation

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    build = dict(
        text_dims=SIZES[size]["text"],
        vision_dims=SIZES[size]["vision"],
        attn_implementation=resolve_attn_implementation(None, device),
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VLM2Vec.tiny(
                "qwen2_vl",
                build=build,
                settings=ProcessorSettings("native", QWEN_MIN_PIXELS, QWEN_MAX_PIXELS),
                max_len=2048,
            )
    finally:
        torch.set_default_dtype(default)
    return model.train()


def build_model(size: str, device: torch.device, dtype: torch.dtype, lora_dropout: float):
    from vlm2vec.model import VLM2Vec

    if size == "tiny":
        model = VLM2Vec.tiny("qwen2_vl")
    else:
        model = build_sized_qwen2_vl(size, device, dtype)
    model.add_lora(r=8, alpha=16, dropout=lora_dropout)
    model.to(device=device, dtype=dtype)
    model.train()
    model.vision_tower.eval()
    return model


def run(args: argparse.Namespace, init_process_group: bool = True) -> list[Row]:
    device = torch.device(args.device)
    if init_process_group and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = build_model(args.size, device, dtype, args.lora_dropout)
    batch = make_batch(args.batch, seed=0, image_size=args.image_size, max_words=args.max_words)
    return measure_all(model, batch, args.chunk, args.repeats, dist.group.WORLD)


def table(rows: list[Row], title: str) -> str:
    ref = next(r for r in rows if r.variant == "reference-style")
    ours = next(r for r in rows if r.variant == "ours")
    lines = [
        f"### {title}",
        "",
        "| step | samples/s | vs reference | vs ours | peak MiB | tokens/pass | loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedups = f"{r.samples_per_s / ref.samples_per_s:.2f}x | {r.samples_per_s / ours.samples_per_s:.2f}x"
        lines.append(
            f"| {r.variant} | {r.samples_per_s:.2f} | {speedups} | {r.peak_mb:.1f} | {r.tokens} | "
            f"{r.loss:.4f} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[Row], args: argparse.Namespace, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    with open(path, "a", newline="") as f:
        out = csv.writer(f)
        if new:
            out.writerow(
                [
                    "date",
                    "device",
                    "torch",
                    "size",
                    "dtype",
                    "batch",
                    "chunk",
                    "variant",
                    "seconds",
                    "samples_per_s",
                    "peak_mib",
                    "tokens_per_pass",
                ]
            )
        for r in rows:
            out.writerow(
                [
                    datetime.date.today().isoformat(),
                    device,
                    torch.__version__,
                    args.size,
                    args.dtype,
                    args.batch,
                    args.chunk,
                    r.variant,
                    f"{r.seconds:.5f}",
                    f"{r.samples_per_s:.3f}",
                    f"{r.peak_mb:.2f}",
                    r.tokens,
                ]
            )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", help="tiny, or a real size built from config: qwen2_vl_2b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=16, help="queries (and positives) per step")
    p.add_argument("--chunk", type=int, default=4, help="GradCache chunk size (queries and candidates)")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--max_words", type=int, default=120)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (fastest counts)")
    p.add_argument("--lora_dropout", type=float, default=0.1)
    p.add_argument("--csv", default=os.path.join(HERE, "results", "train_step.csv"))
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    return p


def main(argv: list[str] | None = None, extra: Callable[[], str] | None = None) -> list[Row]:
    args = parser().parse_args(argv)
    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny matrices: one thread, no OpenMP spinning
    print(
        f"train step: size={args.size} device={args.device} dtype={args.dtype} batch={args.batch} "
        f"chunk={args.chunk}",
        flush=True,
    )
    rows = run(args)
    text = table(
        rows,
        f"{args.size} Qwen2-VL + LoRA, {args.device}, {args.dtype}, batch {args.batch}, chunk {args.chunk}",
    )
    if extra is not None:
        text += "\n\n" + extra()
    print(text)
    write_csv(rows, args, args.csv)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
