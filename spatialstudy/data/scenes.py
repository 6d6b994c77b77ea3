"""Procedural 3D scenes: objects on a ground plane, a pinhole camera, a numpy ray caster, and the point-cloud
recovery of each object's centroid and extent (the VQASynth pipeline in miniature, with exact ground truth).

World frame: x to the right, y up, z away from the camera; the ground is y = 0; units are metres.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# --- camera and light (named so the scene geometry is auditable) ---
CAM_HEIGHT = 2.0                 # metres above the ground: a raised view spreads objects over the image
CAM_PITCH_DEG = 25.0             # looks down so the ground fills the image, a sliver of sky on top
FOV_DEG = 60.0                   # full field of view of the square image
LIGHT_DIR = np.array([-0.45, 1.0, -0.35]) / np.linalg.norm([-0.45, 1.0, -0.35])  # towards the sun: upper left, behind
AMBIENT, DIFFUSE = 0.35, 0.75    # Lambertian shading: colour * (ambient + diffuse * max(0, n.l) * lit)
SHADOW_EPS = 1e-3                # offset of shadow-ray origins along the normal (avoids self-shadowing acne)
GROUND_RGB = (150, 146, 136)     # plain warm grey ground
SKY_TOP, SKY_HORIZON = (120, 165, 225), (200, 220, 240)
# The sky band and the perspective of the ground tell a patch how high it sits in the image, but a plain floor is
# left-right symmetric, and Qwen2.5-VL has only rotary (relative) positions: measured, tiny bases then learnt upper vs
# lower perfectly and left vs right not at all. A soft light from the left dims the ground across the view, as a window
# beside a real room does, so every patch of ground also tells how far left it is.
SIDE_LIGHT = 0.3                 # ground brightness x1.3 at the view's left edge, x0.7 at its right edge

# --- objects ---
SHAPES = ("cube", "sphere", "cylinder")
DEPTH_RANGE = (2.0, 6.0)         # z of object centres: near enough to be large in a 112 px image
MIN_PIXEL_GAP = 3                # projected bounding boxes are at least this far apart, so nothing is occluded
MIN_VISIBLE_PIXELS = 40          # an object smaller than this in the image is resampled
PLACE_TRIES = 256
# Every shape's width and height are drawn from one range (cube side, sphere and cylinder diameter, cylinder height
# independently): with shape-specific ranges "is the cylinder taller than the cube?" was answerable from the shape
# words alone (a text-only classifier reached 84% on which_taller).
SIZE_RANGE = (0.5, 1.3)          # metres; wide enough for four numeric options 1.25x apart within the prior
DUPLICATE_SIZE_RATIO = 1.6       # two objects of one shape differ at least this much, so "large"/"small" names hold

# Colours: the "distinct" palette has clearly different luma levels so grayscale keeps objects apart;
# "equal_brightness" shifts every colour to one luma so only hue tells them apart.
PALETTE = {
    "blue": (30, 50, 165),
    "red": (205, 40, 40),
    "green": (60, 180, 70),
    "orange": (250, 150, 40),
    "yellow": (250, 240, 90),
}
EQUAL_LUMA = 125.0


def luma(rgb) -> float:
    """ITU-R BT.601 luma, the grayscale that PIL's convert('L') computes."""
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _equalise(rgb, target: float = EQUAL_LUMA, iters: int = 8) -> tuple[int, int, int]:
    """Shift a colour's channels until its luma is `target` (iterated because clipping moves it)."""
    c = np.array(rgb, float)
    for _ in range(iters):
        c = np.clip(c + (target - luma(c)), 0, 255)
    return tuple(int(round(v)) for v in c)


def palette(name: str = "distinct") -> dict[str, tuple[int, int, int]]:
    """Colour name -> RGB for palette 'distinct' or 'equal_brightness'."""
    if name == "distinct":
        return dict(PALETTE)
    if name == "equal_brightness":
        return {k: _equalise(v) for k, v in PALETTE.items()}
    raise ValueError(f"unknown palette {name!r}; use 'distinct' or 'equal_brightness'")


@dataclass
class Obj:
    """One object resting on the ground: shape, colour, position of its footprint centre, and size."""

    shape: str
    colour: str
    rgb: tuple
    x: float
    z: float
    width: float                  # x extent
    height: float                 # y extent
    depth: float                  # z extent
    size_word: str = ""           # "large" / "small" when another object has the same shape

    @property
    def radius(self) -> float:
        return self.width / 2

    @property
    def centre(self) -> np.ndarray:
        return np.array([self.x, self.height / 2, self.z])

    def corners(self) -> np.ndarray:
        """8 corners of the axis-aligned bounding box (for projection and placement)."""
        hx, hz = self.width / 2, self.depth / 2
        return np.array([[self.x + sx * hx, y, self.z + sz * hz]
                         for sx in (-1, 1) for sz in (-1, 1) for y in (0.0, self.height)])


@dataclass
class Camera:
    """Pinhole camera at (0, CAM_HEIGHT, 0) pitched down; square image of `size` pixels."""

    size: int = 112
    height: float = CAM_HEIGHT
    pitch_deg: float = CAM_PITCH_DEG
    fov_deg: float = FOV_DEG

    @property
    def pos(self) -> np.ndarray:
        return np.array([0.0, self.height, 0.0])

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors in world coordinates."""
        p = np.radians(self.pitch_deg)
        return np.array([1.0, 0, 0]), np.array([0, np.cos(p), np.sin(p)]), np.array([0, -np.sin(p), np.cos(p)])

    @property
    def focal(self) -> float:
        """Focal length in pixels (fx = fy)."""
        return self.size / 2 / np.tan(np.radians(self.fov_deg) / 2)

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (n,3) -> pixel coords (n,2) as (col, row) and camera depth (n,)."""
        r, u, f = self.axes
        d = pts - self.pos
        zc = d @ f
        c = self.size / 2
        return np.stack([c + self.focal * (d @ r) / zc, c - self.focal * (d @ u) / zc], 1), zc

    def rays(self) -> np.ndarray:
        """Unit ray directions (H*W, 3) through pixel centres, row-major."""
        r, u, f = self.axes
        c = (np.arange(self.size) + 0.5 - self.size / 2) / self.focal
        xs, ys = np.meshgrid(c, -c)
        d = f + xs.reshape(-1, 1) * r + ys.reshape(-1, 1) * u
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    def backproject(self, depth: np.ndarray) -> np.ndarray:
        """Depth map (H,W) of camera z-depths -> world points (H*W, 3); inf depths give inf points."""
        r, u, f = self.axes
        c = (np.arange(self.size) + 0.5 - self.size / 2) / self.focal
        xs, ys = np.meshgrid(c, -c)
        z = depth.reshape(-1, 1)
        return self.pos + z * (xs.reshape(-1, 1) * r + ys.reshape(-1, 1) * u + f)


# --- ray-object intersections (vectorised over rays; return t (inf = miss) and unit normals) ---

def _hit_sphere(o, d, ob: Obj):
    c = np.array([ob.x, ob.radius, ob.z])
    oc = o - c
    b = np.einsum("ij,ij->i", oc, d)
    disc = b * b - (np.sum(oc * oc, axis=-1) - ob.radius ** 2)
    t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
    t = np.where(t > 1e-6, t, np.inf)
    n = (o + t[:, None] * d) - c
    n = np.where(np.isfinite(t)[:, None], n, 0.0)
    return t, n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)


def _hit_box(o, d, ob: Obj):
    lo = np.array([ob.x - ob.width / 2, 0.0, ob.z - ob.depth / 2])
    hi = np.array([ob.x + ob.width / 2, ob.height, ob.z + ob.depth / 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1, t2 = (lo - o) * inv, (hi - o) * inv
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    t = np.where((tmax >= tmin) & (tmin > 1e-6), tmin, np.inf)
    axis = np.argmax(np.minimum(t1, t2), axis=1)          # the slab entered last is the face hit
    n = np.zeros_like(d)
    n[np.arange(len(d)), axis] = -np.sign(d[np.arange(len(d)), axis])
    return t, n


def _hit_cylinder(o, d, ob: Obj):
    """Vertical cylinder: side surface plus top cap (the bottom rests on the ground)."""
    r = ob.radius
    ox, oz = o[..., 0] - ob.x, o[..., 2] - ob.z
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = ox * d[:, 0] + oz * d[:, 2]
    disc = b * b - a * (ox ** 2 + oz ** 2 - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    ys = o[..., 1] + ts * d[:, 1]
    ts = np.where((ts > 1e-6) & (ys >= 0) & (ys <= ob.height), ts, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = (ob.height - o[..., 1]) / d[:, 1]
    cx, cz = ox + tc * d[:, 0], oz + tc * d[:, 2]
    tc = np.where((tc > 1e-6) & (cx ** 2 + cz ** 2 <= r * r), tc, np.inf)
    side = ts <= tc
    n = np.where(side[:, None], np.stack([ox + ts * d[:, 0], np.zeros_like(ts), oz + ts * d[:, 2]], 1) / r,
                 np.array([0.0, 1.0, 0.0]))
    return np.minimum(ts, tc), np.nan_to_num(n)


HIT = {"sphere": _hit_sphere, "cube": _hit_box, "cylinder": _hit_cylinder}


@dataclass
class Render:
    """Result of ray casting one scene: image, z-depth map, per-pixel object id (-1 ground, -2 sky)."""

    image: Image.Image
    depth: np.ndarray
    ids: np.ndarray


def _pixel_subset(ob: Obj, cam: Camera) -> np.ndarray:
    """Indices of the rays whose pixels fall in the object's projected bounding box (+1 px): the only rays that
    can hit it, so each object is intersected with a few hundred rays, not the whole image."""
    px, _ = cam.project(ob.corners())
    c0, r0 = np.floor(px.min(0)).astype(int) - 1
    c1, r1 = np.ceil(px.max(0)).astype(int) + 1
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, cam.size - 1), min(r1, cam.size - 1)
    rows, cols = np.mgrid[r0:r1 + 1, c0:c1 + 1]
    return (rows * cam.size + cols).reshape(-1)


def _cast(cam: Camera, d, objs):
    """Nearest hit among the ground plane and objects: (t, ids, normals)."""
    o = np.broadcast_to(cam.pos, d.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[:, 1] < -1e-9, -cam.pos[1] / d[:, 1], np.inf)
    ids = np.where(np.isfinite(t), -1, -2)
    normals = np.tile([0.0, 1.0, 0.0], (len(d), 1))
    for k, ob in enumerate(objs):
        sub = _pixel_subset(ob, cam)
        tk, nk = HIT[ob.shape](o[sub], d[sub], ob)
        closer = tk < t[sub]
        idx = sub[closer]
        t[idx], ids[idx], normals[idx] = tk[closer], k, nk[closer]
    return t, ids, normals


def _shadow_reach(ob: Obj) -> float:
    """Ground distance from the object's footprint centre beyond which its shadow cannot fall."""
    return np.hypot(ob.width, ob.depth) / 2 + ob.height * np.hypot(LIGHT_DIR[0], LIGHT_DIR[2]) / LIGHT_DIR[1]


def _in_shadow(points, normals, objs):
    """True where the ray towards the light is blocked by an object (the ground cannot shadow)."""
    o = points + SHADOW_EPS * normals
    d = np.broadcast_to(LIGHT_DIR, points.shape)
    blocked = np.zeros(len(points), bool)
    for ob in objs:
        near = np.flatnonzero(np.hypot(points[:, 0] - ob.x, points[:, 2] - ob.z) <= _shadow_reach(ob) + 0.05)
        blocked[near] |= np.isfinite(HIT[ob.shape](o[near], d[near], ob)[0])
    return blocked


def _side_light(d, cam: Camera) -> np.ndarray:
    """Per-ray ground brightness factor, falling linearly from 1 + SIDE_LIGHT (left edge) to 1 - SIDE_LIGHT (right)."""
    r, _, f = cam.axes
    across = np.clip((d @ r) / (d @ f) / np.tan(np.radians(cam.fov_deg) / 2), -1, 1)   # -1 left edge, +1 right edge
    return 1 - SIDE_LIGHT * across


def render(objs: list[Obj], cam: Camera) -> Render:
    """Ray-cast the scene: Lambertian shading with hard shadows, a sky gradient, and the z-depth map."""
    d = cam.rays()
    t, ids, normals = _cast(cam, d, objs)
    hit = ids > -2
    pts = cam.pos + np.where(hit, t, 0)[:, None] * d
    lit = np.ones(len(d))
    lit[hit] = ~_in_shadow(pts[hit], normals[hit], objs)
    albedo = np.array([GROUND_RGB] + [ob.rgb for ob in objs], float)[np.where(ids >= 0, ids + 1, 0)]
    shade = AMBIENT + DIFFUSE * np.clip(normals @ LIGHT_DIR, 0, 1) * lit
    rgb = albedo * shade[:, None] * np.where(ids == -1, _side_light(d, cam), 1.0)[:, None]
    sky_mix = np.clip(d[:, 1] * 3, 0, 1)[:, None]             # bluer towards the zenith
    sky = (1 - sky_mix) * np.array(SKY_HORIZON) + sky_mix * np.array(SKY_TOP)
    rgb = np.where(hit[:, None], rgb, sky)
    s = cam.size
    depth = np.where(hit, t * (d @ cam.axes[2]), np.inf).reshape(s, s)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8).reshape(s, s, 3), "RGB")
    return Render(img, depth, ids.reshape(s, s))


# --- recovery from the point cloud (what a VQASynth-style pipeline measures) ---

@dataclass
class Geometry:
    """Per-object measurements recovered from the point cloud; every answer is computed from these."""

    centroid: np.ndarray          # (k,3) mean of the object's visible 3D points, world frame
    size: np.ndarray              # (k,3) width (x), height (y, floor-aligned: top above ground), depth (z)
    uv: np.ndarray                # (k,2) mean pixel position of the object's mask, normalised to [0,1] (col, row)
    cam: np.ndarray = field(default_factory=lambda: np.array([0.0, CAM_HEIGHT, 0.0]))
    npix: np.ndarray | None = None

    @property
    def k(self) -> int:
        return len(self.centroid)

    @property
    def dist(self) -> np.ndarray:
        """Euclidean distance camera -> centroid."""
        return np.linalg.norm(self.centroid - self.cam, axis=1)

    @property
    def ground_dist(self) -> np.ndarray:
        """Distance on the ground from the point below the camera to below the centroid."""
        return np.hypot(self.centroid[:, 0] - self.cam[0], self.centroid[:, 2] - self.cam[2])


def point_cloud(rend: Render, cam: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Back-project the depth map: (points (n,3), object ids (n,)) for every non-sky pixel."""
    pts = cam.backproject(rend.depth)
    ids = rend.ids.reshape(-1)
    keep = ids > -2
    return pts[keep], ids[keep]


def recover_geometry(rend: Render, cam: Camera, k: int) -> Geometry:
    """Centroids and extents of the k objects from the back-projected point cloud and the id mask."""
    pts, ids = point_cloud(rend, cam)
    rows, cols = np.nonzero(rend.ids >= 0)
    mids = rend.ids[rows, cols]
    cen, size, uv, npix = np.zeros((k, 3)), np.zeros((k, 3)), np.zeros((k, 2)), np.zeros(k, int)
    for i in range(k):
        p = pts[ids == i]
        npix[i] = len(p)
        if not len(p):
            continue
        cen[i] = p.mean(0)
        lo, hi = p.min(0), p.max(0)
        size[i] = [hi[0] - lo[0], hi[1], hi[2] - lo[2]]   # height from the ground: the scene is floor-aligned
        uv[i] = [(cols[mids == i].mean() + 0.5) / cam.size, (rows[mids == i].mean() + 0.5) / cam.size]
    return Geometry(cen, size, uv, cam.pos, npix)


# --- scene sampling ---

def _sample_obj(rng, shape, colour, rgb, scale=1.0) -> Obj:
    s = rng.uniform(*SIZE_RANGE) * scale
    h = rng.uniform(*SIZE_RANGE) * scale if shape == "cylinder" else s
    return Obj(shape, colour, rgb, 0, 0, s, h, s)


def _bboxes(ob: Obj, xs: np.ndarray, zs: np.ndarray, cam: Camera) -> np.ndarray:
    """Projected bounding boxes (m,4: x0,y0,x1,y1) of `ob` placed at each candidate (x, z)."""
    rel = ob.corners() - np.array([ob.x, 0.0, ob.z])
    pts = rel[None] + np.stack([xs, np.zeros_like(xs), zs], 1)[:, None]
    px, _ = cam.project(pts.reshape(-1, 3))
    px = px.reshape(len(xs), 8, 2)
    return np.concatenate([px.min(1), px.max(1)], 1)


def _fitting(cand: np.ndarray, boxes: list, size: int) -> np.ndarray:
    """Mask of candidate boxes inside the frame and MIN_PIXEL_GAP apart from every placed box."""
    ok = (cand[:, 0] >= 1) & (cand[:, 1] >= 1) & (cand[:, 2] <= size - 1) & (cand[:, 3] <= size - 1)
    g = MIN_PIXEL_GAP
    for b in boxes:
        ok &= (cand[:, 2] + g < b[0]) | (b[2] + g < cand[:, 0]) | (cand[:, 3] + g < b[1]) | (b[3] + g < cand[:, 1])
    return ok


def _shapes(rng, n) -> list[str]:
    """Distinct shapes for up to 3 objects; a 4th repeats one (then named by size)."""
    shapes = list(rng.permutation(SHAPES))[:n]
    if n > len(SHAPES):
        shapes.append(shapes[int(rng.integers(len(SHAPES)))])
    return shapes


def _objects(rng, n, colours: dict) -> list[Obj]:
    names = list(rng.permutation(list(colours)))[:n]
    shapes = _shapes(rng, n)
    objs, seen = [], {}
    for shape, c in zip(shapes, names):
        if shape in seen:                         # second of its shape: make the size difference unmistakable
            other = seen[shape]
            big = rng.random() < 0.5
            ob = _sample_obj(rng, shape, c, colours[c])
            ratio = DUPLICATE_SIZE_RATIO * (1 + 0.2 * rng.random())
            f = ratio * other.width / ob.width if big else other.width / (ratio * ob.width)
            ob = Obj(shape, c, colours[c], 0, 0, ob.width * f, ob.height * f, ob.depth * f)
            ob.size_word, other.size_word = ("large", "small") if big else ("small", "large")
        else:
            ob = _sample_obj(rng, shape, c, colours[c])
        seen[shape] = ob
        objs.append(ob)
    return objs


def place(rng, objs: list[Obj], cam: Camera) -> bool:
    """Place objects at random ground positions without projected overlap; False if it failed."""
    boxes = []
    half = np.tan(np.radians(cam.fov_deg) / 2)
    for ob in objs:
        zs = rng.uniform(*DEPTH_RANGE, PLACE_TRIES)       # candidates drawn in one batch: vectorised projection
        xs = rng.uniform(-0.85, 0.85, PLACE_TRIES) * zs * half
        cand = _bboxes(ob, xs, zs, cam)
        ok = np.flatnonzero(_fitting(cand, boxes, cam.size))
        if not len(ok):
            return False
        ob.x, ob.z = float(xs[ok[0]]), float(zs[ok[0]])
        boxes.append(cand[ok[0]])
    return True


@dataclass
class Scene:
    """A rendered scene with its camera, objects, render buffers and recovered geometry."""

    objs: list[Obj]
    cam: Camera
    rend: Render
    geom: Geometry

    @property
    def image(self) -> Image.Image:
        return self.rend.image


def sample_scene(rng: np.random.Generator, image_size: int = 112, palette_name: str = "distinct",
                 n_objects: tuple[int, int] = (2, 4)) -> Scene:
    """Sample, place and render a scene with n_objects[0]..n_objects[1] objects; resample until valid."""
    cam, colours = Camera(image_size), palette(palette_name)
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))   # drawn once, so crowded scenes are not under-sampled
    while True:
        objs = _objects(rng, n, colours)
        if not place(rng, objs, cam):
            continue
        rend = render(objs, cam)
        geom = recover_geometry(rend, cam, n)
        if geom.npix.min() >= MIN_VISIBLE_PIXELS * (image_size / 112) ** 2:
            return Scene(objs, cam, rend, geom)
