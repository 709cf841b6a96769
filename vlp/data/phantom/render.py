"""Rendering one view of one study: anatomy + findings + acquisition -> image and boxes.

One job: compose the other modules for a single image, caching the per-patient normal
anatomy (which does not change between a patient's studies) so that a patient's later
studies only pay for the heart, the findings and the acquisition.

Canonical maps are drawn at most :data:`RENDER_LONG_SIDE` pixels high and resampled to the
output size in the same affine step that applies the patient's positioning; detector
noise is added at the output resolution.
"""

from __future__ import annotations

import numpy as np

from vlp.data.phantom import anatomy as anat
from vlp.data.phantom.acquisition import (
    Acquisition,
    expose,
    forward_matrix,
    map_box,
    output_shape,
    tone,
    warp,
)
from vlp.data.phantom.findings import Canvas, draw_findings, heart_scale

#: Height of the canonical density map; larger outputs are upsampled from it.
RENDER_LONG_SIDE = 256


def canonical_shape(image_size: int) -> tuple[int, int]:
    h = min(int(image_size), RENDER_LONG_SIDE)
    return h, max(8, int(round(h * anat.ASPECT)))


class PatientRenderer:
    """Draws any view of any study of one patient."""

    def __init__(self, a: anat.Anatomy, image_size: int):
        self.a = a
        self.image_size = int(image_size)
        self.h, self.w = canonical_shape(image_size)
        self.out_hw = output_shape(image_size)
        self._base: dict = {}

    def base(self, view: str):
        if view not in self._base:
            if view == "frontal":
                self._base[view] = anat.render_frontal(self.a, self.h, self.w)
            else:
                self._base[view] = anat.render_lateral(self.a, self.h, self.w)
        return self._base[view]

    def canvas(self, view: str, findings: dict, acq: Acquisition, subtlety: float) -> Canvas:
        """Canonical density of one view with its findings drawn (boxes in ``c.boxes_by``)."""
        layers = self.base(view)
        density = layers.density.copy()
        ap = acq.view == "AP"
        scale = heart_scale(findings) * (1.12 if ap else 1.0)
        air = layers.air.copy()  # the heart displaces lung air; findings replace what is left
        anat.add_heart(density, air, self.a, scale, view)
        c = Canvas(view, self.a, layers, density)
        c.air = air
        c.ap = ap
        c.boxes_by = draw_findings(c, findings, subtlety)
        if ap:
            density *= 0.95
        return c

    def render(
        self, view: str, findings: dict, acq: Acquisition, subtlety: float
    ) -> tuple[np.ndarray, dict[str, list[list[int] | None]]]:
        """8-bit image and per-finding boxes ``[x, y, w, h]`` in output pixels.

        A box that left the image (extreme positioning) is ``None`` so that box lists stay
        aligned with the devices they describe.
        """
        c = self.canvas(view, findings, acq, subtlety)
        m = forward_matrix(acq, (self.h, self.w), self.out_hw)
        img = expose(warp(tone(c.density, acq), m, self.out_hw), acq)
        boxes = {kind: [map_box(m, b, self.out_hw) for b in bs] for kind, bs in c.boxes_by.items()}
        return img, boxes

    def masks(
        self, view: str, findings: dict, acq: Acquisition, subtlety: float
    ) -> dict[str, np.ndarray]:
        """Boolean output-frame mask of each drawn finding (union of its parts)."""
        c = self.canvas(view, findings, acq, subtlety)
        m = forward_matrix(acq, (self.h, self.w), self.out_hw)
        out = {}
        for kind, parts in c.finding_masks.items():
            canon = np.zeros((self.h, self.w), np.float32)
            for sl, mask in parts:
                canon[sl] = np.maximum(canon[sl], mask.astype(np.float32))
            out[kind] = warp(canon, m, self.out_hw) >= 0.5
        return out
