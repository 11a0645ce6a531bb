"""The embedded nuisance world: a procedural image world, the default data when no --data is given.

It needs no download, and the study's premise holds in it by construction and can be measured:
every image shows one object of a known class in front of nuisances drawn per image, so two views
of one image share those nuisances while two instances of one class (a semantic pair) share only
the kind of object.

Classes. A class is a fixed kind of object: 2-4 parts (ellipse, rectangle, triangle, ring,
diamond, half-disc, cross, trapezoid, hexagon, crescent) in a fixed layout, each part with a
colour from a shared palette of eight. Instances vary in pose (rotation up to 30 degrees, mirror),
scale, position, aspect, part proportions and offsets, and colour (jitter in hue, saturation and
value; with probability 1 - colour_consistency a part takes a random palette colour instead).
Many classes share colours, so colour narrows a class down but shape decides it
(colour_consistency=0 gives a shape-only world, the control for that).

Nuisances, drawn per image, each from its own random stream:
- background: one of eight texture families (stripes, checker, dots, waves, plaid, blobs, rings,
  zigzag) with random colours, frequency, orientation and phase. The family, orientation and
  frequency survive cropping and the hue/colour survive colour jitter only partly, so two crops
  of one image share a strong background signature. `background_strength` s in [0, 1] is the
  nuisance-strength knob: the background is s * texture + (1 - s) * a flat grey, so 0 is plain
  and 1 is full contrast and full colour.
- illumination: global gain, colour cast and a linear shadow ramp, scaled by `illumination`.
- occlusion: with probability `occlusion_prob`, one or two textured occluders (bars or blobs)
  over the object.
- pattern: with probability `sticker_prob`, a sticker (a small two-colour glyph) on the object's
  body, clipped to the object.
`bg_class_corr` = rho: each class has an assigned background family and hue; with probability
rho a pretraining image uses them (frequency, orientation, phase and the other colours stay
random), otherwise the family is uniform over the eight. So P(family == class family) =
rho + (1 - rho) / 8 and rho = (P - 1/8) / (1 - 1/8). The transfer splits always use
class-independent backgrounds, so a background shortcut learnt in pretraining does not pay there.

Defaults were chosen on world seed 0, the calibration world, by criteria that never use the size
or sign of SP - AP (README, "Calibration"; eval/study.py's embedded-calibration preset and
eval/calibration.py): 50-shot probe splits with 50 test images a class and 40 unseen classes; a
supervised backbone trained the same way reaches at least 50% on the seen split; augmented pairs
beat a random-init backbone at least twice; no method collapses from random init; and shape
matters (the supervised net beats a colour-histogram probe by far). colour_consistency 0.95 is
what passes the ceiling (0.75 gave 33%); the nuisance strengths are those of the first world,
fixed before any SP - AP was seen (0.2 is the strongest background where augmented pairs still
learn the object). Studies report on other world seeds. The strength sweep (eval/study.py's
embedded-nuisance preset) runs background_strength over 0, 0.2, 0.5 and 1.

Rendering is a pure function of (instance, nuisance): `render` composes background, object,
sticker and occluders on a 2x supersampled grid, applies the illumination, averages 2x2 blocks
and rounds to uint8. Nuisance geometry is in the object's frame, so it does not depend on where
the instance is; a counterfactual replaces one nuisance record and re-renders (`counterfactuals`).

Every image has its own seed (world seed, split, class, index), so a world is deterministic,
images do not depend on generation order, and a world with fewer pairs per class holds the
first pairs of a larger one. Same config and WORLD_VERSION give identical arrays; PNG bytes also
depend on the zlib build, so compare decoded arrays across machines.

On disk (`ensure_world`), under <cache>/world-v{WORLD_VERSION}-{hash of the config}/:
  world.json                  config, version, counts, class names, conventions
  train/<c000..>/<idx>.png    pretraining pool, both images of every pair (ImageFolder layout)
  pairs.csv                   class,image_a,image_b (relative to train/), grouped by class,
                              pairs in index order: the first N rows of a class are its N-pair subset
  transfer/seen/{train,test}/<c000..>/*.png     new instances of the pretraining classes
  transfer/unseen/{train,test}/<u000..>/*.png   classes never used for pretraining
  boxes.csv                   path,xmin,ymin,xmax,ymax for every image (path relative to the root):
                              the whole object's box before occlusion, 0-based pixels, xmin/ymin
                              inclusive, xmax/ymax exclusive (= VOC's 1-based inclusive values
                              after adding 1 to xmin and ymin)
  nuisances.csv               path,bg_family,occluded,sticker for every image (for probes of
                              what a representation keeps)
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORLD_VERSION = 2

SHAPES = ("ellipse", "rectangle", "triangle", "ring", "diamond", "half_disc", "cross", "trapezoid",
          "hexagon", "crescent")
PALETTE = np.array([
    (0.86, 0.16, 0.14),  # red
    (0.96, 0.56, 0.10),  # orange
    (0.95, 0.86, 0.20),  # yellow
    (0.20, 0.68, 0.25),  # green
    (0.15, 0.36, 0.86),  # blue
    (0.56, 0.26, 0.72),  # purple
    (0.93, 0.93, 0.93),  # white
    (0.14, 0.14, 0.14),  # black
])
BACKGROUND_FAMILIES = ("stripes", "checker", "dots", "waves", "plaid", "blobs", "rings", "zigzag")
GLYPHS = ("disc", "square", "cross", "star", "ring", "bars", "triangle", "diamond")
FACTORS = ("background", "illumination", "occlusion", "pattern")
SPLITS = {"train": 0, "seen_train": 1, "seen_test": 2, "unseen_train": 3, "unseen_test": 4,
          "counterfactual": 5}
SUPERSAMPLE = 2


@dataclass(frozen=True)
class WorldConfig:
    num_classes: int = 100
    pairs_per_class: int = 20           # semantic pairs per class in the pretraining pool
    img_size: int = 32
    background_strength: float = 0.2    # nuisance-strength knob: 0 plain grey, 1 full-contrast colour texture
    bg_class_corr: float = 0.0          # probability that an image uses its class's background family and hue
    occlusion_prob: float = 0.3
    sticker_prob: float = 0.5
    illumination: float = 0.3           # strength of gain, colour cast and shadow ramp
    colour_consistency: float = 0.95    # probability that a part keeps its class colour (0: shape only)
    transfer_train_per_class: int = 50  # 50-shot probes; test noise (binomial std) about 0.7 points on the
    transfer_test_per_class: int = 50   # seen split's 5,000 test images, 1 on the unseen split's 2,000
    unseen_classes: int = 40
    seed: int = 0

    def __post_init__(self):
        """Refuses a setting out of its range with one line naming it, its value and the range."""
        lowest = {"num_classes": 1, "pairs_per_class": 1, "img_size": 8, "transfer_train_per_class": 1,
                  "transfer_test_per_class": 1, "unseen_classes": 1, "seed": 0}
        for name, value in dataclasses.asdict(self).items():
            if name in lowest and value < lowest[name]:
                raise ValueError(f"world setting {name} must be at least {lowest[name]}, got {value}")
            if name not in lowest and not 0 <= value <= 1:  # strengths and probabilities
                raise ValueError(f"world setting {name} must be in [0, 1], got {value}")

    def key(self):
        """Short hash of the config and WORLD_VERSION: worlds with equal keys are identical."""
        text = json.dumps({"version": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def name(self):
        return f"world-v{WORLD_VERSION}-{self.key()}"


@dataclass(frozen=True)
class Part:
    shape: str
    x: float            # centre in the object's frame (the object fits in the unit disc)
    y: float
    half_w: float
    half_h: float
    angle: float        # radians, in the object's frame
    colour: int         # palette index (class) ...
    rgb: tuple = ()     # ... and the instance's actual colour


@dataclass(frozen=True)
class ClassSpec:
    name: str
    parts: tuple        # of Part, drawn in order (later parts on top); parts[0] is the body
    bg_family: int      # background family and hue used when backgrounds correlate with classes
    bg_hue: float


@dataclass(frozen=True)
class Instance:
    label: int
    parts: tuple        # of Part with the instance's proportions and rgb
    cx: float           # object centre, in image sides
    cy: float
    radius: float       # object radius, in image sides
    angle: float
    mirror: bool
    aspect: float       # x scale / y scale of the whole object


@dataclass(frozen=True)
class Background:
    family: int
    colours: tuple      # two RGB tuples
    grey: float         # the flat level that the texture is blended towards ...
    strength: float     # ... by 1 - strength (the config's background_strength; 1 for occluders)
    freq: float         # cycles per image side
    angle: float
    phase: float
    extra: tuple        # family-specific numbers (second frequency, warp, centre, ...)


@dataclass(frozen=True)
class Illumination:
    gain: float
    cast: tuple         # per-channel multipliers
    shadow_angle: float
    shadow_depth: float
    strength: float     # the config's illumination


@dataclass(frozen=True)
class Occluder:
    kind: str           # "bar" or "blob"
    x: float            # centre, in the object's frame (rotation excluded), in object radii
    y: float
    half_w: float
    half_h: float
    angle: float
    texture: Background


@dataclass(frozen=True)
class Sticker:
    glyph: int
    u: float            # centre relative to the body part, in body half-sizes
    v: float
    size: float         # half-size in object radii
    angle: float
    colours: tuple      # two RGB tuples


@dataclass(frozen=True)
class Nuisance:
    background: Background
    illumination: Illumination
    occluders: tuple    # of Occluder, empty when not occluded
    sticker: Sticker | None


# ---------------------------------------------------------------- random streams

def image_rngs(seed, split, *key):
    """Independent generators for one image: instance, background, illumination, occlusion,
    pattern, and one for counterfactual redraws; keyed by the world seed, the split and e.g.
    (class, index)."""
    seq = np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS[split], *key))
    return [np.random.default_rng(s) for s in seq.spawn(6)]


def _r(x):
    # Sampled parameters are rounded, so a last-bit difference between maths libraries cannot reach them.
    return round(float(x), 6)


def _hsv_to_rgb(h, s, v):
    h = (h % 1.0) * 6
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _rgb_to_hsv(rgb):
    r, g, b = (float(c) for c in rgb)
    mx, mn = max(r, g, b), min(r, g, b)
    if mx == mn:
        return 0.0, 0.0, mx
    d = mx - mn
    h = ((g - b) / d) % 6 if mx == r else (b - r) / d + 2 if mx == g else (r - g) / d + 4
    return h / 6, d / mx, mx


def _random_colour(rng, sat=(0.35, 1.0), val=(0.3, 1.0), hue=None):
    h = rng.random() if hue is None else hue
    return tuple(_r(c) for c in _hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)))


# ---------------------------------------------------------------- classes

def _outline_radius(half_w, half_h, direction):
    return 1.0 / math.hypot(math.cos(direction) / half_w, math.sin(direction) / half_h)


def make_class(seed, class_id, unseen=False):
    """The fixed kind of object `class_id` (unseen classes come from their own stream)."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(100 + unseen, class_id)))
    n_parts = int(rng.choice([2, 3, 4], p=[0.4, 0.45, 0.15]))
    body_w, body_h = rng.uniform(0.45, 0.8), rng.uniform(0.35, 0.75)
    parts = [Part(SHAPES[rng.integers(len(SHAPES))], 0.0, 0.0, body_w, body_h,
                  float(rng.choice([0.0, 0.0, math.pi / 4])), int(rng.integers(len(PALETTE))))]
    directions = rng.uniform(0, 2 * math.pi) + np.sort(rng.uniform(0, 2 * math.pi, n_parts - 1))
    for direction in directions:
        half_w, half_h = rng.uniform(0.28, 0.5), rng.uniform(0.2, 0.4)
        # On the body's outline, pushed out by at most about half its own size, so parts touch.
        reach = _outline_radius(body_w, body_h, direction) * rng.uniform(0.7, 0.95) + rng.uniform(0, 0.5) * half_w
        parts.append(Part(SHAPES[rng.integers(len(SHAPES))], reach * math.cos(direction),
                          reach * math.sin(direction), half_w, half_h,
                          direction + rng.uniform(-0.4, 0.4), int(rng.integers(len(PALETTE)))))
    # Centre the layout and scale it into the unit disc (bounding circles of the parts).
    xs = [p.x for p in parts]
    ys = [p.y for p in parts]
    mx, my = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    scale = 1.0 / max(math.hypot(p.x - mx, p.y - my) + max(p.half_w, p.half_h) for p in parts)
    parts = tuple(Part(p.shape, _r((p.x - mx) * scale), _r((p.y - my) * scale), _r(p.half_w * scale),
                       _r(p.half_h * scale), _r(p.angle), p.colour) for p in parts)
    name = f"u{class_id:03d}" if unseen else f"c{class_id:03d}"
    return ClassSpec(name, parts, int(rng.integers(len(BACKGROUND_FAMILIES))), _r(rng.random()))


def make_classes(cfg):
    """(seen classes, unseen classes) of a world."""
    return ([make_class(cfg.seed, c) for c in range(cfg.num_classes)],
            [make_class(cfg.seed, u, unseen=True) for u in range(cfg.unseen_classes)])


# ---------------------------------------------------------------- sampling

def sample_instance(spec, label, rng, colour_consistency):
    """A new object of kind `spec`: proportions, pose, scale, position and part colours (each part
    keeps its class colour with probability `colour_consistency`)."""
    parts = []
    for p in spec.parts:
        colour = p.colour if rng.random() < colour_consistency else int(rng.integers(len(PALETTE)))
        h, s, v = _rgb_to_hsv(PALETTE[colour])
        rgb = _hsv_to_rgb(h + rng.normal(0, 0.02), np.clip(s * rng.uniform(0.8, 1.1), 0, 1),
                          np.clip(v * rng.uniform(0.75, 1.05), 0, 1))
        parts.append(Part(p.shape, _r(p.x + rng.normal(0, 0.04)), _r(p.y + rng.normal(0, 0.04)),
                          _r(p.half_w * rng.uniform(0.8, 1.2)), _r(p.half_h * rng.uniform(0.8, 1.2)),
                          _r(p.angle + rng.normal(0, 0.1)), colour, tuple(_r(c) for c in rgb)))
    radius = rng.uniform(0.36, 0.46)
    margin = radius * 0.85
    return Instance(label, tuple(parts), _r(rng.uniform(margin, 1 - margin)), _r(rng.uniform(margin, 1 - margin)),
                    _r(radius), _r(rng.uniform(-0.5, 0.5)), bool(rng.random() < 0.5), _r(rng.uniform(0.85, 1.15)))


def sample_background(rng, strength, family=None, hue=None):
    """A background texture; `family` and `hue` fix those two, everything else is random."""
    family = int(rng.integers(len(BACKGROUND_FAMILIES))) if family is None else family
    hue = rng.random() if hue is None else hue + rng.normal(0, 0.03)
    first = _random_colour(rng, hue=hue)
    second = _random_colour(rng, hue=hue + rng.uniform(0.15, 0.85))
    return Background(family, (first, second), _r(rng.uniform(0.3, 0.7)), strength, _r(rng.uniform(2.5, 6.0)),
                      _r(rng.uniform(0, math.pi)), _r(rng.random()), tuple(_r(x) for x in rng.random(8)))


def sample_illumination(rng, strength):
    return Illumination(_r(rng.uniform(-1, 1)), tuple(_r(x) for x in rng.normal(0, 1, 3)),
                        _r(rng.uniform(0, 2 * math.pi)), _r(rng.random()), strength)


def sample_occluders(rng):
    occluders = []
    for _ in range(1 + int(rng.random() < 0.35)):
        kind = "bar" if rng.random() < 0.5 else "blob"
        direction, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.9)
        if kind == "bar":
            half_w, half_h = rng.uniform(1.5, 2.5), rng.uniform(0.12, 0.22)
        else:
            half_w, half_h = rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.5)
        occluders.append(Occluder(kind, _r(dist * math.cos(direction)), _r(dist * math.sin(direction)),
                                  _r(half_w), _r(half_h), _r(rng.uniform(0, math.pi)), sample_background(rng, 1.0)))
    return tuple(occluders)


def sample_sticker(rng):
    return Sticker(int(rng.integers(len(GLYPHS))), _r(rng.uniform(-0.35, 0.35)), _r(rng.uniform(-0.35, 0.35)),
                   _r(rng.uniform(0.18, 0.28)), _r(rng.uniform(0, 2 * math.pi)),
                   (_random_colour(rng, sat=(0.7, 1.0), val=(0.7, 1.0)), _random_colour(rng, val=(0.05, 0.4))))


def sample_nuisance(cfg, spec, rngs, class_background_prob=None):
    """All nuisances of one image from its four streams (background, illumination, occlusion,
    pattern). With probability `class_background_prob` (default cfg.bg_class_corr) the background
    takes the class's family and hue."""
    bg_rng, ill_rng, occ_rng, pat_rng = rngs
    rho = cfg.bg_class_corr if class_background_prob is None else class_background_prob
    from_class = bg_rng.random() < rho
    fixed = (spec.bg_family, spec.bg_hue) if from_class else ()
    background = sample_background(bg_rng, cfg.background_strength, *fixed)
    occluders = sample_occluders(occ_rng) if occ_rng.random() < cfg.occlusion_prob else ()
    sticker = sample_sticker(pat_rng) if pat_rng.random() < cfg.sticker_prob else None
    return Nuisance(background, sample_illumination(ill_rng, cfg.illumination), occluders, sticker)


# ---------------------------------------------------------------- rendering

_GRIDS = {}


def _grid(size):
    """Sample positions of the supersampled grid, in image sides."""
    if size not in _GRIDS:
        n = size * SUPERSAMPLE
        c = (np.arange(n) + 0.5) / n
        _GRIDS[size] = np.meshgrid(c, c)  # x varies along columns
    return _GRIDS[size]


def _wave(t):
    """Smooth periodic profile in [0, 1] with period 1, sharpened towards a square wave."""
    return np.clip(0.5 + 1.6 * np.sin(2 * np.pi * t), 0, 1)


def _texture(bg, x, y):
    """Texture value in [0, 1] of background `bg` at positions x, y."""
    ca, sa = math.cos(bg.angle), math.sin(bg.angle)
    u = (x * ca + y * sa) * bg.freq + bg.phase
    v = (-x * sa + y * ca) * bg.freq
    e = bg.extra
    name = BACKGROUND_FAMILIES[bg.family]
    if name == "stripes":
        return _wave(u)
    if name == "checker":
        return (np.sign(np.sin(2 * np.pi * u)) * np.sign(np.sin(2 * np.pi * (v + e[0]))) + 1) / 2
    if name == "dots":
        fu, fv = u % 1 - 0.5, (v + e[0]) % 1 - 0.5
        return (fu * fu + fv * fv < (0.18 + 0.12 * e[1]) ** 2).astype(float)
    if name == "waves":
        return _wave(u + (0.3 + 0.4 * e[0]) * np.sin(2 * np.pi * (v * (0.5 + 0.5 * e[1]) + e[2])))
    if name == "plaid":
        return np.maximum(_wave(u) * (0.5 + 0.5 * e[0]), _wave(v * (0.6 + 0.8 * e[1]) + e[2]))
    if name == "blobs":
        field = sum(np.sin(2 * np.pi * (bg.freq * 0.5 * (x * math.cos(a) + y * math.sin(a)) + p))
                    for a, p in zip(np.pi * np.array(e[:4]) * 2, e[4:8]))
        return np.clip(0.5 + 1.5 * field, 0, 1)
    if name == "rings":
        r = np.hypot(x - e[0], y - e[1])
        return _wave(r * bg.freq + bg.phase)
    if name == "zigzag":
        return _wave(u + (0.5 + 0.5 * e[0]) * np.abs((v * 1.5 + e[1]) % 1 * 2 - 1))
    raise ValueError(name)


def _paint_background(bg, x, y):
    t = _texture(bg, x, y)[..., None]
    a, b = np.array(bg.colours[0]), np.array(bg.colours[1])
    return bg.grey + bg.strength * (a + (b - a) * t - bg.grey)


def _shape_mask(shape, X, Y):
    """Inside test of a unit-half-size shape in its own normalised coordinates."""
    if shape == "ellipse":
        return X * X + Y * Y <= 1
    if shape == "rectangle":
        return (np.abs(X) <= 1) & (np.abs(Y) <= 1)
    if shape == "triangle":
        return (Y <= 1) & (np.abs(X) <= (Y + 1) / 2)
    if shape == "ring":
        r2 = X * X + Y * Y
        return (r2 <= 1) & (r2 >= 0.36)
    if shape == "diamond":
        return np.abs(X) + np.abs(Y) <= 1
    if shape == "half_disc":
        return (X * X + (Y + 0.5) ** 2 <= 2.25) & (Y >= -0.5) & (Y <= 1)
    if shape == "cross":
        return ((np.abs(X) <= 0.35) & (np.abs(Y) <= 1)) | ((np.abs(Y) <= 0.35) & (np.abs(X) <= 1))
    if shape == "trapezoid":
        return (np.abs(Y) <= 1) & (np.abs(X) <= 0.6 + 0.4 * Y)
    if shape == "hexagon":
        return (np.abs(Y) <= 0.87) & (0.87 * np.abs(X) + 0.5 * np.abs(Y) <= 0.87)
    if shape == "crescent":
        return (X * X + Y * Y <= 1) & ((X - 0.5) ** 2 + Y * Y > 0.64)
    raise ValueError(shape)


def _local(x, y, cx, cy, angle, sx, sy):
    """Coordinates of positions x, y in a frame centred at (cx, cy), rotated by `angle`, scaled."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    return (dx * c + dy * s) / sx, (-dx * s + dy * c) / sy


def _object_frame(inst, x, y):
    ox, oy = _local(x, y, inst.cx, inst.cy, inst.angle, inst.radius * inst.aspect ** 0.5,
                    inst.radius / inst.aspect ** 0.5)
    return (-ox if inst.mirror else ox), oy


def _downsample(a):
    n = a.shape[0] // SUPERSAMPLE
    return a.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, *a.shape[2:]).mean(axis=(1, 3))


def render_layers(inst, nuis, size):
    """Float image in [0, 1] (H x W x 3) and coverage maps (H x W, in [0, 1]) of the whole object
    and of the occluders, and the box (xmin, ymin, xmax, ymax), 0-based, max exclusive."""
    x, y = _grid(size)
    img = _paint_background(nuis.background, x, y)
    ox, oy = _object_frame(inst, x, y)
    obj = np.zeros(x.shape, bool)
    for p in inst.parts:
        px, py = _local(ox, oy, p.x, p.y, p.angle, p.half_w, p.half_h)
        inside = _shape_mask(p.shape, px, py)
        img[inside] = p.rgb
        obj |= inside
    if nuis.sticker is not None:
        st, body = nuis.sticker, inst.parts[0]
        sx, sy = _local(ox, oy, body.x + st.u * body.half_w, body.y + st.v * body.half_h, st.angle, st.size, st.size)
        glyph, detail = _glyph(GLYPHS[st.glyph], sx, sy)
        img[glyph & obj] = st.colours[0]
        img[detail & obj] = st.colours[1]
    occ = np.zeros(x.shape, bool)
    if nuis.occluders:
        # Occluders sit in the object's frame without its rotation, so they follow position and scale only.
        fx, fy = (x - inst.cx) / inst.radius, (y - inst.cy) / inst.radius
        for o in nuis.occluders:
            X, Y = _local(fx, fy, o.x, o.y, o.angle, o.half_w, o.half_h)
            inside = X * X + Y * Y <= 1 if o.kind == "blob" else (np.abs(X) <= 1) & (np.abs(Y) <= 1)
            img[inside] = _paint_background(o.texture, x, y)[inside]
            occ |= inside
    img = img * _illumination_field(nuis.illumination, x, y)
    obj_cover = _downsample(obj.astype(float))
    rows, cols = np.nonzero(obj_cover > 0)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)  # the centre is always inside
    return np.clip(_downsample(img), 0, 1), obj_cover, _downsample(occ.astype(float)), box


def _glyph(name, X, Y):
    """(main mask, detail mask) of a sticker glyph with unit half-size."""
    r2 = X * X + Y * Y
    ax, ay = np.abs(X), np.abs(Y)
    if name == "disc":
        return r2 <= 1, r2 <= 0.2
    if name == "square":
        return (ax <= 1) & (ay <= 1), (ax <= 0.4) & (ay <= 0.4)
    if name == "cross":
        return ((ax <= 0.35) & (ay <= 1)) | ((ay <= 0.35) & (ax <= 1)), np.zeros_like(r2, bool)
    if name == "star":
        return ((ax <= 0.75) & (ay <= 0.75)) | (ax + ay <= 1.05), r2 <= 0.15
    if name == "ring":
        return (r2 <= 1) & (r2 >= 0.4), np.zeros_like(r2, bool)
    if name == "bars":
        return (ax <= 1) & (ay <= 1), (ax <= 1) & (ay <= 1) & ((Y + 1) % 0.67 < 0.33)
    if name == "triangle":
        return (Y <= 0.8) & (ax <= (Y + 1) / 1.8), np.zeros_like(r2, bool)
    if name == "diamond":
        return ax + ay <= 1, ax + ay <= 0.4
    raise ValueError(name)


def _illumination_field(ill, x, y):
    """Multiplicative light: gain, colour cast, and a linear shadow ramp across the image."""
    strength = ill.strength
    gain = math.exp(0.45 * strength * ill.gain)
    cast = np.exp(0.12 * strength * np.array(ill.cast))
    ramp = np.clip((x - 0.5) * math.cos(ill.shadow_angle) + (y - 0.5) * math.sin(ill.shadow_angle) + 0.5, 0, 1)
    shade = 1 - 0.7 * strength * ill.shadow_depth * ramp
    return gain * cast * shade[..., None]


def render(inst, nuis, size):
    """(uint8 H x W x 3 image, box) of one instance under one set of nuisances; box as in render_layers."""
    img, _, _, box = render_layers(inst, nuis, size)
    return _to_uint8(img), box


def _to_uint8(img):
    return np.floor(img * 255 + 0.5).astype(np.uint8)


def make_image(cfg, spec, split, class_id, index, class_background_prob=None):
    """(image, box, instance, nuisance) of image `index` of class `class_id` in `split`."""
    inst_rng, *nuisance_rngs, _ = image_rngs(cfg.seed, split, class_id, index)
    inst = sample_instance(spec, class_id, inst_rng, cfg.colour_consistency)
    nuis = sample_nuisance(cfg, spec, nuisance_rngs, class_background_prob)
    img, box = render(inst, nuis, cfg.img_size)
    return img, box, inst, nuis


# ---------------------------------------------------------------- counterfactuals

def counterfactuals(cfg, factor, n, seed=0, unseen=False):
    """n new instances of the world's classes (seen ones, or unseen ones with unseen=True; instance
    i is of class i % number of classes), each rendered twice with exactly one nuisance factor
    redrawn. `seed` picks another set of instances; all are apart from the world's splits.

    factor: one of FACTORS. For "occlusion" and "pattern" both images have the factor present
    (drawn independently), so the pair always differs in it; for "background" and "illumination"
    the other nuisances follow the config's probabilities. Backgrounds are class-independent.
    Returns {"base": uint8 n x H x W x 3, "changed": uint8 n x H x W x 3, "label": int64 n,
    "boxes": int64 n x 4 (as in render_layers), "object": float n x H x W (the object's coverage,
    the same in both images), "base_occluder" and "changed_occluder": float n x H x W (occluder
    coverage in each image)}.
    """
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    seen, unseen_specs = make_classes(cfg)
    specs = unseen_specs if unseen else seen
    forced = cfg
    if factor == "occlusion":
        forced = dataclasses.replace(cfg, occlusion_prob=1.0)
    if factor == "pattern":
        forced = dataclasses.replace(cfg, sticker_prob=1.0)
    out = {k: [] for k in ("base", "changed", "label", "boxes", "object", "base_occluder", "changed_occluder")}
    for i in range(n):
        label = i % len(specs)
        inst_rng, *rngs, redraw = image_rngs(cfg.seed, "counterfactual", seed, int(unseen), i)
        inst = sample_instance(specs[label], label, inst_rng, cfg.colour_consistency)
        nuis = sample_nuisance(forced, specs[label], rngs, 0.0)
        if factor == "background":
            other = dataclasses.replace(nuis, background=sample_background(redraw, cfg.background_strength))
        elif factor == "illumination":
            other = dataclasses.replace(nuis, illumination=sample_illumination(redraw, cfg.illumination))
        elif factor == "occlusion":
            other = dataclasses.replace(nuis, occluders=sample_occluders(redraw))
        else:
            other = dataclasses.replace(nuis, sticker=sample_sticker(redraw))
        img, obj, occ, box = render_layers(inst, nuis, cfg.img_size)
        other_img, _, other_occ, _ = render_layers(inst, other, cfg.img_size)
        for k, v in zip(out, (_to_uint8(img), _to_uint8(other_img), label, box, obj, occ, other_occ)):
            out[k].append(v)
    return {k: np.array(v, dtype=np.int64) if k in ("label", "boxes") else np.stack(v) for k, v in out.items()}


# ---------------------------------------------------------------- the world on disk

def default_cache_dir():
    return Path(os.environ.get("SEMPAIRS_CACHE") or Path.home() / ".cache" / "semantic-pairs")


def ensure_world(cfg=WorldConfig(), cache_dir=None):
    """Root folder of the world `cfg`, generated on first use (in a temporary folder, then renamed
    into place, so a root that exists is complete)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / cfg.name()
    if (root / "world.json").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name()}-", dir=cache))
    try:
        write_world(cfg, tmp)
        os.rename(tmp, root)
    except OSError:
        if not (root / "world.json").exists():  # not a concurrent writer that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_world(cfg, root):
    """Render every image of world `cfg` into the empty folder `root`."""
    from PIL import Image

    root = Path(root)
    seen, unseen = make_classes(cfg)
    boxes, nuisances = [], []

    def save(rel, spec, split, class_id, index, class_background_prob=None):
        img, box, _, nuis = make_image(cfg, spec, split, class_id, index, class_background_prob)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        boxes.append((rel, *box))
        nuisances.append((rel, nuis.background.family, int(bool(nuis.occluders)), int(nuis.sticker is not None)))

    pairs = []
    for c, spec in enumerate(seen):
        for i in range(cfg.pairs_per_class):
            a, b = f"{spec.name}/{2 * i:06d}.png", f"{spec.name}/{2 * i + 1:06d}.png"
            save(f"train/{a}", spec, "train", c, 2 * i)
            save(f"train/{b}", spec, "train", c, 2 * i + 1)
            pairs.append((spec.name, a, b))
    counts = {"train_images": 2 * len(pairs), "pairs": len(pairs)}
    for group, specs in (("seen", seen), ("unseen", unseen)):
        for part, per_class in (("train", cfg.transfer_train_per_class), ("test", cfg.transfer_test_per_class)):
            for c, spec in enumerate(specs):
                for i in range(per_class):
                    save(f"transfer/{group}/{part}/{spec.name}/{i:06d}.png", spec, f"{group}_{part}", c, i, 0.0)
            counts[f"transfer_{group}_{part}"] = per_class * len(specs)
    _write_csv(root / "pairs.csv", ("class", "image_a", "image_b"), pairs)
    _write_csv(root / "boxes.csv", ("path", "xmin", "ymin", "xmax", "ymax"), boxes)
    _write_csv(root / "nuisances.csv", ("path", "bg_family", "occluded", "sticker"), nuisances)
    meta = {
        "version": WORLD_VERSION,
        "config": dataclasses.asdict(cfg),
        "counts": counts,
        "classes": [s.name for s in seen],
        "unseen_classes": [s.name for s in unseen],
        "background_families": list(BACKGROUND_FAMILIES),
        "boxes": "0-based pixels, xmin/ymin inclusive, xmax/ymax exclusive; the whole object before occlusion",
    }
    (root / "world.json").write_text(json.dumps(meta, indent=1))  # last: marks the world complete


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- preview and command line

def preview(cfg, path, num_classes=8, scale=3):
    """A PNG grid: a row per class with a semantic pair, then per factor a base image and its
    counterfactual."""
    from PIL import Image

    seen, _ = make_classes(cfg)
    k = min(num_classes, len(seen))
    cfs = {f: counterfactuals(cfg, f, k) for f in FACTORS}
    s, gap = cfg.img_size, cfg.img_size // 4
    columns = 2 + 2 * len(FACTORS)
    grid = np.full((k * (s + gap), columns * s + len(FACTORS) * gap + gap, 3), 255, np.uint8)
    for row in range(k):
        tiles = [make_image(cfg, seen[row], "train", row, j)[0] for j in (0, 1)]
        for f in FACTORS:
            tiles += [cfs[f]["base"][row], cfs[f]["changed"][row]]
        for col, tile in enumerate(tiles):
            x = col * s + (col // 2) * gap
            grid[row * (s + gap):row * (s + gap) + s, x:x + s] = tile
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def _folder_size(root):
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate (or find) the embedded nuisance world and summarise it.")
    parser.add_argument("--out", type=Path, default=None,
                        help="cache folder that holds world-v*-<hash>/ "
                             "(default: $SEMPAIRS_CACHE, else ~/.cache/semantic-pairs)")
    parser.add_argument("--preview", type=Path, default=None,
                        help="write a PNG grid: per class a semantic pair, then base/counterfactual per factor "
                             + "/".join(FACTORS))
    for field in dataclasses.fields(WorldConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    cfg = WorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)})
    start = time.time()
    existed = ((args.out or default_cache_dir()) / cfg.name() / "world.json").exists()
    root = ensure_world(cfg, args.out)
    meta = json.loads((root / "world.json").read_text())
    print(f"world {root} ({'found in cache' if existed else f'generated in {time.time() - start:.1f} s'}, "
          f"{_folder_size(root) / 2 ** 20:.1f} MiB)")
    print("  " + ", ".join(f"{k}={v}" for k, v in meta["counts"].items()))
    print("  " + ", ".join(f"{k}={v}" for k, v in meta["config"].items()))
    if args.preview:
        preview(cfg, args.preview)
        print(f"preview {args.preview}")


if __name__ == "__main__":
    sys.exit(main())
