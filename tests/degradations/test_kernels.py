"""Blur kernels against independent numpy formulas (and BasicSR where it imports)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from bir.degradations import build_kernels, draw_mixed_kernel_params, sinc_kernels
from bir.degradations.pipelines import REAL_ESRGAN_KERNELS


def _np_quadratic(k: int, sx: float, sy: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on a k x k grid, Sigma = R diag(sx^2, sy^2) R^T, x = (col, row)."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    sigma = rot @ np.diag([sx**2, sy**2]) @ rot.T
    inv = np.linalg.inv(sigma)
    ax = np.arange(k) - (k - 1) / 2
    xx, yy = np.meshgrid(ax, ax)  # xx varies along columns
    xy = np.stack([xx, yy], axis=-1)
    return np.einsum("hwi,ij,hwj->hw", xy, inv, xy)


def _pad(kernel: np.ndarray, pad_to: int) -> np.ndarray:
    p = (pad_to - kernel.shape[0]) // 2
    return np.pad(kernel, p)


def _np_kernel(kind: str, k: int, sx: float, sy: float, theta: float, beta: float) -> np.ndarray:
    q = _np_quadratic(k, sx, sy, theta)
    if kind.startswith("generalized"):
        kern = np.exp(-0.5 * q**beta)
    elif kind.startswith("plateau"):
        kern = 1.0 / (q**beta + 1)
    else:
        kern = np.exp(-0.5 * q)
    return kern / kern.sum()


def _np_sinc(cutoff: float, k: int) -> np.ndarray:
    ax = np.arange(k) - (k - 1) / 2
    r = np.sqrt(ax[None, :] ** 2 + ax[:, None] ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        kern = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    kern[(k - 1) // 2, (k - 1) // 2] = cutoff**2 / (4 * np.pi)
    return kern / kern.sum()


CASES = [
    ("iso", 7, 1.3, 1.3, 0.0, 1.0),
    ("aniso", 21, 2.7, 0.6, 0.7, 1.0),
    ("aniso", 13, 0.4, 2.9, -2.2, 1.0),
    ("generalized_iso", 11, 1.5, 1.5, 0.0, 0.6),
    ("generalized_aniso", 15, 2.0, 1.0, 1.1, 3.5),
    ("plateau_iso", 9, 1.1, 1.1, 0.0, 1.4),
    ("plateau_aniso", 19, 2.5, 0.8, -0.4, 1.9),
]


def test_gaussian_family_matches_numpy_formula_in_one_batch():
    kernels = build_kernels(
        kinds=[c[0] for c in CASES],
        sizes=[c[1] for c in CASES],
        pad_to=21,
        sigma_x=torch.tensor([c[2] for c in CASES]),
        sigma_y=torch.tensor([c[3] for c in CASES]),
        theta=torch.tensor([c[4] for c in CASES]),
        beta=torch.tensor([c[5] for c in CASES]),
    )
    assert kernels.shape == (len(CASES), 21, 21) and kernels.dtype == torch.float32
    for kern, (kind, k, sx, sy, theta, beta) in zip(kernels, CASES):
        expected = _pad(_np_kernel(kind, k, sx, sy, theta, beta), 21)
        np.testing.assert_allclose(kern.numpy(), expected, atol=1e-6)
        assert abs(float(kern.sum()) - 1) < 1e-5


def test_sinc_matches_bessel_formula_and_pulse_is_identity():
    cut = torch.tensor([math.pi / 3, 2.0, math.pi])
    kernels = sinc_kernels(cut, torch.tensor([7, 13, 21]), pad_to=21)
    for kern, c, k in zip(kernels, cut.tolist(), [7, 13, 21]):
        np.testing.assert_allclose(kern.numpy(), _pad(_np_sinc(c, k), 21), atol=1e-6)
    pulse = build_kernels(["pulse"], [1], pad_to=9)[0]
    assert pulse[4, 4] == 1 and pulse.sum() == 1


def test_matches_basicsr_kernels():
    deg = pytest.importorskip("basicsr.data.degradations")
    k = 15
    ours = build_kernels(
        ["aniso", "generalized_aniso", "plateau_aniso", "sinc"],
        [k] * 4,
        pad_to=k,
        sigma_x=torch.tensor([2.0, 2.0, 2.0, 0.0]),
        sigma_y=torch.tensor([0.7, 0.7, 0.7, 0.0]),
        theta=torch.tensor([0.9, 0.9, 0.9, 0.0]),
        beta=torch.tensor([1.0, 2.5, 1.5, 1.0]),
        cutoff=torch.tensor([1.0, 1.0, 1.0, 1.7]),
    )
    refs = [
        deg.bivariate_Gaussian(k, 2.0, 0.7, 0.9, isotropic=False),
        deg.bivariate_generalized_Gaussian(k, 2.0, 0.7, 0.9, 2.5, isotropic=False),
        deg.bivariate_plateau(k, 2.0, 0.7, 0.9, 1.5, isotropic=False),
        deg.circular_lowpass_kernel(1.7, k, pad_to=0),
    ]
    for o, r in zip(ours, refs):
        np.testing.assert_allclose(o.numpy(), r, atol=1e-6)


def test_mixed_kernel_draw_frequencies_and_ranges():
    g = torch.Generator().manual_seed(0)
    probs = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    draws = [
        draw_mixed_kernel_params(
            g, REAL_ESRGAN_KERNELS, probs, range(7, 22, 2), (0.2, 3.0), sinc_prob=0.1
        )
        for _ in range(3000)
    ]
    kinds = [d["kind"] for d in draws]
    assert abs(kinds.count("sinc") / 3000 - 0.1) < 0.025
    assert abs(kinds.count("iso") / 3000 - 0.9 * 0.45) < 0.04
    assert abs(kinds.count("aniso") / 3000 - 0.9 * 0.25) < 0.04
    for d in draws:
        assert d["size"] in range(7, 22, 2)
        if d["kind"] == "sinc":
            low = math.pi / 3 if d["size"] < 13 else math.pi / 5
            assert low <= d["cutoff"] <= math.pi
        else:
            assert 0.2 <= d["sigma_x"] <= 3.0 and 0.2 <= d["sigma_y"] <= 3.0
            if not d["kind"].endswith("aniso"):
                assert d["sigma_x"] == d["sigma_y"] and d["theta"] == 0.0
        if d["kind"].startswith("generalized"):
            assert 0.5 <= d["beta"] <= 4.0
        if d["kind"].startswith("plateau"):
            assert 1.0 <= d["beta"] <= 2.0
