"""Street-scene layouts of the synthetic domain pair (rendering and files: ``uda_ray.data.synthetic``).

Layout. A pinhole camera at height h above a flat ground looks down a street; the horizon row y_h and the vanishing
column x_v vary per scene. A world point (X lateral, Y height, Z depth, metres) projects to
``x = x_v + f X / Z``, ``y = y_h + f (h - Y) / Z``. Everything is painted with a z-buffer: the ground (road with
lane marks and crossings, sidewalks with curbs, terrain verges), façade planes parallel to the street (buildings
with windows, walls, fences, hedges; a second row behind them; a backdrop across the street's end), vehicles
parked along the curbs (side view on a plane), vehicles in the lanes (rear view), people, riders, bicycles and
motorcycles, poles with lamps, signs and traffic lights, and trees, all at sizes in metres, so image sizes follow
depth. Rare classes (train, bus, truck, motorcycle, rider) appear in few scenes, as in the real data.

A layout is a ``Canvas``: z-buffered maps of instance, part, surface coordinates and facing, plus each
instance's Cityscapes label id and canonical part colours; ``render`` in ``synthetic.py`` turns it into
pixels in one domain's appearance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from uda_ray.data.labels import CITYSCAPES_ID_TO_TRAIN, CLASSES

_TRAIN_TO_ID = {t: i for i, t in CITYSCAPES_ID_TO_TRAIN.items()}
LID = {name: _TRAIN_TO_ID[t] for t, name in enumerate(CLASSES)}  # class name -> Cityscapes label id
TID = {name: t for t, name in enumerate(CLASSES)}  # class name -> train id
UNLABELED, EGO_VEHICLE, PARKING = 0, 1, 9  # void Cityscapes ids written as real data has them

Shape = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | int]]


def _c(*rgb: int) -> np.ndarray:
    return np.array(rgb, dtype=np.float32) / 255.0


# Canonical part colours per class: (main, secondary, tertiary, accent); instances vary the main colour.
PARTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "road": ((78, 78, 84), (226, 226, 214), (66, 66, 70), (90, 90, 96)),
    "sidewalk": ((168, 150, 140), (196, 190, 184), (150, 138, 130), (180, 170, 160)),
    "building": ((190, 165, 125), (46, 62, 88), (92, 72, 62), (150, 140, 130)),
    "wall": ((152, 142, 124), (124, 112, 100), (140, 130, 115), (160, 150, 135)),
    "fence": ((118, 96, 64), (84, 72, 52), (100, 84, 60), (130, 110, 80)),
    "pole": ((88, 88, 94), (70, 70, 74), (110, 110, 116), (88, 88, 94)),
    "traffic light": ((38, 38, 32), (22, 22, 22), (220, 40, 30), (64, 64, 52)),
    "traffic sign": ((200, 34, 30), (236, 236, 236), (40, 40, 40), (150, 150, 150)),
    "vegetation": ((62, 118, 46), (92, 66, 46), (42, 88, 36), (80, 130, 50)),
    "terrain": ((146, 162, 82), (122, 136, 62), (160, 150, 90), (140, 160, 80)),
    "sky": ((92, 152, 236), (232, 236, 246), (150, 190, 240), (92, 152, 236)),
    "person": ((60, 70, 120), (45, 45, 55), (222, 180, 150), (40, 30, 25)),
    "rider": ((200, 80, 40), (45, 45, 55), (222, 180, 150), (40, 30, 25)),
    "car": ((160, 30, 30), (36, 46, 56), (24, 24, 24), (200, 40, 30)),
    "truck": ((220, 220, 210), (40, 46, 52), (24, 24, 24), (200, 40, 30)),
    "bus": ((200, 150, 30), (36, 46, 56), (24, 24, 24), (200, 40, 30)),
    "train": ((230, 230, 225), (40, 50, 60), (200, 40, 40), (80, 80, 80)),
    "motorcycle": ((40, 40, 48), (150, 150, 160), (24, 24, 24), (200, 40, 30)),
    "bicycle": ((30, 90, 160), (120, 120, 120), (24, 24, 24), (30, 90, 160)),
}
# Instance main colours drawn from these lists where the real world varies a lot.
PAINTS = {
    "building": ((190, 165, 125), (165, 100, 80), (205, 195, 175), (125, 125, 135), (150, 130, 110), (215, 205, 150)),
    "car": ((160, 30, 30), (225, 225, 225), (30, 30, 34), (40, 70, 150), (150, 152, 158), (90, 90, 95),
            (30, 90, 60), (200, 170, 60)),
    "truck": ((220, 220, 210), (60, 80, 140), (200, 60, 40), (120, 120, 110)),
    "bus": ((200, 150, 30), (200, 50, 40), (50, 110, 180), (230, 230, 220)),
    "train": ((230, 230, 225), (220, 190, 40), (200, 50, 40)),
    "person": ((60, 70, 120), (180, 40, 40), (40, 40, 40), (200, 200, 190), (70, 110, 60), (150, 110, 70)),
    "rider": ((200, 80, 40), (40, 40, 40), (60, 90, 160), (230, 200, 50)),
    "traffic sign": ((200, 34, 30), (34, 70, 190), (230, 196, 40), (236, 236, 236)),
    "traffic light": ((220, 40, 30), (230, 180, 30), (40, 200, 80)),
    "bicycle": ((30, 90, 160), (160, 30, 30), (30, 30, 30), (200, 200, 200)),
    "motorcycle": ((40, 40, 48), (180, 30, 30), (30, 60, 150), (200, 200, 200)),
}
_PART_ARRAYS = {name: np.array(p, np.float32) / 255.0 for name, p in PARTS.items()}  # (4, 3) each
_PAINT_ARRAYS = {name: np.array(p, np.float32) / 255.0 for name, p in PAINTS.items()}  # (n, 3) each
# Per-class variation of the main colour (relative, per channel) for the classes without a paint list.
VARIATION = {"road": 0.08, "sidewalk": 0.08, "wall": 0.12, "fence": 0.12, "pole": 0.1, "vegetation": 0.15,
             "terrain": 0.12, "sky": 0.05}
VOID_COLOURS = {UNLABELED: (20, 20, 20), EGO_VEHICLE: (32, 32, 38), PARKING: (112, 106, 104)}


# ---------------------------------------------------------------------------------------------------- canvas
class Canvas:
    """Z-buffered label/instance/part/surface-coordinate maps of one scene seen by one pinhole camera."""

    def __init__(self, h: int, w: int, f: float, xv: float, yh: float, cam_h: float) -> None:
        self.h, self.w, self.f, self.xv, self.yh, self.cam_h = h, w, f, xv, yh, cam_h
        self.xs = np.arange(w, dtype=np.float32) + 0.5
        self.ys = np.arange(h, dtype=np.float32) + 0.5
        self.depth = np.full((h, w), np.inf, np.float32)
        self.inst = np.zeros((h, w), np.int32)
        self.part = np.zeros((h, w), np.uint8)
        self.u = np.zeros((h, w), np.float32)
        self.v = np.zeros((h, w), np.float32)
        self.facing = np.zeros((h, w), np.uint8)
        self.label_ids: list[int] = []
        self.colours: list[np.ndarray] = []

    def add(self, label_id: int, colours: np.ndarray) -> int:
        self.label_ids.append(label_id)
        self.colours.append(colours)
        return len(self.label_ids) - 1

    def paint(self, rows: slice, cols: slice, mask: np.ndarray, depth: np.ndarray | float, k: np.ndarray | int,
              part: np.ndarray | int, u: np.ndarray | float, v: np.ndarray | float, facing: int) -> None:
        d = self.depth[rows, cols]
        m = mask & (depth < d)
        if not m.any():
            return
        for dst, src in ((d, depth), (self.inst[rows, cols], k), (self.part[rows, cols], part),
                         (self.u[rows, cols], u), (self.v[rows, cols], v)):
            if np.ndim(src) == 0:
                dst[m] = src
            else:
                dst[m] = (src if src.shape == m.shape else np.broadcast_to(src, m.shape))[m]
        self.facing[rows, cols][m] = facing

    def plane(self, xp: float, z0: float, z1: float, k: int, shape: Shape, facing: int, top: float) -> None:
        """A vertical plane at lateral position ``xp`` spanning depths [z0, z1) and heights [0, top);
        ``shape(a, Y)`` in metres."""
        dx = self.xs - self.xv
        with np.errstate(divide="ignore", invalid="ignore"):
            zc = np.where(dx * xp > 0, self.f * xp / dx, -1.0)
        cols = np.nonzero((zc >= z0) & (zc < z1))[0]
        if cols.size == 0:
            return
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        z = zc[c0:c1][None, :]  # (1, C)
        z_near = float(z.min())
        r0 = max(0, math.floor(self.yh + self.f * (self.cam_h - top) / z_near))
        r1 = min(self.h, math.ceil(self.yh + self.f * self.cam_h / z_near))
        if r0 >= r1:
            return
        y = self.cam_h - (self.ys[r0:r1, None] - self.yh) * z / self.f  # (R, C) height above ground
        a = np.broadcast_to(z - z0, y.shape)  # (R, C) metres along the plane
        mask, part = shape(a, y)
        self.paint(slice(r0, r1), slice(c0, c1), mask & (y >= 0) & (y < top), z, k, part, a, y, facing)

    def board(self, xc: float, z: float, half_w: float, top: float, k: int, shape: Shape,
              bottom: float = 0.0) -> None:
        """A plane facing the camera at depth ``z`` centred on lateral ``xc``; ``shape(lx, ly)`` in metres."""
        if z < 0.5:
            return
        f, cam_h = self.f, self.cam_h
        c0 = max(0, math.floor(self.xv + f * (xc - half_w) / z))
        c1 = min(self.w, math.ceil(self.xv + f * (xc + half_w) / z))
        r0 = max(0, math.floor(self.yh + f * (cam_h - top) / z))
        r1 = min(self.h, math.ceil(self.yh + f * (cam_h - bottom) / z))
        if c0 >= c1 or r0 >= r1:
            return
        lx = ((self.xs[c0:c1] - self.xv) * z / f - xc)[None, :]  # (1, C)
        ly = (cam_h - (self.ys[r0:r1] - self.yh) * z / f)[:, None]  # (R, 1)
        mask, part = shape(lx, ly)
        mask = np.broadcast_to(mask, (r1 - r0, c1 - c0)) & (ly >= bottom)
        self.paint(slice(r0, r1), slice(c0, c1), mask, z, k, part, lx, ly, 3)

    def label_map(self) -> np.ndarray:
        return np.asarray(self.label_ids, dtype=np.uint8)[self.inst]  # (H, W) Cityscapes label ids


# ----------------------------------------------------------------------------------------------------- shapes
def _disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (x - cx) ** 2 + (y - cy) ** 2 < r * r


def _car_rear(w: float, h: float) -> Shape:
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ax = np.abs(x)
        wheel = (ax > w / 2 - 0.4) & (ax < w / 2 - 0.04) & (y < 0.34)
        body = (ax < w / 2) & (y >= 0.28) & (y < 0.6 * h)
        cab_w = w / 2 * (0.92 - 0.3 * (y - 0.6 * h) / (0.4 * h))
        cabin = (y >= 0.6 * h) & (y < h) & (ax < cab_w)
        glass = cabin & (y < 0.93 * h) & (ax < cab_w - 0.08)
        light = body & (ax > w / 2 - 0.3) & (y > 0.45 * h)
        part = np.where(glass, 1, np.where(wheel & ~body, 2, np.where(light, 3, 0)))
        return wheel | body | cabin, part
    return shape


def _box_rear(w: float, h: float, glass_from: float, glass_to: float) -> Shape:
    """Truck, bus or tram seen from behind: a box on wheels with an optional window band."""
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ax = np.abs(x)
        wheel = (ax > w / 2 - 0.45) & (ax < w / 2 - 0.05) & (y < 0.5)
        body = (ax < w / 2) & (y >= 0.42) & (y < h)
        glass = body & (y > glass_from * h) & (y < glass_to * h) & (ax < w / 2 - 0.15)
        part = np.where(glass, 1, np.where(wheel & ~body, 2, 0))
        return wheel | body, part
    return shape


def _vehicle_side(length: float, h: float, kind: str) -> Shape:
    """A parked vehicle in side view on a plane along the street; ``a`` runs along its length."""
    def shape(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = 0.33 if kind == "car" else 0.48
        wheels = _disc(a, y, 0.18 * length, r, r) | _disc(a, y, 0.82 * length, r, r)
        if kind == "car":
            body = (a >= 0) & (a < length) & (y >= 0.3) & (y < 0.62 * h)
            t = (y - 0.62 * h) / (0.38 * h)
            cabin = (y >= 0.62 * h) & (y < h) & (a > (0.22 + 0.12 * t) * length) & (a < (0.8 - 0.1 * t) * length)
            glass = cabin & (y < 0.94 * h) & (a > (0.25 + 0.12 * t) * length) & (a < (0.77 - 0.1 * t) * length)
        else:
            body = (a >= 0) & (a < length) & (y >= 0.45) & (y < h)
            cabin = np.zeros_like(body)
            glass = body & (y > 0.55 * h) & (y < 0.85 * h) & (np.mod(a, 1.6) > 0.25)
            if kind == "truck":
                glass = body & (a > 0.82 * length) & (y > 0.5 * h) & (y < 0.8 * h)
        part = np.where(glass, 1, np.where(wheels, 2, 0))
        return wheels | body | cabin, part
    return shape


def _person(h: float, stride: float) -> Shape:
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        head = _disc(x / 0.8, y, 0.0, h - 0.12, 0.12)
        torso = (np.abs(x) < 0.2 + 0.05 * (y < 0.8 * h)) & (y >= 0.5 * h) & (y < h - 0.2)
        spread = stride * (0.5 * h - y) / (0.5 * h)
        legs = (y < 0.5 * h) & ((np.abs(x - spread) < 0.08) | (np.abs(x + spread) < 0.08))
        part = np.where(head, 2, np.where(legs & ~torso, 1, 0))
        return head | torso | legs, part
    return shape


def _rider(seat: float) -> Shape:
    """Upper body of a person seated at height ``seat`` facing sideways, with one leg down to the pedal."""
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        head = _disc(x, y, 0.1, seat + 0.82, 0.12)
        torso = (np.abs(x - 0.05 - 0.1 * (y - seat)) < 0.17) & (y >= seat) & (y < seat + 0.68)
        leg = (np.abs(x - 0.1 + 0.15 * (seat - y)) < 0.08) & (y < seat + 0.05) & (y > seat - 0.55)
        part = np.where(head, 2, np.where(leg & ~torso, 1, 0))
        return head | torso | leg, part
    return shape


def _two_wheeler(motor: bool) -> Shape:
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, cx = (0.32, 0.68) if motor else (0.34, 0.55)
        d1, d2 = np.hypot(x - cx, y - r), np.hypot(x + cx, y - r)
        tyre = (np.abs(d1 - r) < 0.06) | (np.abs(d2 - r) < 0.06)
        inside = (d1 < r) | (d2 < r)
        if motor:
            frame = (np.abs(x) < 0.62) & (y > 0.3) & (y < 0.95 - 0.3 * np.abs(x + 0.1))
        else:
            frame = ((np.abs(y - r - 0.35) < 0.05) & (np.abs(x) < 0.45)) | \
                    ((np.abs(x + 0.15 * (y - r)) < 0.05) & (y > r) & (y < 1.0)) | \
                    ((np.abs(x - cx + 0.12 * (y - r)) < 0.05) & (y > r) & (y < 1.05))
        part = np.where(tyre, 2, np.where(frame, 0, 1))
        return tyre | inside | frame, part
    return shape


def _pole(half: float, h: float, mast_x: float = 0.0, arm_end: float = 0.0) -> Shape:
    """A mast at local x ``mast_x`` and, when ``arm_end`` differs from it, a horizontal arm at the top."""
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
        mast = (np.abs(x - mast_x) < half) & (y < h)
        lo, hi = min(mast_x, arm_end), max(mast_x, arm_end)
        boom = (x > lo) & (x < hi) & (y > h - 0.18) & (y < h)
        return mast | boom, 0
    return shape


def _front(shape: Shape, half_w: float) -> Shape:
    """A plane shape (along-coordinate ``a`` from 0) used on a camera-facing board of half width ``half_w``."""
    def front(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | int]:
        mask, part = shape(x + half_w, y)
        return mask & (np.abs(x) < half_w), part
    return front


def _sign(kind: int, size: float, centre: float) -> Shape:
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dy = y - centre
        if kind == 0:  # round
            inner, outer = _disc(x, dy, 0, 0, 0.4 * size), _disc(x, dy, 0, 0, 0.5 * size)
        elif kind == 1:  # rectangle
            outer = (np.abs(x) < 0.5 * size) & (np.abs(dy) < 0.35 * size)
            inner = (np.abs(x) < 0.42 * size) & (np.abs(dy) < 0.27 * size)
        else:  # triangle
            outer = (dy > -0.45 * size) & (np.abs(x) < 0.55 * size * (0.5 - dy / size) / 0.95)
            inner = (dy > -0.35 * size) & (np.abs(x) < 0.4 * size * (0.4 - dy / size) / 0.85)
        return outer, np.where(inner, 0, 1)
    return shape


def _traffic_light(cx: float, top: float) -> Shape:
    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        box = (np.abs(x - cx) < 0.22) & (y < top) & (y > top - 1.05)
        lit = _disc(x, y, cx, top - 0.19, 0.12)
        lamps = lit | _disc(x, y, cx, top - 0.52, 0.12) | _disc(x, y, cx, top - 0.85, 0.12)
        return box, np.where(lit, 2, np.where(lamps, 3, 0))
    return shape


def _tree(rng: np.random.Generator, trunk_h: float, crown_r: float) -> tuple[Shape, float]:
    blobs = [(0.0, trunk_h + crown_r * 0.8, crown_r)]
    for _ in range(int(rng.integers(2, 6))):
        ang = rng.uniform(0, 2 * math.pi)
        blobs.append((0.6 * crown_r * math.cos(ang), trunk_h + crown_r * (0.8 + 0.5 * math.sin(ang)),
                      crown_r * rng.uniform(0.5, 0.8)))

    def shape(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        crown = np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
        for bx, by, br in blobs:
            crown |= _disc(x, y, bx, by, br)
        trunk = (np.abs(x) < 0.12 + 0.05 * (y < 0.5)) & (y < trunk_h + crown_r * 0.5)
        return crown | trunk, np.where(crown, np.where(((x * 3.1).astype(int) + (y * 2.3).astype(int)) % 3 == 0,
                                                        2, 0), 1)
    return shape, trunk_h + crown_r * 2.0


def _facade(top: float, sx: float, sy: float, shop: float) -> Shape:
    """A building wall with a window grid (part 1) and a ground floor band (part 2)."""
    def shape(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        win = (y > shop) & (y < top - 0.8) & (np.mod(a, sx) > 0.3 * sx) & (np.mod(y - shop, sy) > 0.35 * sy)
        ground = (y < shop) & (np.mod(a, 7.0) > 1.5)
        return y < top, np.where(win, 1, np.where(ground, 2, 0))
    return shape


def _bumpy(top: float, amp: float, period: float, phase: float, part: int = 0) -> Shape:
    def shape(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
        return y < top + amp * np.sin(a * 2 * math.pi / period + phase), part
    return shape


def _fence(top: float) -> Shape:
    def shape(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return y < top, np.where((np.mod(a, 0.5) < 0.12) | (y > top - 0.12), 0, 1)
    return shape


# ------------------------------------------------------------------------------------------------------ scene
class Scene:
    """Samples one street layout into a canvas; all random choices come from ``rng``."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, *, ego_hood: bool, void_specks: bool) -> None:
        self.rng = rng
        yh = h * rng.uniform(0.33, 0.5)
        self.cv = Canvas(h, w, f=w * rng.uniform(0.9, 1.15), xv=w * rng.uniform(0.35, 0.65), yh=yh,
                          cam_h=rng.uniform(1.25, 1.7))
        self.z_min = self.cv.f * self.cv.cam_h / (h - yh)  # depth of the bottom row
        self.cv.add(LID["sky"], self.colours("sky"))
        self.street()
        self.ground()
        self.backdrop()
        for side in (-1, 1):
            self.side(side)
            self.curb_objects(side)
        self.traffic()
        self.people()
        if ego_hood:
            self.hood()
        if void_specks:
            self.specks()

    # -- colours
    def colours(self, name: str) -> np.ndarray:
        rng = self.rng
        cols = _PART_ARRAYS[name].copy()  # (4, 3)
        if name in _PAINT_ARRAYS:
            choice = _PAINT_ARRAYS[name]
            cols[2 if name == "traffic light" else 0] = choice[int(rng.integers(len(choice)))]
        if name in VARIATION:
            cols[0] = cols[0] * rng.uniform(1 - VARIATION[name], 1 + VARIATION[name], 3)
        if name in ("person", "rider"):
            cols[1] = cols[1] * rng.uniform(0.6, 2.2)
            cols[2] = cols[2] * rng.uniform(0.45, 1.05)
        return np.clip(cols, 0, 1, out=cols)

    def new(self, name: str) -> int:
        return self.cv.add(LID[name], self.colours(name))

    # -- layout
    def street(self) -> None:
        rng = self.rng
        self.road = (-rng.uniform(2.5, 9.0), rng.uniform(2.5, 9.0))
        self.walk = tuple(0.0 if rng.random() < 0.08 else rng.uniform(1.5, 4.5) for _ in range(2))
        self.verge = tuple(rng.uniform(1.0, 5.0) if rng.random() < 0.35 else 0.0 for _ in range(2))
        self.parking = tuple(rng.random() < 0.1 for _ in range(2))
        self.face = (self.road[0] - 2.3 * self.parking[0] - self.walk[0] - self.verge[0],
                     self.road[1] + 2.3 * self.parking[1] + self.walk[1] + self.verge[1])
        self.z_end = rng.uniform(60.0, 250.0)
        self.crossing = None
        if rng.random() < 0.35:
            zc = rng.uniform(self.z_min * 1.5, 60.0)
            self.crossing = (zc, zc + rng.uniform(8.0, 14.0))

    def segment_end(self, xp: float, z: float, length: float) -> float:
        """End of a façade segment from ``z``; once segments shrink below 2 px, the rest of the row is one segment."""
        if self.cv.f * abs(xp) * (1 / z - 1 / (z + length)) < 2.0:
            return self.z_end
        return z + length

    def in_crossing(self, z0: float, z1: float) -> bool:
        return self.crossing is not None and z1 > self.crossing[0] and z0 < self.crossing[1]

    def ground(self) -> None:
        cv, rng = self.cv, self.rng
        r0 = int(np.searchsorted(cv.ys, cv.yh + 0.25))
        z = (cv.f * cv.cam_h / (cv.ys[r0:] - cv.yh))[:, None]  # (R, 1)
        x = (cv.xs - cv.xv)[None, :] * z / cv.f  # (R, W) lateral metres
        x = np.broadcast_to(x, (z.shape[0], cv.w))
        road, walk, verge, park = self.road, self.walk, self.verge, self.parking
        k = np.empty(x.shape, np.int32)
        part = np.zeros(x.shape, np.uint8)
        for i, s in enumerate((-1, 1)):
            side = (x < 0) if s < 0 else (x >= 0)
            beyond = self.new("terrain") if rng.random() < 0.5 else self.new("sidewalk")
            k[side] = beyond
            edge = road[i] + s * 2.3 * park[i]
            bands = [(edge + s * walk[i] + s * verge[i], self.new("terrain") if rng.random() < 0.7 else beyond),
                     (edge + s * walk[i], self.new("sidewalk") if walk[i] > 0 else self.new("terrain"))]
            if park[i]:
                bands.append((edge, cv.add(PARKING, _c(*VOID_COLOURS[PARKING])[None].repeat(4, 0))))
            for limit, kk in bands:
                k[side & (s * (x - limit) < 0)] = kk
            if walk[i] > 0:
                part[side & (s * (x - edge) >= 0) & (s * (x - edge) < 0.25)] = 1  # curb stones
        on_road = (x >= road[0]) & (x <= road[1])
        zz = np.broadcast_to(z, x.shape)
        lane = np.zeros(x.shape, bool)
        for lane_x in np.arange(road[0] + 3.2, road[1] - 1.0, 3.2):
            lane |= np.abs(x - lane_x) < 0.08
        marks = lane & (np.mod(zz, 9.0) < 3.5)  # dashed lane lines
        if self.crossing is not None:
            zc0, zc1 = self.crossing
            zebra = (zz >= zc0 - 4.0) & (zz < zc0 - 1.0)
            marks = np.where(zebra, np.mod(x, 1.0) < 0.5, marks & ~((zz >= zc0) & (zz < zc1)))
            on_road |= (zz >= zc0) & (zz < zc1)
        k[on_road] = self.new("road")
        part[on_road] = marks[on_road]
        cv.paint(slice(r0, None), slice(None), np.ones(x.shape, bool), z, k, part, zz, x, 0)

    def backdrop(self) -> None:
        """Buildings, trees or open sky across the street's end, on a plane facing the camera at ``z_end``."""
        cv, rng, z = self.cv, self.rng, self.z_end
        if rng.random() < 0.2:
            return
        x = self.face[0] - 20.0
        while x < self.face[1] + 20.0:
            wdt = rng.uniform(8.0, 25.0)
            kind = rng.choice(3, p=(0.65, 0.25, 0.1))
            if kind == 0:
                top = rng.uniform(6.0, 35.0)
                k = self.new("building")
                shape = _facade(top, rng.uniform(2.5, 4.0), rng.uniform(2.8, 3.4), rng.uniform(3.0, 4.5))
                cv.board(x + wdt / 2, z, wdt / 2, top, k, _front(shape, wdt / 2))
            elif kind == 1:
                top = rng.uniform(5.0, 14.0)
                k = self.new("vegetation")
                shape = _bumpy(top, 1.5, rng.uniform(2.0, 5.0), rng.uniform(0.0, 6.0))
                cv.board(x + wdt / 2, z, wdt / 2, top + 2, k, _front(shape, wdt / 2))
            x += wdt

    def side(self, s: int) -> None:
        """Façade segments along one side of the street, a back row behind them, hedges, walls and fences."""
        cv, rng = self.cv, self.rng
        i = 0 if s < 0 else 1
        facing = 1 if s < 0 else 2
        back = self.face[i] + s * rng.uniform(6.0, 20.0)
        z = self.z_min * 0.3
        while z < self.z_end:  # back row: tall buildings or tree lines, seen through gaps
            end = self.segment_end(back, z, rng.uniform(10.0, 35.0))
            if self.in_crossing(z, end):
                z = self.crossing[1]  # type: ignore[index]
                continue
            if rng.random() < 0.75:
                top = rng.uniform(10.0, 40.0)
                cv.plane(back, z, end, self.new("building"),
                         _facade(top, rng.uniform(2.5, 4.0), rng.uniform(2.8, 3.4), rng.uniform(3.0, 4.5)), facing, top)
            else:
                top = rng.uniform(5.0, 12.0)
                cv.plane(back, z, end, self.new("vegetation"),
                         _bumpy(top, 1.2, rng.uniform(3, 8), rng.uniform(0, 6)), facing, top + 1.2)
            z = end
        z = self.z_min * 0.3
        xf = self.face[i]
        while z < self.z_end:
            end = self.segment_end(xf, z, rng.uniform(6.0, 30.0))
            if self.in_crossing(z, end):
                z = self.crossing[1]  # type: ignore[index]
                continue
            kind = rng.choice(5, p=(0.62, 0.1, 0.09, 0.07, 0.12))
            if kind == 0:
                top = rng.uniform(6.0, 28.0)
                shape = _facade(top, rng.uniform(2.5, 4.0), rng.uniform(2.8, 3.4), rng.uniform(3.0, 4.5))
                cv.plane(xf + s * rng.uniform(0.0, 1.0), z, end, self.new("building"), shape, facing, top)
            elif kind == 1:
                top = rng.uniform(1.5, 5.0)
                cv.plane(xf, z, end, self.new("vegetation"),
                         _bumpy(top, 0.4, rng.uniform(1, 3), rng.uniform(0, 6)), facing, top + 0.4)
            elif kind == 2:
                top = rng.uniform(1.2, 3.0)
                cv.plane(xf, z, end, self.new("wall"), _bumpy(top, 0.0, 1.0, 0.0), facing, top)
            elif kind == 3:
                top = rng.uniform(1.0, 2.2)
                cv.plane(xf, z, end, self.new("fence"), _fence(top), facing, top)
            z = end
        if self.verge[i] > 0 and rng.random() < 0.3:  # a fence between sidewalk and verge
            z0 = rng.uniform(self.z_min * 0.5, 30.0)
            edge = self.face[i] - s * self.verge[i]
            top = rng.uniform(0.9, 1.5)
            cv.plane(edge + s * 0.1, z0, z0 + rng.uniform(8, 40), self.new("fence"), _fence(top), facing, top)

    def curb_objects(self, s: int) -> None:
        """Parked vehicles along the curb, poles with lamps/signs/traffic lights, trees and parked bicycles."""
        cv, rng = self.cv, self.rng
        i = 0 if s < 0 else 1
        facing = 1 if s < 0 else 2
        if rng.random() < 0.6:
            z = self.z_min * rng.uniform(0.3, 1.0)
            x_car = self.road[i] + s * 2.3 * self.parking[i] - s * rng.uniform(0.9, 1.3)
            while z < 70.0:
                kind = rng.choice(3, p=(0.84, 0.1, 0.06))
                name, length, h = (("car", rng.uniform(3.8, 4.8), rng.uniform(1.4, 1.6)),
                                   ("truck", rng.uniform(6, 9), rng.uniform(2.6, 3.6)),
                                   ("bus", rng.uniform(11, 13), rng.uniform(3.0, 3.3)))[kind]
                if not self.in_crossing(z, z + length) and rng.random() < 0.75:
                    cv.plane(x_car, z, z + length, self.new(name), _vehicle_side(length, h, name), facing, h)
                z += length + rng.uniform(0.5, 12.0)
        x_curb = self.road[i] + s * 2.3 * self.parking[i] + s * rng.uniform(0.3, 0.7)
        z = self.z_min * rng.uniform(0.6, 2.0)
        while z < 90.0:
            if not self.in_crossing(z - 1, z + 1):
                self.pole(x_curb, z, s, near_crossing=self.crossing is not None and abs(z - self.crossing[0]) < 8)
            z += rng.uniform(10.0, 30.0)
        if self.crossing is not None and rng.random() < 0.7:
            self.pole(x_curb, self.crossing[0] - 1.0, s, near_crossing=True)
        if rng.random() < 0.5:
            x_tree = self.face[i] - s * (self.verge[i] / 2 if self.verge[i] > 0 else 0.8)
            z = self.z_min * rng.uniform(0.5, 1.5)
            while z < 80.0:
                shape, top = _tree(rng, rng.uniform(1.8, 3.5), rng.uniform(1.3, 3.2))
                if not self.in_crossing(z - 2, z + 2):
                    cv.board(x_tree, z, 4.0, top, self.new("vegetation"), shape)
                z += rng.uniform(5.0, 14.0)
        if rng.random() < 0.25 and self.walk[i] > 0:
            for _ in range(int(rng.integers(1, 4))):
                z = rng.uniform(self.z_min * 0.7, 30.0)
                cv.board(self.face[i] - s * rng.uniform(0.4, 1.0), z, 0.95, 1.1, self.new("bicycle"),
                         _two_wheeler(False))

    def pole(self, x: float, z: float, s: int, near_crossing: bool) -> None:
        cv, rng = self.cv, self.rng
        kind = rng.choice(3, p=(0.45, 0.25, 0.3) if near_crossing else (0.12, 0.38, 0.5))
        half = rng.uniform(0.08, 0.14)
        if kind == 0:  # traffic light hanging from an arm over the road, or on top of the pole
            h = rng.uniform(3.5, 6.0)
            arm = -s * rng.uniform(1.5, 4.5) if rng.random() < 0.6 else 0.0
            cv.board(x + arm / 2, z, abs(arm) / 2 + 0.3, h, self.new("pole"), _pole(half, h, -arm / 2, arm / 2))
            cx = arm / 2 if arm else 0.0
            top = h - 0.15 if arm else h + 1.05
            cv.board(x + arm / 2, z - 0.05, abs(arm) / 2 + 0.3, top, self.new("traffic light"),
                     _traffic_light(cx, top))
        elif kind == 1:  # sign on a short pole
            h = rng.uniform(2.2, 3.2)
            size = rng.uniform(0.55, 0.9)
            cv.board(x, z, 0.2, h, self.new("pole"), _pole(half, h))
            cv.board(x, z - 0.05, size / 2 + 0.05, h + size / 2, self.new("traffic sign"),
                     _sign(int(rng.integers(3)), size, h))
        else:  # street lamp: a tall pole with an arm over the road
            h = rng.uniform(5.0, 9.0)
            arm = -s * rng.uniform(0.5, 2.0)
            cv.board(x + arm / 2, z, abs(arm) / 2 + 0.2, h, self.new("pole"), _pole(half, h, -arm / 2, arm / 2))

    def traffic(self) -> None:
        """Vehicles in the lanes seen from behind; riders on two-wheelers; rarely a tram."""
        cv, rng = self.cv, self.rng
        lo, hi = self.road[0] + 1.3, self.road[1] - 1.3
        if hi <= lo:
            return
        for _ in range(int(rng.poisson(1.6))):
            z = rng.uniform(self.z_min * 0.9, 80.0)
            x = rng.uniform(lo, hi)
            kind = rng.choice(4, p=(0.78, 0.1, 0.08, 0.04))
            if kind == 0:
                w, h = rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.6)
                cv.board(x, z, w / 2, h, self.new("car"), _car_rear(w, h))
            elif kind == 1:
                h = rng.uniform(2.8, 3.8)
                cv.board(x, z, 1.25, h, self.new("truck"), _box_rear(2.45, h, 1.0, 1.0))
            elif kind == 2:
                cv.board(x, z, 1.3, 3.2, self.new("bus"), _box_rear(2.55, 3.2, 0.55, 0.85))
            else:
                cv.board(x, z, 1.3, 3.6, self.new("train"), _box_rear(2.6, 3.5, 0.45, 0.8))
        if rng.random() < 0.07:  # a tram in the middle of the street
            z = rng.uniform(self.z_min, 60.0)
            cv.board((lo + hi) / 2, z, 1.3, 3.6, self.new("train"), _box_rear(2.6, 3.5, 0.45, 0.8))
        for _ in range(int(rng.poisson(0.35))):
            motor = rng.random() < 0.45
            z = rng.uniform(self.z_min * 0.8, 40.0)
            x = rng.uniform(self.road[0] + 0.5, self.road[1] - 0.5)
            cv.board(x, z, 1.1, 1.1, self.new("motorcycle" if motor else "bicycle"), _two_wheeler(motor))
            if rng.random() < 0.9:
                cv.board(x, z - 0.05, 0.6, 2.0, self.new("rider"), _rider(0.85 if motor else 0.95))

    def people(self) -> None:
        cv, rng = self.cv, self.rng
        for _ in range(int(rng.poisson(2.5))):
            i = int(rng.integers(2))
            s = -1 if i == 0 else 1
            edge = self.road[i] + s * 2.3 * self.parking[i]
            if self.walk[i] > 0:
                x = edge + s * rng.uniform(0.3, self.walk[i])
            elif self.crossing is not None:
                x = rng.uniform(self.road[0], self.road[1])
            else:
                continue
            z = rng.uniform(self.z_min * 0.7, 60.0)
            h = rng.uniform(1.5, 1.95)
            for _ in range(int(rng.choice(3, p=(0.7, 0.2, 0.1))) + 1):  # groups
                cv.board(x, z, 0.45, h, self.new("person"), _person(h, rng.uniform(0.0, 0.2)))
                x += rng.uniform(-0.9, 0.9)
                z += rng.uniform(-1.5, 1.5)
        if self.crossing is not None and rng.random() < 0.5:
            for _ in range(int(rng.integers(1, 4))):
                h = rng.uniform(1.5, 1.95)
                z = self.crossing[0] - rng.uniform(1.0, 4.0)
                cv.board(rng.uniform(*self.road), z, 0.45, h, self.new("person"), _person(h, rng.uniform(0, 0.25)))

    def hood(self) -> None:
        """The recording car's bonnet at the bottom (Cityscapes 'ego vehicle', a void id)."""
        cv, rng = self.cv, self.rng
        k = cv.add(EGO_VEHICLE, _c(*VOID_COLOURS[EGO_VEHICLE])[None].repeat(4, 0))
        hh = cv.h * rng.uniform(0.04, 0.08)
        xc = cv.w * rng.uniform(0.45, 0.55)
        top = cv.h - hh * np.clip(1 - ((cv.xs - xc) / (0.75 * cv.w)) ** 2, 0, 1)  # (W,)
        cv.paint(slice(None), slice(None), cv.ys[:, None] > top[None, :], 0.01, k, 0, 0.0, 0.0, 0)

    def specks(self) -> None:
        """A few small 'unlabeled' patches, as GTA5 labels have."""
        cv, rng = self.cv, self.rng
        for _ in range(int(rng.integers(0, 3))):
            k = cv.add(UNLABELED, _c(*VOID_COLOURS[UNLABELED])[None].repeat(4, 0))
            r, c = int(rng.integers(cv.h // 3, cv.h - 2)), int(rng.integers(0, cv.w - 3))
            cv.paint(slice(r, r + 2), slice(c, c + 3), np.ones((2, 3), bool), 0.02, k, 0, 0.0, 0.0, 0)


def make_scene(seed: int, domain: int, index: int, height: int, width: int) -> Canvas:
    """The layout of scene ``index`` of stream ``domain`` (0 source, 1 target train, 2 target val)."""
    rng = np.random.default_rng([seed, domain, index])
    return Scene(rng, height, width, ego_hood=domain > 0, void_specks=domain == 0).cv
