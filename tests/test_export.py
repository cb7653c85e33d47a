"""python -m vlm2vec.export: tiny models with a LoRA (a few real optimizer steps of a contrastive loss),
exported and loaded back by sentence-transformers (run for real, offline), by the backbone's
transformers class and by `VLM2Vec.from_pretrained`; the files read as vLLM's pooling-config reader
reads them; the bad-input errors.

Qwen through sentence-transformers needs torchvision (transformers builds the Qwen processors with a
video processor, which needs it); this box has none (PyPI's wheels are CUDA builds that do not load
with the CPU torch), so there the Qwen families are checked one step down: the chat template renders
exactly `VLM2Vec.prepare`'s token ids, and the exported weights through `AutoModel` + the built-in
Pooling and Normalize modules give `VLM2Vec.encode`'s vectors. Where torchvision imports, the full
`SentenceTransformer(DIR)` path runs for them too; without it, VLM2VEC_TORCHVISION_PYTHON may name
another interpreter that has torchvision and sentence-transformers (.ci/run makes one: torch 2.14.1 +
torchvision 0.29.1): the export made here is loaded and encoded there, as a user's environment would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm2vec.model import VLM2Vec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
HF_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next"]
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TEXT = "Represent the given image."
try:
    import torchvision  # noqa: F401

    HAS_TORCHVISION = True
except Exception:  # noqa: BLE001 - a CUDA wheel on a CPU torch raises RuntimeError on import
    HAS_TORCHVISION = False
# an interpreter with torchvision + sentence-transformers for the Qwen families (see the docstring)
TORCHVISION_PYTHON = os.environ.get("VLM2VEC_TORCHVISION_PYTHON") or None


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), (200, 30, 40)), Image.new("RGB", (40, 72), (10, 130, 90))]


def _trained(family: str, **kwargs) -> VLM2Vec:
    """A tiny model with a LoRA trained 3 AdamW steps on an InfoNCE loss over text <-> image pairs (its
    adapter weights are non-zero and learned, not just initialised)."""
    torch.manual_seed(0)
    model = VLM2Vec.tiny(family, **kwargs).add_lora(r=4, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    imgs = _images()
    model.train()
    for _ in range(3):
        q = model(model.prepare(["a red box", "a green bar"]))
        p = model(model.prepare([TEXT, TEXT], imgs))
        loss = F.cross_entropy(q @ p.T / 0.05, torch.arange(2))
        loss.backward()
        opt.step()
        opt.zero_grad()
    lora_b = [p for n, p in model.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    return model.eval()


def _export(tmp_path, model: VLM2Vec, *args: str) -> tuple[str, str]:
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    model.save_pretrained(run)
    cmd = [sys.executable, "-m", "vlm2vec.export", "--model", run, "--out", out, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, out


def _rows() -> tuple[list, list[str], list]:
    """The same rows in sentence-transformers' input forms and VLM2Vec.encode's (texts, images)."""
    a, b = _images()
    st_inputs = [
        "a red box",
        a,
        {"image": b, "text": TEXT},
        {"image": a, "text": "<|image_1|> and a caption"},
    ]
    texts = ["a red box", "", TEXT, "<|image_1|> and a caption"]
    return st_inputs, texts, [None, a, b, a]


def _assert_same(got: torch.Tensor, want: torch.Tensor, tol: float = 0.9999) -> None:
    got = torch.as_tensor(got).float().cpu()
    assert got.shape == want.shape
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(got)), atol=1e-5)
    cos = (got * want).sum(-1)
    assert (cos >= tol).all(), cos


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_family_exports_and_embeds_like_vlm2vec(tmp_path, family):
    import transformers
    from transformers import AutoModel

    model = _trained(family)
    run, out = _export(tmp_path, model)
    files = set(os.listdir(out))
    assert {"modules.json", "sentence_bert_config.json", "config.json", "README.md", "vlm2vec.json"} <= files
    assert not any(f.startswith("adapter") for f in files) and not any(
        ".partial-" in f for f in os.listdir(tmp_path)
    )
    st_inputs, texts, images = _rows()
    adapter = VLM2Vec.from_pretrained(run, dtype=torch.float32)
    want = adapter.encode(texts, images, show_progress=False)

    # merged weights == adapter (fp32), round trip through VLM2Vec.from_pretrained
    merged = VLM2Vec.from_pretrained(out, dtype=torch.float32)
    assert not merged.is_peft and merged.settings == adapter.settings
    assert (merged.encode(texts, images, show_progress=False) - want).abs().max() <= 1e-5

    # the backbone's own class: no missing or unexpected keys
    cls = getattr(transformers, type(model.hf_model).__name__)
    _, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # the chat template renders VLM2Vec.prepare's token ids
    template = _template(out)
    tok = merged.processor.tokenizer
    for st_input, text, image in zip(st_inputs, texts, images):
        rendered = _render(template, st_input)
        ids = _expand(merged, rendered, image)
        assert ids == merged.prepare([text], [image])["input_ids"][0].tolist(), (family, rendered)

    if family in QWEN and not HAS_TORCHVISION and TORCHVISION_PYTHON is None:
        # one step down: AutoModel on the exported weights + the built-in Pooling / Normalize modules
        from sentence_transformers.models import Normalize, Pooling

        auto = AutoModel.from_pretrained(out).eval()
        pooling = Pooling(**_pooling_args(out))
        tok.padding_side = "right"  # as exported
        got = []
        for text, image in zip(texts, images):
            inputs = merged.prepare([text], [image])
            keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
            with torch.no_grad():
                hidden = auto(**{k: v for k, v in inputs.items() if k in keys}).last_hidden_state
            feats = {"token_embeddings": hidden, "attention_mask": inputs["attention_mask"]}
            got.append(Normalize()(pooling(feats))["sentence_embedding"][0])
        got = torch.stack(got)
        if merged.settings.prompt_layout == "native":
            _assert_same(got, want)
        else:  # reference layout: text rows exact; image rows differ by transformers' M-RoPE positions
            _assert_same(got[:1], want[:1])
            _assert_same(got, _transformers_positions(merged, texts, images))
        return

    other = TORCHVISION_PYTHON if family in QWEN and not HAS_TORCHVISION else None
    encoded = _st_encode(tmp_path, out, st_inputs, (None, "Find: "), other)
    for prompt, got in encoded.items():
        rows = [(prompt or "") + t for t in texts]
        want = adapter.encode(rows, images, show_progress=False)
        if family in QWEN and merged.settings.prompt_layout == "reference":
            # text rows exact; image rows as transformers positions them (M-RoPE), not as trained
            _assert_same(got[:1], want[:1])
            _assert_same(got, _transformers_positions(merged, rows, images))
        else:
            _assert_same(got, want)


# sentence-transformers in another interpreter: rows as JSON (images as PNG paths), vectors back as .pt
_ST_SCRIPT = """
import json, sys, torch
from PIL import Image
from sentence_transformers import SentenceTransformer
out, rows_json, dest = sys.argv[1:4]
def load(x):
    if isinstance(x, dict) and "png" in x:
        return Image.open(x["png"]).convert("RGB")
    if isinstance(x, dict):
        return {k: load(v) for k, v in x.items()}
    return x
spec = json.load(open(rows_json))
rows = [load(r) for r in spec["rows"]]
st = SentenceTransformer(out, device="cpu", local_files_only=True)
got = {str(p): st.encode(rows, prompt=p, convert_to_tensor=True).float().cpu() for p in spec["prompts"]}
torch.save(got, dest)
"""


def _st_encode(tmp_path, out: str, rows: list, prompts: tuple, python: str | None) -> dict:
    """{prompt: SentenceTransformer(out).encode(rows, prompt=prompt)}, here or in `python`."""
    if python is None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(out, device="cpu", local_files_only=True)
        return {p: st.encode(rows, prompt=p, convert_to_tensor=True) for p in prompts}
    pngs: dict[int, str] = {}

    def dump(x):
        if isinstance(x, Image.Image):
            if id(x) not in pngs:
                pngs[id(x)] = str(tmp_path / f"row{len(pngs)}.png")
                x.save(pngs[id(x)])
            return {"png": pngs[id(x)]}
        return {k: dump(v) for k, v in x.items()} if isinstance(x, dict) else x

    spec, dest = tmp_path / "rows.json", tmp_path / "st.pt"
    spec.write_text(json.dumps({"rows": [dump(r) for r in rows], "prompts": list(prompts)}))
    proc = subprocess.run(
        [python, "-c", _ST_SCRIPT, out, str(spec), str(dest)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(dest)
    return {p: got[str(p)] for p in prompts}


def _transformers_positions(model: VLM2Vec, texts: list[str], images: list) -> torch.Tensor:
    """VLM2Vec's rows run with the positions transformers computes itself (M-RoPE for image runs)."""
    out = []
    for text, image in zip(texts, images):
        inputs = model.prepare([text], [image])
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        with torch.no_grad():
            hidden = model.hf_model.model(**{k: v for k, v in inputs.items() if k in keys}).last_hidden_state
        out.append(F.normalize(hidden[0, -1].float(), dim=-1))
    return torch.stack(out)


def test_reference_layout_image_rows_measured(tmp_path):
    """Qwen2-VL's default (reference) layout: record how far transformers' own positions move an image
    row (the number docs/export.md reports); text rows are identical."""
    model = _trained("qwen2_vl")
    st_inputs, texts, images = _rows()
    want = model.encode(texts, images, show_progress=False)
    got = _transformers_positions(model, texts, images)
    cos = (got * want).sum(-1)
    assert cos[0] >= 0.99999
    print(f"qwen2_vl reference layout, cosine per row (text, image, image+text, image+text): {cos.tolist()}")


def _template(out: str) -> str:
    path = os.path.join(out, "chat_template.jinja")
    if os.path.isfile(path):
        return open(path, encoding="utf-8").read()
    return json.load(open(os.path.join(out, "processor_config.json"), encoding="utf-8"))["chat_template"]


def _render(template: str, st_input) -> str:
    """sentence-transformers' message form of an input (dict keys in order, structured content)."""
    from vlm2vec.export_template import render

    if isinstance(st_input, str):
        content = [{"type": "text", "text": st_input}]
    elif isinstance(st_input, dict):
        content = [{"type": k, k: v} for k, v in st_input.items()]
    else:
        content = [{"type": "image", "image": st_input}]
    return render(template, [{"role": "user", "content": content}])


def _expand(model: VLM2Vec, rendered: str, image) -> list[int]:
    """Token ids of a rendered row after the processor's image-token expansion (the rule the
    transformers processors apply: each image token becomes its feature count)."""
    tok = model.processor.tokenizer
    if image is not None:
        ref = model.prepare(["<|image_1|>"], [image])["input_ids"][0].tolist()
        if model.family.name in QWEN:
            pad = tok.convert_tokens_to_ids("<|image_pad|>")
            n = ref.count(pad)
            rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * n)
        else:
            n = ref.count(tok.convert_tokens_to_ids("<image>"))
            rendered = rendered.replace("<image>", "<image>" * n)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def _pooling_args(out: str) -> dict:
    config = json.load(open(os.path.join(out, "1_Pooling", "config.json"), encoding="utf-8"))
    mode = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode") and v]
    names = {"lasttoken": "lasttoken", "mean_tokens": "mean"}
    return {"embedding_dimension": config["word_embedding_dimension"], "pooling_mode": names[mode[0]]}


def test_qwen3_native_layout_via_prepare_tokens(tmp_path):
    """The chat template of the native layout (Qwen3-VL default) wraps images in vision start/end."""
    model = _trained("qwen3_vl")
    _, out = _export(tmp_path, model)
    rendered = _render(_template(out), {"image": _images()[0], "text": TEXT})
    assert rendered == f"<|vision_start|><|image_pad|><|vision_end|> {TEXT}"


def test_vllm_pooling_config_reader(tmp_path):
    """The exported files read as vLLM's `get_pooling_config` (vllm/transformers_utils/config.py) reads
    them: modules.json types matched literally, `pooling_mode_*` booleans -> MEAN/CLS/LAST, Normalize ->
    use_activation; `matryoshka_dimensions` in config.json."""
    model = _trained("llava_next")
    model.save_pretrained(str(tmp_path / "run"))
    meta_path = tmp_path / "run" / "vlm2vec.json"
    meta = json.loads(meta_path.read_text())
    meta["matryoshka_dims"] = [16, 32]
    meta_path.write_text(json.dumps(meta))
    from vlm2vec.export import export

    out = export(str(tmp_path / "run"), str(tmp_path / "export"))
    assert _vllm_pooling_config(out) == {"use_activation": True, "seq_pooling_type": "LAST"}
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["matryoshka_dimensions"] == [64, 32, 16]
    assert config["vlm2vec"]["pooling"] == "last"


def _vllm_pooling_config(model: str) -> dict | None:
    """vLLM's reader, restated on local files."""
    path = os.path.join(model, "modules.json")
    if not os.path.isfile(path):
        return None
    modules = json.load(open(path, encoding="utf-8"))
    pooling = next((m for m in modules if m["type"] == "sentence_transformers.models.Pooling"), None)
    normalize = bool(
        next((m for m in modules if m["type"] == "sentence_transformers.models.Normalize"), False)
    )
    if not pooling:
        return None
    pooling_dict = json.load(open(os.path.join(model, pooling["path"], "config.json"), encoding="utf-8"))
    config: dict = {"use_activation": normalize}
    for key, val in pooling_dict.items():
        if val is True:
            name = key.replace("pooling_mode_", "") if "pooling_mode_" in key else key
            name = name.split("_", 1)[0] if "_" in name else name
            name = "last" if "lasttoken" in name else name
            if name.upper() in ("MEAN", "CLS", "LAST"):
                config["seq_pooling_type"] = name.upper()
    return config


@pytest.mark.parametrize("family", ["effnet_minilm", "phi3_v"])
def test_custom_module_families_export(tmp_path, family):
    """The demo (EfficientNet + MiniLM) and Phi-3.5-V: no built-in module expresses them; their export
    ships vlm2vec/export_module.py and loads with trust_remote_code=True (it needs vlm2vec installed)."""
    from sentence_transformers import SentenceTransformer

    import vlm2vec.demo.family  # noqa: F401 - registers effnet_minilm

    model = _trained(family, **({"pooling": "mean"} if family == "effnet_minilm" else {}))
    run, out = _export(tmp_path, model)
    assert "vlm2vec_st.py" in os.listdir(out)
    st_inputs, texts, images = _rows()
    want = VLM2Vec.from_pretrained(run, dtype=torch.float32).encode(texts, images, show_progress=False)
    with pytest.raises(ValueError):
        SentenceTransformer(out, device="cpu", local_files_only=True)  # remote code is opt-in
    st = SentenceTransformer(out, device="cpu", local_files_only=True, trust_remote_code=True)
    _assert_same(st.encode(st_inputs, convert_to_tensor=True), want)


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the weights are written (here: the model card) removes the partial directory."""
    import vlm2vec.model_card
    from vlm2vec.export import export

    VLM2Vec.tiny("llava_next").save_pretrained(str(tmp_path / "run"))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vlm2vec.model_card, "model_card", boom)
    with pytest.raises(KeyboardInterrupt):
        export(str(tmp_path / "run"), str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path)) == ["run"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlm2vec.export", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_help_and_bad_input(tmp_path):
    assert _cli("--help").returncode == 0
    (tmp_path / "empty").mkdir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "vlm2vec.json").write_text(json.dumps({"family": "qwen2_vl", "base": str(tmp_path / "nowhere"),
                                                  "settings": {}}))  # fmt: skip
    (run / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "nowhere")})
    )
    qlora = tmp_path / "qlora"
    qlora.mkdir()
    (qlora / "vlm2vec.json").write_text(json.dumps({"family": "qwen2_vl", "settings": {}}))
    (qlora / "train_config.json").write_text(json.dumps({"options": {"quantization": "nf4"}}))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "vlm2vec.json").write_text(json.dumps({"family": "no_such_family", "settings": {}}))
    cases = [
        (
            ["--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")],
            "neither a run nor a checkpoint",
        ),
        (["--model", str(qlora), "--out", str(tmp_path / "o3")], "QLoRA"),
        (["--model", str(unknown), "--out", str(tmp_path / "o4")], "cannot be loaded"),
        (["--model", str(run), "--out", str(busy)], "not empty"),
        (["--model", str(run), "--out", str(tmp_path / "o2")], "not available offline"),
    ]
    for args, words in cases:
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / "o2").exists() and not any(".partial-" in p for p in os.listdir(tmp_path))


def test_trainer_export_dir_replaces_a_previous_export_only(tmp_path):
    """`--export_dir` (export_after_training): a previous export is replaced, other content refused with
    a ConfigError (the trainer's one-line exit 2); --dtype bf16 writes bf16 weights."""
    from safetensors import safe_open

    from vlm2vec.errors import ConfigError
    from vlm2vec.export import export, export_after_training

    run = str(tmp_path / "run")
    VLM2Vec.tiny("llava_next").save_pretrained(run)
    out = tmp_path / "export"
    export(run, str(out), dtype="bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert export_after_training(run, str(out)) == f"exported to {out}"
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--export_dir: --out .* not empty"):
        export_after_training(run, str(other))
    assert (other / "keep.txt").read_text() == "mine"
