"""Normal chest anatomy of the phantom, as a density map in a canonical frame.

One job: turn a patient's anatomy parameters into an X-ray *density* map (line integral of
attenuation, arbitrary units; 0 is air, about 1 is the mid-thorax soft tissue) for the
frontal and the lateral projection. Findings (``findings.py``) add to this map and the
acquisition (``acquisition.py``) turns it into a radiograph.

Coordinates. Both views are drawn on a portrait canvas of ``h`` x ``w`` pixels with
isotropic coordinates ``x = col / h`` (0 .. w/h) and ``y = row / h`` (0 .. 1). The frontal
view is displayed as radiographs are read: the patient faces the viewer, so the patient's
RIGHT is on the image LEFT. Side ``s = -1`` is the patient's right (image left) and
``s = +1`` the patient's left (image right). The lateral view is displayed with the
patient facing image left: anterior on the image left, the spine on the image right.

A finding's location is given in patient coordinates ``(px, py, pz)``: ``px`` in -1..1
from the patient's right to left chest wall, ``py`` in 0..1 from the lung apex to the
costophrenic angle, ``pz`` in 0..1 from the anterior to the posterior lung edge. Both
views project the same point (``to_frontal``, ``to_lateral``), which keeps findings
consistent between views.

The shapes follow the textbook radiographic anatomy (e.g. Goodman, *Felson's Principles
of Chest Roentgenology*): domed hemidiaphragms with sharp lateral costophrenic angles,
the right dome higher than the left, posterior ribs arching down laterally, anterior
ribs running down medially, a cardiothoracic ratio near 0.45 in health.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Canvas width / height (MIMIC-CXR images are mostly portrait, e.g. 2500 x 3000).
ASPECT = 5.0 / 6.0


@dataclass
class Anatomy:
    """Per-patient anatomy parameters (canonical frame, see module docstring)."""

    cx: float = ASPECT / 2  # frontal midline
    half_width: float = 0.30  # inner chest wall to midline at the lung base
    apex_y: float = 0.13  # top of the lung apices
    base_y: float = 0.70  # costophrenic angles (lowest lateral lung point)
    dome_rise: float = 0.11  # how far the dome top lies above the costophrenic angle
    right_dome_offset: float = -0.015  # the right hemidiaphragm sits higher
    mediastinum: float = 0.055  # half width of the upper mediastinum
    heart_width: float = 0.27  # transverse cardiac diameter (CTR ~ 0.45)
    heart_y: float = 0.6  # vertical centre of the heart shadow
    soft_tissue: float = 1.0  # body thickness scale
    lung_air: float = 0.5  # how much the aerated lung lowers the density
    rib_spacing: float = 0.052
    rib_phase: float = 0.0
    vessel_seed: int = 0
    # lateral view
    lat_front: float = 0.16  # anterior lung edge (behind the sternum)
    lat_back: float = 0.70  # posterior lung edge (in front of the spine)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy (sizes vary by a few percent, as between adults)."""
    u = rng.uniform
    return Anatomy(
        cx=ASPECT / 2 + u(-0.01, 0.01),
        half_width=u(0.28, 0.32),
        apex_y=u(0.11, 0.15),
        base_y=u(0.67, 0.73),
        dome_rise=u(0.08, 0.13),
        right_dome_offset=u(-0.03, -0.005),
        mediastinum=u(0.05, 0.062),
        heart_width=u(0.25, 0.28),
        heart_y=u(0.58, 0.62),
        soft_tissue=u(0.9, 1.1),
        lung_air=u(0.45, 0.55),
        rib_spacing=u(0.049, 0.055),
        rib_phase=u(-0.01, 0.01),
        vessel_seed=int(rng.integers(0, 2**31 - 1)),
        lat_front=u(0.14, 0.18),
        lat_back=u(0.68, 0.72),
    )


# ---------------------------------------------------------------- coordinate helpers


@lru_cache(maxsize=8)
def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic pixel-centre coordinates ``(x, y)`` of an ``h`` x ``w`` canvas."""
    x = (np.arange(w, dtype=np.float32) + 0.5) / h
    y = (np.arange(h, dtype=np.float32) + 0.5) / h
    return np.broadcast_to(x[None, :], (h, w)), np.broadcast_to(y[:, None], (h, w))


def ramp(margin: np.ndarray, soft: float) -> np.ndarray:
    """0 outside, 1 inside, linear across a band of width ``soft`` around margin 0."""
    r = np.multiply(margin, 1.0 / soft, dtype=np.float32)
    r += 0.5
    np.maximum(r, 0.0, out=r)
    return np.minimum(r, 1.0, out=r)


def ellipse(x, y, cx, cy, rx, ry, angle: float = 0.0) -> np.ndarray:
    """Squared normalised radius of a (rotated) ellipse: < 1 inside."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / rx) ** 2 + (dy / ry) ** 2


def dome(r2: np.ndarray) -> np.ndarray:
    """Thickness profile of an ellipsoid seen in projection: sqrt(1 - r^2), 0 outside."""
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def frontal_point(a: Anatomy, px: float, py: float) -> tuple[float, float]:
    """Project patient coordinates onto the frontal canvas (``x``, ``y``)."""
    return a.cx + px * a.half_width, a.apex_y + py * (a.base_y - a.apex_y)


def lateral_point(a: Anatomy, pz: float, py: float) -> tuple[float, float]:
    """Project patient coordinates onto the lateral canvas (``x``, ``y``)."""
    return a.lat_front + pz * (a.lat_back - a.lat_front), a.apex_y + py * (a.base_y - a.apex_y)


# ---------------------------------------------------------------- frontal view


def diaphragm_y(a: Anatomy, d: np.ndarray, side: int) -> np.ndarray:
    """Height of the hemidiaphragm at lateral distance ``d`` from the midline."""
    top = a.base_y - a.dome_rise + (a.right_dome_offset if side < 0 else 0.0)
    peak = 0.45 * a.half_width
    k = (a.base_y - top) / (a.half_width - peak) ** 2
    return top + k * (d - peak) ** 2


def lung_margins(a: Anatomy, x: np.ndarray, y: np.ndarray, side: int, shrink: float = 0.0):
    """Signed distances (positive inside) to the four borders of one frontal lung.

    ``shrink`` pulls the apical and lateral borders inwards (a collapsed lung under a
    pneumothorax), most at the apex and tapering to nothing at the base.
    """
    d = side * (x - a.cx)
    t = np.clip((y - a.apex_y) / (a.base_y - a.apex_y), 0.0, 1.0)
    pull = shrink * (1.0 - t) ** 1.2
    lateral = a.half_width * (1.0 - 0.55 * (1.0 - t) ** 2.5) - pull - d
    medial = d - (a.mediastinum + 0.01 * (side > 0))
    apex_d = 0.42 * a.half_width
    top = a.apex_y + shrink + 5.0 * (d - apex_d) ** 2
    upper = y - top
    lower = diaphragm_y(a, d, side) - y
    return lateral, medial, upper, lower


def lung_mask(a: Anatomy, x, y, side: int, shrink: float = 0.0, soft: float = 0.006):
    lat, med, up, low = lung_margins(a, x, y, side, shrink)
    return ramp(lat, soft) * ramp(med, soft) * ramp(up, soft) * ramp(low, soft)


def heart_shape(a: Anatomy, x, y, scale: float = 1.0) -> np.ndarray:
    """Projected thickness (0..1) of the heart; ``scale`` widens it (cardiomegaly, AP)."""
    w = a.heart_width * scale
    cx = a.cx + 0.18 * w
    r2 = ellipse(x, y, cx, a.heart_y, 0.5 * w, 0.15 + 0.03 * (scale - 1), angle=-0.3)
    # The great vessels join the heart to the upper mediastinum.
    vessels = dome(ellipse(x, y, cx - 0.2 * w, a.heart_y - 0.17, 0.055, 0.1))
    return np.maximum(dome(r2) ** 0.4, vessels**0.5)


def heart_bounds(a: Anatomy, scale: float = 1.0) -> tuple[float, float, float, float]:
    """Axis-aligned bounding box ``(x0, y0, x1, y1)`` of :func:`heart_shape`'s ellipse."""
    w = a.heart_width * scale
    rx, ry, ang = 0.5 * w, 0.15 + 0.03 * (scale - 1), -0.3
    ex = np.sqrt((rx * np.cos(ang)) ** 2 + (ry * np.sin(ang)) ** 2)
    ey = np.sqrt((rx * np.sin(ang)) ** 2 + (ry * np.cos(ang)) ** 2)
    cx = a.cx + 0.18 * w
    return cx - ex, a.heart_y - ey, cx + ex, a.heart_y + ey


def rib_pattern(a: Anatomy, x, y, side: int, shift: float = 0.0) -> np.ndarray:
    """Posterior ribs of one hemithorax as bright curved bands (0..1)."""
    d = np.abs(x - a.cx)
    # Rising a little from the spine, then arching down along the lateral chest wall.
    g = 2.6 * (d - 0.05) ** 2 + 4.0 * np.clip(d - 0.24, 0.0, None) ** 2 - 0.05 * d
    p = (y - a.apex_y + 0.03 - g + a.rib_phase + shift) / a.rib_spacing
    p = np.maximum(p, 0.0) ** 0.93 * (p > 0)  # lower ribs lie a little further apart
    frac = p - np.floor(p)
    band = np.clip(1.0 - np.abs(frac - 0.25) / 0.25, 0.0, 1.0)
    band = np.sqrt(band) * (0.7 + 0.3 * (np.abs(frac - 0.25) > 0.15))  # cortical rim
    keep = (p > 0) & (p < 10.5) & (d > 0.035) & (d < a.half_width + 0.06)
    return band * keep * ramp(d - 0.05, 0.04) * ramp(a.base_y + 0.04 - y, 0.06)


def anterior_ribs(a: Anatomy, x, y) -> np.ndarray:
    d = np.abs(x - a.cx)
    g = -0.45 * (d - a.half_width)
    p = (y - a.apex_y - 0.02 - g) / (a.rib_spacing * 1.25)
    frac = p - np.floor(p)
    band = np.clip(1.0 - np.abs(frac - 0.25) / 0.25, 0.0, 1.0) ** 0.7
    keep = (p > 0) & (p < 5.5) & (d > 0.12) & (d < a.half_width + 0.02)
    return band * keep


def clavicles(a: Anatomy, x, y) -> np.ndarray:
    d = np.abs(x - a.cx)
    centre = a.apex_y + 0.07 - 0.42 * (d - 0.03) + 1.0 * (d - 0.14) ** 2
    thick = 0.013 + 0.008 * ramp(0.07 - d, 0.06) + 0.006 * ramp(d - 0.25, 0.05)
    band = dome(((y - centre) / thick) ** 2)
    return band * ramp(d - 0.025, 0.01) * ramp(0.33 - d, 0.03)


def spine(a: Anatomy, x, y, cx: float, half: float) -> np.ndarray:
    """Vertebral column: bodies separated by darker disc spaces."""
    body = dome(((x - cx) / half) ** 2)
    frac = ((y + a.rib_phase) / 0.046) % 1.0
    return body * (0.65 + 0.35 * (frac < 0.78))


@lru_cache(maxsize=16)
def parenchyma(seed: int, h: int, w: int) -> np.ndarray:
    """Fine reticular lung texture (band-passed noise), fixed per patient."""
    rng = np.random.default_rng(seed + 17)
    fine = rng.uniform(0, 1, size=(h // 3 + 1, w // 3 + 1)).astype(np.float32)
    img = Image.fromarray(fine, "F").resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


@lru_cache(maxsize=64)
def _vessel_tree(seed: int, h: int, w: int, view: str, roots: tuple) -> np.ndarray:
    """Branching pulmonary vessels radiating from the hila, drawn once per patient."""
    rng = np.random.default_rng(seed + (0 if view == "frontal" else 7919))
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    scale = h / 512.0
    for hx, hy, base_angle, spread in roots:
        for k in range(8):
            ang = base_angle + spread * (k / 7.0 - 0.5) + rng.normal(0, 0.1)
            stack = [(hx, hy, ang, 0.07, 3.4)]
            while stack:
                sx, sy, an, length, width = stack.pop()
                ex = sx + length * np.cos(an)
                ey = sy + length * np.sin(an)
                draw.line(
                    [(sx * h, sy * h), (ex * h, ey * h)],
                    fill=int(min(255, 60 + 50 * width)),
                    width=max(1, int(round(width * scale))),
                )
                if width > 1.1:
                    for turn in (-1, 1):
                        stack.append(
                            (
                                ex,
                                ey,
                                an + turn * rng.uniform(0.2, 0.7),
                                length * rng.uniform(0.62, 0.8),
                                width * 0.75,
                            )
                        )
    img = img.filter(ImageFilter.GaussianBlur(max(0.6, 1.3 * scale)))
    return np.asarray(img, dtype=np.float32) * (1.0 / 255.0)


def vessels(a: Anatomy, h: int, w: int, view: str) -> np.ndarray:
    if view == "frontal":
        hy = a.apex_y + 0.5 * (a.base_y - a.apex_y) - 0.02
        roots = (
            (a.cx - 0.09, hy, np.pi * 1.05, 2.4),
            (a.cx + 0.085, hy - 0.01, -np.pi * 0.05, 2.4),
        )
    else:
        cx, cy = lateral_point(a, 0.5, 0.5)
        roots = ((cx, cy - 0.02, -np.pi / 2, 5.6),)
    roots = tuple(tuple(round(float(v), 5) for v in r) for r in roots)
    return _vessel_tree(a.vessel_seed, h, w, view, roots)


def hila_centres(a: Anatomy) -> list[tuple[float, float]]:
    hy = a.apex_y + 0.5 * (a.base_y - a.apex_y) - 0.02
    return [(a.cx - 0.085, hy), (a.cx + 0.08, hy - 0.012)]


@dataclass
class FrontalLayers:
    """What findings need from the normal frontal anatomy."""

    density: np.ndarray
    lungs: dict  # side -> soft lung mask
    air: np.ndarray  # how much air (density deficit) each pixel's lung holds
    vessels: np.ndarray  # vessel texture inside the lungs (already in ``density``)
    ribs: dict  # side -> rib band pattern (already in ``density``)


def render_frontal(a: Anatomy, h: int, w: int) -> FrontalLayers:
    """Density map of a normal frontal chest *without* the heart (see :func:`add_heart`).

    Everything here is fixed for a patient, so it is computed once per patient and size;
    the heart, whose size changes between studies, is added per study.
    """
    x, y = grid(h, w)
    d = np.abs(x - a.cx)
    # Body outline: neck, shoulders, chest wall; thickness like an elliptic cylinder.
    t = np.clip((y + 0.02) / 0.16, 0.0, 1.0)
    shoulder = 0.09 + 0.34 * (t * t * (3 - 2 * t))
    body_half = shoulder - 0.03 * np.clip((y - 0.8) / 0.2, 0, 1)
    inside = ramp(body_half - d, 0.03)
    body = dome((d / (body_half + 0.03)) ** 2) ** 1.4
    density = a.soft_tissue * (0.16 + 0.8 * body + 0.08 * ramp(y - 0.75, 0.2)) * inside

    lungs = {s: lung_mask(a, x, y, s) for s in (-1, 1)}
    lung = lungs[-1] + lungs[1]
    # Aerated lung is deepest mid-lung and thinner near the chest wall and apex.
    prof = dome(((d - 0.55 * a.half_width) / (0.62 * a.half_width)) ** 2)
    tdepth = np.clip((y - a.apex_y) / 0.2, 0.0, 1.0)
    air = a.lung_air * lung * (0.5 + 0.5 * prof) * (0.75 + 0.25 * tdepth)

    density = density - air
    # Aortic knob, hila, trachea (air column) and the gastric bubble.
    density += 0.12 * dome(ellipse(x, y, a.cx + 0.055, a.apex_y + 0.19, 0.035, 0.03))
    for hx, hy in hila_centres(a):
        density += 0.08 * dome(ellipse(x, y, hx, hy, 0.03, 0.05))
    trachea = dome(((x - a.cx) / 0.013) ** 2) * ramp(a.apex_y + 0.24 - y, 0.05)
    density -= 0.06 * trachea * ramp(y - 0.04, 0.08)
    stomach_y = diaphragm_y(a, np.float32(0.45 * a.half_width), 1) + 0.045
    density -= 0.2 * dome(ellipse(x, y, a.cx + 0.13, stomach_y, 0.05, 0.025))
    # Upper abdomen (liver, spleen) under the domes is as dense as the mediastinum.
    abdomen = ramp(y - diaphragm_y(a, d, 1) - 0.01, 0.03) * ramp(a.half_width + 0.02 - d, 0.05)
    density += 0.14 * abdomen

    vess = vessels(a, h, w, "frontal") * lung
    density += 0.16 * vess + 0.07 * lung * parenchyma(a.vessel_seed, h, w)
    both = rib_pattern(a, x, y, 1)  # symmetric: one evaluation serves both sides
    right = x < a.cx
    ribs = {-1: both * right, 1: both * ~right}
    bone = 0.15 * both + 0.05 * anterior_ribs(a, x, y)
    bone += 0.3 * clavicles(a, x, y)
    bone += 0.04 * spine(a, x, y, a.cx, 0.032) * ramp(0.72 - y, 0.1)
    density = density + bone * inside * (0.45 + 0.55 * lung)
    return FrontalLayers(density=density, lungs=lungs, air=air, vessels=vess, ribs=ribs)


# ---------------------------------------------------------------- lateral view


def lateral_diaphragm_y(a: Anatomy, x: np.ndarray) -> np.ndarray:
    """Single diaphragm contour: dome anteriorly, deepest at the posterior sulcus."""
    t = (x - a.lat_front) / (a.lat_back - a.lat_front)
    top = a.base_y - a.dome_rise - 0.02
    return top + 0.05 * (t - 0.35) ** 2 / 0.42 + 0.09 * np.clip(t - 0.55, 0, None) ** 1.5 / 0.3


def lateral_lung(a: Anatomy, x, y, shrink: float = 0.0, soft: float = 0.007):
    t = np.clip((y - a.apex_y) / (a.base_y - a.apex_y), 0.0, 1.0)
    front = x - (a.lat_front + 0.05 * (1 - t) ** 2)
    back = a.lat_back + 0.03 * t - x
    top = y - (a.apex_y + 0.01 + shrink + 2.6 * (x - 0.5 * (a.lat_front + a.lat_back)) ** 2)
    bottom = lateral_diaphragm_y(a, x) + 0.04 - y
    return ramp(front, soft) * ramp(back, soft) * ramp(top, soft) * ramp(bottom, soft)


def lateral_heart(a: Anatomy, x, y, scale: float = 1.0) -> np.ndarray:
    cx = a.lat_front + 0.25 * (a.lat_back - a.lat_front) + 0.02 * (scale - 1)
    return dome(ellipse(x, y, cx, a.heart_y + 0.03, 0.16 * scale, 0.15, angle=0.6)) ** 0.5


def lateral_heart_bounds(a: Anatomy, scale: float = 1.0) -> tuple[float, float, float, float]:
    cx = a.lat_front + 0.25 * (a.lat_back - a.lat_front) + 0.02 * (scale - 1)
    rx, ry, ang = 0.16 * scale, 0.15, 0.6
    ex = np.sqrt((rx * np.cos(ang)) ** 2 + (ry * np.sin(ang)) ** 2)
    ey = np.sqrt((rx * np.sin(ang)) ** 2 + (ry * np.cos(ang)) ** 2)
    return cx - ex, a.heart_y + 0.03 - ey, cx + ex, a.heart_y + 0.03 + ey


@dataclass
class LateralLayers:
    density: np.ndarray
    lung: np.ndarray
    air: np.ndarray
    vessels: np.ndarray


def render_lateral(a: Anatomy, h: int, w: int) -> LateralLayers:
    """Density map of a normal lateral chest (patient facing image left), without heart."""
    x, y = grid(h, w)
    front_wall = a.lat_front - 0.06 + 0.05 * np.clip((y - 0.3) / 0.5, 0, 1) ** 2
    back_wall = a.lat_back + 0.13 - 0.04 * ramp(0.1 - y, 0.1)
    mid, half = 0.5 * (front_wall + back_wall), 0.5 * (back_wall - front_wall)
    t = np.clip((y + 0.02) / 0.14, 0.0, 1.0)
    inside = ramp(half - np.abs(x - mid), 0.02) * (t * t * (3 - 2 * t))
    body = dome(((x - mid) / (half + 0.02)) ** 2)
    # Shoulders and arms overlap the upper chest on a lateral film.
    arms = 0.3 * ramp(0.24 - y, 0.12) * body
    density = a.soft_tissue * (0.25 + 0.55 * body + 0.1 * ramp(y - 0.7, 0.2)) * inside + arms

    lung = lateral_lung(a, x, y)
    prof = dome(((x - 0.5 * (a.lat_front + a.lat_back)) / (0.6 * (a.lat_back - a.lat_front))) ** 2)
    air = a.lung_air * lung * (0.75 + 0.35 * prof)
    density = density - air
    vess = vessels(a, h, w, "lateral") * lung
    density += 0.12 * vess + 0.06 * lung * parenchyma(a.vessel_seed + 1, h, w)
    # Trachea running down and back to the carina; sternum; vertebral bodies.
    tx = a.lat_front + 0.42 * (a.lat_back - a.lat_front) + 0.12 * (y - 0.1)
    trachea = dome(((x - tx) / 0.016) ** 2) * ramp(a.apex_y + 0.25 - y, 0.05)
    density -= 0.08 * trachea * ramp(y - 0.03, 0.06)
    sternum = dome(((x - (front_wall + 0.015)) / 0.012) ** 2) * ramp(y - 0.16, 0.02)
    density += 0.15 * sternum * ramp(0.62 - y, 0.02)
    spine_x = a.lat_back + 0.045
    vert = spine(a, x, y, spine_x, 0.035) * ramp(y - 0.08, 0.04)
    density += vert * (0.2 - 0.12 * y) * inside  # the spine grows darker caudally (normal)
    ribs = rib_pattern(a, a.cx + 0.7 * (x - a.lat_back) - 0.05, y, 1) * ramp(x - 0.3, 0.2)
    density += 0.06 * ribs * inside
    return LateralLayers(density=density, lung=lung, air=air, vessels=vess)


def pixel_slices(bounds, h: int, w: int) -> tuple[slice, slice]:
    """Pixel slices ``(rows, cols)`` covering canonical bounds ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = bounds
    c0, c1 = max(0, int(np.floor(x0 * h))), min(w, int(np.ceil(x1 * h)) + 1)
    r0, r1 = max(0, int(np.floor(y0 * h))), min(h, int(np.ceil(y1 * h)) + 1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def add_heart(density, air, a: Anatomy, scale: float, view: str) -> tuple:
    """Add the heart (which displaces aerated lung) to ``density`` and remove the lung air
    it displaces from ``air``, both in place; returns the slices it touched."""
    h, w = density.shape
    bounds = heart_bounds(a, scale) if view == "frontal" else lateral_heart_bounds(a, scale)
    x0, y0, x1, y1 = bounds
    if view == "frontal":  # include the great vessels above the heart
        y0 = min(y0, a.heart_y - 0.28)
        x0 = min(x0, a.cx - 0.1)
    sl = pixel_slices((x0, y0, x1, y1), h, w)
    x, y = grid(h, w)
    if view == "frontal":
        heart = heart_shape(a, x[sl], y[sl], scale)
        density[sl] += heart * (air[sl] + 0.06)
        air[sl] *= 1.0 - heart
    else:
        heart = lateral_heart(a, x[sl], y[sl], scale)
        density[sl] += heart * (0.6 * air[sl] + 0.12)
        air[sl] *= 1.0 - 0.6 * heart
    return sl
