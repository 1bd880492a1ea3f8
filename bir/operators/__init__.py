"""Differentiable forward models y = A(x) for zero-shot restoration (shared by BIRD and BIR-D)."""

from bir.operators.base import Operator
from bir.operators.blur import (
    FixedKernelBlur,
    KernelMLPBlur,
    LearnableKernelBlur,
    MotionBlur,
    convolve_per_image,
    gaussian_kernel,
)
from bir.operators.compose import Compose
from bir.operators.kernel_mask import KernelMaskOperator
from bir.operators.lowlight import LowLightOperator
from bir.operators.mask import InpaintMask
from bir.operators.pointwise import Grayscale, Identity
from bir.operators.resample import AvgPoolDownsample, BicubicDownsample

__all__ = [
    "AvgPoolDownsample",
    "BicubicDownsample",
    "Compose",
    "FixedKernelBlur",
    "Grayscale",
    "Identity",
    "InpaintMask",
    "KernelMaskOperator",
    "LowLightOperator",
    "KernelMLPBlur",
    "LearnableKernelBlur",
    "MotionBlur",
    "Operator",
    "convolve_per_image",
    "gaussian_kernel",
]
