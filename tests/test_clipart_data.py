"""OpenClipArt data builder: metadata parsing, the documented text-cleaning rules, the family split.

The rule tests use hand-written SVG metadata; the build tests read the Debian packages
`openclipart-png` + `openclipart-svg` (installed by .ci/run and README's apt line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlm2vec.demo import clipart_data as C

SVG = """<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg"><metadata><rdf:RDF><cc:Work rdf:about="">
  <dc:title>{title}</dc:title>
  <dc:description>{description}</dc:description>
  <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
  <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org">
    <dc:title>public domain</dc:title></cc:Agent></dc:publisher>
  <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
</cc:Work></rdf:RDF></metadata></svg>"""


def _drawing(
    tmp_path: Path, source: str, title: str, creator: str = "Nicu Buculei", keywords=()
) -> C.Drawing:
    path = tmp_path / f"{source.replace('/', '_')}.svg"
    kw = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    path.write_text(SVG.format(title=title, description="a drawing", keywords=kw, creator=creator))
    return C.parse_svg_metadata(path, source)


def test_metadata_from_the_work_element_not_nested_agents(tmp_path):
    d = _drawing(tmp_path, "animals/birds/new_penguin_charles_mcco_01", "New &amp; Penguin", "Charles McColm",
                 ["", "bird", "hash(0x8a3cd28)"])  # fmt: skip
    assert (d.title, d.creator, d.description) == ("New & Penguin", "Charles McColm", "a drawing")
    assert (
        d.keywords == ("bird", "hash(0x8a3cd28)") and d.category == "animals" and d.folder == "animals/birds"
    )
    untitled = _drawing(tmp_path, "food/pear", "")
    assert untitled.title == ""  # the publisher's "public domain" is not the drawing's title


@pytest.mark.parametrize(
    "source, creator, expected",
    [
        ("animals/birds/new_penguin_charles_mcco_01", "Charles McColm", "new penguin"),
        ("animals/bugs/farfalla_contorno_archit_01", "Architetto Francesco Rollandin", "farfalla contorno"),
        ("people/people_juliane_krug_03c", "Juliane Krug", "people"),
        ("electronics/bulb/light_bulb_karl_bartel_01", "Karl Bartel", "light bulb"),
        ("signs_and_symbols/map_symbols/aiga_toilets1", "Jean-Victor Balin", "toilets"),
        ("geography/astronomy/08_waningcrescent_openc_01", "c...", "waningcrescent"),
        ("signs_and_symbols/BandeMarquageSecurite", "someone", "Bande Marquage Securite"),
        ("recreation/party/baloon2_02", "Nicu Buculei", "baloon"),
    ],
)
def test_clean_file_name(source, creator, expected):
    assert C.clean_file_name(source, creator) == expected


def test_boilerplate_titles_become_file_name_plus_keywords(tmp_path):
    ds = [
        _drawing(tmp_path, f"transportation/roadsigns/{name}", "SVG Road Signs", "John Cliff",
                 ["roadsign", "transportation", "symbol"])
        for name in ("turn_left", "keep_left", "no_entry", "stop", "give_way")
    ]  # fmt: skip
    ds.append(
        _drawing(
            tmp_path,
            "recreation/party/hat_02",
            "Clipart by Nicu Buculei - baloon1_04",
            keywords=["party", "hat"],
        )
    )
    ds.append(_drawing(tmp_path, "tools/mag2", "magnifying glass 2", "Jarno Vasamaa", ["tools"]))
    ds.append(
        _drawing(tmp_path, "animals/rana02_architetto_france_01", "Rana02", "Architetto Francesco Rollandin")
    )
    ds.append(_drawing(tmp_path, "animals/mammals/bluewhale-md", "", "", ["mammal", "animal", "0xa115960"]))
    collections = C.collection_titles(ds)
    assert collections == {"SVG Road Signs"}  # 5 different file names under one title
    texts = [C.drawing_text(d, collections) for d in ds]
    assert texts[0] == "turn left, roadsign, transportation"  # generic "symbol" left out, MAX_KEYWORDS = 2
    assert texts[5] == "hat, party"  # credit line replaced; "hat" is already a word of the name
    assert texts[6] == "magnifying glass"  # a real title keeps its words, minus the variant number
    assert texts[7] == "Rana"
    assert texts[8] == "bluewhale, mammal, animal"  # empty title; "md" and the hex keyword dropped


def test_family_split_keeps_near_duplicates_together(tmp_path):
    ds, texts = [], []
    for i in range(60):  # 30 one-off drawings + a card set + numbered variants + a deep folder of flags
        if i < 30:
            ds.append(
                _drawing(tmp_path, f"food/thing{i}x_{i:02d}", f"Thing {chr(65 + i % 26)}{chr(65 + i // 26)}")
            )
        elif i < 40:
            ds.append(_drawing(tmp_path, f"recreation/games/cards/simple/simple_h_{i}", "card"))
        elif i < 50:
            ds.append(_drawing(tmp_path, f"tools/hammer_{i}", f"hammer {i}"))
        else:
            ds.append(_drawing(tmp_path, f"signs_and_symbols/flags/asia/c{i}", f"Country {chr(65 + i)}"))
    collections = C.collection_titles(ds)
    texts = [C.drawing_text(d, collections) for d in ds]
    family = C.families(ds, texts, collections)
    assert len({family[i] for i in range(30, 40)}) == 1  # one card set (shared boilerplate title, folder)
    assert len({family[i] for i in range(40, 50)}) == 1  # "hammer 41".."hammer 49": numbered variants
    assert len({family[i] for i in range(50, 60)}) == 1  # flags of one continent: a deep folder
    assert len({family[i] for i in range(30)}) == 30
    for seed in range(4):
        split = C.split_by_family(texts, family, n_eval=12, seed=seed)
        assert split == C.split_by_family(texts, family, n_eval=12, seed=seed)  # deterministic
        for f in set(family):
            assert len({split[i] for i in range(len(ds)) if family[i] == f}) == 1
        held = {texts[i].lower() for i in range(len(ds)) if split[i] == "eval"}
        trained = {texts[i].lower() for i in range(len(ds)) if split[i] == "train"}
        assert len(held) == 12 and not held & trained
    with pytest.raises(ValueError, match="distinct texts could be held out"):
        C.split_by_family(texts, family, n_eval=100)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    if not Path(C.PNG_ROOT).is_dir() or not Path(C.SVG_ROOT).is_dir():
        pytest.fail("install the Debian packages openclipart-png and openclipart-svg (README's apt line)")
    out = tmp_path_factory.mktemp("clipart")
    return C.build_clipart_dataset(out, n_eval=25, limit=250, show_progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_writes_mmeb_layout_with_disjoint_split(small_build):
    out = small_build
    items = _jsonl(out / "items.jsonl")
    assert len(items) == 250 and all(not it["source"].startswith(("computer/", "shapes/")) for it in items)
    held = {it["text"].lower() for it in items if it["split"] == "eval"}
    trained = {it["text"].lower() for it in items if it["split"] == "train"}
    assert len(held) == 25 and not held & trained
    fam_split = {}
    for it in items:
        assert fam_split.setdefault(it["family"], it["split"]) == it["split"]
    i2t = _jsonl(out / "eval" / "ClipArtI2T.jsonl")
    t2i = _jsonl(out / "eval" / "ClipArtT2I.jsonl")
    assert len(i2t) == sum(it["split"] == "eval" for it in items) and len(t2i) == 25
    by_image = {it["image"].split("/", 1)[1]: it["text"] for it in items if it["split"] == "eval"}
    for row in i2t:
        assert len(row["tgt_text"]) == 25 and len({t.lower() for t in row["tgt_text"]}) == 25  # no duplicates
        assert row["tgt_text"][0].lower() == by_image[row["qry_img_path"]].lower()  # ground truth first
    for row in t2i:
        assert (
            len(set(row["tgt_img_path"])) == 25
            and by_image[row["tgt_img_path"][0]].lower() in row["qry_text"].lower()
        )
    train = _jsonl(out / "train" / "ClipArtI2T.jsonl")
    assert len(train) == sum(it["split"] == "train" for it in items)
    with Image.open(out / "train" / train[0]["qry_image_path"]) as im:
        assert im.size == (C.IMAGE_SIZE, C.IMAGE_SIZE) and im.mode == "RGB"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_eval_texts"] == 25 and set(manifest["eval_sets"]) == set(C.EVAL_SETS)
    # a second call with the same settings reuses the build
    stamp = (out / "items.jsonl").stat().st_mtime_ns
    C.build_clipart_dataset(out, n_eval=25, limit=250, show_progress=False)
    assert (out / "items.jsonl").stat().st_mtime_ns == stamp


def test_missing_packages_say_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="openclipart-png"):
        C.find_drawings(tmp_path / "nope", tmp_path)
