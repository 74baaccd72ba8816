"""Synthetic identities: procedurally drawn faces whose identity lives in fine details.

The CPU demo's and the tests' data. Each identity has coarse traits (skin tone, face shape, hair)
and fine ones that a 4-8x degradation wipes out but a clean reference shows: iris colour, a mole
(position and size), eyebrow shape (arch, slant, thickness), lip colour and, for some identities,
a freckle pattern. Each image (a "view") of an identity varies pose (yaw, roll, scale, shift),
expression (smile, open mouth, eye openness, raised brows, gaze), lighting (direction, strength,
brightness, colour cast) and background, so a reference is never a copy of the target. Views are aligned
crops by default, as FFHQ's are (a similarity transform puts the eyes and mouth in fixed places): no roll,
one scale, the eyes' and mouth's centre fixed while the yaw turns the head around it; `aligned=False` adds
free roll, scale and shift.

Everything is a pure function of (seed, identity, view): traits come from
`numpy.random.default_rng([seed, identity])`, views from `default_rng([seed, identity, view])`.
Faces are drawn with OpenCV primitives on a canvas of at least 256 px and area-downsampled, so they
render cleanly at any resolution (64 px for the demo, 512 for the real configuration). One 64 px
image takes about a millisecond (`python -m iconface_jax.data.synthetic` measures it).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import cv2
import numpy as np

from iconface_jax.data.sources import Record

_SHIFT = 4  # fixed-point bits for OpenCV coordinates: sub-pixel placement on the canvas
_MIN_CANVAS = 256
EYE_U, EYE_V, MOUTH_V = 0.38, -0.13, 0.58  # face coordinates of the eye centres (+-EYE_U) and the mouth line

SKIN = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 94), (160, 102, 66), (110, 70, 45))
HAIR = ((25, 20, 18), (70, 45, 30), (120, 80, 45), (150, 60, 30), (215, 180, 110), (170, 170, 170))
IRIS = ((50, 110, 220), (55, 150, 70), (100, 55, 25), (125, 135, 150), (205, 140, 30), (135, 70, 185))
LIPS = ((200, 90, 90), (170, 70, 80), (215, 120, 110), (150, 60, 60), (190, 100, 130))


@dataclasses.dataclass(frozen=True)
class Traits:
    """What makes an identity: constant over all its images."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int  # 0 short, 1 long, 2 receding, 3 fringe
    face_width: float  # half-width / half-height of the face ellipse
    iris: tuple[int, int, int]
    mole_uv: tuple[float, float]  # face coordinates, (-1..1, -1..1)
    mole_radius: float  # fraction of the face half-height
    brow_arch: float
    brow_slant: float  # how much higher the outer ends sit than the inner ones
    brow_thickness: float
    lips: tuple[int, int, int]
    nose_width: float
    freckles: tuple[tuple[float, float], ...]  # face coordinates; empty for most identities


@dataclasses.dataclass(frozen=True)
class View:
    """What changes between images of one identity."""

    yaw: float  # -1..1, turns the features sideways
    roll: float  # radians
    scale: float
    shift: tuple[float, float]  # fraction of the image
    smile: float  # -0.3 (frown) .. 1
    mouth_open: float  # 0..1
    eye_open: float  # 0.45..1
    brow_raise: float
    gaze: tuple[float, float]
    light_angle: float
    light_strength: float
    brightness: float
    tint: tuple[float, float, float]
    background: tuple[int, int, int]


def _jitter(colour: tuple[int, ...], rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    c = np.clip(np.asarray(colour, np.float64) + rng.normal(0, amount, 3), 0, 255)
    return tuple(int(v) for v in c)


def identity_traits(seed: int, identity: int) -> Traits:
    """The traits of one identity, a pure function of (seed, identity)."""
    rng = np.random.default_rng([seed, identity])
    side = rng.choice([-1.0, 1.0])
    # Moles sit where they read as identity marks: cheek, chin, forehead or above the lip.
    spot = [(0.45 * side, 0.25), (0.25 * side, 0.78), (0.3 * side, -0.55), (0.3 * side, 0.45)][rng.integers(4)]
    mole = (spot[0] + rng.uniform(-0.08, 0.08), spot[1] + rng.uniform(-0.06, 0.06))
    freckles = ()
    if rng.random() < 0.35:
        n = int(rng.integers(5, 11))
        freckles = tuple((float(side * rng.uniform(0.15, 0.6) * rng.choice([-1, 1])), float(rng.uniform(0.05, 0.35)))
                         for _ in range(n))
    return Traits(
        skin=_jitter(SKIN[rng.integers(len(SKIN))], rng, 6),
        hair=_jitter(HAIR[rng.integers(len(HAIR))], rng, 8),
        hair_style=int(rng.integers(4)),
        face_width=float(rng.uniform(0.72, 0.86)),
        iris=_jitter(IRIS[rng.integers(len(IRIS))], rng, 10),
        mole_uv=(float(mole[0]), float(mole[1])),
        mole_radius=float(rng.uniform(0.022, 0.04)),
        brow_arch=float(rng.uniform(-0.03, 0.1)),
        brow_slant=float(rng.uniform(-0.06, 0.06)),
        brow_thickness=float(rng.uniform(0.018, 0.045)),
        lips=_jitter(LIPS[rng.integers(len(LIPS))], rng, 8),
        nose_width=float(rng.uniform(0.1, 0.2)),
        freckles=freckles,
    )


def view_params(seed: int, identity: int, view: int, aligned: bool = True) -> View:
    """Pose, expression, lighting and background of one image, a pure function of its ids; `aligned`: an
    aligned crop (no roll, scale 1, the eyes' and mouth's centre fixed), the other parameters unchanged."""
    rng = np.random.default_rng([seed, identity, view])
    v = View(
        yaw=float(rng.uniform(-0.6, 0.6)),
        roll=float(rng.uniform(-0.2, 0.2)),
        scale=float(rng.uniform(0.92, 1.06)),
        shift=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
        smile=float(rng.uniform(-0.3, 1.0)),
        mouth_open=float(max(0.0, rng.uniform(-0.5, 1.0))),
        eye_open=float(rng.uniform(0.45, 1.0)),
        brow_raise=float(rng.uniform(-0.02, 0.05)),
        gaze=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.2, 0.2))),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.45)),
        brightness=float(rng.uniform(0.8, 1.12)),
        tint=tuple(float(v) for v in rng.uniform(0.92, 1.08, 3)),
        background=tuple(int(v) for v in rng.integers(40, 220, 3)),
    )
    if not aligned:
        return v
    # The yaw moves the eyes and mouth sideways with the face's front; an aligning crop moves them back.
    v = dataclasses.replace(v, roll=0.0, scale=1.0, shift=(0.0, 0.0))
    unshifted = _Canvas(1, identity_traits(seed, identity), v)  # size 1: positions are fractions of the image
    x = np.mean([unshifted.xy(u, y)[0] for u, y in ((-EYE_U, EYE_V), (EYE_U, EYE_V), (0.0, MOUTH_V))])
    return dataclasses.replace(v, shift=(float(0.5 - x), 0.0))


class _Canvas:
    """Maps face coordinates (u right, v down, both -1..1 over the face ellipse) to canvas pixels."""

    def __init__(self, size: int, traits: Traits, view: View):
        self.img = np.empty((size, size, 3), np.uint8)
        self.traits = np.zeros((size, size), np.uint8)  # 255 where an identity's fine trait is drawn
        self.size = size
        self.b = 0.36 * size * view.scale  # face half-height in pixels
        self.a = self.b * traits.face_width * (1.0 - 0.12 * abs(view.yaw))
        self.cx = size * (0.5 + view.shift[0])
        self.cy = size * (0.53 + view.shift[1])
        self.cos, self.sin = math.cos(view.roll), math.sin(view.roll)
        self.roll_degrees = math.degrees(view.roll)
        self.yaw = view.yaw
        self.origin = (0, 0)  # top-left of `img` on the canvas, when drawing into a crop

    def xy(self, u: float, v: float, depth: float = 1.0) -> tuple[float, float]:
        """Canvas position; `depth` (0 at the face outline, 1 at its front) scales the yaw shift."""
        u = u + 0.28 * self.yaw * depth * math.sqrt(max(0.0, 1.0 - min(1.0, u * u)))
        x, y = u * self.a, v * self.b
        return self.cx + self.cos * x - self.sin * y, self.cy + self.sin * x + self.cos * y

    def pt(self, u: float, v: float, depth: float = 1.0) -> tuple[int, int]:
        """`xy` in OpenCV's fixed point, relative to `origin`."""
        x, y = self.xy(u, v, depth)
        return int(round((x - self.origin[0]) * (1 << _SHIFT))), int(round((y - self.origin[1]) * (1 << _SHIFT)))

    def radius(self, r: float) -> int:
        """A length given as a fraction of the face half-height, in fixed point."""
        return max(1, int(round(r * self.b * (1 << _SHIFT))))

    def ellipse(self, u: float, v: float, ru: float, rv: float, angle: float, colour, thickness: int = -1,
                start: float = 0, end: float = 360, depth: float = 1.0, trait: bool = False) -> None:
        """An ellipse at (u, v) with radii in face half-heights, turned with the head; `trait` marks its
        area in the trait mask (`colour` None: marks only)."""
        for img, c in ((self.img, colour), (self.traits if trait else None, 255)):
            if img is not None and c is not None:
                cv2.ellipse(img, self.pt(u, v, depth), (self.radius(ru), self.radius(rv)),
                            self.roll_degrees + angle, start, end, c, thickness, cv2.LINE_AA, _SHIFT)

    def poly(self, pts: list[tuple[float, float]], colour, thickness: float, closed: bool = False,
             fill: bool = False, trait: bool = False) -> None:
        """A polyline (thickness in face half-heights) or a filled polygon through face points; `trait`
        marks it in the trait mask."""
        arr = np.asarray([self.pt(u, v) for u, v in pts], np.int32)[None]
        for img, c in ((self.img, colour), (self.traits if trait else None, 255)):
            if img is None:
                continue
            if fill:
                cv2.fillPoly(img, arr, c, cv2.LINE_AA, _SHIFT)
            else:
                px = max(1, int(round(thickness * self.b)))
                cv2.polylines(img, arr, closed, c, px, cv2.LINE_AA, _SHIFT)


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def render(traits: Traits, view: View, resolution: int, with_traits: bool = False):
    """Draw one face as (resolution, resolution, 3) uint8 RGB; with `with_traits`, also its trait mask: a
    (resolution, resolution) bool array, True where the identity's fine traits (irises, brows, mole, lips,
    freckles) cover any part of a pixel."""
    ss = max(1, math.ceil(_MIN_CANVAS / resolution))
    c = _Canvas(resolution * ss, traits, view)
    bg = np.asarray(view.background, np.float32)
    ramp = np.linspace(1.1, 0.85, c.size, dtype=np.float32)[:, None, None]
    c.img[:] = np.clip(bg * ramp, 0, 255).astype(np.uint8)

    skin, hair = traits.skin, traits.hair
    a_ratio = c.a / c.b
    if traits.hair_style == 1:  # long hair falls behind the head
        c.ellipse(0.0, 0.25, 1.28 * a_ratio, 1.3, 0, hair, depth=0)
    c.ellipse(0.0, 1.25, 0.42 * a_ratio, 0.5, 0, _shade(skin, 0.85), depth=0.3)  # neck
    for side in (-1, 1):  # ears
        c.ellipse(side * 0.98, 0.05, 0.13, 0.22, 0, _shade(skin, 0.93), depth=0)
    c.ellipse(0.0, 0.0, a_ratio, 1.0, 0, skin, depth=0)  # face
    _hair(c, traits, a_ratio)

    # Eyebrows: the identity's arch, slant and thickness; the view raises them.
    for side in (-1, 1):
        pts = []
        for t in np.linspace(-1, 1, 9):  # inner (-1) to outer (+1) end
            v = -0.33 - view.brow_raise - traits.brow_arch * (1 - t * t) - traits.brow_slant * t
            pts.append((side * (EYE_U + 0.2 * t), v))
        c.poly(pts, _shade(hair, 0.8), traits.brow_thickness, trait=True)

    # Eyes: white, iris of the identity's colour, pupil and highlight, clipped to the eye opening.
    for side in (-1, 1):
        _eye(c, traits, view, side * EYE_U, EYE_V)

    # Nose.
    nw = traits.nose_width
    c.poly([(0.0, -0.05), (-0.02, 0.22), (-nw, 0.3), (0.0, 0.34), (nw, 0.3)], _shade(skin, 0.7), 0.018)

    # Mouth: smile curvature and opening from the view, lip colour from the identity.
    curve = 0.1 * view.smile  # positive: the middle sits lower than the corners
    top = [(t * 0.3, MOUTH_V + curve * (1 - t * t)) for t in np.linspace(-1, 1, 11)]
    if view.mouth_open > 0.05:
        bottom = [(t * 0.3, MOUTH_V + (curve + 0.12 * view.mouth_open) * (1 - t * t))
                  for t in np.linspace(1, -1, 11)]
        c.poly(top + bottom, (70, 20, 25), 0, fill=True)
        c.poly(top + bottom, traits.lips, 0.035, closed=True, trait=True)
    else:
        c.poly(top, traits.lips, 0.05, trait=True)

    # Mole and freckles: the finest identity marks.
    c.ellipse(*traits.mole_uv, traits.mole_radius, traits.mole_radius, 0, (55, 35, 30), trait=True)
    for fu, fv in traits.freckles:
        c.ellipse(fu, fv, 0.012, 0.012, 0, _shade(skin, 0.68), trait=True)

    img, mask = c.img, c.traits
    if ss > 1:
        img = cv2.resize(img, (resolution, resolution), interpolation=cv2.INTER_AREA)
        # In float: a uint8 average rounds a faint anti-aliased edge to 0 where the image still shows it.
        mask = cv2.resize(mask.astype(np.float32), (resolution, resolution), interpolation=cv2.INTER_AREA)
    # Lighting (smooth, so applied after downsampling): a linear ramp in the light's direction, a
    # brightness and a colour cast.
    ax = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    ramp = 1.0 + 2.0 * view.light_strength * (math.cos(view.light_angle) * ax[None, :]
                                              + math.sin(view.light_angle) * ax[:, None])
    gain = (ramp * view.brightness)[..., None] * np.asarray(view.tint, np.float32)
    img = np.clip(img * gain, 0, 255).astype(np.uint8)
    return (img, mask > 0) if with_traits else img


def _eye(c: _Canvas, traits: Traits, view: View, eu: float, ev: float) -> None:
    """One eye; the eye-openness of the view narrows the opening over the iris."""
    ew, eh = 0.17, 0.085 * view.eye_open
    # Draw into a crop around the eye (the iris is clipped to the opening by a mask there).
    x, y = c.xy(eu, ev)
    r = int(ew * c.b) + 3
    x0, y0 = max(0, int(x) - r), max(0, int(y) - r)
    x1, y1 = min(c.size, int(x) + r + 1), min(c.size, int(y) + r + 1)
    base = c.img
    crop = base[y0:y1, x0:x1]
    c.img, c.origin = crop.copy(), (x0, y0)
    c.ellipse(eu, ev, ew, eh, 0, (245, 245, 240))
    iu, iv = eu + view.gaze[0] * 0.08, ev + view.gaze[1] * 0.03
    c.ellipse(iu, iv, 0.075, 0.075, 0, traits.iris)
    c.ellipse(iu, iv, 0.032, 0.032, 0, (15, 12, 12))
    c.ellipse(iu + 0.025, iv - 0.025, 0.014, 0.014, 0, (255, 255, 255))
    layer, c.img = c.img, np.zeros(crop.shape[:2], np.uint8)
    c.ellipse(eu, ev, ew, eh, 0, 255)
    mask = c.img[..., None].astype(np.float32) / 255.0
    crop[:] = (crop * (1.0 - mask) + layer * mask).astype(np.uint8)
    c.img, c.origin = base, (0, 0)
    c.ellipse(eu, ev, ew, eh, 0, None, trait=True)  # the iris shows only inside the opening
    c.ellipse(eu, ev, ew, eh, 0, _shade(traits.skin, 0.45), thickness=max(1, int(0.014 * c.b)), start=180, end=360)


def _hair(c: _Canvas, traits: Traits, a_ratio: float) -> None:
    """The hair cap over the forehead, in the identity's style."""
    hair = traits.hair
    if traits.hair_style == 2:  # receding: a thin cap high on the head
        c.ellipse(0.0, -0.62, a_ratio * 0.95, 0.42, 0, hair, start=180, end=360, depth=0)
        return
    c.ellipse(0.0, -0.35, a_ratio * 1.08, 0.78, 0, hair, start=180, end=360, depth=0)
    if traits.hair_style == 3:  # fringe
        c.ellipse(0.0, -0.38, a_ratio * 0.9, 0.22, 0, hair, start=0, end=180, depth=0.5)
    if traits.hair_style == 1:
        for side in (-1, 1):
            c.ellipse(side * 1.0, 0.12, 0.13, 0.7, 0, hair, depth=0)


class SyntheticSource:
    """`num_identities` synthetic identities with `images_per_identity` views each, numbered from
    `first_identity` (a held-out set starts where the training identities end); `aligned` as `view_params`.

    Record keys are ints `identity * images_per_identity + view`; a record's references are the other
    views of its identity. `fetch` renders at `resolution`.
    """

    def __init__(self, num_identities: int, images_per_identity: int, resolution: int, seed: int = 0,
                 first_identity: int = 0, aligned: bool = True):
        if images_per_identity < 2:
            raise ValueError("a synthetic identity needs at least 2 images (one target, one reference)")
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.resolution = resolution
        self.seed = seed
        self.aligned = aligned
        n = images_per_identity
        self.records = [
            Record(gt=i * n + v, refs=tuple(i * n + w for w in range(n) if w != v))
            for i in range(first_identity, first_identity + num_identities) for v in range(n)
        ]
        self.issues: dict[str, int] = {}

    def fetch(self, key: int, with_traits: bool = False):
        """Render image `key` as uint8 RGB (and its trait mask, see `render`)."""
        identity, view = divmod(int(key), self.images_per_identity)
        return render(identity_traits(self.seed, identity), view_params(self.seed, identity, view, self.aligned),
                      self.resolution, with_traits)


def benchmark(resolution: int = 64, images: int = 200) -> float:
    """Milliseconds per rendered image at `resolution` (the figure the CPU demo's data loading rests on)."""
    source = SyntheticSource(50, 4, resolution)
    start = time.perf_counter()
    for key in range(images):
        source.fetch(key)
    return 1000 * (time.perf_counter() - start) / images


if __name__ == "__main__":  # python -m iconface_jax.data.synthetic [resolution]: a benchmark, not a test
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    print(f"{benchmark(size):.2f} ms per {size} px synthetic image")
