"""One training image from one piece of art: background, placement, and the derived styles.

Everything random comes from the ``rng`` passed in, so an image is a pure function of
(art, style, size, seed). Augmentation is the same for every style (backgrounds, scale,
position, rotation), so a shift changes only how the emoji is drawn. Derived styles:

- ``silhouette``: the art's alpha mask filled with one dark colour (shape without detail),
- ``grayscale``: the finished image without colour,
- ``corrupt``: the finished image with one CIFAR-10-C-like corruption (Hendrycks & Dietterich,
  2019) of random type and severity: gaussian noise, gaussian blur, contrast, JPEG, pixelate.
"""

from __future__ import annotations

import colorsys
import io
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

SCALE_RANGE = (0.5, 0.95)  # long side of the emoji, as a fraction of the image side
MAX_ROTATION = 15.0  # degrees; more would turn arrows and letters into other symbols
OVERHANG = 0.1  # fraction of the emoji that may fall outside the frame
BACKGROUNDS = ("white", "solid", "gradient", "noise")
BACKGROUND_P = (0.3, 0.3, 0.25, 0.15)
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "jpeg", "pixelate")
# Severities 1..5, as CIFAR-10-C sets them for 32 px images.
SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of noise on [0, 1] pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in px at 32 px (scaled with size)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the mean
    "jpeg": (80, 65, 58, 50, 40),  # quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
}


def _round(value: float) -> float:
    return round(float(value), 4)


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> list:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return [int(round(255 * c)) for c in rgb]


@lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    return np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)


def background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A light-to-mid background (dark ones would hide line art and silhouettes)."""
    kind = BACKGROUNDS[
        int(np.searchsorted(np.cumsum(BACKGROUND_P), rng.random() * sum(BACKGROUND_P)))
    ]
    if kind == "white":
        first = _colour(rng, (0.0, 0.05), (0.92, 1.0))
    else:
        first = _colour(rng, (0.0, 0.6), (0.6, 1.0))
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = first
    params: dict[str, Any] = {"bg": kind, "bg_rgb": first}
    if kind == "gradient":
        second = _colour(rng, (0.0, 0.6), (0.6, 1.0))
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = _grid(size)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        canvas = canvas * (1 - t[..., None]) + np.asarray(second, np.float32) * t[..., None]
        params.update(bg_rgb2=second, bg_angle=_round(angle))
    elif kind == "noise":
        sigma = rng.uniform(6, 20)
        canvas = canvas + rng.normal(0, sigma, canvas.shape).astype(np.float32)
        params["bg_sigma"] = _round(sigma)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), params


def silhouette(art: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list]:
    rgb = _colour(rng, (0.0, 0.6), (0.05, 0.3))
    out = Image.new("RGBA", art.size, (*rgb, 255))
    out.putalpha(art.getchannel("A"))
    return out, rgb


def place(
    art: Image.Image, size: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int], dict[str, Any]]:
    """Shrink (antialiased) to the drawn size, then rotate; pick a position.

    Rotating after the shrink costs a quarter of rotating the full-resolution art, for a
    barely visible softening at these sizes.
    """
    scale = rng.uniform(*SCALE_RANGE)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    side = max(1, round(scale * size))
    premult = art.convert("RGBa")  # premultiplied alpha: resampling makes no dark fringes
    small = premult.resize((side, side), Image.Resampling.LANCZOS)
    obj = small.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True).convert("RGBA")
    w, h = obj.size
    x = int(rng.integers(-int(OVERHANG * w), max(size - w + int(OVERHANG * w), 0) + 1))
    y = int(rng.integers(-int(OVERHANG * h), max(size - h + int(OVERHANG * h), 0) + 1))
    params = {"scale": _round(scale), "rotation": _round(angle), "x": x, "y": y}
    return obj, (x, y), params


def corrupt(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    severity = int(rng.integers(1, 6))
    level = SEVERITY[kind][severity - 1]
    size = image.width
    if kind == "gaussian_noise":
        x = np.asarray(image, np.float32) / 255.0
        x = x + rng.normal(0, level, x.shape).astype(np.float32)
        out = Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))
    elif kind == "gaussian_blur":
        out = image.filter(ImageFilter.GaussianBlur(level * size / 32))
    elif kind == "contrast":
        x = np.asarray(image, np.float32)
        mean = x.mean(axis=(0, 1), keepdims=True)
        out = Image.fromarray(np.clip((x - mean) * level + mean + 0.5, 0, 255).astype(np.uint8))
    elif kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(level))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    else:
        small = max(1, round(size * level))
        out = image.resize((small, small), Image.Resampling.BOX)
        out = out.resize((size, size), Image.Resampling.BOX)
    return out, {"corruption": kind, "severity": severity}


def render(
    art: Image.Image, style: str, size: int, rng: np.random.Generator
) -> tuple[Image.Image, dict[str, Any]]:
    """An RGB ``size`` x ``size`` image of ``art`` drawn in ``style``, and how it was made."""
    params: dict[str, Any] = {}
    if style == "silhouette":
        art, params["silhouette_rgb"] = silhouette(art, rng)
    canvas, bg_params = background(size, rng)
    params.update(bg_params)
    obj, position, place_params = place(art, size, rng)
    params.update(place_params)
    image = Image.fromarray(canvas, "RGB")
    image.paste(obj, position, obj)
    if style == "grayscale":
        image = image.convert("L").convert("RGB")
    elif style == "corrupt":
        image, corrupt_params = corrupt(image, rng)
        params.update(corrupt_params)
    return image, params
