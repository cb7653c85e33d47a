"""Device check (issue 22): export a tiny Qwen2-VL (native layout) and LLaVA-NeXT with a random LoRA, serve
each with vLLM's pooling runner and compare its embeddings of text rows with `VLM2Vec.encode` (cosine).
Runs only where vllm imports (a GPU build); prints one line per family. bench/device_check.sh calls it."""

from __future__ import annotations

import sys
import tempfile

import torch


def main() -> int:
    from vllm import LLM

    from vlm2vec.backbones import ProcessorSettings
    from vlm2vec.export import export
    from vlm2vec.model import VLM2Vec

    texts = ["a red box", "Represent the given image.", "two cats on a sofa"]
    worst = 1.0
    for family, kwargs in (("qwen2_vl", {"settings": ProcessorSettings(prompt_layout="native")}),
                           ("llava_next", {})):  # fmt: skip
        tmp = tempfile.mkdtemp()
        model = VLM2Vec.tiny(family, **kwargs).add_lora(r=4, init=False, dropout=0.0)
        model.save_pretrained(f"{tmp}/run")
        out = export(f"{tmp}/run", f"{tmp}/export")
        want = model.eval().encode(texts, show_progress=False)
        llm = LLM(model=out, runner="pooling", dtype="float32", enforce_eager=True, max_model_len=512)
        rows = llm.embed(texts)
        got = torch.tensor([r.outputs.embedding for r in rows])
        cos = torch.nn.functional.cosine_similarity(got, want).tolist()
        worst = min(worst, *cos)
        print(f"vllm export {family}: cosine per text row {[round(c, 6) for c in cos]}")
        del llm
    return 0 if worst >= 0.999 else 1


if __name__ == "__main__":
    sys.exit(main())
