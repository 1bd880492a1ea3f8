"""Pipelines: output contract, per-sample determinism, no in-place modification, configs."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from bir.degradations import (
    DegradationResult,
    IdentityDegradation,
    SecondOrderDegradation,
    SingleStageDegradation,
)
from bir.random import sample_generators
from tests.conftest import compose_config


def _gt(batch: int = 4, size: int = 48) -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    return torch.stack(
        [img[:, 60 * i : 60 * i + size, 40 * i : 40 * i + size] for i in range(batch)]
    )


def _compose(name: str):
    return compose_config("degrade", f"degradation={name}").degradation


PIPELINES = {
    "second_order": lambda: SecondOrderDegradation(kernel_sizes=[7, 9, 11], kernel_pad_to=11),
    "second_order_usm": lambda: SecondOrderDegradation(use_sharpener=True, usm_radius=10),
    "single_stage": lambda: SingleStageDegradation(blur_kernel_size=21),
    "single_stage_face": lambda: SingleStageDegradation(
        blur_sigma=(0.1, 10), downsample_range=(0.8, 8), noise_range=(0, 20), jpeg_range=(60, 100)
    ),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_contract_and_batch_independence(name):
    pipeline = PIPELINES[name]()
    gt = _gt()
    gt_before = gt.clone()
    for seed in (0, 1):
        result = pipeline(gt, sample_generators(seed, [10, 11, 12, 13]))
        assert isinstance(result, DegradationResult)
        assert result.lq.shape == gt.shape and result.lq.dtype == torch.float32
        assert result.lq.min() >= 0 and result.lq.max() <= 1
        levels = result.lq * 255
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the 8-bit grid
        assert len(result.params) == 4 and json.loads(json.dumps(result.params)) == result.params
        # sample 2 of the batch equals the same sample degraded alone
        alone = pipeline(gt[2:3], sample_generators(seed, [12]))
        torch.testing.assert_close(result.lq[2:3], alone.lq, atol=0, rtol=0)
        assert alone.params[0] == result.params[2]
        assert (result.lq - gt).abs().mean() > 1e-3  # it degrades
    assert torch.equal(gt, gt_before)
    other = pipeline(gt, sample_generators(2, [10, 11, 12, 13]))
    assert not torch.equal(other.lq, result.lq)


def test_usm_sharpened_gt_is_returned():
    gt = _gt(2)
    result = SecondOrderDegradation(use_sharpener=True)(gt, sample_generators(0, [0, 1]))
    assert not torch.equal(result.gt, gt) and result.gt.min() >= 0 and result.gt.max() <= 1
    plain = SecondOrderDegradation()(gt, sample_generators(0, [0, 1]))
    assert torch.equal(plain.gt, gt)


def test_single_stage_params_in_ranges_and_fixed_kernel_size():
    result = SingleStageDegradation()(_gt(4), sample_generators(3, range(4)))
    for p in result.params:
        assert p["kernel"]["size"] == 41 and p["kernel"]["kind"] in ("iso", "aniso")
        assert 0.1 <= p["kernel"]["sigma_x"] <= 12 and 1 <= p["downsample_scale"] <= 12
        assert 0 <= p["noise_sigma"] <= 15 and 30 <= p["jpeg_quality"] <= 100


def test_second_order_without_any_degradation_is_near_identity():
    """All probabilities off and scale 1: only JPEG at quality 100 and 8-bit rounding remain."""
    pipeline = SecondOrderDegradation(
        scale=1,
        kernel_sizes=[1],
        kernel_pad_to=1,
        kernel_list=["iso"],
        kernel_prob=[1.0],
        blur_sigma=(0.2, 0.2),
        resize_prob=(0, 0, 1),
        gaussian_noise_prob=1.0,
        noise_range=(0, 0),
        jpeg_range=(100, 100),
        second_blur_prob=0.0,
        kernel_list2=["iso"],
        kernel_prob2=[1.0],
        resize_prob2=(0, 0, 1),
        gaussian_noise_prob2=1.0,
        noise_range2=(0, 0),
        jpeg_range2=(100, 100),
        final_sinc_prob=0.0,
    )
    gt = (_gt(2) * 255).round() / 255
    result = pipeline(gt, sample_generators(0, [0, 1]))
    assert (result.lq - gt).abs().mean() < 2 / 255


def test_identity_pipeline():
    gt = _gt(2)
    result = IdentityDegradation()(gt, sample_generators(0, [0, 1]))
    torch.testing.assert_close(result.lq, gt, atol=0.5 / 255, rtol=0)
    assert result.params == [{}, {}]


@pytest.mark.parametrize(
    "name,cls",
    [
        ("second_order", SecondOrderDegradation),
        ("second_order_tiny", SecondOrderDegradation),
        ("second_order_basicsr", SecondOrderDegradation),
        ("single_stage", SingleStageDegradation),
        ("single_stage_face", SingleStageDegradation),
        ("none", IdentityDegradation),
    ],
)
def test_configs_instantiate_with_documented_numbers(name, cls):
    pipeline = instantiate(_compose(name))
    assert isinstance(pipeline, cls)
    if name == "second_order":
        assert pipeline.stages[0]["resize_range"] == (0.15, 1.5)
        assert pipeline.stages[1]["noise_range"] == (1.0, 25.0)
        assert pipeline.final_sinc_prob == 0.8 and pipeline.kernel_pad_to == 21
    if name == "single_stage_face":
        assert pipeline.blur_sigma == (0.1, 10.0) and pipeline.jpeg_range == (60, 100)
    if name == "second_order":
        assert pipeline.jpeg.convention == "libjpeg" and pipeline.jpeg.padding == "edge"
        assert pipeline.poisson_levels == 256 and pipeline.stage1_resize == "size"
    if name == "second_order_basicsr":  # BasicSR's conventions, Real-ESRGAN's numbers
        assert pipeline.jpeg.convention == "basicsr" and pipeline.jpeg.padding == "zero"
        assert pipeline.poisson_levels == "unique" and pipeline.stage1_resize == "scale_factor"
        assert pipeline.gray_weights == (0.2989, 0.587, 0.114)
        assert not pipeline.jpeg_integer_quality and pipeline.kernel_pad_to == 21
        result = pipeline(_gt(2, 48), sample_generators(0, [0, 1]))
        assert result.lq.shape == (2, 3, 48, 48)
        qualities = [p["stage1"]["jpeg_quality"] for p in result.params]
        assert all(30 <= q <= 95 and q != round(q) for q in qualities)  # continuous, as BasicSR
    if name == "second_order_tiny":
        result = pipeline(_gt(2, 32), sample_generators(0, [0, 1]))
        assert result.lq.shape == (2, 3, 32, 32)


def test_basicsr_preset_stage_equals_basicsr_ops():
    """One stage of the basicsr preset (noise off) = BasicSR's filter2D, F.interpolate with
    scale_factor, clamp and DiffJPEG on the same kernel, scale, mode and quality."""
    img_process = pytest.importorskip("basicsr.utils.img_process_util")
    basicsr_jpeg = pytest.importorskip("basicsr.utils.diffjpeg")
    import torch.nn.functional as F

    from bir.degradations import kernels_from_params

    cfg = _compose("second_order_basicsr")
    pipeline = instantiate(cfg, noise_range=[0, 0], gaussian_noise_prob=1.0)
    gt = _gt(4, 48)
    gens = sample_generators(7, range(4))
    params = [pipeline.draw_params(g)["stage1"] for g in gens]
    sizes = [(int(48 * p["resize_scale"]),) * 2 for p in params]
    ours = pipeline._stage(list(gt.split(1)), params, gens, sizes, by_factor=True)
    jpeg = basicsr_jpeg.DiffJPEG(differentiable=False)
    for i, p in enumerate(params):
        kernel = kernels_from_params([p["kernel"]], 21)
        x = img_process.filter2D(gt[i : i + 1], kernel)
        x = F.interpolate(x, scale_factor=p["resize_scale"], mode=p["resize_mode"])
        x = jpeg(x.clamp(0, 1).contiguous(), quality=torch.tensor([p["jpeg_quality"]]))
        assert ours[i].shape == x.shape
        torch.testing.assert_close(ours[i], x, atol=1e-5, rtol=0)
    assert len({p["resize_mode"] for p in params}) > 1 and any(
        p["resize_scale"] != 1 for p in params
    )
