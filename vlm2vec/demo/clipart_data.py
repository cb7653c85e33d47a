"""MMEB-format image-text data from OpenClipArt, built from files Debian installs (no download).

Sources: `openclipart-png` (the renders) and `openclipart-svg` (each drawing's metadata); the two hold
the same 8,121 drawings under the same relative paths, in 22 top-level category folders. `computer/`
(mostly parts of icon themes) and `shapes/` (geometric primitives) are left out, and so are the 17
renders of over MAX_PIXELS: 4,301 drawings stay.

What a drawing's text is (every rule below is applied in `drawing_text`, in this order):

1. Metadata come from the SVG's `cc:Work` element: `dc:title`, `dc:description`, the keywords
   (`rdf:li` under `dc:subject`) and the creator; titles of nested agents (publisher, rights) are not
   the drawing's title.
2. A title is *boilerplate* when it says nothing about this drawing:
   - empty, or a collection/credit line: "Clipart by <author> - <file>", "Part of the Flat Icon
     Collection ...", anything naming a "collection", "clipart(s)" or a "submission"/"sibmission";
   - or a *collection name*: a title whose drawings have >= COLLECTION_MIN different cleaned file
     names (e.g. "AIGA_Symbol_Signs", "card", "SVG Road Signs", "Australian Maps", "people").
3. A boilerplate title is replaced by the drawing's *cleaned file name*: the file stem without its
   variant counter (`_01`, `_03c`, `-2`), without the creator's name that the packagers appended
   (any trailing run of `_`-separated words that spells the start of the creator's name, as in
   `new_penguin_charles_mcco_01` by Charles McColm -> "new penguin"), camelCase split into words,
   without bare numbers and the words "openclipart" (or its truncation),
   "aiga", "md", "svg", with `_`/`-` as spaces. If that leaves nothing, the deepest folder name.
   Then up to MAX_KEYWORDS of the drawing's keywords are appended ("turn left, roadsign"), leaving out
   keywords that are not plain words (`hash(0x8a3cd28)`, `0xa115960`), the creator's name, generic
   ones ("symbol", "icon", "mapsym", "clip art", ...) or words already in the text.
4. Any text: `_` as spaces, a trailing variant number dropped ("magnifying glass 2" -> "magnifying
   glass", "Rana02" -> "Rana"), white space collapsed.

Drawings whose texts are equal (case-insensitive) are one target with several positives: in the
held-out tasks a text is one candidate (image->text) and one image stands for it (text->image), so a
second drawing of the same text is never a false negative.

The held-out split is *by family*, so that near-duplicates never straddle it: drawings are joined
(union-find) when their texts are equal after dropping digits, when they share a boilerplate title in
the same folder (one card set, one series of road signs or AIGA signs), or when they sit in the same
folder three or more levels deep (the flags of one continent, one deck of cards). Families, in a seeded
order, go to the held-out side until it has `n_eval` distinct texts; a family larger than
MAX_EVAL_FAMILY texts always trains. Layout written under `out_dir` (paths relative to each folder):

    eval/ClipArtI2T.jsonl       image -> text over every held-out text
    eval/ClipArtT2I.jsonl       text -> image over one image per held-out text
    eval/ClipArtCategory.jsonl  image -> top-level category (the categories with >= 20 drawings)
    eval/datasets.json, eval/images/NNNNN.png
    train/ClipArtI2T.jsonl, train/ClipArtT2I.jsonl, train/images/NNNNN.png  (one row per drawing)
    items.jsonl                 every drawing: index, source, category, title, text, family, split
    manifest.json               settings and counts (written last: marks a complete build)
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlm2vec.demo.emoji_data import rotate_first, write_jsonl

PNG_ROOT = "/usr/share/openclipart/png"
SVG_ROOT = "/usr/share/openclipart/svg"
SKIPPED_CATEGORIES = ("computer", "shapes")
IMAGE_SIZE = 224  # renders are fitted into a white square of this side (the demo tower's input size)
IMAGE_PLACEHOLDER = "<|image_1|>"
N_EVAL = 800
SPLIT_SEED = 0
COLLECTION_MIN = 5
MAX_KEYWORDS = 2
MAX_EVAL_FAMILY = 40
MIN_CATEGORY_SIZE = 20
MAX_PIXELS = 40_000_000  # 17 renders are 105-623 Mpx (up to 2.5 GB decoded): left out
NO_CATEGORY = ("unsorted", "special")  # grab-bag folders: no class label to learn

I2T_QUERY = f"{IMAGE_PLACEHOLDER} Find the title of this clip art."
T2I_QUERY = "Find the clip art titled: {text}"
CATEGORY_QUERY = f"{IMAGE_PLACEHOLDER} Classify this clip art into its category."
IMAGE_TARGET = f"{IMAGE_PLACEHOLDER} Represent the given image."

EVAL_SETS = {
    "ClipArtI2T": {"meta_task": "Retrieval", "ood": False},
    "ClipArtT2I": {"meta_task": "Retrieval", "ood": False},
    "ClipArtCategory": {"meta_task": "Classification", "ood": True},
}
TRAIN_SETS = ("ClipArtI2T", "ClipArtT2I")

_BOILERPLATE = re.compile(r"^clipart by |flat icon collection|collection|\bcliparts?\b|s[iu]bmission", re.I)
_COUNTER = re.compile(r"([_\- ]?\d+[a-z]?)+$", re.I)
_TRAILING_NUMBER = re.compile(r"(?<=[A-Za-z])[\s_\-]*\d+$")
_DROPPED_WORDS = {"openclipart", "aiga", "md", "svg", "png"}
_GENERIC_KEYWORDS = {
    "symbol", "icon", "icons", "mapsym", "clip art", "clipart", "image", "media", "sign",
    "signs_and_symbols", "unsorted", "special", "public domain", "svg", "png", "other",
}  # fmt: skip


@dataclass(frozen=True)
class Drawing:
    source: str  # path below the PNG/SVG roots, without extension
    title: str
    description: str
    keywords: tuple[str, ...]
    creator: str

    @property
    def category(self) -> str:
        return self.source.split("/", 1)[0]

    @property
    def folder(self) -> str:
        return self.source.rsplit("/", 1)[0] if "/" in self.source else ""


def _xml_text(s: str) -> str:
    s = re.sub(r"<!\[CDATA\[(.*?)\]\]>", r"\1", s, flags=re.S)
    s = re.sub(r"<[^>]+>", "", s)
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
        s = s.replace(entity, char)
    return " ".join(s.split())


def parse_svg_metadata(svg_path: str | os.PathLike, source: str) -> Drawing:
    """The drawing's own metadata from its `cc:Work` element (regular expressions: several files of
    the package are not well-formed XML, and only the metadata block is needed)."""
    head = Path(svg_path).read_text(encoding="utf-8", errors="replace")[:200_000]
    work = re.search(r"<cc:Work\b[^>]*>(.*?)</cc:Work>", head, re.S)
    block = work.group(1) if work else ""
    creator_m = re.search(r"<dc:creator>(.*?)</dc:creator>", block, re.S)
    creator = _xml_text(creator_m.group(1)) if creator_m else ""
    own = re.sub(r"<cc:Agent\b.*?</cc:Agent>", "", block, flags=re.S)  # publisher/rights/creator titles
    title_m = re.search(r"<dc:title>(.*?)</dc:title>", own, re.S)
    desc_m = re.search(r"<dc:description>(.*?)</dc:description>", own, re.S)
    subject = re.search(r"<dc:subject>(.*?)</dc:subject>", own, re.S)
    keywords = re.findall(r"<rdf:li>(.*?)</rdf:li>", subject.group(1), re.S) if subject else []
    return Drawing(
        source=source,
        title=_xml_text(title_m.group(1)) if title_m else "",
        description=_xml_text(desc_m.group(1)) if desc_m else "",
        keywords=tuple(k for k in (_xml_text(k) for k in keywords) if k),
        creator=creator,
    )


def _words(s: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-.,]+", s.lower()) if w]


def _filler(word: str) -> bool:
    w = word.lower()
    return w in _DROPPED_WORDS or w.isdigit() or (len(w) >= 4 and "openclipart".startswith(w))


def clean_file_name(source: str, creator: str) -> str:
    """Rule 3's file name: stem without counter, creator suffix and filler words, spaces for `_`/`-`."""
    stem = source.rsplit("/", 1)[-1]
    stem = _COUNTER.sub("", stem).strip("_- ")
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", stem)  # camelCase words apart
    words = [w for w in re.split(r"[_\-\s]+", stem) if w]
    author = "_".join(_words(creator))
    if author:  # the longest trailing run of words that spells the start of the creator's name
        for cut in range(1, len(words)):
            tail = "_".join(words[cut:]).lower()
            if len(tail) >= 2 and author.startswith(tail):
                words = words[:cut]
                break
    words = [w for w in words if not _filler(w)]
    return " ".join(words)


def _tidy(text: str) -> str:
    """Rule 4: `_` as spaces, trailing variant number dropped, white space collapsed."""
    text = " ".join(text.replace("_", " ").split())
    return " ".join(_TRAILING_NUMBER.sub("", text).split())


def collection_titles(drawings: list[Drawing]) -> set[str]:
    """Rule 2's collection names: titles whose drawings have >= COLLECTION_MIN different file names."""
    names = defaultdict(set)
    for d in drawings:
        names[d.title].add(clean_file_name(d.source, d.creator).lower())
    return {t for t, files in names.items() if len(files) >= COLLECTION_MIN}


def is_boilerplate(title: str, collections: set[str]) -> bool:
    return not title.strip() or bool(_BOILERPLATE.search(title)) or title in collections


def drawing_text(d: Drawing, collections: set[str]) -> str:
    """The drawing's text by rules 2-4 of the module docstring."""
    if not is_boilerplate(d.title, collections):
        return _tidy(d.title) or _tidy(clean_file_name(d.source, d.creator))
    name = _tidy(clean_file_name(d.source, d.creator)) or _tidy(d.folder.rsplit("/", 1)[-1])
    present = set(_words(name))
    creator = " ".join(_words(d.creator))
    extra: list[str] = []
    for kw in d.keywords:
        k = " ".join(kw.replace("_", " ").split()).lower()
        if not re.fullmatch(r"[a-z][a-z '&]*", k) or k in _GENERIC_KEYWORDS or k == creator or len(k) > 30:
            continue
        if set(_words(k)) <= present or k in extra:
            continue
        extra.append(k)
        present |= set(_words(k))
        if len(extra) == MAX_KEYWORDS:
            break
    return ", ".join([name, *extra]) if extra else name


def _pixels(png: Path) -> int:
    """Width x height from the PNG header (Pillow refuses to open the largest renders at all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(png) as im:
                return im.width * im.height
        except Image.DecompressionBombError:
            return 2**62


def find_drawings(
    png_root: str | os.PathLike = PNG_ROOT, svg_root: str | os.PathLike = SVG_ROOT
) -> list[Drawing]:
    """Every drawing with both a PNG and an SVG, outside SKIPPED_CATEGORIES and at most MAX_PIXELS
    large, sorted by path."""
    png_root, svg_root = Path(png_root), Path(svg_root)
    for root, package in ((png_root, "openclipart-png"), (svg_root, "openclipart-svg")):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found: install the Debian package `{package}`")
    drawings = []
    for png in sorted(png_root.rglob("*.png")):
        source = png.relative_to(png_root).with_suffix("").as_posix()
        svg = svg_root / f"{source}.svg"
        if source.split("/", 1)[0] in SKIPPED_CATEGORIES or not svg.is_file():
            continue
        if _pixels(png) > MAX_PIXELS:
            continue
        drawings.append(parse_svg_metadata(svg, source))
    return drawings


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def families(drawings: list[Drawing], texts: list[str], collections: set[str]) -> list[int]:
    """A family id per drawing (the smallest member index): near-duplicates share one."""
    uf = _UnionFind(len(drawings))
    first: dict[tuple, int] = {}

    def link(key: tuple, i: int) -> None:
        j = first.setdefault(key, i)
        if j != i:
            uf.join(i, j)

    for i, (d, text) in enumerate(zip(drawings, texts)):
        link(("text", re.sub(r"[\d\s]+", " ", text.lower()).strip()), i)
        if is_boilerplate(d.title, collections) and d.title.strip():
            link(("series", d.folder, d.title), i)
        if d.folder.count("/") >= 2:
            link(("folder", d.folder), i)
    return [uf.find(i) for i in range(len(drawings))]


def split_by_family(
    texts: list[str], family: list[int], n_eval: int = N_EVAL, seed: int = SPLIT_SEED
) -> list[str]:
    """'train' or 'eval' per drawing: whole families, in a seeded order, until n_eval distinct texts."""
    members = defaultdict(list)
    for i, f in enumerate(family):
        members[f].append(i)
    fams = sorted(members)
    order = np.random.default_rng(seed).permutation(len(fams))
    split = ["train"] * len(texts)
    held: set[str] = set()
    for k in order:
        if len(held) >= n_eval:
            break
        fam_texts = {texts[i].lower() for i in members[fams[k]]}
        if len(fam_texts) > MAX_EVAL_FAMILY or len(held | fam_texts) > n_eval:
            continue
        held |= fam_texts
        for i in members[fams[k]]:
            split[i] = "eval"
    if len(held) < n_eval:
        raise ValueError(f"only {len(held)} distinct texts could be held out (asked for {n_eval})")
    return split


def render(png_path: Path, size: int = IMAGE_SIZE) -> Image.Image:
    """The render on white (transparency composited), fitted into a size x size square."""
    with Image.open(png_path) as im:
        im.thumbnail((4 * size, 4 * size), Image.Resampling.BOX)  # cheap first cut of large renders
        im = im.convert("RGBA")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (size, size), "white")
        canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2), im)
    return canvas


def eval_rows(texts: list[str], images: list[str], categories: list[str]) -> dict[str, list[dict]]:
    """The held-out tasks: one query per drawing (image->text, category) or per distinct text."""
    distinct = list(dict.fromkeys(t.lower() for t in texts))
    position = {key: k for k, key in enumerate(distinct)}
    shown = {}  # lower-cased text -> (the text as first seen, its first drawing's image)
    for t, img in zip(texts, images):
        shown.setdefault(t.lower(), (t, img))
    cand_texts = [shown[k][0] for k in distinct]
    cand_images = [shown[k][1] for k in distinct]
    labels = sorted({c for c in categories if c})
    i2t, t2i, category = [], [], []
    for t, img, cat in zip(texts, images, categories):
        i2t.append(
            {
                "qry_text": I2T_QUERY,
                "qry_img_path": img,
                "tgt_text": rotate_first(cand_texts, position[t.lower()]),
                "tgt_img_path": [""] * len(distinct),
            }
        )
        if cat:
            category.append(
                {
                    "qry_text": CATEGORY_QUERY,
                    "qry_img_path": img,
                    "tgt_text": rotate_first(labels, labels.index(cat)),
                    "tgt_img_path": [""] * len(labels),
                }
            )
    for k, key in enumerate(distinct):
        t2i.append(
            {
                "qry_text": T2I_QUERY.format(text=shown[key][0]),
                "qry_img_path": "",
                "tgt_text": [IMAGE_TARGET] * len(distinct),
                "tgt_img_path": rotate_first(cand_images, k),
            }
        )
    return {"ClipArtI2T": i2t, "ClipArtT2I": t2i, "ClipArtCategory": category}


def train_rows(texts: list[str], images: list[str]) -> dict[str, list[dict]]:
    """MMEB-train pairs, one per drawing, in-batch negatives only."""
    blank = {"neg_text": "", "neg_image_path": ""}
    i2t = [
        {"qry": I2T_QUERY, "qry_image_path": img, "pos_text": t, "pos_image_path": "", **blank}
        for t, img in zip(texts, images)
    ]
    t2i = [
        {
            "qry": T2I_QUERY.format(text=t),
            "qry_image_path": "",
            "pos_text": IMAGE_TARGET,
            "pos_image_path": img,
        }
        | blank
        for t, img in zip(texts, images)
    ]
    return {"ClipArtI2T": i2t, "ClipArtT2I": t2i}


def build_clipart_dataset(
    out_dir: str | os.PathLike,
    *,
    n_eval: int = N_EVAL,
    seed: int = SPLIT_SEED,
    limit: int | None = None,
    png_root: str | os.PathLike = PNG_ROOT,
    svg_root: str | os.PathLike = SVG_ROOT,
    show_progress: bool = True,
) -> Path:
    """Write the data set (idempotent: a complete build with the same settings is reused).

    `limit` keeps only the first `limit` drawings by path (tests); every rule stays the same.
    """
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    settings = {"n_eval": n_eval, "seed": seed, "limit": limit, "image_size": IMAGE_SIZE}
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("settings") == settings:
        return out
    drawings = find_drawings(png_root, svg_root)[:limit]
    collections = collection_titles(drawings)
    texts = [drawing_text(d, collections) for d in drawings]
    family = families(drawings, texts, collections)
    split = split_by_family(texts, family, n_eval, seed)
    sizes = Counter(d.category for d in drawings)
    categories = [
        d.category if sizes[d.category] >= MIN_CATEGORY_SIZE and d.category not in NO_CATEGORY else ""
        for d in drawings
    ]
    image = [f"images/{i:05d}.png" for i in range(len(drawings))]
    for s in ("train", "eval"):
        (out / s / "images").mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(tqdm(drawings, desc="render clip art", disable=not show_progress)):
        render(Path(png_root) / f"{d.source}.png").save(out / split[i] / image[i])
    ev = [i for i in range(len(drawings)) if split[i] == "eval"]
    tr = [i for i in range(len(drawings)) if split[i] == "train"]
    for name, rows in eval_rows(
        [texts[i] for i in ev], [image[i] for i in ev], [categories[i] for i in ev]
    ).items():
        write_jsonl(out / "eval" / f"{name}.jsonl", rows)
    (out / "eval" / "datasets.json").write_text(json.dumps(EVAL_SETS, indent=2) + "\n")
    for name, rows in train_rows([texts[i] for i in tr], [image[i] for i in tr]).items():
        write_jsonl(out / "train" / f"{name}.jsonl", rows)
    table = [
        {
            "index": i,
            **asdict(d),
            "category": d.category,
            "text": texts[i],
            "family": family[i],
            "split": split[i],
            "image": f"{split[i]}/{image[i]}",
        }
        for i, d in enumerate(drawings)
    ]
    write_jsonl(out / "items.jsonl", table)
    manifest = {
        "settings": settings,
        "source": {"png_root": str(png_root), "svg_root": str(svg_root)},
        "n_drawings": len(drawings),
        "n_texts": len({t.lower() for t in texts}),
        "n_eval_drawings": len(ev),
        "n_eval_texts": len({texts[i].lower() for i in ev}),
        "n_families": len(set(family)),
        "collection_titles": sorted(collections),
        "eval_sets": EVAL_SETS,
        "train_sets": list(TRAIN_SETS),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks the build complete
    return out
