"""mk.metrics against hand-computed cases and independent straightforward loops."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import mtl_kernels as mk
from mtl_kernels import available_backends
from mtl_kernels.metrics import (
    DepthMeter,
    EdgeMeter,
    HumanPartsMeter,
    MultiTaskMetrics,
    NormalsMeter,
    SaliencyMeter,
    SemsegMeter,
    delta_m,
    edge_counts,
    task_deltas,
)
from mtl_kernels.metrics._matching import matching_sizes
from mtl_kernels.metrics.edge import _thin_dense, thin

MATCHING_BACKENDS = [b for b in ("reference", "cpu") if b in available_backends()]

# ----------------------------------------------------------------------------- semseg


def _hand_case():
    gt = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    return pred, gt


def test_semseg_hand_case_with_ignore():
    pred, gt = _hand_case()
    m = SemsegMeter(3)
    m.update(pred, gt)
    r = m.compute()
    # valid pixels: (g0,p0) (g0,p1) (g1,p1) (g1,p1) (g2,p0); class 0: tp 1 fp 1 fn 1; 1: tp 2 fp 1; 2: fn 1
    assert r["IoU_0"] == pytest.approx(1 / 3)
    assert r["IoU_1"] == pytest.approx(2 / 3)
    assert r["IoU_2"] == 0.0
    assert r["mIoU"] == pytest.approx(1 / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5)


def test_semseg_logits_give_the_same_as_labels():
    pred, gt = _hand_case()
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 5 - 1
    a, b = SemsegMeter(3), SemsegMeter()  # num_classes inferred from the logits
    a.update(pred, gt)
    b.update(logits, gt.unsqueeze(1))
    assert a.compute() == b.compute()
    assert b.num_classes == 3


def test_semseg_absent_class_counts_as_zero_like_the_survey():
    pred, gt = _hand_case()
    m = SemsegMeter(4)
    m.update(pred, gt)
    assert m.compute()["IoU_3"] == 0.0
    assert m.compute()["mIoU"] == pytest.approx(1 / 4)
    m2 = SemsegMeter(4, ignore_absent=True)
    m2.update(pred, gt)
    assert m2.compute()["mIoU"] == pytest.approx(1 / 3)


def test_semseg_predicted_label_out_of_range_is_a_false_negative_only():
    gt = torch.tensor([[[0, 1]]])
    pred = torch.tensor([[[0, 255]]])
    m = SemsegMeter(2)
    m.update(pred, gt)
    r = m.compute()
    assert r["IoU_0"] == 1.0 and r["IoU_1"] == 0.0  # class 0 gets no false positive


def _survey_semseg(preds, gts, C):
    tp, fp, fn = [0] * C, [0] * C, [0] * C
    for p, g in zip(preds, gts):
        valid = g != 255
        for c in range(C):
            tp[c] += np.sum((g == c) & (p == c) & valid)
            fp[c] += np.sum((g != c) & (p == c) & valid)
            fn[c] += np.sum((g == c) & (p != c) & valid)
    jac = [tp[c] / max(tp[c] + fp[c] + fn[c], 1e-8) for c in range(C)]
    return np.mean(jac), jac


def test_semseg_pooled_over_batches_matches_the_survey_loop():
    g = torch.Generator().manual_seed(0)
    C = 5
    batches = []
    for _ in range(3):
        gt = torch.randint(0, C, (2, 7, 9), generator=g)
        gt[torch.rand(gt.shape, generator=g) < 0.2] = 255
        logits = torch.randn(2, C, 7, 9, generator=g)
        batches.append((logits, gt))
    m = SemsegMeter(C)
    for logits, gt in batches:
        m.update(logits, gt)
    preds = [lo.argmax(1).numpy() for lo, _ in batches]
    miou, jac = _survey_semseg(preds, [gt.numpy() for _, gt in batches], C)
    r = m.compute()
    assert r["mIoU"] == pytest.approx(miou)
    assert [r[f"IoU_{c}"] for c in range(C)] == pytest.approx(jac)


def test_semseg_errors_name_the_argument():
    pred, gt = _hand_case()
    with pytest.raises(ValueError, match=r"gt has labels \[7\] outside \[0, 3\)"):
        SemsegMeter(3).update(pred, torch.full_like(gt, 7))
    with pytest.raises(ValueError, match="pred and gt must have the same"):
        SemsegMeter(3).update(pred[:, :1], gt)
    with pytest.raises(ValueError, match="num_classes is needed"):
        SemsegMeter().update(pred, gt)
    with pytest.raises(ValueError, match="pred has 4 channels but num_classes is 3"):
        SemsegMeter(3).update(torch.zeros(1, 4, 2, 3), gt)
    with pytest.raises(ValueError, match=r"gt must be \[B, H, W\] or \[B, 1, H, W\]"):
        SemsegMeter(3).update(pred, gt[0])
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        SemsegMeter(3).update([0, 1], gt)


def test_semseg_compute_before_update_is_nan_and_reset_clears():
    m = SemsegMeter(3)
    assert math.isnan(m.compute()["mIoU"])
    pred, gt = _hand_case()
    m.update(pred, gt)
    m.reset()
    assert math.isnan(m.compute()["mIoU"])


def test_human_parts_skips_person_free_images_as_the_offline_survey():
    gt = torch.zeros(2, 2, 2, dtype=torch.long)
    gt[0] = torch.tensor([[1, 2], [0, 0]])  # image 0 has parts; image 1 is all background
    pred = torch.zeros_like(gt)
    pred[0] = torch.tensor([[1, 2], [0, 1]])
    m = HumanPartsMeter()
    m.update(pred, gt)
    cm = m.confusion_matrix()
    assert int(cm.sum()) == 4  # only image 0's pixels
    assert m.compute()["IoU_background"] == pytest.approx(1 / 2)
    m2 = HumanPartsMeter(skip_empty=False)
    m2.update(pred, gt)
    assert int(m2.confusion_matrix().sum()) == 8


# ----------------------------------------------------------------------------- depth


def test_depth_rmse_and_log_rmse_pooled_over_valid_pixels():
    m = DepthMeter()
    m.update(torch.tensor([[[2.0, 2.0], [5.0, 5.0]]]), torch.tensor([[[1.0, 2.0], [0.0, 255.0]]]))
    m.update(torch.tensor([[[[2.0, 1.0]]]]), torch.tensor([[[[4.0, float("nan")]]]]))
    r = m.compute()
    # valid (gt, pred): (1, 2), (2, 2), (4, 2); squared errors 1, 0, 4; log errors ln2^2, 0, ln2^2
    assert r["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert r["log_rmse"] == pytest.approx(math.log(2) * math.sqrt(2 / 3))


def test_depth_nonpositive_prediction_is_clamped_to_1e_9():
    m = DepthMeter()
    m.update(torch.tensor([[[-1.0]]]), torch.tensor([[[1.0]]]))
    assert m.compute()["log_rmse"] == pytest.approx(-math.log(1e-9))
    assert m.compute()["rmse"] == pytest.approx(1.0)  # the survey clamps before both errors


# ----------------------------------------------------------------------------- normals


def _rot_x(deg):
    t = math.radians(deg)
    return [0.0, -math.sin(t), math.cos(t)]


def test_normals_known_rotations():
    angles = [0.0, 10.0, 20.0, 25.0, 40.0, 90.0]
    gt = torch.zeros(1, 3, 2, 4)
    pred = torch.zeros(1, 3, 2, 4)
    for i, a in enumerate(angles):
        y, x = divmod(i, 4)
        gt[0, :, y, x] = torch.tensor([0.0, 0.0, 2.0])  # gt is normalised too
        pred[0, :, y, x] = torch.tensor(_rot_x(a)) * (1 + i)  # any length
    gt[0, :, 1, 2] = 255.0  # padding: invalid
    gt[0, :, 1, 3] = 0.0  # zero norm: invalid
    pred[0, :, 1, 2:] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    m = NormalsMeter()
    m.update(pred, gt)
    r = m.compute()
    a = np.array(angles)
    assert r["mean"] == pytest.approx(a.mean(), abs=1e-4)
    assert r["median"] == pytest.approx(np.median(a), abs=1e-3)
    assert r["rmse"] == pytest.approx(math.sqrt((a**2).mean()), abs=1e-4)
    assert r["11.25"] == pytest.approx(100 * 2 / 6)
    assert r["22.5"] == pytest.approx(100 * 3 / 6)
    assert r["30"] == pytest.approx(100 * 4 / 6)


def test_normals_match_the_survey_numpy_evaluation():
    g = torch.Generator().manual_seed(1)
    m = NormalsMeter()
    all_deg = []
    for _ in range(3):
        gt = torch.randn(2, 3, 5, 6, generator=g)
        gt[:, :, 0, 0] = 0.0
        pred = gt + 0.7 * torch.randn(2, 3, 5, 6, generator=g)
        m.update(pred, gt)
        for b in range(2):  # eval_normals.py, image by image, channels last
            label = gt[b].permute(1, 2, 0).double().numpy()
            p = pred[b].permute(1, 2, 0).double().numpy()
            p = p / (np.linalg.norm(p, axis=2)[..., None] + 1e-12)
            valid = np.linalg.norm(label, axis=2) != 0
            label = label / (np.linalg.norm(label, axis=2)[..., None] + 1e-12)
            deg = np.rad2deg(np.arccos(np.clip(np.sum(p * label, axis=2), -1, 1)))
            all_deg.extend(deg[valid])
    d = np.array(all_deg)
    r = m.compute()
    assert r["mean"] == pytest.approx(d.mean(), abs=1e-6)
    assert r["median"] == pytest.approx(np.median(d), abs=1e-3)
    assert r["rmse"] == pytest.approx(np.mean(d**2) ** 0.5, abs=1e-6)
    for t in ("11.25", "22.5", "30"):
        assert r[t] == pytest.approx(np.mean(d < float(t)) * 100)


def test_normals_bad_shape():
    with pytest.raises(ValueError, match=r"pred must be \[B, 3, H, W\]"):
        NormalsMeter().update(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


# ----------------------------------------------------------------------------- saliency


def test_saliency_hand_case_averages_precision_and_recall_over_images_then_takes_F():
    m = SaliencyMeter(thresholds=[0.2, 0.4, 0.6])
    gt = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])
    pred = torch.tensor([[[0.95, 0.5, 0.3, 0.1]], [[0.3, 0.5, 0.1, 0.1]]])
    m.update(pred, gt)
    c = m.curves()
    # image 1: P 2/3 1 1, R 1 1 .5, J 2/3 1 .5; image 2: P .5 0 0, R 1 0 0, J .5 0 0
    assert c["precision"] == pytest.approx([7 / 12, 0.5, 0.5])
    assert c["recall"] == pytest.approx([1.0, 0.5, 0.25])
    assert c["IoU"] == pytest.approx([7 / 12, 0.5, 0.25])
    r = m.compute()
    assert r["maxF"] == pytest.approx(14 / 19)  # 2 (7/12) / (7/12 + 1)
    assert r["mIoU"] == pytest.approx(7 / 12)  # the max over thresholds, as the survey
    assert r["maxF_threshold"] == 0.2
    m03 = SaliencyMeter(thresholds=[0.2, 0.4, 0.6], beta2=0.3)
    m03.update(pred, gt)
    p, rec = 7 / 12, 1.0
    assert m03.compute()["maxF"] == pytest.approx(1.3 * p * rec / (0.3 * p + rec))


def test_saliency_empty_target_and_prediction_is_a_perfect_jaccard():
    m = SaliencyMeter()
    m.update(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3))
    assert m.compute()["mIoU"] == 1.0
    assert m.compute()["maxF"] == 0.0  # precision and recall are 0 / (0 + 1e-12)


def test_saliency_survey_thresholds_void_and_logits():
    assert mk.metrics.SURVEY_THRESHOLDS == pytest.approx(np.linspace(0.2, 0.9, 15).tolist())
    gt = torch.tensor([[[1.0, 255.0, 0.0]]])
    prob = torch.tensor([[[0.95, 0.95, 0.05]]])  # the void pixel's false positive is not counted
    m = SaliencyMeter()
    m.update(prob, gt)
    assert m.compute()["maxF"] == pytest.approx(1.0)
    ml = SaliencyMeter(logits=True)
    ml.update(torch.logit(prob), gt)
    assert ml.compute() == pytest.approx(m.compute())
    with pytest.raises(ValueError, match=r"values outside \[0, 1\].*logits=True"):
        SaliencyMeter().update(torch.logit(prob), gt)


def test_saliency_compares_in_the_predictions_precision():
    # The survey's predictions are 8-bit maps / 255 in float32, compared in float32: 51/255 is
    # not above the 0.2 threshold (float32(0.2) == float32(51 / 255)).
    pred = torch.tensor([[[51 / 255, 0.9]]], dtype=torch.float32)
    gt = torch.tensor([[[0.0, 1.0]]])
    m = SaliencyMeter(thresholds=[0.2])
    m.update(pred, gt)
    assert m.curves()["precision"] == pytest.approx([1.0])
    m64 = SaliencyMeter(thresholds=[0.2])
    m64.update(pred.double(), gt)  # float64 input: compared in float64, 0.20000000298 > 0.2
    assert m64.curves()["precision"] == pytest.approx([0.5])


# ----------------------------------------------------------------------------- edge


def _box(H=240, W=320, y0=60, y1=180, x0=80, x1=240):
    g = np.zeros((H, W), np.float32)
    g[y0, x0 : x1 + 1] = g[y1, x0 : x1 + 1] = 1
    g[y0 : y1 + 1, x0] = g[y0 : y1 + 1, x1] = 1
    return g


def _edge(preds, gts, **kw):
    m = EdgeMeter(**kw)
    m.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(gts)))
    return m.compute()


def test_edge_perfect_prediction():
    g = _box()
    r = _edge([g, g], [g, g])
    assert r["odsF"] == 1.0 and r["oisF"] == 1.0 and r["AP"] == pytest.approx(1.0)
    soft = np.where(g > 0, 0.9, 0.0).astype(np.float32)  # recall 1 up to 0.9, then 0 (precision 1)
    r = _edge([soft], [g])
    # SEISM's AP sums 101 interpolated precisions (recall 0, 0.01, ..., 1) and divides by 100
    assert r["odsF"] == 1.0 and r["oisF"] == 1.0 and r["AP"] == pytest.approx(1.01)


def test_edge_shift_within_and_beyond_the_tolerance():
    g = np.zeros((240, 320), np.float32)  # default tolerance: 0.0075 * 400 = 3 pixels
    g[40:200, 100] = g[40:200, 200] = 1  # vertical lines, shifted sideways
    one = np.roll(g, 1, axis=1)
    diag = np.roll(np.roll(g, 2, axis=1), 2, axis=0)  # sqrt(8) < 3 (along the line: matched anyway)
    four = np.roll(g, 4, axis=1)
    assert _edge([one], [g])["odsF"] == 1.0
    assert _edge([diag], [g])["odsF"] == 1.0
    r = _edge([four], [g])
    assert r["odsF"] == 0.0 and r["odsR"] == 0.0
    assert _edge([four], [g], max_dist=0.011)["odsF"] == 1.0  # NYUD's 4.4 pixels


def test_edge_empty_prediction_has_recall_zero():
    g = _box()
    r = _edge([np.zeros_like(g)], [g])
    assert r["odsR"] == 0.0 and r["odsF"] == 0.0 and r["oisF"] == 0.0
    assert r["odsP"] == 1.0  # SEISM: nothing predicted is precision 1


def test_edge_one_to_one_matching_and_thinning():
    g = np.zeros((240, 320), np.float32)
    g[40:200, 150] = 1
    half = g.copy()
    half[120:200, 150] = 0
    r = _edge([half], [g])
    assert r["odsR"] == pytest.approx(0.5) and r["odsP"] == 1.0 and r["odsF"] == pytest.approx(2 / 3)
    thick = g.copy()
    thick[40:200, 151] = 1  # two pixels wide: only one of each pair can be matched
    r = _edge([thick], [g])
    assert r["odsP"] == pytest.approx(0.5) and r["odsR"] == 1.0
    r = _edge([thick], [g], thin=True)  # thinned to one pixel wide first (as BSDS)
    assert r["odsF"] == pytest.approx(1.0, abs=0.02)


def test_edge_ods_ois_ap_hand_case():
    n = 50
    gA = np.zeros((64, 64), np.float32)
    gA[5 : 5 + n, 10] = 1
    pA = 0.8 * gA
    pA[5 : 5 + n, 50] = 0.3  # n spurious pixels far from any edge
    gB = gA.copy()
    pB = 0.2 * gB
    r = _edge([pA, pB], [gA, gB], thresholds=[0.1, 0.5, 0.9])
    # thresholds 0.1 / 0.5 / 0.9: summed R = 1, .5, 0 and P = 2/3, 1, 1 (nothing predicted)
    assert r["odsF"] == pytest.approx(0.8) and r["ods_threshold"] == 0.1
    # per image best: A at 0.5 (F 1), B at 0.1 (F 1)
    assert r["oisF"] == pytest.approx(1.0)
    # AP: P = 1 for R in [0, .5], then linear down to 2/3 at R = 1: (51 + 41.5) / 100
    assert r["AP"] == pytest.approx(0.925)


def _brute_counts(pred, gt, thresholds, radius):
    gy, gx = np.nonzero(gt)
    out = []
    for t in thresholds:
        py, px = np.nonzero(pred >= t)
        if len(gy) == 0 or len(py) == 0:
            out.append(0)
            continue
        d2 = (gy[:, None] - py[None, :]) ** 2 + (gx[:, None] - px[None, :]) ** 2
        cost = np.where(d2 <= radius * radius, 0, 1)
        r, c = linear_sum_assignment(cost)
        out.append(int((cost[r, c] == 0).sum()))
    return out


@pytest.mark.parametrize("backend", MATCHING_BACKENDS)
@pytest.mark.parametrize("thin", [False, True])
def test_edge_matching_size_equals_an_exact_assignment(backend, thin):
    rng = np.random.default_rng(0)
    thr = [0.2, 0.5, 0.8]
    for _ in range(4):
        gt = (rng.random((30, 40)) < 0.08).astype(np.float32)
        pred = rng.random((30, 40)) * (rng.random((30, 40)) < 0.3)
        c = edge_counts(pred, gt, thr, max_dist=0.04, thin_pred=thin, backend=backend)  # radius 2 pixels
        if thin:  # the thinned masks, thresholded again: a binary map at 0.5 is its own mask
            pred = thin_masks(pred, thr)
            expect = [_brute_counts(p, gt, [0.5], 0.04 * 50)[0] for p in pred]
            assert c[0].tolist() == expect and c[2].tolist() == expect
            continue
        expect = _brute_counts(pred, gt, thr, 0.04 * 50)
        assert c[0].tolist() == expect and c[2].tolist() == expect
        assert c[1].tolist() == [int(gt.sum())] * 3
        assert c[3].tolist() == [int((pred >= t).sum()) for t in thr]


def thin_masks(pred, thr):
    return [thin(pred >= t).astype(np.float64) for t in thr]


@pytest.mark.skipif("cpu" not in MATCHING_BACKENDS, reason="needs the compiled kernels")
def test_matching_sizes_equal_scipy_on_random_graphs():
    """The compiled Hopcroft-Karp (one matching grown through nested prefixes) against scipy's,
    prefix by prefix: sparse and dense graphs, duplicate edges, empty prefixes, unreached vertices."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        n_left, n_right = rng.integers(1, 60, size=2)
        edges = int(rng.integers(0, 6 * max(n_left, n_right)))
        left, right = rng.integers(0, n_left, edges), rng.integers(0, n_right, edges)
        ends = np.sort(rng.integers(0, edges + 1, size=5))
        got = matching_sizes(left, right, n_left, n_right, ends, backend="cpu")
        want = matching_sizes(left, right, n_left, n_right, ends, backend="reference")
        assert got.tolist() == want.tolist(), trial
        assert np.all(np.diff(got) >= 0)


@pytest.mark.skipif("cpu" not in MATCHING_BACKENDS, reason="needs the compiled kernels")
def test_matching_on_line_boundaries_and_bad_input():
    """Boundary maps of lines give the layered graphs on which scipy's matching can take exponential
    time (scipy issue 26147); both backends agree on such an image, and bad input is an error."""
    g = np.zeros((60, 80))
    g[::8, :] = 1
    g[:, ::10] = 1
    pred = np.clip(np.random.default_rng(1).random((60, 80)) * 0.6 + g * 0.5, 0, 1)
    a = edge_counts(pred, g, 20, max_dist=0.04, backend="cpu")
    assert np.array_equal(a, edge_counts(pred, g, 20, max_dist=0.04, backend="reference"))
    with pytest.raises(ValueError, match="ends must be non-decreasing"):
        matching_sizes([0, 1], [0, 0], 2, 1, [2, 1])
    with pytest.raises(ValueError, match="left and right must be 1-D of one length"):
        matching_sizes([0, 1], [0], 2, 1, [1])
    with pytest.raises(RuntimeError, match=r"right vertices must be in \[0, num_right\)"):
        matching_sizes([0, 1], [0, 3], 2, 2, [2], backend="cpu")
    with pytest.raises(NotImplementedError, match="no 'cuda' backend"):
        matching_sizes([0], [0], 1, 1, [1], backend="cuda")


@pytest.mark.parametrize("backend", MATCHING_BACKENDS)
def test_thinning_equals_the_plain_parallel_algorithm(backend):
    rng = np.random.default_rng(1)
    for trial in range(12):
        H, W = rng.integers(5, 30, size=2)
        p = torch.from_numpy(rng.random((3, H, W)))
        p = torch.nn.functional.avg_pool2d(p[None], 3, 1, 1)[0]
        mask = p > rng.uniform(0.35, 0.6)
        if trial % 3 == 2:  # speckle noise, thick blocks touching the border, a [1, H, W] batch
            mask = torch.from_numpy(rng.random((1, H, W)) < 0.5)
            mask[:, : H // 2, : W // 2] = True
        assert torch.equal(thin(mask, backend=backend), _thin_dense(mask))
    bar = np.zeros((9, 20), bool)
    bar[2:7, 2:18] = True
    out = thin(bar, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == bool and out.shape == bar.shape
    assert out.sum(0)[4:16].tolist() == [1] * 12  # one pixel wide
    line = np.zeros((5, 9), bool)
    line[2, 1:8] = True
    assert np.array_equal(thin(line, backend=backend), line)
    batch = np.stack([bar[:5, :9], line, np.zeros((5, 9), bool)]).reshape(3, 1, 5, 9)  # any leading dims
    assert np.array_equal(thin(batch, backend=backend)[:, 0], _thin_dense(torch.from_numpy(batch[:, 0])).numpy())
    with pytest.raises(ValueError, match=r"thin: mask must be \[\.\.\., H, W\]"):
        thin(np.zeros(5, bool), backend=backend)


def test_edge_ignore_and_errors():
    g = _box(64, 64, 10, 50, 10, 50)
    gt = g.copy()
    gt[:, 55:] = 255  # padding: neither ground truth nor prediction
    pred = g.copy()
    pred[:, 58] = 1.0
    assert _edge([pred], [gt])["odsF"] == 1.0
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 1\]"):
        EdgeMeter().update(torch.full((1, 4, 4), 3.0), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="pred and gt must have the same"):
        EdgeMeter().update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))
    m = EdgeMeter(logits=True)
    m.update(torch.where(torch.from_numpy(g) > 0, 10.0, -10.0)[None], torch.from_numpy(g)[None])
    assert m.compute()["odsF"] == 1.0
    assert math.isnan(EdgeMeter().compute()["odsF"])


# ----------------------------------------------------------------------------- delta_m


def test_delta_m_signs_and_values():
    single = {
        "semseg": {"mIoU": 0.5},
        "depth": {"rmse": 0.5},
        "normals": {"mean": 20.0},
        "edge": {"odsF": 0.7},
        "sal": {"mIoU": 0.5, "maxF": 0.1},
    }
    mtl = {"semseg": {"mIoU": 0.55}, "depth": {"rmse": 0.55}, "normals": {"mean": 18.0}, "edge": {"odsF": 0.7}}
    d = task_deltas(mtl, single)
    assert d == pytest.approx({"semseg": 10.0, "depth": -10.0, "normals": 10.0, "edge": 0.0})
    assert delta_m(mtl, single) == pytest.approx(2.5)
    assert delta_m({"sal": {"mIoU": 0.6, "maxF": 0.9}}, single) == pytest.approx(20.0)  # sal: mIoU, as the survey
    assert delta_m({"sal": {"maxF": 0.2}}, single, metrics={"sal": ("maxF", True)}) == pytest.approx(100.0)
    assert delta_m({**mtl, "delta_m": 2.5}, single) == pytest.approx(2.5)  # a stored number is skipped


def test_delta_m_errors():
    single = {"semseg": {"mIoU": 0.5}}
    with pytest.raises(ValueError, match=r"no main metric known for tasks \['foo'\]"):
        delta_m({"foo": {"x": 1.0}}, single)
    with pytest.raises(ValueError, match=r"no baseline for tasks \['depth'\]"):
        delta_m({"depth": {"rmse": 1.0}}, single)
    with pytest.raises(ValueError, match=r"results\['semseg'\] has no 'mIoU'"):
        delta_m({"semseg": {"acc": 1.0}}, single)
    with pytest.raises(ValueError, match="is 0"):
        delta_m({"semseg": {"mIoU": 0.5}}, {"semseg": {"mIoU": 0.0}})


# ----------------------------------------------------------------------------- MultiTaskMetrics


def test_multi_task_metrics_routes_each_task():
    g = _box(32, 32, 8, 24, 8, 24)
    sem_pred, sem_gt = _hand_case()
    meter = MultiTaskMetrics(["semseg", "depth", "edge"], num_classes=3, edge_tolerance=0.05)
    preds = {"semseg": sem_pred, "depth": torch.ones(1, 1, 2, 3), "edge": torch.from_numpy(g)[None, None]}
    targets = {
        "semseg": sem_gt,
        "depth": torch.full((1, 1, 2, 3), 2.0),
        "edge": torch.from_numpy(g)[None, None],
        "image": torch.zeros(1, 3, 2, 3),
    }
    meter.update(preds, targets)
    r = meter.compute()
    assert set(r) == {"semseg", "depth", "edge"}
    assert r["semseg"]["mIoU"] == pytest.approx(1 / 3)
    assert r["depth"]["rmse"] == pytest.approx(1.0)
    assert r["edge"]["odsF"] == 1.0
    assert meter["edge"].max_dist == 0.05
    meter.reset()
    assert math.isnan(meter.compute()["depth"]["rmse"])


def test_multi_task_metrics_presets_and_errors():
    m = MultiTaskMetrics(["semseg", "edge", "sal"], dataset="NYUD", sal={"beta2": 0.3}, logits=True)
    assert m["semseg"].num_classes == 40 and m["edge"].max_dist == 0.011
    assert m["sal"].beta2 == 0.3 and m["sal"].logits and m["edge"].logits
    m = MultiTaskMetrics(["semseg", "human_parts"], num_classes={"semseg": 6, "human_parts": 4})
    assert m["semseg"].num_classes == 6 and m["human_parts"].num_classes == 4
    with pytest.raises(ValueError, match=r"unknown tasks \['foo'\]; the valid tasks are \['semseg', 'human_parts'"):
        MultiTaskMetrics(["semseg", "foo"])
    with pytest.raises(ValueError, match="unknown dataset"):
        MultiTaskMetrics(["semseg"], dataset="coco")
    with pytest.raises(ValueError, match=r"keyword arguments \['depth'\] are not among tasks"):
        MultiTaskMetrics(["semseg"], depth={})
    m = MultiTaskMetrics(["depth", "normals"])
    with pytest.raises(ValueError, match=r"targets lacks \['normals'\]"):
        m.update({"depth": torch.ones(1, 2, 2), "normals": torch.ones(1, 3, 2, 2)}, {"depth": torch.ones(1, 2, 2)})
    with pytest.raises(ValueError, match=r"task 'normals': NormalsMeter: gt must be \[B, 3, H, W\]"):
        m.update(
            {"depth": torch.ones(1, 2, 2), "normals": torch.ones(1, 3, 2, 2)},
            {"depth": torch.ones(1, 2, 2), "normals": torch.ones(1, 2, 2)},
        )


@pytest.mark.cuda
def test_meters_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(3)
    sem_gt = torch.randint(0, 4, (2, 8, 8), generator=g)
    edge_gt = torch.from_numpy(_box(32, 32, 8, 24, 8, 24))[None].repeat(2, 1, 1)
    data = {
        "semseg": (torch.randn(2, 4, 8, 8, generator=g), sem_gt),
        "depth": (torch.rand(2, 1, 8, 8, generator=g) + 0.5, torch.rand(2, 1, 8, 8, generator=g) + 0.5),
        "normals": (torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)),
        "sal": (torch.rand(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()),
        "edge": (torch.rand(2, 32, 32, generator=g) * 0.5 + 0.5 * edge_gt, edge_gt),
    }
    cpu, gpu = MultiTaskMetrics(list(data)), MultiTaskMetrics(list(data))
    cpu.update({t: p for t, (p, _) in data.items()}, {t: y for t, (_, y) in data.items()})
    gpu.update({t: p.cuda() for t, (p, _) in data.items()}, {t: y.cuda() for t, (_, y) in data.items()})
    a, b = cpu.compute(), gpu.compute()
    for t in data:
        assert b[t] == pytest.approx(a[t], rel=1e-6, abs=2e-3 if t == "normals" else 1e-9)
