"""Released VLM2Vec checkpoints: adapters saved under transformers 4.46 module names load exactly (or fail
naming the keys), in safetensors and the reference's .bin format; the table of released checkpoints
gives their settings without flags, and explicit arguments still override."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlm2vec.backbones import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS
from vlm2vec.model import VLM2Vec
from vlm2vec.released import RELEASED, released_checkpoint

NEW = "base_model.model.model.language_model."
OLD = {  # transformers 4.46: Qwen2-VL's LM at `model.*`, LLaVA-NeXT's at `language_model.model.*`
    "qwen2_vl": "base_model.model.model.",
    "llava_next": "base_model.model.language_model.model.",
}


def image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


ROWS = (["<|image_1|> Represent the given image.", "a dog on the grass"], [image(60, 100, 1), None])


def old_layout_adapter(src: VLM2Vec, family: str, directory: str, fmt: str) -> None:
    """Save `src`'s adapter, then rename its keys (and full target module names) the way transformers
    4.46 had them, as the released VLM2Vec adapters carry them. (`src` was made with init=False: its
    random B comes from the RNG, which a fresh tiny model + adapter would reproduce; the saved config
    says gaussian, so a fresh adapter starts at B = 0 and only loaded weights can match `src`.)"""
    tmp = directory + ".new"
    src.backbone.save_pretrained(tmp)
    state = load_file(os.path.join(tmp, "adapter_model.safetensors"))
    assert all(k.startswith(NEW) for k in state)  # every adapter weight sits in the LM
    old = {OLD[family] + k.removeprefix(NEW): v for k, v in state.items()}
    config = json.loads(open(os.path.join(tmp, "adapter_config.json")).read())
    config["target_modules"] = [
        OLD[family].removeprefix("base_model.model.") + t.removeprefix("model.language_model.")
        for t in config["target_modules"]
    ]
    # released adapters: gaussian init (B = 0), so an adapter left unloaded is a no-op and shows
    config["init_lora_weights"] = "gaussian"
    os.makedirs(directory)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    if fmt == "bin":
        torch.save(old, os.path.join(directory, "adapter_model.bin"))
    else:
        save_file(old, os.path.join(directory, "adapter_model.safetensors"))
    shutil.rmtree(tmp)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_adapter_under_transformers_4_46_names_loads_exactly(tmp_path, family: str, fmt: str) -> None:
    src = VLM2Vec.tiny(family).add_lora(r=4, dora=True, init=False)  # random B: a non-identity adapter
    directory = str(tmp_path / "adapter")
    old_layout_adapter(src, family, directory, fmt)
    with torch.no_grad():
        expected = src.encode(*ROWS, show_progress=False)
        plain = VLM2Vec.tiny(family).encode(*ROWS, show_progress=False)
        assert (expected - plain).abs().max() > 1e-3  # the adapter changes the embeddings
        loaded = VLM2Vec.tiny(family).load_adapter(directory)
        torch.testing.assert_close(loaded.encode(*ROWS, show_progress=False), expected, rtol=0, atol=0)


def test_plain_peft_leaves_the_old_names_unloaded(tmp_path) -> None:
    """What the renaming fixes: peft alone loads such an adapter as a silent no-op on the LM."""
    from peft import PeftModel

    src = VLM2Vec.tiny("qwen2_vl").add_lora(r=4, init=False)
    directory = str(tmp_path / "adapter")
    old_layout_adapter(src, "qwen2_vl", directory, "safetensors")
    config = json.loads(open(os.path.join(directory, "adapter_config.json")).read())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]  # as released
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    base = VLM2Vec.tiny("qwen2_vl")
    base.backbone = PeftModel.from_pretrained(base.backbone, directory)
    with torch.no_grad():
        wrong = base.encode(*ROWS, show_progress=False)
        ours = VLM2Vec.tiny("qwen2_vl").load_adapter(directory).encode(*ROWS, show_progress=False)
        torch.testing.assert_close(ours, src.encode(*ROWS, show_progress=False), rtol=0, atol=0)
    assert (wrong - ours).abs().max() > 1e-3


def test_adapter_weights_that_stay_unloaded_raise_naming_them(tmp_path) -> None:
    src = VLM2Vec.tiny("qwen2_vl").add_lora(r=4, init=False)
    directory = tmp_path / "adapter"
    src.backbone.save_pretrained(str(directory))
    state = load_file(str(directory / "adapter_model.safetensors"))
    key = next(iter(state))
    extra = "base_model.model.model.language_model.layers.9.self_attn.q_proj.lora_A.weight"
    state[extra] = state[key].clone()
    save_file(state, str(directory / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"match no module.*layers\.9\.self_attn\.q_proj\.lora_A"):
        VLM2Vec.tiny("qwen2_vl").load_adapter(str(directory))
    del state[extra]
    del state[key]
    save_file(state, str(directory / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"does not hold \(1\): " + key.replace(".", r"\.")):
        VLM2Vec.tiny("qwen2_vl").load_adapter(str(directory))


def test_from_pretrained_loads_an_old_layout_adapter_directory(tmp_path) -> None:
    src = VLM2Vec.tiny("qwen2_vl").add_lora(r=4, dora=True, init=False)
    src.save_pretrained(str(tmp_path / "run"))  # adapter + base/ + vlm2vec.json
    os.remove(tmp_path / "run" / "adapter_model.safetensors")
    os.remove(tmp_path / "run" / "adapter_config.json")
    old_layout_adapter(src, "qwen2_vl", str(tmp_path / "old"), "bin")
    for name in os.listdir(tmp_path / "old"):
        shutil.copy(tmp_path / "old" / name, tmp_path / "run" / name)
    loaded = VLM2Vec.from_pretrained(str(tmp_path / "run"))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode(*ROWS, show_progress=False), src.encode(*ROWS, show_progress=False), rtol=0, atol=0
        )


# ----------------------------------------------------------------------------------- the table
def test_table_names_the_released_checkpoints_with_their_settings() -> None:
    assert set(RELEASED) == {
        "TIGER-Lab/VLM2Vec-Qwen2VL-2B",
        "TIGER-Lab/VLM2Vec-Qwen2VL-7B",
        "TIGER-Lab/VLM2Vec-LLaVa-Next",
        "TIGER-Lab/VLM2Vec-Full",
        "VLM2Vec/VLM2Vec-V2.0",
    }
    v2 = RELEASED["VLM2Vec/VLM2Vec-V2.0"]
    assert (v2.family, v2.prompt_layout, v2.resolution) == ("qwen2_vl", "reference", "native")
    assert (v2.min_pixels, v2.max_pixels) == (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS) == (4 * 784, 1280 * 784)
    v1 = RELEASED["TIGER-Lab/VLM2Vec-Qwen2VL-7B"]
    assert (v1.resolution, v1.prompt_layout, v1.base) == ("high", "reference", "Qwen/Qwen2-VL-7B-Instruct")
    assert RELEASED["TIGER-Lab/VLM2Vec-LLaVa-Next"].resolution == "high"
    phi = RELEASED["TIGER-Lab/VLM2Vec-Full"]
    assert (phi.family, phi.num_crops, phi.resolution, phi.base) == ("phi3_v", 4, "native", None)
    for c in RELEASED.values():
        assert (c.pooling, c.normalize, c.temperature) == ("last", True, 0.02)


def test_released_ids_and_local_copies_are_recognised(tmp_path) -> None:
    assert released_checkpoint("TIGER-Lab/VLM2Vec-Qwen2VL-2B") is RELEASED["TIGER-Lab/VLM2Vec-Qwen2VL-2B"]
    assert released_checkpoint("tiger-lab/vlm2vec-qwen2vl-2b") is RELEASED["TIGER-Lab/VLM2Vec-Qwen2VL-2B"]
    assert released_checkpoint("Qwen/Qwen2-VL-2B-Instruct") is None
    copy = tmp_path / "VLM2Vec-V2.0"
    copy.mkdir()
    assert released_checkpoint(str(copy)) is RELEASED["VLM2Vec/VLM2Vec-V2.0"]
    cached = tmp_path / "models--TIGER-Lab--VLM2Vec-Full" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert released_checkpoint(str(cached)) is RELEASED["TIGER-Lab/VLM2Vec-Full"]
    assert released_checkpoint(str(tmp_path)) is None


def test_a_local_copy_of_a_released_adapter_loads_with_the_table_settings(tmp_path) -> None:
    """A directory laid out like TIGER-Lab/VLM2Vec-Qwen2VL-2B (an adapter under 4.46 names, no
    vlm2vec.json, adapter_config naming the authors' path as base) loads with the table's settings;
    the base comes from the table, here pointed at a local tiny base."""
    import vlm2vec.released as released

    src = VLM2Vec.tiny("qwen2_vl").add_lora(r=4, dora=True, init=False)
    base_dir = str(tmp_path / "base")
    VLM2Vec.tiny("qwen2_vl").save_pretrained(base_dir)
    copy = str(tmp_path / "VLM2Vec-Qwen2VL-2B")
    old_layout_adapter(src, "qwen2_vl", copy, "safetensors")
    config = json.loads(open(os.path.join(copy, "adapter_config.json")).read())
    config["base_model_name_or_path"] = "/fsx/home/authors/Qwen2-VL-2B-Instruct"
    open(os.path.join(copy, "adapter_config.json"), "w").write(json.dumps(config))
    entry = RELEASED["TIGER-Lab/VLM2Vec-Qwen2VL-2B"]
    original = dict(released.RELEASED)
    try:
        released.RELEASED["TIGER-Lab/VLM2Vec-Qwen2VL-2B"] = type(entry)(
            **{**entry.__dict__, "base": base_dir}
        )
        model = VLM2Vec.from_pretrained(copy)
        assert model.settings.to_dict() == {
            "resolution": "high", "min_pixels": 4 * 784, "max_pixels": 1280 * 784, "num_crops": None,
            "prompt_layout": "reference",
        }  # fmt: skip
        assert (model.pooling, model.normalize) == ("last", True)
        overridden = VLM2Vec.from_pretrained(copy, resolution="native", prompt_layout="native")
        assert (overridden.settings.resolution, overridden.settings.prompt_layout) == ("native", "native")
    finally:
        released.RELEASED.clear()
        released.RELEASED.update(original)
    src.settings = model.settings
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode(*ROWS, show_progress=False), src.encode(*ROWS, show_progress=False), rtol=0, atol=0
        )
