"""Scenes: a procedural dense multi-task dataset that needs no download.

Each image is a ray-cast view of a box-shaped room (a floor and four walls, no ceiling) holding
3 to 7 primitives resting on the floor (spheres, oriented boxes, upright capped cylinders), seen
from a random camera pose inside the room. Surfaces carry procedural textures (checkers,
stripes, smooth value noise), are lit by one point light with hard shadows plus ambient light
(Lambertian), and the image gets a little sensor noise. Every pixel's ground truth is exact,
computed from the hit of the ray through the pixel's centre:

- ``semseg``: class of the hit surface, ``CLASSES`` = background (the sky above the walls),
  floor, wall, sphere, box, cylinder (0..5).
- ``depth``: metric z-depth in metres (distance along the optical axis), 255 (ignored) where no
  surface is hit.
- ``normals``: unit surface normals in the camera frame, OpenCV axes (x right, y down, z
  forward; visible surfaces have n_z < 0), 255 on all three channels where no surface is hit.
- ``edge``: thin (one pixel wide) boundaries: between two 4-neighbours that see different
  surfaces (another class, or another object of the same class, which always means a depth
  discontinuity because objects never touch), the pixel nearer the camera is 1. Creases inside
  one surface (box edges, wall corners) are not edges: label and depth are continuous there.
- ``sal``: 1 on the objects (spheres, boxes, cylinders), 0 on the room and the sky.
- ``human_parts``: parts of the cylinders, as PASCAL's human parts are parts of people:
  0 not a cylinder, 1 top cap, 2 upper half of the side, 3 lower half (``PART_CLASSES``). As the
  survey does for images without people, an image with no cylinder in view is 255 everywhere
  (``parts_ignore_outside=True`` gives 255 on every non-cylinder pixel instead of 0).

Item format (the survey code's targets after its ``ToTensor``, see ``mtl_kernels.data``):
``image`` float32 [3, H, W] (ImageNet mean/std normalised unless ``normalize=False``; then in
[0, 1]), ``semseg`` and ``human_parts`` int64 [H, W] with 255 ignore, ``depth`` float32
[1, H, W], ``normals`` float32 [3, H, W], ``edge`` and ``sal`` float32 [1, H, W] in {0, 1},
``meta`` = {"image": id, "im_size": (H, W), "index", "intrinsics": (fx, fy, cx, cy)}.

The camera is a pinhole with fx = fy = (W / 2) / tan(fov / 2) and the principal point at the
image centre (cx, cy) = (W / 2, H / 2), with pixel (i, j) centred at (j + 0.5, i + 0.5); so a
pixel's 3-D point is depth * ((u - cx) / fx, (v - cy) / fy, 1).

Determinism: image ``index`` of split ``split`` depends only on (seed, split, index, size and
the generation parameters), not on ``length``; train and val use different seed streams.
Generation is vectorised over the pixels with numpy (one image at a time; about 20 ms per
120 x 160 image on one core) and runs once: the arrays (15 bytes a pixel) are cached in
``root`` (default ``$XDG_CACHE_HOME/mtl_kernels/scenes``, i.e. ``~/.cache/...``) in a directory
whose name hashes every generation parameter, written to a temporary directory and renamed into
place, and memory-mapped afterwards (cheap in DataLoader workers). A damaged cache directory is
regenerated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD, check_tasks, normalize_image

__all__ = ["CLASSES", "PART_CLASSES", "Scenes", "SCENES_TASKS"]

CLASSES = ("background", "floor", "wall", "sphere", "box", "cylinder")
PART_CLASSES = ("not_cylinder", "top", "upper_side", "lower_side")
SCENES_TASKS = ("semseg", "depth", "normals", "edge", "sal", "human_parts")
IGNORE = 255
_VERSION = 1  # bump when the renderer changes: it is part of the cache key

_BG, _FLOOR, _WALL, _SPHERE, _BOX, _CYL = range(6)
_SPLIT_CODE = {"train": 0, "val": 1}
# instance table fields: [kind, cx, cy, cz, s0, s1, s2, yaw, c1 rgb, c2 rgb, pattern, scale, noise_amp, noise_freq]
_F = 18


def _default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtl_kernels" / "scenes"


# ----------------------------------------------------------------------------------------------
# scene sampling (per image, numpy; cheap)


def _sample_scene(rng: np.random.Generator) -> dict:
    wx, wz = rng.uniform(2.5, 4.5, size=2)  # half extents of the room
    hr = rng.uniform(2.4, 3.4)
    n_obj = int(rng.integers(3, 8))
    objects = []  # (kind, cx, cy, cz, s0, s1, s2, yaw, bounding radius in xz)
    for _ in range(50 * n_obj):
        if len(objects) == n_obj:
            break
        kind = int(rng.integers(_SPHERE, _CYL + 1))
        if kind == _SPHERE:
            r = rng.uniform(0.25, 0.7)
            obj = [kind, 0.0, r, 0.0, r, r, r, 0.0, r]
        elif kind == _BOX:
            hx, hy, hz = rng.uniform(0.2, 0.6, size=3)
            obj = [kind, 0.0, hy, 0.0, hx, hy, hz, rng.uniform(0, math.pi), math.hypot(hx, hz)]
        else:
            r, h = rng.uniform(0.2, 0.5), rng.uniform(0.4, 1.6)
            obj = [kind, 0.0, 0.0, 0.0, r, h, r, 0.0, r]
        br = obj[8]
        x, z = rng.uniform(-wx + br + 0.1, wx - br - 0.1), rng.uniform(-wz + br + 0.1, wz - br - 0.1)
        # at least 0.15 m of floor between any two objects: they never touch or intersect
        if all(math.hypot(x - o[1], z - o[3]) > br + o[8] + 0.15 for o in objects):
            obj[1], obj[3] = x, z
            objects.append(obj)
    # camera inside the room, outside every object, looking at an object or the floor
    for _ in range(200):
        cam = np.array([rng.uniform(-wx + 0.3, wx - 0.3), rng.uniform(0.9, 2.0), rng.uniform(-wz + 0.3, wz - 0.3)])
        if all(math.hypot(cam[0] - o[1], cam[2] - o[3]) > o[8] + 0.5 for o in objects):
            break
    else:  # a crowded room: drop the objects the camera would stand in
        objects = [o for o in objects if math.hypot(cam[0] - o[1], cam[2] - o[3]) > o[8] + 0.5]
    if rng.random() < 0.85 and objects:
        o = objects[int(rng.integers(len(objects)))]
        target = np.array([o[1], o[2], o[3]]) + rng.normal(0, 0.2, size=3)
    else:
        target = np.array([rng.uniform(-wx, wx), 0.0, rng.uniform(-wz, wz)])
    f = target - cam
    if np.linalg.norm(f[[0, 2]]) < 0.3:
        f[[0, 2]] = [0.0, 1.0]
    f /= np.linalg.norm(f)
    pitch = float(np.clip(math.asin(f[1]), math.radians(-45), math.radians(-5)))
    yaw = math.atan2(f[0], f[2])
    f = np.array([math.cos(pitch) * math.sin(yaw), math.sin(pitch), math.cos(pitch) * math.cos(yaw)])
    up = np.array([0.0, 1.0, 0.0])
    d = -(up - up.dot(f) * f)
    d /= np.linalg.norm(d)
    r = np.cross(d, f)  # camera frame (x right, y down, z forward) is right-handed: r x d = f
    roll = math.radians(rng.uniform(-5, 5))
    r, d = math.cos(roll) * r + math.sin(roll) * d, -math.sin(roll) * r + math.cos(roll) * d
    rot = np.stack([r, d, f], axis=1)  # columns: camera axes in world coordinates

    def colour():
        return rng.uniform(0.1, 0.95, size=3)

    # instance table: 0 background, 1 floor, 2 walls (one surface: the room's inside is convex), 3.. objects
    table = np.zeros((3 + len(objects), _F))
    table[0, 0] = _BG
    table[0, 15] = 1.0  # texture scale, unused
    table[1, :8] = [_FLOOR, 0, 0, 0, wx, hr, wz, 0]
    table[2, :8] = [_WALL, 0, 0, 0, wx, hr, wz, 0]
    floor_c = colour()
    table[1, 8:] = [*floor_c, *(floor_c * rng.uniform(0.4, 0.8)), 1, rng.uniform(0.3, 0.8), 0.2, 6.0]
    wall_c = rng.uniform(0.5, 0.95, size=3)
    table[2, 8:] = [*wall_c, *(wall_c * rng.uniform(0.7, 0.9)), 3, rng.uniform(0.15, 0.6), 0.15, 3.0]
    for k, o in enumerate(objects):
        c1 = colour()
        pattern = int(rng.integers(0, 5))
        table[3 + k, :8] = o[:8]
        table[3 + k, 8:] = [*c1, *colour(), pattern, rng.uniform(0.08, 0.3), rng.uniform(0.0, 0.3), 8.0]
    return {
        "room": (wx, hr, wz),
        "cam": cam,
        "rot": rot,
        "light": np.array([rng.uniform(-wx, wx) * 0.8, hr + rng.uniform(-0.3, 0.5), rng.uniform(-wz, wz) * 0.8]),
        "ambient": rng.uniform(0.2, 0.4),
        "sky": (rng.uniform(0.5, 0.9, size=3), rng.uniform(0.7, 1.0, size=3)),
        "noise": rng.uniform(0.005, 0.025),
        "table": table,
    }


# ----------------------------------------------------------------------------------------------
# ray casting (numpy float32, one image at a time; each object is tested only on the rays that
# meet its bounding sphere, which keeps the cost near the number of pixels)

_INF = np.float32(np.inf)
_F32 = np.float32


def _dot(a, b):
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _hit_sphere(o, d, p):
    """First hit t > 0 of rays o + t d (o [N,3] or [3], d [N,3]) with the sphere of row p; inf: miss."""
    oc = o - p[1:4]
    a, b, c = _dot(d, d), _dot(d, oc), _dot(oc, oc) - p[4] * p[4]
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    return np.where((disc > 0) & (t > 1e-5), t, _INF)


def _yaw_rot(x, z, yaw, inverse=False):
    c, s = math.cos(yaw), math.sin(yaw)
    if inverse:  # box frame -> world
        return c * x + s * z, -s * x + c * z
    return c * x - s * z, s * x + c * z


def _hit_box(o, d, p):
    oc = o - p[1:4]
    ox, oz = _yaw_rot(oc[..., 0], oc[..., 2], p[7])
    dx, dz = _yaw_rot(d[..., 0], d[..., 2], p[7])
    tmin = tmax = None
    for oi, di, h in ((ox, dx, p[4]), (oc[..., 1], d[..., 1], p[5]), (oz, dz, p[6])):
        di = np.where(np.abs(di) < 1e-12, _F32(1e-12), di)
        t1, t2 = (-h - oi) / di, (h - oi) / di
        lo_i, hi_i = np.minimum(t1, t2), np.maximum(t1, t2)
        tmin = lo_i if tmin is None else np.maximum(tmin, lo_i)
        tmax = hi_i if tmax is None else np.minimum(tmax, hi_i)
    return np.where((tmax >= tmin) & (tmin > 1e-5), tmin, _INF)


def _hit_cylinder(o, d, p):
    r, h = p[4], p[5]
    ox, oy, oz = o[..., 0] - p[1], o[..., 1], o[..., 2] - p[3]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - r * r)
    ts = (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, 1e-20)
    ys = oy + ts * dy
    t = np.where((disc > 0) & (ts > 1e-5) & (ys >= 0) & (ys <= h), ts, _INF)
    tt = (h - oy) / np.where(np.abs(dy) < 1e-12, _F32(-1e-12), dy)
    xt, zt = ox + tt * dx, oz + tt * dz
    return np.where((tt > 1e-5) & (xt * xt + zt * zt <= r * r) & (tt < t), tt, t)


_HIT = {_SPHERE: _hit_sphere, _BOX: _hit_box, _CYL: _hit_cylinder}


def _bounding_sphere(p):
    k = int(p[0])
    if k == _CYL:
        return np.array([p[1], p[5] / 2, p[3]], _F32), math.hypot(p[4], p[5] / 2)
    if k == _BOX:
        return p[1:4], math.sqrt(p[4] ** 2 + p[5] ** 2 + p[6] ** 2)
    return p[1:4], p[4]


def _cast(o, d, table, t_max=None):
    """Nearest object hit along o + t d, 0 < t (< t_max): (t [N], instance row [N]); t = inf: none."""
    n = d.shape[0]
    t_best = np.full(n, _INF if t_max is None else _F32(t_max), dtype=_F32)
    i_best = np.zeros(n, dtype=np.int64)
    a = _dot(d, d)
    for row in range(3, len(table)):
        p = table[row]
        c, rad = _bounding_sphere(p)
        oc = o - c
        b = _dot(d, oc)
        disc = b * b - a * (_dot(oc, oc) - rad * rad)
        ok = disc > 0
        sq = np.sqrt(np.maximum(disc, 0))
        ok &= (-b + sq) > 0  # the bounding sphere is (partly) ahead
        ok &= (-b - sq) < t_best * a  # and nearer than the best hit so far
        idx = np.flatnonzero(ok)
        if not len(idx):
            continue
        t = _HIT[int(p[0])](o[idx] if o.ndim == 2 else o, d[idx], p)
        better = t < t_best[idx]
        t_best[idx[better]] = t[better]
        i_best[idx[better]] = row
    if t_max is not None:
        t_best[i_best == 0] = _INF
    return t_best, i_best


def _value_noise(x):
    """Smooth value noise in [0, 1] at points x [..., 3] (a hashed integer lattice, blended trilinearly)."""
    fl = np.floor(x)
    fr = x - fl
    fr = fr * fr * (3 - 2 * fr)
    i = fl.astype(np.int64).astype(np.uint32)
    hx = [i[..., 0] * np.uint32(73856093), (i[..., 0] + np.uint32(1)) * np.uint32(73856093)]
    hy = [i[..., 1] * np.uint32(19349663), (i[..., 1] + np.uint32(1)) * np.uint32(19349663)]
    hz = [i[..., 2] * np.uint32(83492791), (i[..., 2] + np.uint32(1)) * np.uint32(83492791)]
    wx, wy, wz = [1 - fr[..., 0], fr[..., 0]], [1 - fr[..., 1], fr[..., 1]], [1 - fr[..., 2], fr[..., 2]]
    out = 0.0
    for a in (0, 1):
        for b in (0, 1):
            hab = hx[a] ^ hy[b]
            wab = wx[a] * wy[b]
            for c in (0, 1):
                h = (hab ^ hz[c]) * np.uint32(2654435761)
                out = out + (wab * wz[c]) * ((h >> np.uint32(16)).astype(_F32) * _F32(1 / 65535))
    return out


def _render(scene: dict, height: int, width: int, fov_deg: float) -> dict[str, np.ndarray]:
    """Ray-cast one scene: the image (uint8) and every target, see the module docstring."""
    f32 = _F32
    fx = (width / 2) / math.tan(math.radians(fov_deg) / 2)
    v, u = np.meshgrid(np.arange(height, dtype=f32) + 0.5, np.arange(width, dtype=f32) + 0.5, indexing="ij")
    xc = ((u - width / 2) / fx).reshape(-1).astype(f32)
    yc = ((v - height / 2) / fx).reshape(-1).astype(f32)
    rot = scene["rot"].astype(f32)  # columns: camera axes r, d, f in world coordinates
    # world ray directions [P,3], unnormalised with unit component along f: t is the z-depth
    d = xc[:, None] * rot[:, 0] + yc[:, None] * rot[:, 1] + rot[:, 2]
    o = scene["cam"].astype(f32)
    wx, hr, wz = (f32(x) for x in scene["room"])
    table = scene["table"].astype(f32)

    # room: the ray leaves the box [-wx, wx] x [0, hr] x [-wz, wz] (camera inside) by the floor, a wall or the top
    dd = np.where(np.abs(d) < 1e-12, f32(1e-12), d)
    hi, lo = np.array([wx, hr, wz], f32), np.array([-wx, 0, -wz], f32)
    t_axis = np.where(dd > 0, (hi - o) / dd, (lo - o) / dd)  # [P,3]
    axis = t_axis.argmin(-1)
    t_room = np.take_along_axis(t_axis, axis[:, None], 1)[:, 0]
    sky = (axis == 1) & (d[:, 1] > 0)
    room_inst = np.where(sky, 0, np.where(axis == 1, 1, 2))

    t_o, inst_o = _cast(o, d, table)
    hit_obj = t_o < np.where(sky, _INF, t_room)
    inst = np.where(hit_obj, inst_o, room_inst)  # [P]
    t = np.where(hit_obj, t_o, t_room)
    bg = inst == 0
    pt = o + np.where(bg, f32(1), t)[:, None] * d  # [P,3] world hit points

    row = table[inst]  # [P,_F]
    kk = row[:, 0].astype(np.int64)
    ctr, size, yaw = row[:, 1:4], row[:, 4:7], row[:, 7]
    px, py, pz = pt[:, 0], pt[:, 1], pt[:, 2]
    zero, one = np.zeros_like(t), np.ones_like(t)
    # world normals per kind: floor and cylinder tops (0, 1, 0), walls inward, spheres radial, boxes by face
    nx, ny, nz = zero, one, zero
    wall_x = (wx - np.abs(px)) < (wz - np.abs(pz))
    is_wall = kk == _WALL
    nx = np.where(is_wall & wall_x, -np.sign(px), nx)
    nz = np.where(is_wall & ~wall_x, -np.sign(pz), nz)
    ny = np.where(is_wall, zero, ny)
    is_s = kk == _SPHERE
    inv_r = 1 / np.where(is_s, size[:, 0], one)
    nx = np.where(is_s, (px - ctr[:, 0]) * inv_r, nx)
    ny = np.where(is_s, (py - ctr[:, 1]) * inv_r, ny)
    nz = np.where(is_s, (pz - ctr[:, 2]) * inv_r, nz)
    is_b = kk == _BOX
    if is_b.any():
        c, s = np.cos(yaw), np.sin(yaw)
        lx, lz = c * (px - ctr[:, 0]) - s * (pz - ctr[:, 2]), s * (px - ctr[:, 0]) + c * (pz - ctr[:, 2])
        ly = py - ctr[:, 1]
        face = np.stack([size[:, 0] - np.abs(lx), size[:, 1] - np.abs(ly), size[:, 2] - np.abs(lz)], -1).argmin(-1)
        sx, sy, sz = (np.where(face == i, np.sign(li), zero) for i, li in enumerate((lx, ly, lz)))
        nx = np.where(is_b, c * sx + s * sz, nx)
        ny = np.where(is_b, sy, ny)
        nz = np.where(is_b, -s * sx + c * sz, nz)
    is_c = kk == _CYL
    rx, rz = px - ctr[:, 0], pz - ctr[:, 2]
    top = is_c & ((size[:, 1] - py) < (size[:, 0] - np.sqrt(rx * rx + rz * rz)))
    side = is_c & ~top
    inv_r = 1 / np.where(side, size[:, 0], one)
    nx, ny, nz = np.where(side, rx * inv_r, nx), np.where(side, zero, ny), np.where(side, rz * inv_r, nz)
    nrm = np.maximum(np.sqrt(nx * nx + ny * ny + nz * nz), 1e-12)
    n = np.stack([nx / nrm, ny / nrm, nz / nrm], -1)

    # albedo: two colours blended by a pattern, times smooth value noise
    c1, c2, pat, scale, amp = row[:, 8:11], row[:, 11:14], row[:, 14], row[:, 15], row[:, 16]
    q = (pt - ctr) / scale[:, None]
    noise = _value_noise(pt * row[:, 17:18])
    w = np.where(pat == 1, (np.floor(q + 0.5).sum(-1) % 2).astype(f32), zero)
    w = np.where(pat == 2, 0.5 + 0.5 * np.sin(f32(2 * math.pi) * q[:, 1]), w)
    w = np.where(pat == 3, 0.5 + 0.5 * np.sin(f32(2 * math.pi) * (q[:, 0] + q[:, 2])), w)
    w = np.where(pat == 4, 0.5 + 0.5 * np.sin(f32(2 * math.pi) * (q[:, 0] + q[:, 1]) + 4 * noise), w)
    albedo = (c1 + (c2 - c1) * w[:, None]) * (1 - amp + amp * noise)[:, None]

    # shading: ambient + Lambertian point light with hard shadows cast by the objects
    to_l = scene["light"].astype(f32) - pt
    dist = np.sqrt(_dot(to_l, to_l))
    ndl = np.maximum(_dot(n, to_l) / dist, 0)
    lit = ndl > 0
    shadow = np.zeros_like(lit)
    idx = np.flatnonzero(lit & ~bg)
    shadow[idx] = _cast(pt[idx] + f32(1e-3) * n[idx], to_l[idx], table, t_max=1.0)[0] < 1.0
    amb = f32(scene["ambient"])
    shade = amb + (1 - amb) * ndl * ~shadow * np.minimum(6.0 / (4.0 + dist * dist), 1.2)
    colour = albedo * shade[:, None]
    sky_lo, sky_hi = (c.astype(f32) for c in scene["sky"])
    elev = np.clip(d[:, 1:2] / np.sqrt(_dot(d, d))[:, None], 0, 1)
    colour = np.where(bg[:, None], sky_lo + (sky_hi - sky_lo) * elev, colour)
    grain = np.random.default_rng(scene["noise_seed"]).standard_normal((d.shape[0], 3), dtype=f32)
    img = np.clip(colour + f32(scene["noise"]) * grain, 0, 1)

    # camera-frame outputs: n . r, n . d, n . f
    n_cam = np.where(bg[:, None], f32(IGNORE), n @ rot)
    depth = np.where(bg, f32(IGNORE), t)
    sem = np.where(bg, 0, kk)

    # edges: between 4-neighbours seeing different instances, the one nearer the camera
    shp = (height, width)
    inst_i, z = inst.reshape(shp), np.where(bg, _INF, t).reshape(shp)
    edge = np.zeros(shp, dtype=bool)
    dh = inst_i[:, 1:] != inst_i[:, :-1]
    near = z[:, :-1] <= z[:, 1:]
    edge[:, :-1] |= dh & near
    edge[:, 1:] |= dh & ~near
    dv = inst_i[1:, :] != inst_i[:-1, :]
    near = z[:-1, :] <= z[1:, :]
    edge[:-1, :] |= dv & near
    edge[1:, :] |= dv & ~near

    # parts of the cylinders; 255 on images with no cylinder in view
    parts = np.where(is_c, np.where(top, 1, np.where(py > 0.5 * size[:, 1], 2, 3)), 0)
    if not is_c.any():
        parts[:] = IGNORE

    return {
        "image": (img * 255 + 0.5).astype(np.uint8).reshape(*shp, 3),
        "depth": depth.reshape(shp).astype(f32),
        "normals": n_cam.reshape(*shp, 3).astype(np.float16),
        "semseg": sem.astype(np.uint8).reshape(shp),
        "edge": edge.astype(np.uint8),
        "human_parts": parts.astype(np.uint8).reshape(shp),
    }


# ----------------------------------------------------------------------------------------------
# dataset

_MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
_STD = np.array(IMAGENET_STD, np.float32)[:, None, None]
_ARRAYS = {
    "image": (np.uint8, 3),
    "depth": (np.float32, None),
    "normals": (np.float16, 3),
    "semseg": (np.uint8, None),
    "edge": (np.uint8, None),
    "human_parts": (np.uint8, None),
}


class Scenes(torch.utils.data.Dataset):
    """The built-in procedural multi-task dataset (see the module docstring).

    split: "train" or "val" (different seeds). size: (H, W), from (64, 80) to (480, 640).
    length: number of images (default 200 for train, 50 for val). tasks: the targets to return
    (default all of ``SCENES_TASKS``). seed: base seed. root: cache directory (default
    ~/.cache/mtl_kernels/scenes); ``cache=False`` generates in memory and writes nothing.
    transform: callable on the item dict before normalisation (``mtl_kernels.data.transforms``).
    normalize: ImageNet mean/std normalisation of the image (else it is in [0, 1]).
    fov: horizontal field of view in degrees. parts_ignore_outside: human_parts 255 on every
    pixel that is not a cylinder (default: 0 there, as the survey's background part).
    """

    classes = CLASSES
    part_classes = PART_CLASSES
    num_classes = len(CLASSES)
    num_parts = len(PART_CLASSES)

    def __init__(
        self,
        split: str = "train",
        size: Sequence[int] = (120, 160),
        length: int | None = None,
        tasks: Sequence[str] | None = None,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        cache: bool = True,
        transform: Callable[[dict], dict] | None = None,
        normalize: bool = True,
        fov: float = 60.0,
        parts_ignore_outside: bool = False,
    ):
        if split not in _SPLIT_CODE:
            raise ValueError(f"Scenes: split must be one of {tuple(_SPLIT_CODE)}, got {split!r}")
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) for s in size):
            raise ValueError(f"Scenes: size must be (H, W) integers, got {size!r}")
        h, w = int(size[0]), int(size[1])
        if not (64 <= h <= 480 and 80 <= w <= 640):
            raise ValueError(f"Scenes: size (H, W) must lie between (64, 80) and (480, 640), got {(h, w)}")
        if length is None:
            length = 200 if split == "train" else 50
        if int(length) < 1:
            raise ValueError(f"Scenes: length must be >= 1, got {length}")
        if not 10.0 <= float(fov) <= 120.0:
            raise ValueError(f"Scenes: fov must be in [10, 120] degrees, got {fov}")
        self.split, self.size, self.length, self.seed, self.fov = split, (h, w), int(length), int(seed), float(fov)
        self.tasks = check_tasks("Scenes", tasks, SCENES_TASKS)
        self.transform, self.normalize = transform, bool(normalize)
        self.parts_ignore_outside = bool(parts_ignore_outside)
        fx = (w / 2) / math.tan(math.radians(self.fov) / 2)
        self.intrinsics = (fx, fx, w / 2, h / 2)
        self.params = {"version": _VERSION, "split": split, "size": [h, w], "length": self.length}
        self.params.update({"seed": self.seed, "fov": self.fov})
        key = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) if root is not None else _default_root()
        self.cache_dir = self.root / f"scenes-{split}-{h}x{w}-n{self.length}-s{self.seed}-{key}" if cache else None
        self.from_cache = False
        if cache and self._complete(self.cache_dir):
            self.from_cache = True
        elif cache:
            self._generate_to_disk()
        else:
            self._arrays = self._generate_in_memory()
        if cache:
            self._arrays = {k: np.load(self.cache_dir / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}

    # -- generation

    def _scene(self, index: int) -> dict:
        ss = np.random.SeedSequence([self.seed, _SPLIT_CODE[self.split], index])
        rng = np.random.default_rng(ss)
        scene = _sample_scene(rng)
        scene["noise_seed"] = int(rng.integers(0, 2**62))
        return scene

    def render(self, index: int) -> dict[str, np.ndarray]:
        """Render image `index` afresh (uint8 image [H, W, 3] and the raw targets), bypassing the cache."""
        return _render(self._scene(index), self.size[0], self.size[1], self.fov)

    def _generate_in_memory(self) -> dict[str, np.ndarray]:
        out = [self.render(i) for i in range(self.length)]
        return {k: np.stack([o[k] for o in out]) for k in _ARRAYS}

    @staticmethod
    def _complete(path: Path | None) -> bool:
        return (
            path is not None
            and (path / "params.json").is_file()
            and all((path / f"{k}.npy").is_file() for k in _ARRAYS)
        )

    def _generate_to_disk(self) -> None:
        h, w = self.size
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.cache_dir.name}.", dir=self.root))
        try:
            out = {}
            for k, (dtype, ch) in _ARRAYS.items():
                shape = (self.length, h, w) + ((ch,) if ch else ())
                out[k] = np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=dtype, shape=shape)
            for i in range(self.length):
                for k, a in self.render(i).items():
                    out[k][i] = a
            for a in out.values():
                a.flush()
            del out
            (tmp / "params.json").write_text(json.dumps(self.params, indent=1, sort_keys=True))
            if self.cache_dir.exists() and not self._complete(self.cache_dir):
                shutil.rmtree(self.cache_dir, ignore_errors=True)  # a damaged cache (a file deleted): replace it
            try:
                os.rename(tmp, self.cache_dir)  # atomic; fails if another process got there first
            except OSError:
                if not self._complete(self.cache_dir):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def __getstate__(self):  # pickled for spawned DataLoader workers: reopen the memory maps there
        state = dict(self.__dict__)
        if self.cache_dir is not None:
            state.pop("_arrays", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.cache_dir is not None:
            self._arrays = {k: np.load(self.cache_dir / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}

    # -- access

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"Scenes: index {index} out of range for length {self.length}")
        index = index % self.length
        # numpy, then torch.from_numpy: cheap in DataLoader workers and on busy machines alike
        a = self._arrays
        h, w = self.size
        img = np.asarray(a["image"][index], dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
        if self.normalize and self.transform is None:  # else after the transform, as the survey orders them
            img = (img - _MEAN) / _STD
        sample = {"image": torch.from_numpy(np.ascontiguousarray(img))}
        if "semseg" in self.tasks:
            sample["semseg"] = torch.from_numpy(a["semseg"][index].astype(np.int64))
        if "depth" in self.tasks:
            sample["depth"] = torch.from_numpy(np.array(a["depth"][index], dtype=np.float32)[None])
        if "normals" in self.tasks:
            n = np.asarray(a["normals"][index], dtype=np.float32).transpose(2, 0, 1)
            valid = n[0] != IGNORE
            n = np.where(valid, n / np.maximum(np.sqrt((n * n).sum(0)), 1e-12), n)
            sample["normals"] = torch.from_numpy(np.ascontiguousarray(n, dtype=np.float32))
        if "edge" in self.tasks:
            sample["edge"] = torch.from_numpy(a["edge"][index].astype(np.float32)[None])
        if "sal" in self.tasks:
            sample["sal"] = torch.from_numpy((a["semseg"][index] >= _SPHERE).astype(np.float32)[None])
        if "human_parts" in self.tasks:
            parts = a["human_parts"][index].astype(np.int64)
            if self.parts_ignore_outside:
                parts[parts == 0] = IGNORE
            sample["human_parts"] = torch.from_numpy(parts)
        sample["meta"] = {
            "image": f"{self.split}_{index:06d}",
            "im_size": (h, w),
            "index": index,
            "intrinsics": self.intrinsics,
        }
        if self.transform is not None:
            sample = self.transform(sample)
            if self.normalize:
                sample["image"] = normalize_image(sample["image"], IMAGENET_MEAN, IMAGENET_STD)
        return sample

    def __repr__(self) -> str:
        return (
            f"Scenes(split={self.split!r}, size={self.size}, length={self.length}, seed={self.seed}, "
            f"tasks={list(self.tasks)}, cache_dir={str(self.cache_dir) if self.cache_dir else None!r})"
        )
