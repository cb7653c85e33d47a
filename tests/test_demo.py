"""The embedded demo: the emoji data builder on real font renderings and real Unicode names, the demo
backbone family (the default run itself: tests/test_train_default.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec.data import load_eval_dataset, load_train_data
from vlm2vec.demo.emoji_data import (
    EVAL_SETS,
    build_emoji_dataset,
    load_emoji_font,
    parse_emoji_test,
    render_emoji,
    split_indices,
)


@pytest.fixture(scope="module")
def emoji():
    return parse_emoji_test()


def test_unicode_names_and_groups(emoji):
    assert len(emoji) == 1870
    assert len({e.name for e in emoji}) == 1870
    groups = {e.group for e in emoji}
    assert len(groups) == 9 and "Component" not in groups and "Flags" in groups
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for e in emoji for c in e.chars)  # no skin tones
    by_name = {e.name: e for e in emoji}
    assert (
        by_name["grinning face"].chars == "\U0001f600"
        and by_name["grinning face"].group == "Smileys & Emotion"
    )
    assert by_name["flag: Japan"].group == "Flags"


def test_rendering_is_real_colour_emoji(emoji):
    font = load_emoji_font()
    by_name = {e.name: e for e in emoji}
    img = np.asarray(render_emoji(by_name["red heart"].chars, font), dtype=np.int32)
    assert img.shape == (136, 136, 3)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert ((r > 180) & (g < 80) & (b < 80)).sum() > 2000  # a big red area, not a tofu box
    assert (img == 255).all(-1)[0].all()  # white margin
    other = np.asarray(render_emoji(by_name["blue heart"].chars, font), dtype=np.int32)
    assert ((other[..., 2] > 180) & (other[..., 0] < 80)).sum() > 2000


def test_split_is_fixed_and_disjoint():
    train, held_out = split_indices(1870)
    assert (len(train), len(held_out)) == (870, 1000) and not set(train) & set(held_out)
    assert split_indices(1870) == (train, held_out)
    assert split_indices(1870, seed=1) != (train, held_out)
    with pytest.raises(ValueError, match="exceeds"):
        split_indices(10, 6, 6)


def test_builder_writes_mmeb_format_on_a_subset(tmp_path, emoji):
    out = build_emoji_dataset(tmp_path / "emoji", n_train=5, n_eval=7, show_progress=False)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    held_out = [r for r in items if r["split"] == "eval"]
    assert len(items) == 12 and len(held_out) == 7
    names = {e.name for e in emoji}
    assert all(r["name"] in names for r in items)
    first = Image.open(out / held_out[0]["image"])
    colours = np.unique(np.asarray(first.convert("RGB")).reshape(-1, 3), axis=0)
    assert first.size == (136, 136) and len(colours) > 20  # a colour picture, not blank

    i2t = load_eval_dataset(out / "eval", "EmojiI2T", check_images=True)
    assert len(i2t) == 7
    for ex, item in zip(i2t.examples, held_out):
        assert ex.cand_texts[0] == item["name"] and sorted(ex.cand_texts) == sorted(
            r["name"] for r in held_out
        )
        assert ex.query_image == item["image"].removeprefix("eval/")
    t2i = load_eval_dataset(out / "eval", "EmojiT2I", check_images=True)
    assert t2i[3].query_text.endswith(held_out[3]["name"]) and t2i[3].cand_images[0] == i2t[3].query_image
    group = load_eval_dataset(out / "eval", "EmojiGroup")
    assert all(
        len(ex.cand_texts) == 9 and ex.cand_texts[0] == item["group"] for ex, item in zip(group, held_out)
    )
    assert json.loads((out / "eval" / "datasets.json").read_text()) == EVAL_SETS

    train = load_train_data(out / "train", check_images=True)
    assert train.sizes() == {"EmojiI2T": 5, "EmojiT2I": 5}
    train_names = {r["name"] for r in items if r["split"] == "train"}
    assert {ex.pos_text for ex in train.subsets["EmojiI2T"]} == train_names
    # a rebuild with the same settings reuses the files; other settings rebuild
    stamp = (out / "manifest.json").stat().st_mtime_ns
    build_emoji_dataset(out, n_train=5, n_eval=7, show_progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    build_emoji_dataset(out, n_train=4, n_eval=7, show_progress=False)
    assert json.loads((out / "manifest.json").read_text())["settings"]["n_train"] == 4


def test_demo_family_prepare_and_features_cache(tmp_path):
    from vlm2vec.demo import family
    from vlm2vec.model import VLM2Vec

    model = VLM2Vec.tiny(family.FAMILY_NAME, pooling="mean")
    assert model.vision_tower is None  # the frozen image encoder lives in the processor
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    inputs = model.prepare(["<|image_1|> what is this?", "plain text"], [img, None])
    image_id = model.processor.tokenizer.convert_tokens_to_ids(family.IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image_id).sum()) == model.processor.featurizer.n_tokens
    assert inputs["image_features"].shape == (
        model.processor.featurizer.n_tokens,
        family.FEATURE_DIM,
    )  # one per slot
    assert inputs["attention_mask"][1].tolist()[-1] == 0  # right padding
    featurizer = model.processor.featurizer
    calls = []
    original = featurizer.compute
    featurizer.compute = lambda images, batch_size=4: (
        calls.append(len(images)) or original(images, batch_size)
    )
    featurizer([img, img.copy()])
    assert calls == []  # same content -> cached key, not recomputed
    featurizer([Image.new("RGB", (40, 30), (0, 0, 200))])
    assert calls == [1]
    with pytest.raises(ValueError, match="placeholder but no image"):
        model.prepare(["<|image_1|> x"], [None])


def test_image_features_do_not_depend_on_the_batch():
    """The featuriser runs channels-last in small batches (speed): every image gets the features it
    gets alone, in the plain layout (global token and grid cells)."""
    import torch.nn.functional as F

    from vlm2vec.demo.family import ImageFeaturizer, _efficientnet_lite0

    images = [Image.new("RGB", (37 + 9 * i, 50), (40 * i, 255 - 30 * i, 90)) for i in range(5)]
    featurizer = ImageFeaturizer(image_size=96, image_grid=2)
    batched = featurizer.compute(images)  # batches of 4 and 1
    alone = torch.cat([featurizer.compute([im], batch_size=1) for im in images])
    net = _efficientnet_lite0().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        fmap = net.extract_features(torch.stack([featurizer.pixels(im) for im in images]))
    plain = torch.cat(
        [fmap.mean((2, 3))[:, None], F.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)], 1
    )
    assert batched.shape == (5, 5, 1280)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched, plain, rtol=1e-4, atol=1e-4)
