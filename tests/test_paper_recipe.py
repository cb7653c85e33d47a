"""The paper's recipe as configs/*.yaml ship it: max_len counts text tokens (image tokens never cut), every
config tokenises and trains on rows of every MMEB-train subset's shape at its real image settings, a
config whose longest row cannot fit is refused at startup, LoRA as the reference puts it (DoRA, Gaussian
init, its target names matched wherever they occur, vision towers included), V2.0's task-wise batching,
and the data details (unused malformed negatives, palette images resized before RGB conversion)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from paper_models import family_of_config, split_counts, tiny_at
from PIL import Image

from vlm2vec.config_parse import load_config
from vlm2vec.errors import ConfigError
from vlm2vec.synthetic import MMEB_TRAIN_SHAPES, write_mmeb_train_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
V1_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "k_proj", "q_proj", "out_proj", "v_proj"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A synthetic MMEB-train copy: 2 rows of every real subset's shape (long texts in VisDial/WebQA)."""
    return write_mmeb_train_shapes(tmp_path_factory.mktemp("mmeb_shapes"), rows=2, image_size=48)


def _config(path: str, *extra: str):
    return load_config(["--config", path, *extra], validate=False)


# ------------------------------------------------------------------------------------------- max_len
def test_fit_length_counts_text_tokens_and_never_cuts_image_tokens():
    from vlm2vec.families._common import fit_length

    image = 99
    row = [1, image, image, image, 5, 6, 7, 8, image, 9]  # 7 text tokens, 4 image tokens
    assert fit_length(row, 7, {image}, 0) == row  # 11 tokens, but only 7 are text
    assert fit_length(row, 3, {image}, 0) == [1, image, image, image, 5, 6, image]  # first 3 text tokens
    assert fit_length(row, 1, {image}, 0) == [1, image, image, image, image]
    assert fit_length([1, 2, 3], 2, {image}, 0) == [1, 2]  # a text-only row: right truncation


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_tokenises_every_subset_at_its_image_settings(path, shapes):
    """Rows of all 20 MMEB-train subsets' shapes, both sides, prepared by a tiny model at the config's image
    settings and max_len: no row is refused, image tokens are all there, text keeps min(its length,
    max_len) tokens, and the long texts of the 256-token configs are cut to exactly 256."""
    from vlm2vec.data import load_train_data
    from vlm2vec.media import load_image

    config = _config(path)
    model = tiny_at(config)
    data = load_train_data(shapes, subsets=list(MMEB_TRAIN_SHAPES), image_root=shapes)
    full = tiny_at(config)
    full.max_len = 10**6
    cut_rows = 0
    for subset, rows in data.subsets.items():
        for ex in rows:
            for text, path_ in ((ex.query_text, ex.query_image), (ex.pos_text, ex.pos_image)):
                image = load_image(path_, shapes, subset) if path_ else None
                ids = model.prepare([text], [image])["input_ids"][0]
                n_image, n_text = split_counts(model, ids)
                whole_image, whole_text = split_counts(full, full.prepare([text], [image])["input_ids"][0])
                assert n_image == whole_image and (n_image > 0) == (image is not None), (subset, text[:40])
                assert n_text == min(whole_text, config.max_len), (subset, text[:40], n_text, whole_text)
                cut_rows += whole_text > config.max_len
    if config.max_len == 256:
        assert cut_rows >= 4, "VisDial / WebQA rows have more than 256 text tokens"


def _expected_image_tokens(config) -> int | None:
    family = family_of_config(config)
    if family == "qwen2_vl" and config.image_resolution == "high":
        return 1225  # 1344x1344 within 1280*28*28 pixels: 980x980 / 28^2 (bare pads, the reference layout)
    if family == "llava_next" and config.image_resolution == "high":
        return 2928  # 576 base + 48x48 anyres grid + 48 row ends (672x672 pinpoint)
    if family == "phi3_v":
        # 4 crops (2x2) + global: (4 + 1) * 144 + 1 + 3 * 12 = 757 image positions, + the BOS of the text
        # chunk after the image (the reference tokenises each chunk with its own BOS)
        return 757 + 1
    return None


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_image_tokens_per_image_at_each_config(path):
    from vlm2vec.build import image_tokens_per_image

    config = _config(path)
    expected = _expected_image_tokens(config)
    n = image_tokens_per_image(tiny_at(config))
    assert expected is None or n == expected, (n, expected)
    assert n + config.max_len <= 32768  # every shipped config fits the released context


def _run_main(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    code = "import sys\nfrom vlm2vec.train import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "kernels")]))
    return subprocess.run(
        [sys.executable, "-c", code, *args, "--output_dir", str(tmp_path / "run"), "--report_to", "none",
         "--disable_tqdm", "--max_steps", "900"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_a_config_whose_rows_cannot_fit_is_refused_at_startup(tmp_path, shapes):
    """One line, exit 2, before any step: a tiny Qwen2-VL (512 positions) at the paper's high resolution
    (1,225 tokens per image) cannot hold an image row; a chunk token budget below one image neither."""
    common = ["--model_name", "tiny:qwen2_vl", "--dataset_name", str(shapes), "--image_dir", str(shapes),
              "--subset_name", "ImageNet_1K", "--image_resolution", "high", "--min_pixels", "200704",
              "--max_pixels", "1003520", "--per_device_train_batch_size", "2"]  # fmt: skip
    proc = _run_main(common, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]  # (hub warnings aside)
    assert len(lines) == 1 and "1225 tokens" in lines[0] and "512 positions" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "run" / "train_log.jsonl")
    budget = ["--image_resolution", "low", "--max_len", "64", "--gc_max_visual_tokens", "200"]
    proc = _run_main([*common, *budget], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "256 tokens, more than --gc_max_visual_tokens 200" in lines[0], proc.stderr


# --------------------------------------------------------------------------------------- training
TRAIN_SCRIPT = """
import json, sys
from paper_models import family_of_config, tiny_at
from vlm2vec.config_parse import load_config
from vlm2vec.train import init_distributed, train
import torch.distributed as dist

data, out = sys.argv[1], sys.argv[2]
init_distributed()
results = {}
for path in sys.argv[3:]:
    name = path.rsplit("/", 1)[-1]
    extra = ["--interleave_batch_size", "2"] if "v2" in name else []
    shipped = load_config(["--config", path], validate=False)
    tiny_name = "tiny:" + family_of_config(shipped)
    config = load_config(["--config", path, "--model_name", tiny_name, "--dataset_name", data,
                          "--image_dir", data, "--train_batch_size", "4", "--gc_q_chunk_size", "2",
                          "--gc_p_chunk_size", "2", "--max_steps", "2", "--bf16", "false",
                          "--save_steps", "0", "--report_to", "none", "--disable_tqdm",
                          "--output_dir", f"{out}/{name}", *extra])
    result = train(config, model=tiny_at(shipped))
    model = result.engine.module
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    results[name] = dict(losses=list(result.losses.values()), trainable=trainable,
                         dora=bool(model.backbone.peft_config["default"].use_dora))
dist.destroy_process_group()
print("RESULTS " + json.dumps(results))
"""


def test_every_config_trains_two_steps_on_every_subset_shape(tmp_path, shapes):
    """configs/*.yaml, each at its image settings, max_len and LoRA settings (batch, steps and bf16
    scaled down for the CPU), train 2 GradCache steps on rows of all 20 subsets' shapes."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "kernels"), os.path.dirname(__file__)]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(shapes), str(tmp_path), *CONFIGS],
        cwd=REPO, capture_output=True, text=True, timeout=1500, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    assert sorted(results) == sorted(os.path.basename(c) for c in CONFIGS)
    for name, r in results.items():
        assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"])), (name, r["losses"])
        assert r["dora"], name
        in_tower = [n for n in r["trainable"] if "vision_tower" in n or "img_processor" in n]
        assert bool(in_tower) == (not name.startswith("qwen")), (name, in_tower[:3])


# ------------------------------------------------------------------------------------------- LoRA
def _adapted(model) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize("path", [c for c in CONFIGS if "v2" not in c], ids=os.path.basename)
def test_paper_lora_is_the_reference_peft_config(path):
    """The config's adapter equals what the reference builds (v1 src/model.py: LoraConfig(target_modules=
    its list, use_dora=True, init_lora_weights="gaussian")) on the same model: the same modules, vision
    tower included where names match; only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    from vlm2vec.build import build_model

    config = _config(path)
    ours = build_model(config, base=tiny_at(config))
    reference = get_peft_model(
        tiny_at(config).backbone,
        LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                   target_modules=V1_TARGETS, init_lora_weights="gaussian", use_dora=True),
    )  # fmt: skip
    peft_config = ours.backbone.peft_config["default"]
    assert peft_config.use_dora and peft_config.init_lora_weights == "gaussian"
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (8, 64, 0.1)
    assert _adapted(ours.backbone) == _adapted(reference) and _adapted(reference)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)
    tower = [n for n in _adapted(ours.backbone) if "vision_tower" in n or "img_processor" in n]
    family = family_of_config(config)
    assert bool(tower) == (family != "qwen2_vl")
    if family == "phi3_v":
        assert any(n.endswith("gate_up_proj") for n in _adapted(ours.backbone))


def test_v2_config_lora_targets_every_lm_linear():
    from vlm2vec.build import build_model

    config = _config(os.path.join(REPO, "configs", "qwen2_vl_2b_v2.yaml"))
    model = build_model(config, base=tiny_at(config))
    adapted = {n.rsplit(".", 1)[-1] for n in _adapted(model.backbone)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.backbone.peft_config["default"].r == 16 and model.backbone.peft_config["default"].use_dora


def test_explicit_targets_inside_a_frozen_tower_are_refused():
    from vlm2vec.build import build_model
    from vlm2vec.model import VLM2Vec

    config = load_config(["--model_name", "tiny:llava_next", "--lora_target_modules", "q_proj,out_proj"])
    with pytest.raises(ConfigError, match=r"out_proj,q_proj.*inside the vision tower.*--freeze_vision false"):
        build_model(config, base=VLM2Vec.tiny("llava_next"))
    # the family's default targets stay in the LM of a frozen tower; --freeze_vision false adapts the tower
    frozen = build_model(load_config(["--model_name", "tiny:llava_next"]), base=VLM2Vec.tiny("llava_next"))
    assert not any("vision_tower" in n for n in _adapted(frozen.backbone))
    open_tower = load_config(["--model_name", "tiny:llava_next", "--lora_target_modules", "q_proj,out_proj",
                              "--freeze_vision", "false"])  # fmt: skip
    model = build_model(open_tower, base=VLM2Vec.tiny("llava_next"))
    tower = [n for n in _adapted(model.backbone) if "vision_tower" in n]
    assert any(n.endswith("out_proj") for n in tower)
    assert not any(p.requires_grad for n, p in model.vision_tower.named_parameters() if "lora_" not in n)
    full = build_model(load_config(["--model_name", "tiny:llava_next", "--lora", "false", "--freeze_vision",
                                    "false"]), base=VLM2Vec.tiny("llava_next"))  # fmt: skip
    assert all(p.requires_grad for p in full.vision_tower.parameters())  # full fine-tuning trains the tower


# ------------------------------------------------------------------------------------------ options
def test_pooling_eos_is_last_and_yaml_choices_are_checked(tmp_path):
    assert load_config(["--pooling", "eos"]).pooling == "last"
    path = tmp_path / "c.yaml"
    path.write_text("pooling: eos\n")
    assert load_config(["--config", str(path)]).pooling == "last"
    path.write_text("pooling: cls\n")
    with pytest.raises(ConfigError, match="--pooling 'cls'"):
        load_config(["--config", str(path)])


def test_paper_configs_sample_up_to_100k_rows_per_subset():
    for path in CONFIGS:
        caps = _config(path).num_sample_per_subset
        if "v2" in path:  # V2.0's train_image.yaml: its own cap per subset
            assert caps["VisDial"] == 130000 and caps["HatefulMemes"] == 10000 and len(caps) == 20
        else:
            assert caps == 100000, path


def test_per_subset_caps_from_yaml_cap_the_rows(tmp_path, shapes):
    from vlm2vec.train_data import load_data

    path = tmp_path / "c.yaml"
    path.write_text("num_sample_per_subset: {ImageNet_1K: 1, WebQA: 2}\nsubset_name: [ImageNet_1K, WebQA]\n")
    config = load_config(["--config", str(path), "--dataset_name", str(shapes), "--image_dir", str(shapes)])
    assert load_data(config).sizes() == {"ImageNet_1K": 1, "WebQA": 2}
    path.write_text("num_sample_per_subset: {ImageNet_1K: 0}\n")
    with pytest.raises(ConfigError, match="num_sample_per_subset ImageNet_1K: must be >= 1"):
        load_config(["--config", str(path)])


def test_v2_config_gives_task_wise_batches(shapes):
    """V2.0 (interleave_batch_size 64, equal weights) on 8 processes x 128: each process's batch is two runs
    of 64 consecutive rows, each from one subset, and all processes share the subset of each run (one
    global run of 512 rows split 8 ways); subsets are drawn uniformly, not by size."""
    from vlm2vec.model import VLM2Vec
    from vlm2vec.train_data import load_data, make_batches

    v2 = os.path.join(REPO, "configs", "qwen2_vl_2b_v2.yaml")
    data_args = ["--dataset_name", str(shapes), "--image_dir", str(shapes)]
    config = load_config(["--config", v2, "--model_name", "tiny:qwen2_vl", *data_args])
    data = load_data(config)
    data.subsets["VisDial"] = data.subsets["VisDial"] * 50  # very unequal sizes: uniform draws ignore them
    model = VLM2Vec.tiny("qwen2_vl")
    ranks = [make_batches(config, data, model, rank, 8)[0] for rank in range(8)]
    for step in range(40):
        per_rank = [b.sampler.rows(step, b.rank, 8, b.spread) for b in ranks]
        for rows in per_rank:
            assert len(rows) == 128
            runs = [{s for s, _ in rows[:64]}, {s for s, _ in rows[64:]}]
            assert all(len(r) == 1 for r in runs)
        for half in (slice(0, 64), slice(64, 128)):
            assert len({s for rows in per_rank for s, _ in rows[half]}) == 1
    first = ranks[0][0]
    assert len(first) == 128 and len(set(first.subsets[:64])) == 1 and len(set(first.subsets[64:])) == 1
    runs = [ranks[0].sampler.rows(s, 0, 8, True)[0][0] for s in range(400)]
    share = runs.count("VisDial") / len(runs)
    assert share < 0.15, share  # 1/20 expected; by size VisDial would hold 100/138 of the rows


# --------------------------------------------------------------------------------------------- data
def test_malformed_unused_negatives_keep_the_row(tmp_path):
    from vlm2vec.data import DataError, load_train_data
    from vlm2vec.synthetic import write_rows

    base = dict(qry="a query", qry_image_path="", pos_text="a target", pos_image_path="")
    rows = [
        {**base, "neg_text": 5, "neg_image_path": ""},  # wrong type
        {**base, "neg_text": ["x", "y"], "neg_image_path": ["only one"]},  # mismatched lists
        base,  # no negative columns at all
    ]
    write_rows(tmp_path / "S.jsonl", rows)
    assert len(load_train_data(tmp_path).subsets["S"]) == 3  # num_negatives=0: as the reference, all train
    with pytest.raises(DataError, match="neg_text"):
        load_train_data(tmp_path, num_negatives=1)


def test_palette_images_are_resized_before_rgb_conversion(tmp_path):
    """The reference opens the file, resizes it in its own mode (a palette image: nearest neighbour, Pillow's
    rule) and converts to RGB in the processor; converting first and resizing bicubically gives other
    pixels."""
    from vlm2vec.families._common import images_of
    from vlm2vec.media import load_image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8))
    rgb.quantize(16).save(tmp_path / "p.png")
    image = load_image("p.png", tmp_path, "test")
    assert image.mode == "P"
    size = (1344, 1344)
    with Image.open(tmp_path / "p.png") as ref:
        reference = np.asarray(ref.resize(size).convert("RGB"))
    ours = np.asarray(images_of(image, 0, size)[0])
    assert np.array_equal(ours, reference)
    assert not np.array_equal(ours, np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC)))
    config = _config(os.path.join(REPO, "configs", "qwen2_vl_2b_high.yaml"))
    model = tiny_at(config)
    direct = model.prepare(["<|image_1|> x"], [Image.fromarray(reference)])["pixel_values"]
    torch.testing.assert_close(model.prepare(["<|image_1|> x"], [image])["pixel_values"], direct)


def test_transparent_palette_pixels_become_white_as_the_reference_processors_convert(tmp_path):
    """Qwen2-VL / LLaVA-NeXT: the reference's transformers processors (4.46 `convert_to_rgb`) composite
    transparency onto white after the resize; Phi-3.5-V's processor converts plainly."""
    from vlm2vec.families._common import images_of
    from vlm2vec.media import load_image

    rng = np.random.default_rng(1)
    paletted = Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).quantize(8)
    paletted.info["transparency"] = 0  # palette index 0 is transparent
    paletted.save(tmp_path / "t.png", transparency=0)
    image = load_image("t.png", tmp_path, "test")
    size = (1344, 1344)
    resized = image.resize(size).convert("RGBA")
    white = Image.alpha_composite(Image.new("RGBA", size, (255, 255, 255, 255)), resized).convert("RGB")
    ours = np.asarray(images_of(image, 0, size, on_white=True)[0])
    assert np.array_equal(ours, np.asarray(white))
    assert not np.array_equal(ours, np.asarray(image.resize(size).convert("RGB")))
    assert np.array_equal(np.asarray(images_of(image, 0)[0]), np.asarray(image.convert("RGB")))  # Phi
