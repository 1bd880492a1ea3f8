"""Training-time random degradations: kernels, filter2d, resize, noise, DiffJPEG, USM sharpening,
and the pipelines built from them (Real-ESRGAN second order, DiffBIR v1 single stage)."""

from bir.degradations.filters import filter2d, reflect_pad, usm_sharp
from bir.degradations.jpeg import DiffJPEG, quality_scaled_tables
from bir.degradations.kernels import (
    build_kernels,
    draw_mixed_kernel_params,
    draw_sinc_params,
    kernels_from_params,
    sinc_kernels,
)
from bir.degradations.noise import (
    BT601_LUMA,
    POISSON_LEVELS,
    TORCHVISION_LUMA,
    add_gaussian_noise,
    add_poisson_noise,
    unique_levels,
)
from bir.degradations.pipelines import (
    DegradationResult,
    IdentityDegradation,
    SecondOrderDegradation,
    SingleStageDegradation,
    quantize_8bit,
)
from bir.degradations.resize import random_resize, resize, resize_by_factor

__all__ = [
    "BT601_LUMA",
    "POISSON_LEVELS",
    "TORCHVISION_LUMA",
    "DegradationResult",
    "DiffJPEG",
    "IdentityDegradation",
    "SecondOrderDegradation",
    "SingleStageDegradation",
    "add_gaussian_noise",
    "add_poisson_noise",
    "build_kernels",
    "draw_mixed_kernel_params",
    "draw_sinc_params",
    "filter2d",
    "kernels_from_params",
    "quality_scaled_tables",
    "quantize_8bit",
    "random_resize",
    "reflect_pad",
    "resize",
    "resize_by_factor",
    "sinc_kernels",
    "unique_levels",
    "usm_sharp",
]
