"""The training-step benchmark on a GPU at a real backbone size, plus GradCache's CUDA-RNG exactness check.

    python bench/train_step_device.py [--out DIR] [--size qwen2_vl_2b] [--batch 32] [--chunk 8]

1. Exactness on the accelerator: a tiny Qwen2-VL with LoRA dropout on CUDA (fp32); the parameter
   gradients of the GradCache step must equal the plain step's (CPU *and* CUDA RNG restored per chunk).
   Control: the same step with the RNG state not restored must differ (dropout really draws on CUDA).
2. bench/train_step.py's table for a randomly initialised model with Qwen2-VL-2B's dimensions, built
   from its config (no weights are downloaded; a tiny tokenizer stands in, token ids fit the vocab).
Writes train_step_device.md and appends to train_step.csv under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench/train_step.py, run as a script

import train_step  # noqa: E402


def rng_exactness(device: torch.device) -> str:
    """GradCache == plain step with CUDA dropout; a step without RNG restore differs (control)."""
    from PIL import Image
    from vlm2vec_kernels import contrastive_loss

    from vlm2vec import gradcache
    from vlm2vec.gradcache import contrastive_step
    from vlm2vec.model import VLM2Vec

    torch.manual_seed(0)
    model = VLM2Vec.tiny("qwen2_vl")
    model.add_lora(r=8, alpha=16, dropout=0.3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B: dropout reaches the forward, not only the gradients
            torch.nn.init.normal_(p, std=0.05)
    model.to(device).train()
    model.vision_tower.eval()
    images = [Image.new("RGB", (56, 56), c) for c in ("red", "green", "blue", "white")]
    q = [
        model.prepare(["<|image_1|> what is it?", "find a red square"], [images[0], None]),
        model.prepare(["<|image_1|> shape?", "a caption"], [images[1], None]),
    ]
    c = [
        model.prepare(["red", "<|image_1|> Represent the given image."], [None, images[2]]),
        model.prepare(["<|image_1|> Represent the given image.", "green"], [images[3], None]),
    ]

    def loss_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(a, b, 0.05, normalize=False)

    def grads(grad_cache: bool, restore_rng: bool = True) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        if not restore_rng:  # the control: recompute chunks under whatever RNG state autograd finds
            gradcache.SameRandomness = lambda encoder: encoder
        try:
            with model.reuse_vision_features():
                loss = contrastive_step(model, q, c, loss_fn, grad_cache=grad_cache)
                loss.backward()
        finally:
            gradcache.SameRandomness = replay
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    replay = gradcache.SameRandomness
    plain, cached, unrestored = grads(False), grads(True), grads(True, restore_rng=False)
    exact = float((cached - plain).abs().max())
    control = float((unrestored - plain).abs().max())
    ok = exact <= 1e-6 * max(1.0, float(plain.abs().max())) and control > 1e-4
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"### GradCache exactness on {name} (tiny Qwen2-VL, LoRA dropout "
        f"0.3, fp32)\n\nmax |grad(GradCache) - grad(plain)| = {exact:.3e}; without RNG restore "
        f"{control:.3e} (control) -> {'PASS' if ok else 'FAIL'}\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out", "device")))
    p.add_argument("--size", default="qwen2_vl_2b", choices=sorted(train_step.SIZES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--image_size", type=int, default=448, help="448 px = 256 image tokens (paper's minimum)")
    p.add_argument("--max_words", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dry", action="store_true", help="plumbing check on a CPU box: tiny model, CPU")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry:
        raise SystemExit("needs a CUDA GPU (on the CPU: bench/train_step.py, or this script with --dry)")
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    check = rng_exactness(device)
    print(check, flush=True)
    bench_args = [
        "--size",
        "tiny" if args.dry else args.size,
        "--device",
        device.type,
        "--dtype",
        "fp32" if args.dry else "bf16",
        "--batch",
        str(args.batch),
        "--chunk",
        str(args.chunk),
        "--image_size",
        str(args.image_size),
        "--max_words",
        str(args.max_words),
        "--repeats",
        str(args.repeats),
        "--csv",
        os.path.join(args.out, "train_step.csv"),
        "--markdown",
        os.path.join(args.out, "train_step_device.md"),
    ]
    train_step.main(bench_args, extra=lambda: check)
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
