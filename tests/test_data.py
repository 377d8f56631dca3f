"""mk.data: the procedural Scenes (determinism, caching, self-consistent ground truth), the NYUD
and PASCAL-Context loaders on fixtures written here, and the joint transforms."""

import math

import numpy as np
import pytest
import torch

from mtl_kernels import data
from mtl_kernels.data import NYUD, PASCALContext, Scenes
from mtl_kernels.data import transforms as T

IGN = 255


def _scenes(tmp_path, **kw):
    kw.setdefault("size", (64, 80))
    kw.setdefault("length", 4)
    return Scenes(root=tmp_path / "cache", normalize=False, **kw)


@pytest.fixture(scope="module")
def scenes120(tmp_path_factory):
    return Scenes("val", size=(120, 160), length=8, root=tmp_path_factory.mktemp("s120"), normalize=False)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k != "meta":
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- Scenes


def test_scenes_deterministic_and_splits_differ(tmp_path):
    a = Scenes(size=(64, 80), length=3, cache=False)
    b = Scenes(size=(64, 80), length=3, cache=False)
    for i in range(3):
        _same(a[i], b[i])
    # an image does not depend on the dataset's length, and the cache holds what is rendered
    c = _scenes(tmp_path, length=2)
    _same(a[1], Scenes(size=(64, 80), length=2, cache=False)[1])
    assert np.array_equal(c.render(1)["depth"], np.asarray(c._arrays["depth"][1]))
    v = Scenes("val", size=(64, 80), length=3, cache=False)
    assert not torch.equal(a[0]["image"], v[0]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], Scenes(size=(64, 80), length=1, seed=1, cache=False)[0]["image"])


@pytest.mark.parametrize("size", [(64, 80), (90, 130)])
def test_scenes_shapes_and_dtypes(tmp_path, size):
    ds = _scenes(tmp_path, size=size, length=3)
    h, w = size
    s = ds[0]
    assert set(s) == {"image", "semseg", "depth", "normals", "edge", "sal", "human_parts", "meta"}
    expect = {
        "image": ((3, h, w), torch.float32),
        "semseg": ((h, w), torch.int64),
        "depth": ((1, h, w), torch.float32),
        "normals": ((3, h, w), torch.float32),
        "edge": ((1, h, w), torch.float32),
        "sal": ((1, h, w), torch.float32),
        "human_parts": ((h, w), torch.int64),
    }
    for k, (shape, dtype) in expect.items():
        assert tuple(s[k].shape) == shape and s[k].dtype == dtype, k
    assert s["meta"]["im_size"] == (h, w)
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    for i in range(len(ds)):
        s = ds[i]
        assert s["semseg"].min() >= 0 and s["semseg"].max() < len(data.CLASSES)
        valid = s["depth"][0] != IGN
        assert torch.equal(valid, s["semseg"] != 0)  # only the sky has no depth
        assert (s["depth"][0][valid] > 0.05).all() and (s["depth"][0][valid] < 20).all()
        nv = s["normals"][:, valid]
        assert torch.allclose(nv.norm(dim=0), torch.ones(()), atol=1e-3)
        fx, fy, cx, cy = s["meta"]["intrinsics"]
        v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        ray = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones(h, w)])
        assert ((nv * ray[:, valid]).sum(0) < 0).all()  # visible surfaces face the camera
        assert (s["normals"][:, ~valid] == IGN).all()
        assert set(s["edge"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(s["sal"][0] == 1, s["semseg"] >= 3)
        parts = s["human_parts"]
        if (s["semseg"] == 5).any():
            assert torch.equal(parts > 0, s["semseg"] == 5) and parts.max() <= 3
        else:
            assert (parts == IGN).all()
    # normalised images and a subset of tasks
    sub = Scenes(size=size, length=1, root=tmp_path / "cache", tasks=["depth", "edge"])
    assert set(sub[0]) == {"image", "depth", "edge", "meta"}
    assert sub[0]["image"].min() < 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["semseg"].shape == (2, h, w) and batch["depth"].shape == (2, 1, h, w)


def test_scenes_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="between"):
        Scenes(size=(32, 32), cache=False)
    with pytest.raises(ValueError, match="between"):
        Scenes(size=(480, 800), cache=False)
    with pytest.raises(ValueError, match="tasks"):
        Scenes(size=(64, 80), length=1, tasks=["depht"], cache=False)
    with pytest.raises(ValueError, match="split"):
        Scenes(split="test", cache=False)


def _normals_from_depth(depth, intrinsics):
    """Camera-frame normals from a z-depth map by back-projection and central differences: [3, H-2, W-2]."""
    fx, fy, cx, cy = intrinsics
    h, w = depth.shape
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij"
    )
    z = depth.double()
    p = torch.stack([(u - cx) / fx * z, (v - cy) / fy * z, z])
    du = p[:, 1:-1, 2:] - p[:, 1:-1, :-2]
    dv = p[:, 2:, 1:-1] - p[:, :-2, 1:-1]
    n = -torch.linalg.cross(du, dv, dim=0)
    return n / n.norm(dim=0, keepdim=True).clamp_min(1e-12)


def _interior(sample):
    """Pixels (without the border) whose 3 x 3 neighbourhood is one surface: same label, no edge, valid depth."""
    sem, edge, depth = sample["semseg"], sample["edge"][0], sample["depth"][0]
    ok = (depth != IGN) & (edge == 0)
    win = torch.ones_like(ok[1:-1, 1:-1])
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sl = (slice(1 + dy, sem.shape[0] - 1 + dy), slice(1 + dx, sem.shape[1] - 1 + dx))
            win &= ok[sl] & (sem[sl] == sem[1:-1, 1:-1])
    return win


def _angles(n_est, n_ref, mask):
    cos = (n_est * n_ref.double()).sum(0).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))[mask]


def test_scenes_normals_agree_with_depth(scenes120):
    angles = []
    for i in range(len(scenes120)):
        s = scenes120[i]
        est = _normals_from_depth(s["depth"][0], s["meta"]["intrinsics"])
        angles.append(_angles(est, s["normals"][:, 1:-1, 1:-1], _interior(s)))
    a = torch.cat(angles)
    assert len(a) > 50000
    assert a.median() < 0.5, a.median()
    assert (a < 5).float().mean() > 0.98  # the rest: creases of boxes and room corners (same label)


def test_scenes_edges_lie_on_label_or_depth_changes(scenes120):
    for i in range(len(scenes120)):
        s = scenes120[i]
        sem, edge, z = s["semseg"], s["edge"][0] > 0, s["depth"][0].double()
        z = torch.where(z == IGN, torch.tensor(math.inf, dtype=z.dtype), z)
        change = torch.zeros_like(edge)
        label_pair_marked = []
        for a, b in (
            ((slice(None), slice(0, -1)), (slice(None), slice(1, None))),
            ((slice(0, -1),), (slice(1, None),)),
        ):
            diff = (sem[a] != sem[b]) | ((z[a] - z[b]).abs() > 0.05 * torch.minimum(z[a], z[b]))
            change[a] |= diff
            change[b] |= diff
            label_pair_marked.append(edge[a][sem[a] != sem[b]] | edge[b][sem[a] != sem[b]])
        assert edge.any()
        assert change[edge].all(), "an edge pixel with no label or depth change next to it"
        assert torch.cat(label_pair_marked).all(), "a label change without an edge"
        assert edge.float().mean() < 0.1  # thin


def test_scenes_cache(tmp_path):
    a = _scenes(tmp_path, length=3)
    assert not a.from_cache and a.cache_dir.is_dir() and a.cache_dir.parent == tmp_path / "cache"
    b = _scenes(tmp_path, length=3)
    assert b.from_cache and b.cache_dir == a.cache_dir
    _same(a[2], b[2])
    import pickle

    _same(pickle.loads(pickle.dumps(b))[2], b[2])  # as spawned DataLoader workers get it
    other = _scenes(tmp_path, length=3, seed=5)
    assert other.cache_dir != a.cache_dir and not other.from_cache
    import shutil

    shutil.rmtree(a.cache_dir)
    c = _scenes(tmp_path, length=3)
    assert not c.from_cache and c.cache_dir.is_dir()
    _same(b[2], c[2])
    (c.cache_dir / "depth.npy").unlink()  # a damaged cache is regenerated too
    d = _scenes(tmp_path, length=3)
    assert not d.from_cache and (d.cache_dir / "depth.npy").is_file()
    _same(b[1], d[1])
    # nothing but finished cache directories is left behind
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([a.cache_dir.name, other.cache_dir.name])


# ---------------------------------------------------------------------------------------------- NYUD


def _write_nyud(root, ids_by_split, h=12, w=16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for split, ids in ids_by_split.items():
        (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
            seg = rng.integers(0, 41, (h, w)).astype(np.uint8)
            seg[0, 0], seg[0, 1] = 0, 40
            Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
            dep = rng.uniform(0.5, 9, (h, w)).astype(np.float32)
            dep[1, 1] = 0
            np.save(root / "depth" / f"{i}.npy", dep)
            nrm = rng.normal(size=(h, w, 3)).astype(np.float32)
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[2, 2] = 0
            np.save(root / "normals" / f"{i}.npy", nrm)
            np.save(root / "edge" / f"{i}.npy", (rng.random((h, w)) > 0.8).astype(np.float32))


def test_nyud_loader(tmp_path):
    root = tmp_path / "NYUD_MT"
    _write_nyud(root, {"train": ["0001", "0002"], "val": ["0003"]})
    ds = NYUD(root, split="train", normalize=False)
    assert len(ds) == 2 and len(NYUD(root, split="val")) == 1 and len(NYUD(root, split=["train", "val"])) == 3
    s = ds[0]
    seg = np.array(__import__("PIL.Image").Image.open(root / "segmentation" / "0001.png")).astype(np.int64)
    assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (12, 16)
    assert s["semseg"][0, 0] == IGN and s["semseg"][0, 1] == 39
    assert torch.equal(s["semseg"], torch.from_numpy(np.where(seg == 0, IGN, seg - 1)))
    assert s["depth"].shape == (1, 12, 16) and s["depth"][0, 1, 1] == IGN
    assert torch.allclose(s["depth"][0, 0], torch.from_numpy(np.load(root / "depth" / "0001.npy"))[0])
    assert s["normals"].shape == (3, 12, 16) and (s["normals"][:, 2, 2] == IGN).all()
    assert s["edge"].shape == (1, 12, 16) and s["meta"] == {"image": "0001", "im_size": (12, 16)}
    assert set(NYUD(root, split="train", tasks=["depth"])[1]) == {"image", "depth", "meta"}
    # with the survey's training transforms
    aug = NYUD(root, split="train", transform=data.train_transform((16, 20)))[0]
    assert aug["image"].shape == (3, 16, 20) and aug["semseg"].shape == (16, 20)


def test_nyud_missing_files(tmp_path):
    root = tmp_path / "NYUD_MT"
    _write_nyud(root, {"train": ["0001", "0002"]})
    (root / "depth" / "0002.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth/0002\.npy") as e:
        NYUD(root, split="train")
    assert "Expected layout" in str(e.value) and "gt_sets/<split>.txt" in str(e.value)
    assert len(NYUD(root, split="train", tasks=["semseg", "edge"])) == 2  # depth not asked for
    with pytest.raises(FileNotFoundError, match=r"gt_sets/val\.txt"):
        NYUD(root, split="val")
    with pytest.raises(FileNotFoundError, match="dataset directory itself"):
        NYUD(tmp_path / "nowhere")
    np.save(root / "depth" / "0002.npy", np.zeros((12, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"depth/0002\.npy must be \[H, W\]"):
        NYUD(root, split="train")[1]


# ---------------------------------------------------------------------------------------------- PASCAL


def _save_anno(path, objects):
    from scipy.io import savemat

    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for k, (cls, mask, parts) in enumerate(objects):
        objs[0, k]["class"] = "person" if cls == 15 else "other"
        objs[0, k]["class_ind"] = np.array([[cls]], dtype=np.uint8)
        objs[0, k]["mask"] = mask.astype(np.uint8)
        if parts:
            pa = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (name, pmask) in enumerate(parts):
                pa[0, j]["part_name"] = name
                pa[0, j]["mask"] = pmask.astype(np.uint8)
        else:
            pa = np.zeros((0, 0))
        objs[0, k]["parts"] = pa
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0]["imname"] = path.stem
    anno[0, 0]["objects"] = objs
    savemat(path, {"anno": anno})


def _write_pascal(root, h=10, w=14):
    from PIL import Image
    from scipy.io import savemat

    for d in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context", "pascal-context/trainval"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for d in ("human_parts", "normals_distill", "sal_distill"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Context/val.txt").write_text("2008_000001\n2008_000002\n")
    rng = np.random.default_rng(1)
    for k, i in enumerate(["2008_000001", "2008_000002"]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        seg = np.zeros((h, w), np.uint8)
        seg[2:6, 3:9], seg[0, :] = 15, 255
        # the second image's labels come from PASCAL-Context's folder (no VOC12 file)
        Image.fromarray(seg).save(root / ("semseg/VOC12" if k == 0 else "semseg/pascal-context") / f"{i}.png")
        lab = np.full((h, w), 284, np.uint16)  # person: a NYUD class too
        lab[:, 7:] = 360  # sky: not a NYUD class, normals ignored
        savemat(root / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": lab})
        nrm = np.zeros((h, w, 3), np.uint8)
        nrm[..., 2] = 255
        nrm[..., :2] = 128
        Image.fromarray(nrm).save(root / "normals_distill" / f"{i}.png")
        sal = np.zeros((h, w), np.uint8)
        sal[2:6, 3:9] = 200
        sal[7, 7] = 100
        Image.fromarray(sal).save(root / "sal_distill" / f"{i}.png")
        person = np.zeros((h, w), bool)
        person[2:6, 3:9] = True
        head, leg = np.zeros_like(person), np.zeros_like(person)
        head[2, 3:9], leg[5, 3:9] = True, True
        if k == 0:
            _save_anno(
                root / "human_parts" / f"{i}.mat", [(15, person, [("head", head), ("llleg", leg)]), (7, person, [])]
            )
        else:
            _save_anno(root / "human_parts" / f"{i}.mat", [(7, person, [])])


def test_pascal_loader(tmp_path):
    root = tmp_path / "PASCAL_MT"
    _write_pascal(root)
    ds = PASCALContext(root, split="val", normalize=False)
    assert len(ds) == 2
    s = ds[0]
    assert s["semseg"].dtype == torch.int64 and s["semseg"][3, 4] == 15 and s["semseg"][0, 0] == IGN
    hp = s["human_parts"]
    assert hp.dtype == torch.int64 and hp.shape == (10, 14)
    assert hp[2, 4] == 1 and hp[5, 4] == 6 and hp[3, 4] == 0 and hp[8, 0] == 0  # head, lower leg (6 groups)
    assert PASCALContext(root, num_human_parts=14, normalize=False)[0]["human_parts"][5, 4] == 13
    assert (ds[1]["human_parts"] == IGN).all()  # no person parts: all ignored
    assert torch.equal(ds[1]["semseg"], s["semseg"])  # read from semseg/pascal-context
    n = s["normals"]
    assert n.shape == (3, 10, 14) and (n[:, :, 7:] == IGN).all()
    assert torch.allclose(n[:, :, :7].norm(dim=0), torch.ones(()), atol=1e-5) and (n[2, :, :7] > 0.99).all()
    assert s["sal"].shape == (1, 10, 14) and s["sal"][0, 3, 4] == 1 and s["sal"][0, 7, 7] == 0
    e = s["edge"][0]
    # the LabelMap's boundary (columns 6 | 7) thinned to a one-pixel vertical line
    assert e.shape == (10, 14) and (e[2:-2].sum(1) == 1).all() and (e[2:-2, 6:8].sum(1) == 1).all() and e.sum() <= 10
    only_parts = PASCALContext(root, tasks=["human_parts"])
    assert len(only_parts) == 1 and set(only_parts[0]) == {"image", "human_parts", "meta"}


def test_pascal_missing_and_malformed(tmp_path):
    root = tmp_path / "PASCAL_MT"
    _write_pascal(root)
    (root / "sal_distill/2008_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"sal_distill/2008_000002\.png"):
        PASCALContext(root)
    assert len(PASCALContext(root, tasks=["semseg", "edge"])) == 2
    (root / "semseg/pascal-context/2008_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"semseg/VOC12/2008_000002\.png or .*semseg/pascal-context"):
        PASCALContext(root, tasks=["semseg"])
    from scipy.io import savemat

    savemat(root / "pascal-context/trainval/2008_000001.mat", {"Labels": np.zeros((10, 14))})
    with pytest.raises(ValueError, match="no 'LabelMap'"):
        PASCALContext(root, tasks=["edge"])[0]


# ---------------------------------------------------------------------------------------------- transforms


def test_flip(scenes120):
    s = scenes120[0]
    assert _same(T.hflip(T.hflip(s)), s) is None
    f = T.hflip(s)
    valid = s["normals"][0] != IGN
    assert torch.equal(f["normals"][0].flip(-1)[valid], -s["normals"][0][valid])
    assert torch.equal(f["normals"][1:].flip(-1), s["normals"][1:])
    assert torch.equal(f["semseg"], s["semseg"].flip(-1)) and torch.equal(f["depth"], s["depth"].flip(-1))
    never = T.RandomHorizontalFlip(p=0.0)(s)
    _same(never, s)


def test_rotation_keeps_normals_consistent(scenes120):
    s = scenes120[1]
    r = T.scale_rotate(s, 15.0, 1.0)
    valid = (r["normals"] != IGN).all(0)
    assert valid.float().mean() > 0.5
    assert torch.allclose(r["normals"][:, valid].norm(dim=0), torch.ones(()), atol=1e-5)
    assert set(r["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist()) | {IGN}
    assert (r["semseg"][0, 0] == IGN) and r["edge"][0, 0, 0] == 0 and r["depth"][0, 0, 0] == IGN
    # rolling the camera about the optical axis: normals from the rotated depth match the rotated normals
    est = _normals_from_depth(r["depth"][0], s["meta"]["intrinsics"])
    mask = _interior(r)
    ang = _angles(est, r["normals"][:, 1:-1, 1:-1], mask)
    assert len(ang) > 5000 and ang.median() < 0.5, ang.median()
    wrong = T.scale_rotate(s, 15.0, 1.0)
    wrong["normals"] = T.scale_rotate({"normals": s["normals"]}, -15.0, 1.0)["normals"]
    assert _angles(est, wrong["normals"][:, 1:-1, 1:-1], mask).median() > 10  # the test can tell the direction


def test_scale_resize_padcrop(scenes120):
    s = scenes120[2]
    z = T.scale_rotate(s, 0.0, 1.25)
    valid = z["depth"] != IGN
    assert z["depth"].shape == s["depth"].shape and valid.any()
    c = s["depth"][0, 60, 80]
    assert abs(float(z["depth"][0, 60, 80]) - float(c) / 1.25) < 0.05 * float(c)  # centre pixel, depth / sc
    g = torch.Generator().manual_seed(0)
    aug = T.survey_transforms((96, 128), generator=g)(s)
    for k, v in aug.items():
        if k != "meta":
            assert v.shape[-2:] == (96, 128), k
    assert aug["semseg"].dtype == torch.int64
    assert set(aug["human_parts"].unique().tolist()) <= {0, 1, 2, 3, IGN}
    pc = T.PadCrop((140, 150), random=False)(s)
    assert pc["semseg"].shape == (140, 150) and pc["semseg"][0, 0] == IGN and pc["edge"][0, 0, 0] == 0
    assert torch.equal(pc["semseg"][10:130, :], s["semseg"][:, 5:155])
    norm = T.Compose([T.RandomScale((0.9, 1.1), generator=g), T.RandomRotation((-5, 5), generator=g), T.Normalize()])
    out = norm(s)
    assert out["image"].min() < 0
