"""Procedural thermal-like and RGB-like street scenes, written in the real FLIR / COCO layouts.

The `tiny` profile cannot download FLIR ADAS or COCO, so it generates stand-ins that the *same*
loaders read. Scenes are built to be about as hard for a small detector as FLIR is for the
paper's RetinaNet: crowds, perspective (small distant objects near the horizon), occlusion
(near objects drawn over far ones; boxes cover the visible part), truncation at the border,
object-like clutter (poles, exhausts, warm animals, hot windows), random thermal contrast and
polarity, motion blur, vignetting and sensor noise.

Everything is driven by one `numpy.random.Generator` per image, seeded from (seed, split, index),
so any image can be regenerated alone and the sets are identical on every machine.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from helpers.runs import atomic_write_json

# FLIR ADAS v1.3 uses COCO category ids for the classes it shares with COCO.
THERMAL_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]
RGB_CATEGORIES = THERMAL_CATEGORIES[:3] + [
    {"id": 6, "name": "bus", "supercategory": "vehicle"},
    {"id": 10, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 13, "name": "stop sign", "supercategory": "outdoor"},
    THERMAL_CATEGORIES[3],
]
CATEGORY_IDS = {c["name"]: c["id"] for c in RGB_CATEGORIES}


@dataclass(frozen=True)
class SceneSpec:
    """Knobs of the scene generator; `difficulty` in the JSON metadata records them."""

    height: int = 128
    width: int = 160
    max_objects: int = 12             # annotated objects per image, drawn as 1 + Poisson
    mean_objects: float = 5.0
    near_height: float = 44.0         # person height (px) at the bottom edge; shrinks to the horizon
    clutter: int = 10                 # distractors per image (poles, exhausts, animals, windows)
    depth_exponent: float = 0.5       # < 1 favours near (large) objects over distant ones
    min_height: float = 0.0           # objects that would be drawn smaller (px) are not drawn
    min_visible: float = 0.35         # an object less visible than this is left unannotated
    min_box: float = 3.0              # boxes thinner than this (px) are left unannotated
    noise: tuple[float, float] = (0.01, 0.05)
    inverted_polarity: float = 0.12   # probability of a black-hot frame
    motion_blur: float = 0.3          # probability of horizontal motion blur
    crowds: float = 0.35              # probability of a group of 2-4 people walking together
    crowd_spread: float = 6.0         # sd (px) of their positions around the group's centre
    class_weights: dict = field(default_factory=dict)


def default_spec(kind: str) -> SceneSpec:
    """The RGB set stands in for COCO pretraining, so it is easier than the thermal set,
    whose difficulty is tuned to FLIR's (see the foundation issue and README)."""
    if kind == "coco":
        return SceneSpec(mean_objects=3.5, near_height=100.0, clutter=2, noise=(0.01, 0.03), min_height=12.0)
    # objects nearer the camera and none drawn under 28 px: the tiny detector finds nothing under 28 px
    # at 160x128, and this set lands it in the difficulty window (`tools.difficulty_sweep`)
    return SceneSpec(mean_objects=4.5, near_height=100.0, clutter=2, min_height=28.0, depth_exponent=0.3,
                     noise=(0.01, 0.03), inverted_polarity=0.05)


THERMAL_WEIGHTS = {"person": 0.38, "car": 0.42, "bicycle": 0.14, "dog": 0.06}
RGB_WEIGHTS = {"person": 0.30, "car": 0.28, "bicycle": 0.10, "dog": 0.06,
               "bus": 0.10, "traffic light": 0.08, "stop sign": 0.08}


# --------------------------------------------------------------------------- primitives
class Canvas:
    """A float image (C, H, W) with an owner map telling which object each pixel shows."""

    def __init__(self, height: int, width: int, channels: int):
        self.image = np.zeros((channels, height, width), np.float32)
        self.owner = np.full((height, width), -1, np.int32)
        self.height, self.width = height, width
        self.drawn = {}  # object index -> pixels it covered when drawn (before occlusion)

    def _window(self, x0, y0, x1, y1):
        xa, ya = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
        xb, yb = min(int(np.ceil(x1)) + 2, self.width), min(int(np.ceil(y1)) + 2, self.height)
        if xa >= xb or ya >= yb:
            return None
        ys, xs = np.mgrid[ya:yb, xa:xb].astype(np.float32) + 0.5
        return (slice(ya, yb), slice(xa, xb)), xs, ys

    def paint(self, bbox, alpha_fn, value, owner: int | None = None, texture: float = 0.0,
              rng: np.random.Generator | None = None):
        """Composite `value` (per channel) where `alpha_fn(xs, ys)` is > 0."""
        win = self._window(*bbox)
        if win is None:
            return
        sl, xs, ys = win
        alpha = np.clip(alpha_fn(xs, ys), 0.0, 1.0)
        val = np.asarray(value, np.float32).reshape(-1, 1, 1)
        if texture and rng is not None:
            val = val + texture * rng.standard_normal(alpha.shape).astype(np.float32)
        region = self.image[(slice(None),) + sl]
        region *= 1.0 - alpha
        region += alpha * val
        solid = alpha > 0.5
        if owner is not None:
            self.owner[sl][solid] = owner
            self.drawn[owner] = self.drawn.get(owner, 0) + int(solid.sum())
        else:
            self.owner[sl][solid] = -1


def ellipse(cx, cy, rx, ry):
    rx, ry = max(rx, 0.4), max(ry, 0.4)
    bbox = (cx - rx, cy - ry, cx + rx, cy + ry)
    return bbox, lambda x, y: (1 - np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)) * min(rx, ry) + 0.5


def rect(x0, y0, x1, y1):
    return (x0, y0, x1, y1), lambda x, y: np.minimum.reduce([x - x0, x1 - x, y - y0, y1 - y]) + 0.5


def ring(cx, cy, r, width):
    bbox = (cx - r - width, cy - r - width, cx + r + width, cy + r + width)
    return bbox, lambda x, y: width / 2 - np.abs(np.hypot(x - cx, y - cy) - r) + 0.5


def segment(xa, ya, xb, yb, width):
    bbox = (min(xa, xb) - width, min(ya, yb) - width, max(xa, xb) + width, max(ya, yb) + width)
    dx, dy = xb - xa, yb - ya
    length2 = max(dx * dx + dy * dy, 1e-6)

    def alpha(x, y):
        t = np.clip(((x - xa) * dx + (y - ya) * dy) / length2, 0, 1)
        return width / 2 - np.hypot(x - xa - t * dx, y - ya - t * dy) + 0.5
    return bbox, alpha


def polygon(cx, cy, r, sides):
    """Regular polygon by its inscribed radius (stop signs)."""
    angles = np.pi / sides + 2 * np.pi * np.arange(sides) / sides
    normals = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    bbox = (cx - r * 1.1, cy - r * 1.1, cx + r * 1.1, cy + r * 1.1)
    return bbox, lambda x, y: (r - np.max(normals[:, 0, None, None] * (x - cx) + normals[:, 1, None, None] * (y - cy), 0)) + 0.5


# --------------------------------------------------------------------------- palettes
class Palette:
    """Maps a semantic part ('skin', 'tyre', ...) to a per-channel value for one image."""

    def __init__(self, rgb: bool, rng: np.random.Generator):
        self.rgb, self.rng = rgb, rng
        # thermal: ambient temperature decides contrast; a hot day makes people barely visible
        self.ambient = rng.uniform(0.25, 0.6)

    def __call__(self, part: str):
        r = self.rng
        if not self.rgb:
            a = self.ambient
            warm = {"skin": r.uniform(0.75, 1.0), "cloth": a + r.uniform(0.05, 0.35),
                    "tyre": a + r.uniform(0.1, 0.4), "engine": a + r.uniform(0.2, 0.5),
                    "body": a + r.uniform(-0.12, 0.15), "glass": a - r.uniform(0.05, 0.2),
                    "frame": a + r.uniform(0.0, 0.2), "fur": a + r.uniform(0.15, 0.4),
                    "pole": a + r.uniform(-0.15, 0.3), "hot": a + r.uniform(0.25, 0.55),
                    "metal": a + r.uniform(-0.1, 0.2), "lamp": a + r.uniform(0.1, 0.4),
                    "sign": a + r.uniform(-0.1, 0.15)}[part]
            return [warm]
        colours = {"skin": [0.85, 0.65, 0.5], "tyre": [0.08, 0.08, 0.08], "glass": [0.25, 0.35, 0.45],
                   "frame": [0.2, 0.2, 0.25], "engine": [0.3, 0.3, 0.3], "pole": [0.4, 0.4, 0.42],
                   "fur": [0.55, 0.38, 0.2], "hot": [0.9, 0.85, 0.6], "metal": [0.6, 0.6, 0.62],
                   "lamp": [0.1, 0.1, 0.1], "sign": [0.8, 0.1, 0.1]}
        if part in ("cloth", "body"):
            return list(r.uniform(0.05, 0.95, 3))
        base = np.asarray(colours[part]) + r.normal(0, 0.06, 3)
        return list(np.clip(base, 0, 1))


# --------------------------------------------------------------------------- objects
def draw_person(c: Canvas, p: Palette, rng, x, yb, h, owner):
    w = h * rng.uniform(0.3, 0.4)  # boxes include arms and bags; thinner people are lost at 160x128
    head_r = h * 0.085
    stride = rng.uniform(-0.12, 0.12) * h
    cloth, legs = p("cloth"), p("cloth")
    for dx in (-w * 0.22 + stride / 2, w * 0.22 - stride / 2):
        c.paint(*segment(x, yb - h * 0.5, x + dx, yb - 0.5, max(h * 0.09, 0.8)), legs, owner, 0.02, rng)
    c.paint(*rect(x - w / 2, yb - h * 0.8, x + w / 2, yb - h * 0.45), cloth, owner, 0.03, rng)
    arm = rng.uniform(-0.15, 0.15) * h
    for side in (-1, 1):
        c.paint(*segment(x + side * w / 2, yb - h * 0.78, x + side * w / 2 + arm * side, yb - h * 0.5,
                         max(h * 0.06, 0.7)), cloth, owner, 0.02, rng)
    c.paint(*ellipse(x, yb - h * 0.89, head_r, head_r * 1.15), p("skin"), owner, 0.02, rng)


def draw_car(c: Canvas, p: Palette, rng, x, yb, h, owner, rgb):
    side_view = rng.random() < 0.6
    w = h * (rng.uniform(1.9, 2.6) if side_view else rng.uniform(1.2, 1.5))
    body = p("body")
    c.paint(*rect(x - w / 2, yb - h * 0.62, x + w / 2, yb - h * 0.15), body, owner, 0.03, rng)
    roof_w = w * (0.55 if side_view else 0.8)
    c.paint(*rect(x - roof_w / 2, yb - h, x + roof_w / 2, yb - h * 0.58), body, owner, 0.03, rng)
    c.paint(*rect(x - roof_w / 2 + 1, yb - h * 0.92, x + roof_w / 2 - 1, yb - h * 0.66), p("glass"), owner, 0.02, rng)
    tyre_r = h * 0.19
    if side_view:
        for fx in (-0.32, 0.32):
            c.paint(*ellipse(x + fx * w, yb - tyre_r, tyre_r, tyre_r), p("tyre"), owner, 0.02, rng)
        front = 1 if rng.random() < 0.5 else -1
        c.paint(*ellipse(x + front * w * 0.38, yb - h * 0.42, w * 0.1, h * 0.12), p("engine"), owner, 0.03, rng)
    else:
        for fx in (-0.4, 0.4):
            c.paint(*rect(x + fx * w - tyre_r * 0.5, yb - tyre_r * 1.6, x + fx * w + tyre_r * 0.5, yb), p("tyre"), owner)
            c.paint(*ellipse(x + fx * w * 0.85, yb - h * 0.4, w * 0.07, h * 0.06), p("hot" if not rgb else "hot"), owner)
    return w


def draw_bicycle(c: Canvas, p: Palette, rng, x, yb, h, owner):
    r = h * 0.3
    span = h * rng.uniform(0.55, 0.7)
    width = max(h * 0.06, 0.8)
    tyre, frame = p("tyre"), p("frame")
    for fx in (-span, span):
        c.paint(*ring(x + fx, yb - r, r, width), tyre, owner)
    hub = (x, yb - r)
    top = (x + span * 0.15, yb - r * 2.3)
    c.paint(*segment(x - span, yb - r, hub[0], hub[1], width), frame, owner)
    c.paint(*segment(hub[0], hub[1], top[0], top[1], width), frame, owner)
    c.paint(*segment(top[0], top[1], x + span, yb - r, width), frame, owner)
    c.paint(*segment(top[0], top[1], x + span * 0.8, yb - r * 2.6, width), frame, owner)
    return span + r


def draw_dog(c: Canvas, p: Palette, rng, x, yb, h, owner):
    length = h * rng.uniform(1.3, 1.7)
    fur = p("fur")
    body_y = yb - h * 0.55
    for fx in (-0.35, 0.35):
        c.paint(*segment(x + fx * length, body_y, x + fx * length, yb - 0.5, max(h * 0.12, 0.8)), fur, owner)
    c.paint(*ellipse(x, body_y, length * 0.45, h * 0.22), fur, owner, 0.03, rng)
    head = 1 if rng.random() < 0.5 else -1
    c.paint(*ellipse(x + head * length * 0.5, yb - h * 0.85, h * 0.2, h * 0.17), fur, owner, 0.03, rng)
    c.paint(*segment(x - head * length * 0.45, body_y, x - head * length * 0.65, body_y - h * 0.3, max(h * 0.06, 0.6)), fur, owner)


def draw_bus(c: Canvas, p: Palette, rng, x, yb, h, owner):
    w = h * rng.uniform(2.2, 3.2)
    c.paint(*rect(x - w / 2, yb - h, x + w / 2, yb - h * 0.12), p("body"), owner, 0.03, rng)
    glass = p("glass")
    n = int(rng.integers(4, 8))
    for i in range(n):
        wx = x - w / 2 + (i + 0.5) * w / n
        c.paint(*rect(wx - w / n * 0.35, yb - h * 0.85, wx + w / n * 0.35, yb - h * 0.55), glass, owner)
    for fx in (-0.35, 0.35):
        c.paint(*ellipse(x + fx * w, yb - h * 0.12, h * 0.13, h * 0.13), p("tyre"), owner)
    return w


def draw_traffic_light(c: Canvas, p: Palette, rng, x, yb, h, owner):
    w = h * 0.3
    c.paint(*rect(x - w / 2, yb - h, x + w / 2, yb), p("lamp"), owner)
    on = int(rng.integers(0, 3))
    for i, colour in enumerate(([1, 0.1, 0.1], [1, 0.8, 0.1], [0.1, 1, 0.3])):
        value = colour if c.image.shape[0] == 3 else [0.9 if i == on else 0.4]
        if c.image.shape[0] == 3 and i != on:
            value = [v * 0.3 for v in colour]
        c.paint(*ellipse(x, yb - h * (0.8 - 0.3 * i), w * 0.33, w * 0.33), value, owner)
    return w


def draw_stop_sign(c: Canvas, p: Palette, rng, x, yb, h, owner):
    r = h / 2
    c.paint(*polygon(x, yb - r, r, 8), p("sign"), owner, 0.02, rng)
    c.paint(*rect(x - r * 0.55, yb - r * 1.15, x + r * 0.55, yb - r * 0.85), [0.95] * c.image.shape[0], owner)


# Heights relative to a person at the same depth; widths are set inside the drawers.
RELATIVE_HEIGHT = {"person": (0.85, 1.1), "car": (0.7, 0.9), "bicycle": (0.55, 0.7), "dog": (0.3, 0.45),
                   "bus": (1.2, 1.5), "traffic light": (0.35, 0.5), "stop sign": (0.3, 0.4)}


def draw_clutter(c: Canvas, p: Palette, rng, x, yb, scale):
    """Object-like distractors that carry no annotation."""
    kind = rng.choice(["pole", "exhaust", "animal", "window", "hydrant", "tree"])
    if kind == "pole":
        top = yb - scale * rng.uniform(1.2, 3.0)
        c.paint(*rect(x - max(scale * 0.05, 0.6), top, x + max(scale * 0.05, 0.6), yb), p("pole"))
        if rng.random() < 0.5:
            c.paint(*ellipse(x, top, scale * 0.12, scale * 0.08), p("hot"))
    elif kind == "exhaust":
        c.paint(*ellipse(x, yb - scale * 0.1, scale * rng.uniform(0.1, 0.3), scale * 0.08), p("hot"), texture=0.05, rng=rng)
    elif kind == "animal":  # warm four-legged shapes that are not dogs (deer, sheep)
        length = scale * rng.uniform(0.6, 1.0)
        fur = p("fur")
        for fx in (-0.3, 0.3):
            c.paint(*segment(x + fx * length, yb - scale * 0.4, x + fx * length, yb, max(scale * 0.05, 0.6)), fur)
        c.paint(*ellipse(x, yb - scale * 0.45, length * 0.5, scale * 0.18), fur)
        c.paint(*segment(x + length * 0.45, yb - scale * 0.5, x + length * 0.55, yb - scale * 0.85, max(scale * 0.08, 0.7)), fur)
    elif kind == "window":
        c.paint(*rect(x - scale * 0.15, yb - scale * 2.0, x + scale * 0.15, yb - scale * 1.6), p("hot"))
    elif kind == "hydrant":  # upright warm blob, person-like at a distance
        c.paint(*ellipse(x, yb - scale * 0.2, scale * 0.1, scale * 0.2), p("cloth"))
    else:
        c.paint(*ellipse(x, yb - scale * 1.6, scale * rng.uniform(0.4, 0.8), scale * rng.uniform(0.5, 0.9)),
                p("body"), texture=0.08, rng=rng)
        c.paint(*rect(x - scale * 0.06, yb - scale * 1.0, x + scale * 0.06, yb), p("pole"))


# --------------------------------------------------------------------------- scenes
def smooth_noise(rng, height, width, cells, channels=1):
    coarse = rng.standard_normal((channels, cells, cells)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(ch).resize((width, height), Image.BICUBIC)) for ch in coarse])


def draw_background(c: Canvas, p: Palette, rng, horizon: float):
    h, w = c.height, c.width
    ys = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    channels = c.image.shape[0]
    if channels == 1:
        sky = p.ambient - rng.uniform(0.1, 0.3)
        road = p.ambient + rng.uniform(-0.1, 0.1)
        sky_c, road_c = np.array([sky]), np.array([road])
    else:
        sky_c = np.array([0.45, 0.6, 0.85]) * rng.uniform(0.6, 1.1) + rng.normal(0, 0.05, 3)
        road_c = np.array([0.4, 0.4, 0.4]) * rng.uniform(0.6, 1.3) + rng.normal(0, 0.05, 3)
    sky_img = sky_c[:, None, None] + 0.1 * (ys - horizon)[None]
    road_img = road_c[:, None, None] + 0.15 * (ys - horizon)[None]
    mask = (ys > horizon)[None].astype(np.float32)
    c.image[:] = sky_img * (1 - mask) + road_img * mask
    c.image += 0.06 * smooth_noise(rng, h, w, 6, channels) + 0.03 * smooth_noise(rng, h, w, 20, channels)
    # buildings along the horizon, with warm windows
    x = rng.uniform(-20, 0)
    hy = horizon * h
    while x < w:
        bw, bh = rng.uniform(15, 45), rng.uniform(10, hy + 5)
        c.paint(*rect(x, hy - bh, x + bw, hy + 2), p("metal") if channels == 1 else list(rng.uniform(0.2, 0.7, 3)),
                texture=0.03, rng=rng)
        for _ in range(int(rng.integers(0, 6))):
            wx, wy = rng.uniform(x + 2, x + bw - 2), rng.uniform(hy - bh + 2, hy - 2)
            c.paint(*rect(wx - 1, wy - 1.2, wx + 1, wy + 1.2), p("hot"))
        x += bw + rng.uniform(0, 10)
    # lane markings (cold in thermal, white in RGB)
    lane = [p.ambient - 0.1] if channels == 1 else [0.9, 0.9, 0.85]
    for i in range(int(rng.integers(0, 4))):
        xa = rng.uniform(0, w)
        c.paint(*segment(w / 2 + (xa - w / 2) * 0.1, hy + 2, xa, h + 5, 1.0), lane)


def finish(c: Canvas, rng, spec: SceneSpec, rgb: bool) -> np.ndarray:
    img = c.image
    h, w = c.height, c.width
    # vignetting and a column fixed-pattern, as on uncooled microbolometers
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    img *= (1 - rng.uniform(0.0, 0.25) * r2 / 2)[None]
    if not rgb:
        img += rng.uniform(0, 0.02) * rng.standard_normal((1, 1, w)).astype(np.float32)
    if rng.random() < spec.motion_blur:
        k = int(rng.integers(2, 5))
        img = sum(np.roll(img, s, axis=2) for s in range(k)) / k
    pil_blur = rng.uniform(0.3, 0.9)
    kernel = np.exp(-0.5 * (np.arange(-2, 3) / pil_blur) ** 2)
    kernel /= kernel.sum()
    img = sum(wk * np.roll(img, s, axis=1) for s, wk in zip(range(-2, 3), kernel))
    img = sum(wk * np.roll(img, s, axis=2) for s, wk in zip(range(-2, 3), kernel))
    img = img + rng.uniform(*spec.noise) * rng.standard_normal(img.shape).astype(np.float32)
    if not rgb:
        # automatic gain control: stretch between percentiles, as FLIR's 8-bit export does
        lo, hi = np.percentile(img, [rng.uniform(0.5, 3), rng.uniform(97, 99.8)])
        img = (img - lo) / max(hi - lo, 1e-3)
        if rng.random() < spec.inverted_polarity:
            img = 1 - img
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def generate_scene(rng: np.random.Generator, spec: SceneSpec, rgb: bool):
    """One image and its visible-part boxes: (uint8 array (H, W) or (H, W, 3), annotations)."""
    c = Canvas(spec.height, spec.width, 3 if rgb else 1)
    p = Palette(rgb, rng)
    horizon = rng.uniform(0.25, 0.5)
    draw_background(c, p, rng, horizon)
    weights = spec.class_weights or (RGB_WEIGHTS if rgb else THERMAL_WEIGHTS)
    names, probs = list(weights), np.array(list(weights.values()))
    n_obj = min(1 + rng.poisson(spec.mean_objects - 1), spec.max_objects)
    hy = horizon * spec.height
    items = []
    for i in range(n_obj):
        yb = hy + (spec.height * 1.08 - hy) * rng.random() ** spec.depth_exponent
        items.append(("object", str(rng.choice(names, p=probs / probs.sum())), yb, rng.uniform(-8, spec.width + 8)))
    for _ in range(int(rng.integers(spec.clutter // 2, spec.clutter + 1))):
        items.append(("clutter", "", hy + (spec.height * 1.05 - hy) * rng.random(), rng.uniform(0, spec.width)))
    # crowds: people walk in groups
    if rng.random() < spec.crowds:
        gx, gy = rng.uniform(10, spec.width - 10), hy + (spec.height - hy) * rng.uniform(0.1, 0.6)
        for _ in range(int(rng.integers(2, 5))):
            items.append(("object", "person", gy + rng.normal(0, 3), gx + rng.normal(0, spec.crowd_spread)))
    items.sort(key=lambda it: it[2])  # far to near: near objects occlude far ones
    labels = {}
    for idx, (kind, name, yb, x) in enumerate(items):
        depth = max((yb - hy) / (spec.height - hy), 0.03)
        scale = spec.near_height * depth
        if kind == "clutter":
            draw_clutter(c, p, rng, x, yb, scale)
            continue
        h = scale * rng.uniform(*RELATIVE_HEIGHT[name])
        if h < spec.min_height:
            continue
        drawer = {"person": draw_person, "bicycle": draw_bicycle, "dog": draw_dog,
                  "traffic light": draw_traffic_light, "stop sign": draw_stop_sign}.get(name)
        if name == "car":
            draw_car(c, p, rng, x, yb, h, idx, rgb)
        elif name == "bus":
            draw_bus(c, p, rng, x, yb, h, idx)
        else:
            if name == "bicycle" and rng.random() < 0.6:  # a rider, annotated as a person
                drawer(c, p, rng, x, yb, h, idx)
                labels[idx] = name
                idx = idx + 10_000
                draw_person(c, p, rng, x, yb - h * 0.35, h * 1.5, idx)
                labels[idx] = "person"
                continue
            drawer(c, p, rng, x, yb, h, idx)
        labels[idx] = name
    pixels = finish(c, rng, spec, rgb)
    annotations = []
    for idx, name in labels.items():
        ys, xs = np.nonzero(c.owner == idx)
        if len(xs) == 0 or len(xs) < spec.min_visible * c.drawn.get(idx, 1):
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if min(x1 - x0, y1 - y0) < spec.min_box:
            continue
        annotations.append({"category": name, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                            "visible_pixels": int(len(xs))})
    image = pixels[0] if not rgb else pixels.transpose(1, 2, 0)
    return image, annotations


def image_rng(seed: int, split: str, index: int, rgb: bool) -> np.random.Generator:
    """Independent stream per image so any image is reproducible alone."""
    return np.random.default_rng([seed, {"train": 0, "val": 1}[split], index, int(rgb)])


# --------------------------------------------------------------------------- writers
def _coco_json(images, annotations, categories, description, spec):
    return {"info": {"description": description, "version": "irzsq-synthetic",
                     "difficulty": asdict(spec)},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _write_split(root: Path, split: str, n: int, seed: int, spec: SceneSpec, rgb: bool, progress=None):
    if rgb:
        img_dir = root / f"{split}2017"
        ann_path = root / "annotations" / f"instances_{split}2017.json"
        categories = RGB_CATEGORIES
    else:
        img_dir = root / split / "thermal_8_bit"
        ann_path = root / split / "thermal_annotations.json"
        categories = THERMAL_CATEGORIES
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    # FLIR numbers its files across splits (val starts after train) and its image ids from 0
    first = 1 if split == "train" else 1 + n * 100
    bar = tqdm(range(n), desc=f"{root.name}/{split}", disable=progress if progress is None else not progress)
    for i in bar:
        pixels, anns = generate_scene(image_rng(seed, split, i, rgb), spec, rgb)
        if rgb:
            file_name = f"{first + i:012d}.jpg"
            image_id = first + i
        else:
            file_name = f"thermal_8_bit/FLIR_{first + i:05d}.jpeg"
            image_id = i
        path = img_dir / Path(file_name).name
        Image.fromarray(pixels).save(path, quality=92)
        images.append({"id": image_id, "file_name": file_name, "height": spec.height, "width": spec.width})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORY_IDS[a["category"]], "bbox": a["bbox"],
                                "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0, "segmentation": []})
    desc = "synthetic COCO 2017 stand-in" if rgb else "synthetic FLIR ADAS v1.3 stand-in (thermal_8_bit)"
    atomic_write_json(ann_path, _coco_json(images, annotations, categories, desc, spec))
    return {"images": len(images), "annotations": len(annotations)}


def write_dataset(root: str | Path, kind: str, n_train: int, n_val: int, seed: int = 0,
                  spec: SceneSpec | None = None, progress: bool | None = None) -> dict:
    """Write a synthetic set in the FLIR ADAS v1.3 (`kind='flir'`) or COCO 2017 (`kind='coco'`) layout.

    Skips the work when `root/irzsq_synthetic.json` records the same request (idempotent reruns).
    Returns counts per split.
    """
    if kind not in ("flir", "coco"):
        raise ValueError(f"kind must be 'flir' or 'coco', got {kind!r}")
    root = Path(root)
    spec = spec or default_spec(kind)
    request = {"kind": kind, "n_train": n_train, "n_val": n_val, "seed": seed, "spec": asdict(spec)}
    marker = root / "irzsq_synthetic.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("request") == json.loads(json.dumps(request)):
            return done["counts"]
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} holds data that this generator did not write (a real dataset?); "
                              "choose another DATA_ROOT for synthetic data.")
    counts = {split: _write_split(root, split, n, seed, spec, kind == "coco", progress)
              for split, n in (("train", n_train), ("val", n_val))}
    atomic_write_json(marker, {"request": request, "counts": counts})
    return counts
