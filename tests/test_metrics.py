"""bir.metrics: PSNR/SSIM against formulas and skimage, LPIPS/DISTS/FID from local files, the
accumulator's DDP reduction."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from bir import metrics as M
from bir.nets.checkpoints import MissingCheckpointError
from tests.conftest import CONF


def _photo(name: str, size: int = 64) -> torch.Tensor:
    """A crop of a scikit-image photograph as [1, 3, size, size] in [0, 1]."""
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(img[:size, 40 : 40 + size, :3])).permute(2, 0, 1)
    return t.float()[None] / 255.0


def _noisy(x: torch.Tensor, sigma: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).double().numpy()


# ------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_constant_offset_matches_formula():
    x = torch.full((2, 3, 16, 16), 0.3, dtype=torch.float64)
    d = torch.tensor([0.1, 0.02], dtype=torch.float64).view(2, 1, 1, 1)
    expected = 10 * torch.log10(1.0 / d.flatten().double() ** 2)
    torch.testing.assert_close(M.psnr(x + d, x), expected)
    # Y channel: a grey offset d moves Y by d * (65.481 + 128.553 + 24.966) on the 0-255 scale.
    y_expected = 10 * torch.log10(255.0**2 / (d.flatten().double() * 219.0) ** 2)
    torch.testing.assert_close(M.psnr(x + d, x, y_channel=True), y_expected)
    # data_range scales the inputs: [0, 255] images with offset 255 d give the same PSNR.
    torch.testing.assert_close(M.psnr((x + d) * 255, x * 255, data_range=255.0), expected)
    assert torch.isinf(M.psnr(x, x)).all()


def test_rgb_to_y_matches_bt601_endpoints_and_basicsr_formula():
    black, white = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    assert M.rgb_to_y(black).item() == pytest.approx(16.0)
    assert M.rgb_to_y(white).item() == pytest.approx(235.0)
    x = _photo("astronaut", 16)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    torch.testing.assert_close(M.rgb_to_y(x)[:, 0], 16 + 65.481 * r + 128.553 * g + 24.966 * b)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_psnr_ssim_rgb_match_skimage(name):
    x = _photo(name)
    y = _noisy(x)
    ref_psnr = peak_signal_noise_ratio(_hwc(x), _hwc(y), data_range=1.0)
    ref_ssim = structural_similarity(
        _hwc(x),
        _hwc(y),
        data_range=1.0,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert M.psnr(y, x).item() == pytest.approx(ref_psnr, abs=1e-8)
    assert M.ssim(y, x).item() == pytest.approx(ref_ssim, abs=1e-8)


def test_psnr_ssim_y_channel_match_skimage_on_basicsr_y():
    x = _photo("astronaut")
    y = _noisy(x, 0.08, seed=3)

    def y255(t):  # BasicSR: rgb2ycbcr(y_only=True) on [0, 1] input, then * 255
        a = _hwc(t)
        return 16.0 + a @ np.array([65.481, 128.553, 24.966])

    ref_psnr = peak_signal_noise_ratio(y255(x), y255(y), data_range=255)
    ref_ssim = structural_similarity(
        y255(x),
        y255(y),
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert M.psnr(y, x, y_channel=True).item() == pytest.approx(ref_psnr, abs=1e-8)
    assert M.ssim(y, x, y_channel=True).item() == pytest.approx(ref_ssim, abs=1e-8)
    assert M.ssim(y, x, y_channel=True).item() != pytest.approx(M.ssim(y, x).item(), abs=1e-4)


def test_crop_border_removes_exactly_the_border():
    x = _photo("coffee", 40)
    y = x.clone()
    y[..., :4, :] = 1 - y[..., :4, :]  # damage only the top 4 rows
    assert torch.isinf(M.psnr(y, x, crop_border=4)).all()
    assert M.ssim(y, x, crop_border=4).item() == pytest.approx(1.0)
    assert M.psnr(y, x, crop_border=3).item() < 30
    z = _noisy(x)
    c = 5
    torch.testing.assert_close(
        M.ssim(z, x, crop_border=c), M.ssim(z[..., c:-c, c:-c], x[..., c:-c, c:-c])
    )


def test_batch_values_equal_single_image_values():
    x = torch.cat([_photo("astronaut"), _photo("coffee")])
    y = _noisy(x)
    for fn in (M.psnr, M.ssim):
        batched = fn(y, x)
        singles = torch.cat([fn(y[i : i + 1], x[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(batched, singles)
        assert batched[0] != batched[1]


def test_shape_mismatch_and_tiny_images_are_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="11x11"):
        M.ssim(torch.rand(1, 3, 10, 10), torch.rand(1, 3, 10, 10))


# ---------------------------------------------------------------------- LPIPS / DISTS weights
@pytest.fixture(scope="module")
def alex_file(tmp_path_factory) -> Path:
    """A random torchvision AlexNet ``features.*`` state dict saved as the release would be."""
    import torchvision

    torch.manual_seed(1)
    state = {
        k: v
        for k, v in torchvision.models.alexnet().state_dict().items()
        if k.startswith("features.")
    }
    path = tmp_path_factory.mktemp("weights") / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def no_download(monkeypatch):
    """Fail loudly if anything tries to fetch weights."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"attempted download: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_missing_lpips_weights_name_file_url_and_config_key(tmp_path):
    missing = tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(MissingCheckpointError) as err:
        M.LPIPS("alex", missing)
    msg = str(err.value)
    assert str(missing) in msg and "weights.lpips_alex" in msg and "download.pytorch.org" in msg
    with pytest.raises(MissingCheckpointError, match="weights.dists"):
        M.DISTS(tmp_path / "vgg16.pth")


def test_lpips_loads_local_backbone_without_download(alex_file, no_download):
    model = M.LPIPS("alex", alex_file)
    saved = torch.load(alex_file)
    torch.testing.assert_close(model.model.net.slice1[0].weight, saved["features.0.weight"])
    torch.testing.assert_close(
        getattr(model.model.net.slice5, "10").bias, saved["features.10.bias"]
    )
    x = _photo("astronaut", 32)
    y = torch.cat([x, _noisy(x, 0.2)])
    d = model(torch.cat([x, x]), y)
    assert d.shape == (2,)
    assert d[0].item() == pytest.approx(0.0, abs=1e-7) and d[1].item() > 1e-4
    # the cached functional form gives the same numbers
    torch.testing.assert_close(M.lpips(torch.cat([x, x]), y, weights_path=alex_file), d)


def test_lpips_rejects_a_file_that_is_not_alexnet(tmp_path):
    bad = tmp_path / "alex.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, bad)
    with pytest.raises(RuntimeError, match="does not match"):
        M.LPIPS("alex", bad)


def test_dists_from_local_vgg_features(tmp_path, no_download):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(2)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    model = M.DISTS(path)
    torch.testing.assert_close(model.model.stage1[0].weight, state["features.0.weight"])
    x = _photo("coffee", 32)
    d = model(torch.cat([x, x]), torch.cat([x, _noisy(x, 0.2)]))
    assert d[0].abs().item() < 1e-5 and d[1].item() > d[0].item()


def test_no_reference_metrics_need_pyiqa():
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pyiqa"):
            M.NoReferenceIQA("niqe")
    else:
        pytest.skip("pyiqa installed; the guarded import path is not exercised")
    with pytest.raises(ValueError, match="unknown no-reference"):
        M.NoReferenceIQA("brisque-typo")


# ---------------------------------------------------------------------------------- FID / KID
class TinyFeatures(nn.Module):
    """A random conv net ``[B, 3, H, W] -> [B, 8]`` standing in for Inception."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x):
        return self.net(x).flatten(1)


def test_fid_kid_same_set_near_zero_and_different_sets_positive():
    g = torch.Generator().manual_seed(0)
    a = [torch.rand(3, 24, 24, generator=g) for _ in range(20)]
    b = [torch.rand(3, 24, 24, generator=g).pow(3) for _ in range(20)]  # darker distribution
    same = M.distribution_metrics(
        a, a, ("fid", "kid"), feature_extractor=TinyFeatures(), kid_subset_size=10, kid_subsets=5
    )
    diff = M.distribution_metrics(
        b, a, ("fid", "kid"), feature_extractor=TinyFeatures(), kid_subset_size=10, kid_subsets=5
    )
    assert abs(same["fid"]) < 1e-6 and diff["fid"] > 1e-3
    assert diff["kid"] > same["kid"]
    with pytest.raises(ValueError, match="at least two"):
        M.distribution_metrics(a[:1], a, ("fid",), feature_extractor=TinyFeatures())


def test_fid_matches_frechet_formula_on_features():
    """FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) on the extractor's features."""
    from scipy import linalg

    g = torch.Generator().manual_seed(1)
    a = [torch.rand(3, 24, 24, generator=g) for _ in range(30)]
    b = [torch.rand(3, 24, 24, generator=g) * 0.7 for _ in range(30)]
    net = TinyFeatures()
    with torch.no_grad():
        fa = net(torch.stack(a)).double().numpy()
        fb = net(torch.stack(b)).double().numpy()
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    got = M.distribution_metrics(b, a, ("fid",), feature_extractor=net)["fid"]
    assert got == pytest.approx(expected, rel=1e-4)


def test_inception_fid_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(MissingCheckpointError, match="weights.inception"):
        M.distribution_metrics([], [], ("fid",), inception_weights=tmp_path / "incep.pth")


# ------------------------------------------------------------------------ MetricAccumulator
def _values(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 40


def test_accumulator_mean_std_count_and_nonfinite():
    acc = M.MetricAccumulator(["psnr", "ssim"])
    v = _values(0, 7)
    acc.update({"psnr": v[:3]})
    acc.update({"psnr": torch.cat([v[3:], torch.tensor([math.inf])]), "ssim": 0.5})
    out = acc.compute()
    assert out["psnr"]["mean"] == pytest.approx(v.mean().item())
    assert out["psnr"]["std"] == pytest.approx(v.std(unbiased=False).item())
    assert out["psnr"]["count"] == 7 and out["psnr"]["nonfinite"] == 1
    assert out["ssim"] == {"mean": 0.5, "std": 0.0, "count": 1, "nonfinite": 0}
    with pytest.raises(KeyError):
        acc.update({"lpips": 0.1})


def test_accumulator_merge_is_sum_over_count_not_mean_of_means():
    v = _values(1, 10)
    single = M.MetricAccumulator(["psnr"])
    single.update({"psnr": v})
    rank0, rank1 = M.MetricAccumulator(["psnr"]), M.MetricAccumulator(["psnr"])
    rank0.update({"psnr": v[:2]})  # unequal shards: a mean of means would differ
    rank1.update({"psnr": v[2:]})
    rank0.merge_state(rank1)  # the same dist_reduce_fx ("sum") DDP sync applies
    assert rank0.compute()["psnr"]["mean"] == pytest.approx(single.compute()["psnr"]["mean"])
    assert rank0.compute()["psnr"]["count"] == 10
    mean_of_means = (v[:2].mean() + v[2:].mean()).item() / 2
    assert abs(rank0.compute()["psnr"]["mean"] - mean_of_means) > 1e-3


def _rank_worker(rank: int, port: int, out: str) -> None:
    """One DDP rank: accumulate its shard, let torchmetrics sync, rank 0 writes the result."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    v = _values(1, 10)
    acc = M.MetricAccumulator(["psnr"])
    for chunk in (v[:2] if rank == 0 else v[2:]).split(3):  # unequal shards
        acc.update({"psnr": chunk})
    result = acc.compute()  # torchmetrics all-gathers and sums the states here
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.ddp
def test_accumulator_reduces_across_two_gloo_ranks(tmp_path):
    import multiprocessing

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.json"
    # fork: the children inherit the imported modules (a fresh interpreter spends ~10 s importing)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_worker, args=(r, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    result = json.loads(out.read_text())["psnr"]
    v = _values(1, 10)
    assert result["count"] == 10
    assert result["mean"] == pytest.approx(v.mean().item())
    assert result["std"] == pytest.approx(v.std(unbiased=False).item())


# ------------------------------------------------------------------- package layout and table
def test_ssim_window_is_the_one_gaussian_kernel():
    """SSIM's window is bir.operators.blur.gaussian_kernel: cv2's normalised 1-D window (sigma
    1.5) times itself, as BasicSR builds it."""
    from bir.operators.blur import gaussian_kernel

    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    g = g / g.sum()
    torch.testing.assert_close(
        gaussian_kernel(11, 1.5, dtype=torch.float64), g[:, None] * g[None, :], rtol=0, atol=1e-15
    )


def test_importing_the_metrics_sets_no_environment_variable():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = "import os, bir.metrics; print(os.environ.get('HF_HUB_OFFLINE'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_every_metric_name_has_one_kind_and_the_lists_follow_the_table():
    from bir.metrics import registry as R

    assert set(M.METRICS) == {
        *M.FULL_REFERENCE_METRICS,
        *M.DISTRIBUTION_METRICS,
        *M.NO_REFERENCE_METRICS,
    }
    assert {M.METRICS[n].kind for n in M.NO_REFERENCE_METRICS} == {R.NO_REFERENCE}
    for spec in M.METRICS.values():
        if spec.backbone:  # its weights key names a WEIGHT_FILES entry of conf/eval.yaml
            assert M.WEIGHT_FILES[spec.backbone]["key"] == f"weights.{spec.weights_key}"
    # bir-eval's config sets a file for every weights key of the table, and no other
    import yaml

    eval_cfg = yaml.safe_load((CONF / "eval.yaml").read_text())
    assert set(eval_cfg["weights"]) == {s.weights_key for s in M.METRICS.values() if s.weights_key}


def test_per_image_metric_from_the_table_equals_the_function(alex_file):
    x = _photo("astronaut", 32)
    y = _noisy(x)
    fn = M.per_image_metric("psnr", crop_border=3, y_channel=True)
    torch.testing.assert_close(fn(y, x), M.psnr(y, x, crop_border=3, y_channel=True))
    fn = M.per_image_metric("lpips", {"lpips_alex": str(alex_file)})
    torch.testing.assert_close(fn(y, x), M.lpips(y, x, weights_path=alex_file))
    # the release file under a weights folder, when no file is configured
    fn = M.per_image_metric("lpips", weights_dir=alex_file.parent)
    torch.testing.assert_close(fn(y, x), M.lpips(y, x, weights_path=alex_file))


def test_per_image_metric_checks_name_kind_and_weights_before_any_image(tmp_path):
    from bir.errors import UsageError

    with pytest.raises(UsageError, match=r"unknown metrics \['psnrr'\]; known: \["):
        M.per_image_metric("psnrr")
    with pytest.raises(UsageError, match="distribution metrics"):
        M.per_image_metric("fid")
    with pytest.raises(MissingCheckpointError, match="weights.lpips_vgg"):
        M.per_image_metric("lpips_vgg", weights_dir=tmp_path)


# ------------------------------------------------------------- the non-finite value policy
def test_summarize_leaves_non_finite_out_and_counts_it_as_the_accumulator_does():
    v = _values(2, 6).tolist()
    values = [v[0], math.inf, v[1], None, "", *v[2:], "inf"]  # None and "" are missing
    s = M.summarize(values)
    assert s["count"] == 6 and s["nonfinite"] == 2
    assert s["mean"] == pytest.approx(float(np.mean(v)), abs=1e-12)
    assert s["std"] == pytest.approx(float(np.std(v)), abs=1e-9)
    acc = M.MetricAccumulator(["psnr"])
    acc.update({"psnr": [*v, math.inf, math.inf]})
    assert acc.compute()["psnr"] == pytest.approx(s)
    assert math.isnan(M.summarize([math.inf])["mean"]) and M.summarize([math.inf])["nonfinite"] == 1


def test_record_values_round_trip_through_strict_json_and_csv():
    for v in (math.inf, -math.inf, 31.25):
        stored = json.loads(json.dumps(M.record_value(v), allow_nan=False))
        assert M.parse_value(stored) == v and M.parse_value(str(stored)) == v
    assert math.isnan(M.parse_value(M.record_value(math.nan)))
    assert M.parse_value(None) is None and M.parse_value("") is None


def test_summary_table_and_flat_means_say_what_was_left_out():
    stats = {"psnr": M.summarize([30.0, 32.0, math.inf]), "ssim": M.summarize([0.5, 0.7])}
    table = M.summary_table(stats, {"fid": 12.5})
    assert "| psnr | 31.0000 | 1.0000 | 2 (+1 non-finite) |" in table
    assert "| ssim | 0.6000 | 0.1000 | 2 |" in table and "| fid | 12.5000 | | |" in table
    assert "left out" in table
    assert "left out" not in M.summary_table({"ssim": stats["ssim"]})
    assert M.flat_means(stats) == pytest.approx({"psnr": 31.0, "psnr_nonfinite": 1.0, "ssim": 0.6})
