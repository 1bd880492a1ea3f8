"""Every operator config composes and instantiates the class it names with working defaults."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config

EXPECTED = {
    "gaussian_blur_known": ("FixedKernelBlur", (1, 3, 64, 64)),
    "motion_blur_known": ("MotionBlur", (1, 3, 64, 64)),
    "blur_learned_kernel": ("LearnableKernelBlur", (1, 3, 64, 64)),
    "blur_kernel_mlp": ("KernelMLPBlur", (1, 3, 64, 64)),
    "sr_avgpool_x8": ("AvgPoolDownsample", (1, 3, 8, 8)),
    "sr_bicubic_x4": ("BicubicDownsample", (1, 3, 16, 16)),
    "denoise": ("Identity", (1, 3, 64, 64)),
    "inpaint": ("InpaintMask", (1, 3, 64, 64)),
    "colorize": ("Grayscale", (1, 3, 64, 64)),
    "colorize_mean": ("Grayscale", (1, 3, 64, 64)),
    "sr_avgpool_x4": ("AvgPoolDownsample", (1, 3, 16, 16)),
    "kernel_mask": ("KernelMaskOperator", (1, 3, 64, 64)),
    "lowlight": ("LowLightOperator", (1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_operator_config_instantiates(name):
    cfg = compose_config("restore", "method=baseline", f"operator={name}")
    op = instantiate(cfg.operator)
    cls, out_shape = EXPECTED[name]
    assert type(op).__name__ == cls
    op.init_batch((1, 3, 64, 64), [torch.Generator().manual_seed(0)])
    assert op(torch.rand(1, 3, 64, 64)).shape == out_shape
