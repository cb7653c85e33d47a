"""The chat template an exported model ships: it renders a client's messages into exactly the text
`VLM2Vec.prepare` builds for the same row, so the processor's token ids equal `VLM2Vec.encode`'s.

The rule is `expand_placeholders`' (vlm2vec/families/_common.py), written in Jinja:
- the row text is every text part of every message concatenated in order, so a system message (what
  sentence-transformers' `prompt=` becomes for message inputs) is the row's prefix, as `prompt + text`
  is for plain text models;
- `<|image_k|>` / `<|video_1|>` in that text become the family's image / video tokens; a row with
  images or a video and no placeholder gets them in front, images first, space separated, then a
  space and the text (`{"image": im, "text": t}` renders as `VLM2Vec.encode([t], [im])` does);
- the tokens the tokenizer itself adds around a text (a BOS, an EOS) are written literally, because
  processors tokenize a rendered template without adding special tokens.
No role markers, no generation prompt: the model was trained on bare rows.
"""

from __future__ import annotations

import json

from vlm2vec.backbones import STORED_IMAGE_PLACEHOLDER, STORED_VIDEO_PLACEHOLDER

MAX_IMAGES = 16
"""How many `<|image_k|>` placeholders the template substitutes (rows hold a handful)."""


def _lit(value: str) -> str:
    """A Jinja string literal (JSON escaping is valid Jinja)."""
    return json.dumps(value)


def build_chat_template(image_token: str, video_token: str | None, prefix: str = "", suffix: str = "") -> str:
    """The Jinja chat template for a family whose placeholders become `image_token` / `video_token`;
    `prefix` / `suffix`: what the tokenizer adds around a text (tokens written as text)."""
    video = _lit(video_token or STORED_VIDEO_PLACEHOLDER)
    lines = [
        "{%- set ns = namespace(text='', images=0, videos=0) -%}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}{%- set ns.text = ns.text ~ message['content'] -%}",
        "{%- else -%}{%- for item in message['content'] -%}",
        "{%- if item['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}",
        "{%- elif item['type'] == 'video' -%}{%- set ns.videos = ns.videos + 1 -%}",
        "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text ~ item['text'] -%}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if (ns.images or ns.videos) and '<|image_' not in ns.text and "
        f"{_lit(STORED_VIDEO_PLACEHOLDER)} not in ns.text -%}}",
        "{%- set marks = namespace(items=[]) -%}",
        "{%- for k in range(ns.images) -%}"
        "{%- set marks.items = marks.items + ['<|image_' ~ (k + 1) ~ '|>'] -%}{%- endfor -%}",
        "{%- for k in range(ns.videos) -%}"
        f"{{%- set marks.items = marks.items + [{_lit(STORED_VIDEO_PLACEHOLDER)}] -%}}"
        "{%- endfor -%}",
        "{%- set ns.text = marks.items | join(' ') ~ ((' ' ~ ns.text) if ns.text else '') -%}",
        "{%- endif -%}",
        f"{{%- for k in range({MAX_IMAGES}) -%}}"
        f"{{%- set ns.text = ns.text | replace('<|image_' ~ (k + 1) ~ '|>', {_lit(image_token)}) -%}}"
        "{%- endfor -%}",
        f"{{%- set ns.text = ns.text | replace({_lit(STORED_VIDEO_PLACEHOLDER)}, {video}) -%}}",
        f"{{{{- {_lit(prefix)} ~ ns.text ~ {_lit(suffix)} -}}}}",
    ]
    assert STORED_IMAGE_PLACEHOLDER == "<|image_1|>"  # the pattern above spells it '<|image_' ~ k ~ '|>'
    return "".join(lines)


def special_affixes(tokenizer: object) -> tuple[str, str]:
    """(prefix, suffix): the tokens `tokenizer(text)` adds around any text, as a string each."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    if start is None:
        raise ValueError("cannot tell which special tokens the tokenizer adds around a text")
    tokens = tokenizer.convert_ids_to_tokens(full)
    return "".join(tokens[:start]), "".join(tokens[start + len(plain) :])


def render(template: str, messages: list[dict], **variables: object) -> str:
    """Render `template` the way transformers does (its sandboxed Jinja environment)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **variables)
    return rendered[0]
