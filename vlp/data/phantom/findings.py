"""Findings of the phantom: their course over a patient's studies and how they look.

One job: decide which findings each study has (with side, lobe, severity), and draw them
into the canonical density maps of ``anatomy.py`` with exact ground-truth boxes.

A finding is a plain JSON-able dict ``{"type", "severity", "side", "lobe", "params"}``.
Severity is an int: 1..3 for graded findings (effusion, pneumothorax, cardiomegaly,
edema, consolidation), 1..2 for atelectasis and nodule (nodule / mass), the number of
devices for support devices and 1 for a fracture; 0 means absent.

Course over time. Each finding type is a two-state Markov chain (absent / present) whose
stationary probability is the configured prevalence, so the prevalence holds per study
whatever the number of studies; while present, the severity does a +-1 random walk, so
consecutive studies carry signal (improving / stable / worsening / new / resolved).

Continuous level. MS-CXR-T's progression findings (``CONTINUOUS_FINDINGS``: effusion,
edema, consolidation, pneumothorax) also carry an ``extent`` in [0, 1) within their grade:
the finding's ``level`` is severity + extent - 0.5, so grade g spans [g - 0.5, g + 0.5).
They are drawn at their level, not only their grade, and their course is a walk of the
level (steps of ``LEVEL_STEP``), so about two thirds of the changes stay within one grade
(1622 of 2524 over 3000 simulated patients of 4 studies). Like radiologists' "slightly
increased" in MS-CXR-T (Bannur et al., CVPR 2023), such a change is seen by comparing the
two images, not from either image's grade alone.

Appearance follows the radiographic signs (e.g. Felson's *Principles of Chest
Roentgenology*): effusion fills the costophrenic angle first with a meniscus rising
laterally (posterior sulcus on the lateral view), and a small one (severity 1) is drawn on
the lateral view only: about 50 ml blunt the posterior costophrenic sulcus on a lateral
film while the frontal needs about 200 ml to blunt the lateral angle (Felson; Blackmore et
al., Radiology 1996), so it is the phantom's lateral-only finding; pneumothorax is a lucent rim without
lung markings outside a visible visceral pleural line, largest at the apex; edema grades
follow the severity scale of Chauhan et al. (MICCAI 2020): 1 vascular congestion
(prominent hila and upper-zone vessels), 2 interstitial (Kerley B lines, haze), 3 alveolar
(bilateral perihilar "bat-wing" opacity). Fluid and consolidation *replace* aerated lung,
so they raise the density by a fraction of the local lung air, scaled by ``subtlety``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from vlp.data.phantom import anatomy as anat
from vlp.data.phantom.anatomy import Anatomy, dome, ellipse, grid, pixel_slices, ramp

FINDING_TYPES: tuple[str, ...] = (
    "pleural_effusion",
    "cardiomegaly",
    "edema",
    "consolidation",
    "atelectasis",
    "pneumothorax",
    "nodule",
    "support_devices",
    "fracture",
)

#: Fraction of studies with the finding present (the Markov chain's stationary law).
DEFAULT_PREVALENCE: dict[str, float] = {
    "pleural_effusion": 0.30,
    "cardiomegaly": 0.25,
    "edema": 0.30,
    "consolidation": 0.20,
    "atelectasis": 0.20,
    "pneumothorax": 0.12,
    "nodule": 0.10,
    "support_devices": 0.25,
    "fracture": 0.05,
}

#: Probability that a present finding disappears before the next study.
_LEAVE = {"cardiomegaly": 0.1, "nodule": 0.1, "fracture": 0.15, "support_devices": 0.3}
_MAX_SEVERITY = {"atelectasis": 2, "nodule": 2, "fracture": 1, "support_devices": 3}

#: Lobe centres in patient coordinates (px: right -1 .. left +1, py: apex 0 .. base 1,
#: pz: anterior 0 .. posterior 1).
LOBES: dict[str, tuple[float, float, float]] = {
    "RUL": (-0.5, 0.25, 0.45),
    "RML": (-0.45, 0.66, 0.22),
    "RLL": (-0.55, 0.8, 0.75),
    "LUL": (0.55, 0.3, 0.4),
    "LLL": (0.6, 0.8, 0.75),
}
DEVICES = ("ett", "central_line", "pacemaker")


def side_of_lobe(lobe: str) -> str:
    return "right" if lobe.startswith("R") else "left"


def _sign(side: str) -> int:
    return -1 if side == "right" else 1


def _sides(side: str) -> list[int]:
    return [-1, 1] if side == "bilateral" else [_sign(side)]


# ---------------------------------------------------------------- course over time

#: Findings with a continuous level within their grade (module docstring).
CONTINUOUS_FINDINGS: tuple[str, ...] = (
    "pleural_effusion",
    "edema",
    "consolidation",
    "pneumothorax",
)
#: Range of one step of a continuous finding's level when it worsens or improves (grades).
LEVEL_STEP = (0.25, 0.75)
#: A step the grade range cuts shorter than this leaves the level unchanged (stable).
MIN_LEVEL_CHANGE = 0.15


def level(f: dict | None) -> float:
    """A finding's continuous level: severity + extent - 0.5 (0 when absent).

    A finding without an ``extent`` (the other types, hand-written findings) sits mid-grade,
    at its severity.
    """
    if f is None:
        return 0.0
    return f["severity"] + f["params"].get("extent", 0.5) - 0.5


def _onset(kind: str, rng: np.random.Generator) -> dict:
    """A newly appearing finding: its fixed attributes and a starting severity."""
    u = rng.uniform
    f = {"type": kind, "severity": 1, "side": None, "lobe": None, "params": {}}
    if kind == "pleural_effusion":
        f["side"] = str(rng.choice(["left", "right", "bilateral"], p=[0.35, 0.35, 0.3]))
        f["severity"] = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        f["params"] = {"height": u(0.85, 1.15), "meniscus": u(0.3, 0.6)}
    elif kind == "cardiomegaly":
        f["severity"] = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    elif kind == "edema":
        f["severity"] = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
        f["params"] = {"seed": int(rng.integers(0, 2**31 - 1))}
    elif kind in ("consolidation", "atelectasis", "nodule"):
        lobes = ["RLL", "LLL", "RML"] if kind == "atelectasis" else list(LOBES)
        f["lobe"] = str(rng.choice(lobes))
        f["side"] = side_of_lobe(f["lobe"])
        f["params"] = {
            "dx": u(-0.08, 0.08),
            "dy": u(-0.06, 0.06),
            "dz": u(-0.08, 0.08),
            "angle": u(-0.25, 0.25),
            "seed": int(rng.integers(0, 2**31 - 1)),
        }
        if kind == "consolidation":
            f["severity"] = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
            f["params"]["infectious"] = bool(u() < 0.55)
        elif kind == "nodule":
            f["severity"] = 1 if u() < 0.75 else 2
            mm = u(8, 28) if f["severity"] == 1 else u(32, 60)
            f["params"]["size_mm"] = int(round(mm))
        else:
            f["severity"] = 1 if u() < 0.6 else 2
    elif kind == "pneumothorax":
        f["side"] = "left" if u() < 0.5 else "right"
        f["severity"] = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    elif kind == "support_devices":
        chosen = [d for d, p in zip(DEVICES, (0.45, 0.6, 0.35)) if u() < p] or ["central_line"]
        f["severity"] = len(chosen)
        f["params"] = {
            "devices": chosen,
            "line_side": "right" if u() < 0.7 else "left",
            "ett_tip": u(0.12, 0.2),
            "line_tip": u(0.18, 0.26),
        }
    elif kind == "fracture":
        f["side"] = "left" if u() < 0.5 else "right"
        f["params"] = {"rib": int(rng.integers(4, 9)), "d": u(0.19, 0.27), "shift": u(-0.3, 0.3)}
    if kind in CONTINUOUS_FINDINGS:
        f["params"]["extent"] = round(float(u()), 3)
    return f


def _evolve(f: dict, rng: np.random.Generator) -> dict:
    """The same finding at the next study: severity +-1 with fixed attributes."""
    g = {**f, "params": dict(f["params"])}
    top = _MAX_SEVERITY.get(f["type"], 3)
    if f["type"] == "support_devices":
        return g
    r = rng.uniform()
    if f["type"] in CONTINUOUS_FINDINGS:
        if r >= 0.5:
            return g
        step = float(rng.uniform(*LEVEL_STEP)) * (1 if r < 0.25 else -1)
        # The level stays within the grades: [0.5, top + 0.5).
        new = round(min(max(level(f) + step, 0.5), top + 0.499), 3)
        if abs(new - level(f)) < MIN_LEVEL_CHANGE:
            return g
        g["severity"] = min(top, max(1, int(np.floor(new + 0.5))))
        g["params"]["extent"] = round(new + 0.5 - g["severity"], 3)
        return g
    if r < 0.25:
        g["severity"] = min(top, f["severity"] + 1)
    elif r < 0.5:
        g["severity"] = max(1, f["severity"] - 1)
    return g


def sample_course(
    rng: np.random.Generator, n_studies: int, prevalence: dict[str, float]
) -> list[dict[str, dict]]:
    """Findings of each of a patient's studies, oldest first: ``[{type: finding}]``."""
    course: list[dict[str, dict]] = [{} for _ in range(n_studies)]
    for kind in FINDING_TYPES:
        p = float(prevalence.get(kind, 0.0))
        if not 0.0 <= p < 1.0:
            raise ValueError(f"prevalence[{kind!r}] must be in [0, 1), got {p}")
        leave = _LEAVE.get(kind, 0.35)
        enter = min(0.95, leave * p / (1.0 - p)) if p > 0 else 0.0
        current = _onset(kind, rng) if rng.uniform() < p else None
        for t in range(n_studies):
            if t > 0:
                if current is None:
                    current = _onset(kind, rng) if rng.uniform() < enter else None
                elif rng.uniform() < leave:
                    current = None
                else:
                    current = _evolve(current, rng)
            if current is not None:
                course[t][kind] = current
    return course


def heart_scale(findings: dict) -> float:
    """Transverse heart size factor: 1 normal, about 1.2 / 1.35 / 1.5 with cardiomegaly."""
    f = findings.get("cardiomegaly")
    return 1.0 if f is None else 1.0 + 0.16 * f["severity"] + 0.04


# ---------------------------------------------------------------- drawing


def _graded(f: dict, values: tuple[float, ...]) -> float:
    """A size given per grade (``values[g - 1]``), read at the finding's continuous level.

    Linear between grades; beyond the first and last grade (the lower half of grade 1, the
    upper half of the top grade) at half the neighbouring slope, so the smallest finding
    keeps a visible size.
    """
    x, top = level(f), len(values)
    if x < 1:
        return values[0] + 0.5 * (x - 1) * (values[1] - values[0])
    if x > top:
        return values[-1] + 0.5 * (x - top) * (values[-1] - values[-2])
    return float(np.interp(x, np.arange(1, top + 1), values))


@lru_cache(maxsize=32)
def _texture(seed: int, h: int, w: int) -> np.ndarray:
    """Smooth random field in 0..1 (patchiness of opacities), deterministic per seed."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, size=(max(4, h // 16), max(4, w // 16))).astype(np.float32)
    img = Image.fromarray(small, "F").resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    return np.clip(arr, 0.0, 1.0)


class Canvas:
    """One view being drawn: density plus the anatomy layers findings depend on."""

    def __init__(self, view: str, a: Anatomy, layers, density: np.ndarray):
        self.view = view  # "frontal" or "lateral"
        self.a = a
        self.layers = layers
        self.density = density
        self.h, self.w = density.shape
        self.x, self.y = grid(self.h, self.w)
        self.air = layers.air  # aerated lung left after the heart (set by the renderer)
        self.boxes: list[list] = []  # canonical pixel boxes of the finding being drawn
        self.masks: list[tuple] = []  # (slices, bool mask) per box, for ground truth

    def lung(self, side: int | None):
        if self.view == "frontal":
            return self.layers.lungs[side]
        return self.layers.lung

    def add(self, sl, patch: np.ndarray, extent: np.ndarray | None = None, thr: float = 0.3):
        """Add ``patch`` to the density and record the box of ``extent`` (default |patch|)."""
        self.density[sl] += patch
        ext = np.abs(patch) if extent is None else extent
        top = float(ext.max()) if ext.size else 0.0
        if top <= 1e-6:
            return
        mask = ext > thr * top
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            return
        r0, c0 = sl[0].start, sl[1].start
        self.boxes.append(
            [c0 + cols.min(), r0 + rows.min(), c0 + cols.max() + 1, r0 + rows.max() + 1]
        )
        self.masks.append((sl, mask))

    def point(self, px: float, py: float, pz: float) -> tuple[float, float]:
        if self.view == "frontal":
            return anat.frontal_point(self.a, px, py)
        return anat.lateral_point(self.a, pz, py)

    def sub(self, bounds):
        sl = pixel_slices(bounds, self.h, self.w)
        return sl, self.x[sl], self.y[sl]


#: Effusions up to this severity are visible on the lateral view only (module docstring).
LATERAL_ONLY_EFFUSION = 1


def _effusion(c: Canvas, f: dict, k: float) -> None:
    a = c.a
    if c.view == "frontal" and f["severity"] <= LATERAL_ONLY_EFFUSION:
        return
    lung_h = a.base_y - a.apex_y
    frac = _graded(f, (0.07, 0.2, 0.38)) * f["params"]["height"]
    men = f["params"]["meniscus"]
    soft = 0.015 + 0.01 * level(f)
    if c.view == "frontal":
        for s in _sides(f["side"]):
            xin, xout = a.cx + s * a.mediastinum, a.cx + s * (a.half_width + 0.01)
            top = a.base_y - frac * lung_h - 0.05
            sl, x, y = c.sub((min(xin, xout), top, max(xin, xout), a.base_y + 0.02))
            t = np.clip(s * (x - a.cx) / a.half_width, 0.0, 1.0)
            surface = a.base_y - frac * lung_h * (1.0 - men + men * t * t)
            fluid = ramp(y - surface, soft) * c.lung(s)[sl]
            c.add(sl, fluid * (0.9 * c.air[sl] + 0.04) * k, extent=fluid, thr=0.1)
    else:
        n = len(_sides(f["side"]))
        x0 = a.lat_front + 0.35 * (a.lat_back - a.lat_front)
        top = a.base_y - frac * lung_h - 0.1
        sl, x, y = c.sub((x0, top, a.lat_back + 0.05, a.base_y + 0.08))
        t = np.clip((x - x0) / (a.lat_back - x0), 0.0, 1.0)
        floor = anat.lateral_diaphragm_y(a, x) + 0.04
        surface = floor - (0.04 + frac * lung_h) * (0.3 + 0.7 * t * t)
        fluid = ramp(y - surface, soft) * c.lung(None)[sl] * ramp(x - x0 - 0.04, 0.08)
        c.add(sl, fluid * (0.5 + 0.25 * n) * (c.air[sl] + 0.04) * k, extent=fluid, thr=0.1)


def _edema(c: Canvas, f: dict, k: float) -> None:
    # The grade decides the signs (Kerley lines from 2 on); the level, their size.
    a, sev, lvl = c.a, f["severity"], level(f)
    tex = _texture(f["params"]["seed"], c.h, c.w)
    # Vascular congestion: all vessels more prominent, the upper-zone ones most.
    upper = np.clip(1.3 - (c.y - a.apex_y) / (a.base_y - a.apex_y), 0.3, 1.3)
    c.density += (0.16 * 0.15 * lvl * k) * c.layers.vessels * upper
    amp = _graded(f, (0.06, 0.12, 0.3)) * k
    if c.view == "frontal":
        centres = anat.hila_centres(a)
        for s, (hx, hy) in zip((-1, 1), centres):
            r = 0.07 + 0.03 * lvl
            cx = hx + s * 0.03 * lvl
            sl, x, y = c.sub((cx - r - 0.03, hy - 1.3 * r, cx + r + 0.03, hy + 1.3 * r))
            haze = dome(ellipse(x, y, cx, hy, r, 1.25 * r)) * c.lung(s)[sl]
            patch = haze * (0.6 + 0.4 * tex[sl]) * (c.air[sl] + 0.05) * amp / 0.5
            if sev >= 2:  # Kerley B lines at the lateral lung bases
                yy = a.base_y - 0.03 - np.arange(6) * 0.018
                lat_edge = a.half_width * 0.97
                sl2, x2, y2 = c.sub(
                    (
                        min(a.cx + s * (lat_edge - 0.04), a.cx + s * a.half_width),
                        a.base_y - 0.14,
                        max(a.cx + s * (lat_edge - 0.04), a.cx + s * a.half_width),
                        a.base_y - 0.01,
                    )
                )
                d2 = np.abs(x2 - a.cx)
                lines = np.zeros_like(x2)
                for yl in yy:
                    lines += ramp(0.0025 - np.abs(y2 - yl), 0.002)
                lines *= ramp(d2 - (lat_edge - 0.035), 0.004) * c.lung(s)[sl2]
                c.density[sl2] += 0.1 * k * lines
                # The box of the finding covers the haze and the lines on this side.
                c.add(sl, patch)
                x0, y0, x1, y1 = c.boxes.pop()
                rows, cols = np.nonzero(lines > 0.3)
                if rows.size:
                    r0, c0 = sl2[0].start, sl2[1].start
                    x0, y0 = min(x0, c0 + cols.min()), min(y0, r0 + rows.min())
                    x1, y1 = max(x1, c0 + cols.max() + 1), max(y1, r0 + rows.max() + 1)
                c.boxes.append([x0, y0, x1, y1])
            else:
                c.add(sl, patch)
    else:
        cx, cy = anat.lateral_point(a, 0.45, 0.48)
        r = 0.1 + 0.03 * lvl
        sl, x, y = c.sub((cx - r, cy - 1.2 * r, cx + r, cy + 1.2 * r))
        haze = dome(ellipse(x, y, cx, cy, r, 1.2 * r)) * c.lung(None)[sl]
        c.add(sl, haze * (0.6 + 0.4 * tex[sl]) * (c.air[sl] + 0.05) * amp / 0.4)


def _lobe_centre(c: Canvas, f: dict) -> tuple[float, float]:
    px, py, pz = LOBES[f["lobe"]]
    p = f["params"]
    return c.point(px + p["dx"], py + p["dy"], pz + p["dz"])


def _consolidation(c: Canvas, f: dict, k: float) -> None:
    cx, cy = _lobe_centre(c, f)
    r = _graded(f, (0.05, 0.075, 0.1)) * (0.8 if c.view == "lateral" else 1.0)
    tex = _texture(f["params"]["seed"], c.h, c.w)
    sl, x, y = c.sub((cx - r, cy - 1.2 * r, cx + r, cy + 1.2 * r))
    blob = dome(ellipse(x, y, cx, cy, r, 1.2 * r, f["params"]["angle"])) ** 0.6
    s = _sign(f["side"]) if c.view == "frontal" else None
    # Patchy, irregular airspace opacity: the blob thresholded against a smooth field.
    fine = anat.parenchyma(f["params"]["seed"], c.h, c.w)[sl]
    patchy = np.clip((blob + 0.5 * tex[sl] + 0.3 * fine - 0.75) * 2.5, 0.0, 1.0)
    patch = patchy * c.lung(s)[sl]
    amp = (0.55 + 0.1 * level(f)) * k
    c.add(sl, patch * (c.air[sl] + 0.04) * amp, extent=patch)


def _atelectasis(c: Canvas, f: dict, k: float) -> None:
    cx, cy = _lobe_centre(c, f)
    length = 0.07 + 0.03 * f["severity"]
    thick = 0.006 + 0.006 * f["severity"]
    sl, x, y = c.sub((cx - length, cy - length * 0.4, cx + length, cy + length * 0.4))
    band = dome(ellipse(x, y, cx, cy, length, thick, f["params"]["angle"] * 0.6))
    s = _sign(f["side"]) if c.view == "frontal" else None
    patch = band * c.lung(s)[sl]
    c.add(sl, patch * (c.air[sl] + 0.05) * 0.75 * k, extent=patch)


def _nodule(c: Canvas, f: dict, k: float) -> None:
    cx, cy = _lobe_centre(c, f)
    r = 0.001 * f["params"]["size_mm"]
    sl, x, y = c.sub((cx - r, cy - r, cx + r, cy + r))
    blob = dome(ellipse(x, y, cx, cy, r, r)) ** 0.5
    c.add(sl, blob * 0.3 * k, extent=blob)


def _pneumothorax(c: Canvas, f: dict, k: float) -> None:
    a = c.a
    gap = _graded(f, (0.022, 0.045, 0.08))
    if c.view == "frontal":
        s = _sign(f["side"])
        xin, xout = a.cx + s * a.mediastinum, a.cx + s * (a.half_width + 0.01)
        sl, x, y = c.sub((min(xin, xout), a.apex_y - 0.01, max(xin, xout), a.base_y))
        inner = anat.lung_mask(a, x, y, s, shrink=gap, soft=0.004)
        lung = c.lung(s)[sl]
    else:
        sl, x, y = c.sub((a.lat_front, a.apex_y - 0.01, a.lat_back + 0.05, a.apex_y + 0.3))
        inner = anat.lateral_lung(a, x, y, shrink=gap * 0.7, soft=0.004)
        lung = c.lung(None)[sl]
    space = np.clip(lung - inner, 0.0, 1.0)
    markings = 0.2 * c.layers.vessels[sl]
    edge = 4.0 * inner * (1.0 - inner) * lung
    patch = -space * (markings + 0.05 * k) + 0.05 * k * edge
    c.add(sl, patch, extent=((lung > 0.5) & (inner < 0.5)).astype(np.float32), thr=0.5)


def _polyline(points, n: int = 24) -> list[tuple[float, float]]:
    """A smooth curve through 3 control points (quadratic Bezier), or the 2-point line."""
    if len(points) == 2:
        return list(points)
    (x0, y0), (x1, y1), (x2, y2) = points
    t = np.linspace(0, 1, n)
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * x1 + t**2 * x2
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * y1 + t**2 * y2
    return list(zip(xs, ys))


def _devices(c: Canvas, f: dict, k: float) -> None:
    a, p = c.a, f["params"]
    for dev in p["devices"]:
        img = Image.new("F", (c.w, c.h), 0.0)
        draw = ImageDraw.Draw(img)
        scale = c.h

        def line(points, width, value, _draw=draw, _scale=scale):
            pts = [(px * _scale, py * _scale) for px, py in _polyline(points)]
            _draw.line(pts, fill=value, width=max(1, int(round(width * _scale))), joint="curve")

        if c.view == "frontal":
            carina = a.apex_y + 0.24
            if dev == "ett":
                line([(a.cx, 0.0), (a.cx + 0.003, carina - p["ett_tip"] * 0.5)], 0.007, 0.45)
            elif dev == "central_line":
                tip = (a.cx - 0.03, a.apex_y + p["line_tip"])
                if p["line_side"] == "right":
                    line([(a.cx - 0.1, 0.0), (a.cx - 0.05, a.apex_y + 0.05), tip], 0.004, 0.4)
                else:
                    start = (a.cx + 0.25, a.apex_y + 0.07)
                    line([start, (a.cx + 0.02, a.apex_y + 0.06), tip], 0.004, 0.4)
            else:
                gx, gy = a.cx + 0.22, a.apex_y + 0.07
                draw.rounded_rectangle(
                    [
                        (gx - 0.035) * scale,
                        (gy - 0.022) * scale,
                        (gx + 0.035) * scale,
                        (gy + 0.022) * scale,
                    ],
                    radius=0.01 * scale,
                    fill=1.1,
                )
                ra = (a.cx - 0.04, a.heart_y - 0.1)
                rv = (a.cx + 0.07, a.heart_y + 0.05)
                line([(gx, gy), (a.cx + 0.02, a.apex_y + 0.1), ra], 0.004, 0.55)
                line([(gx, gy), (a.cx + 0.03, a.apex_y + 0.12), rv], 0.004, 0.55)
        else:
            front, back = a.lat_front, a.lat_back
            tx = front + 0.45 * (back - front)
            if dev == "ett":
                line(
                    [(tx - 0.015, 0.0), (tx + 0.015, a.apex_y + 0.24 - p["ett_tip"] * 0.5)],
                    0.007,
                    0.4,
                )
            elif dev == "central_line":
                tip = (front + 0.33 * (back - front), a.apex_y + p["line_tip"])
                line([(tx + 0.02, 0.0), (tx, a.apex_y + 0.08), tip], 0.004, 0.35)
            else:
                gx, gy = front - 0.02, a.apex_y + 0.08
                draw.rounded_rectangle(
                    [
                        (gx - 0.012) * scale,
                        (gy - 0.03) * scale,
                        (gx + 0.012) * scale,
                        (gy + 0.03) * scale,
                    ],
                    radius=0.005 * scale,
                    fill=1.1,
                )
                hx0, hy0, hx1, hy1 = anat.lateral_heart_bounds(a, 1.0)
                line(
                    [(gx, gy), (front + 0.1, a.apex_y + 0.15), (hx0 + 0.06, hy1 - 0.05)], 0.004, 0.5
                )
        arr = np.asarray(img, dtype=np.float32)
        rows, cols = np.nonzero(arr > 0)
        if rows.size == 0:
            continue
        sl = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        c.add(sl, arr[sl] * min(1.0, k + 0.3), thr=0.05)


def _fracture(c: Canvas, f: dict, k: float) -> None:
    if c.view != "frontal":
        return
    a, p = c.a, f["params"]
    s = _sign(f["side"])
    d = p["d"]
    g = 1.8 * (d - 0.06) ** 2 + 4.0 * max(d - 0.24, 0.0) ** 2 - 0.03 * d
    prib = (p["rib"] + 0.25) ** (1 / 0.93)
    yc = prib * a.rib_spacing + a.apex_y - 0.03 + g - a.rib_phase
    xc = a.cx + s * d
    r = 0.03
    sl, x, y = c.sub((xc - r, yc - r, xc + r, yc + r))
    rib = c.layers.ribs[s][sl]
    moved = anat.rib_pattern(a, x, y, s, shift=0.004 * (1 + p["shift"])) * ((x - a.cx) * s > 0)
    beyond = ramp(s * (x - xc), 0.002) * dome(ellipse(x, y, xc, yc, r, r))
    gap = ramp(0.003 - np.abs(x - xc - 0.3 * (y - yc)), 0.002)
    callus = dome(ellipse(x, y, xc, yc, 0.012, 0.01))
    patch = 0.15 * (beyond * (moved - rib) - gap * rib) + 0.06 * k * callus
    near = dome(ellipse(x, y, xc, yc, 0.02, 0.02))
    c.add(sl, patch, extent=near)


_DRAW = {
    "pleural_effusion": _effusion,
    "edema": _edema,
    "consolidation": _consolidation,
    "atelectasis": _atelectasis,
    "nodule": _nodule,
    "pneumothorax": _pneumothorax,
    "support_devices": _devices,
    "fracture": _fracture,
}


def draw_findings(c: Canvas, findings: dict, subtlety: float) -> dict[str, list]:
    """Draw every finding into ``c.density``; return canonical pixel boxes per finding.

    Cardiomegaly is drawn by the anatomy (heart size); its box is the heart's extent.
    Also fills ``c.masks`` per finding type: ``{type: [(slices, mask), ...]}`` is
    returned as the attribute ``c.finding_masks``.
    """
    boxes: dict[str, list] = {}
    c.finding_masks = {}
    for kind in FINDING_TYPES:
        f = findings.get(kind)
        if f is None:
            continue
        c.boxes, c.masks = [], []
        if kind == "cardiomegaly":
            scale = heart_scale(findings) * (1.12 if getattr(c, "ap", False) else 1.0)
            if c.view == "frontal":
                b = anat.heart_bounds(c.a, scale)
                sl, x, y = c.sub(b)
                m = anat.heart_shape(c.a, x, y, scale) > 0.5
            else:
                b = anat.lateral_heart_bounds(c.a, scale)
                sl, x, y = c.sub(b)
                m = anat.lateral_heart(c.a, x, y, scale) > 0.5
            rows, cols = np.nonzero(m)
            if rows.size:
                r0, c0 = sl[0].start, sl[1].start
                c.boxes.append(
                    [c0 + cols.min(), r0 + rows.min(), c0 + cols.max() + 1, r0 + rows.max() + 1]
                )
                c.masks.append((sl, m))
        else:
            _DRAW[kind](c, f, subtlety)
        if c.boxes:
            boxes[kind] = [[float(v) for v in b] for b in c.boxes]
            c.finding_masks[kind] = list(c.masks)
    return boxes
