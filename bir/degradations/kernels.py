"""Blur kernels of the Real-ESRGAN / DiffBIR degradation models, built batched in torch.

Every kernel of a batch lives on one ``pad_to x pad_to`` grid centred on the middle pixel; a
sample whose own kernel size ``k`` is smaller is zero outside its central ``k x k`` window and is
normalised inside it, which equals BasicSR's "build k x k, then zero-pad to 21" exactly.

Kernel formulas (BasicSR ``degradations.py``; x = (column, row) offset from the centre,
Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T, Q = x^T Sigma^-1 x):

- Gaussian (iso / aniso):          exp(-Q / 2)
- generalized Gaussian (beta):     exp(-Q^beta / 2)          (BasicSR writes it this way)
- plateau (beta):                  1 / (Q^beta + 1)
- sinc (circular low-pass, cutoff omega_c):
  omega_c J1(omega_c r) / (2 pi r), centre omega_c^2 / (4 pi)

All are normalised to sum 1. Scalar parameters are drawn per sample with that sample's generator
(:func:`draw_mixed_kernel_params`, :func:`draw_sinc_params`); building is one batched call
(:func:`build_kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bir.degradations.filters import flush_subnormal
from bir.random import choice, uniform

#: the kernel families Real-ESRGAN draws from (its default ``kernel_list``)
REAL_ESRGAN_KERNELS = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
#: every kind :func:`build_kernels` builds: those families, the sinc and the identity pulse
KERNEL_KINDS = (*REAL_ESRGAN_KERNELS, "sinc", "pulse")


def kernel_grid(
    pad_to: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row offsets from the centre of an odd ``pad_to`` grid, each [pad_to, pad_to] float64."""
    if pad_to % 2 != 1:
        raise ValueError(f"kernel grid size must be odd, got {pad_to}")
    ax = torch.arange(pad_to, dtype=torch.float64, device=device) - (pad_to - 1) / 2
    rows, cols = torch.meshgrid(ax, ax, indexing="ij")
    return cols, rows


def _window_mask(sizes: torch.Tensor, pad_to: int) -> torch.Tensor:
    """[B, pad_to, pad_to] bool: True inside each sample's central ``sizes[b] x sizes[b]`` window."""
    cols, rows = kernel_grid(pad_to, sizes.device)
    half = (sizes.to(torch.float64) - 1).div(2).view(-1, 1, 1)
    return (cols.abs() <= half) & (rows.abs() <= half)


def gaussian_quadratic_form(
    sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, pad_to: int
) -> torch.Tensor:
    """Q = x^T Sigma^-1 x on the grid for per-sample (sigma_x, sigma_y, theta): [B, pad_to, pad_to] float64.

    Sigma = R diag(sigma_x^2, sigma_y^2) R^T with R the rotation by ``theta`` (BasicSR
    ``sigma_matrix2``); x = (column offset, row offset).
    """
    cols, rows = kernel_grid(pad_to, sigma_x.device)
    sx2 = sigma_x.to(torch.float64).view(-1, 1, 1) ** 2
    sy2 = sigma_y.to(torch.float64).view(-1, 1, 1) ** 2
    cos, sin = (
        torch.cos(theta.to(torch.float64)).view(-1, 1, 1),
        torch.sin(theta.to(torch.float64)).view(-1, 1, 1),
    )
    # Coordinates in the rotated frame: u = R^T x, then Q = u_0^2 / sx^2 + u_1^2 / sy^2.
    u0 = cos * cols + sin * rows
    u1 = -sin * cols + cos * rows
    return u0**2 / sx2 + u1**2 / sy2


def sinc_kernels(cutoff: torch.Tensor, sizes: torch.Tensor, pad_to: int) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernels [B, pad_to, pad_to] float32, normalised to sum 1.

    Args:
        cutoff: [B] cutoff frequency omega_c in radians per pixel (Real-ESRGAN uses [pi/3, pi]).
        sizes: [B] odd kernel sizes <= pad_to; the kernel is zero outside the central window.
    """
    return build_kernels(
        kinds=["sinc"] * len(cutoff),
        sizes=sizes,
        pad_to=pad_to,
        cutoff=cutoff,
    )


def build_kernels(
    kinds: Sequence[str],
    sizes: torch.Tensor | Sequence[int],
    pad_to: int,
    sigma_x: torch.Tensor | None = None,
    sigma_y: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    cutoff: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build one kernel per sample, all kinds in one batched computation.

    Args:
        kinds: per-sample kind, one of :data:`KERNEL_KINDS` ("pulse" is the identity kernel).
        sizes: [B] odd kernel sizes (<= pad_to).
        pad_to: odd size of the returned grid.
        sigma_x, sigma_y, theta: [B] Gaussian-family parameters (ignored for sinc / pulse).
        beta: [B] shape parameter of the generalized / plateau kinds.
        cutoff: [B] sinc cutoff in radians.
    Returns:
        [B, pad_to, pad_to] float32, non-negative except sinc side lobes, each summing to 1;
        entries below float32's smallest normal number are zero.
    """
    batch = len(kinds)
    if device is None:
        ref = next((t for t in (sigma_x, cutoff, beta) if isinstance(t, torch.Tensor)), None)
        device = ref.device if ref is not None else "cpu"
    sizes = torch.as_tensor(sizes, device=device).long().view(batch)
    if bool((sizes % 2 == 0).any()) or bool((sizes > pad_to).any()):
        raise ValueError(f"kernel sizes must be odd and <= {pad_to}, got {sizes.tolist()}")

    def _param(t: torch.Tensor | None, fill: float) -> torch.Tensor:
        if t is None:
            return torch.full((batch,), fill, dtype=torch.float64, device=device)
        return torch.as_tensor(t, device=device).to(torch.float64).view(batch)

    sigma_x, sigma_y = _param(sigma_x, 1.0), _param(sigma_y, 1.0)
    theta, beta, cutoff = _param(theta, 0.0), _param(beta, 1.0), _param(cutoff, math.pi)

    quad = gaussian_quadratic_form(sigma_x, sigma_y, theta, pad_to)
    quad_beta = quad.pow(beta.view(-1, 1, 1))
    gaussian = torch.exp(-0.5 * quad)
    generalized = torch.exp(-0.5 * quad_beta)
    plateau = 1.0 / (quad_beta + 1.0)

    cols, rows = kernel_grid(pad_to, device)
    radius = torch.sqrt(cols**2 + rows**2).expand(batch, -1, -1)
    wc = cutoff.view(-1, 1, 1)
    safe_r = torch.where(radius > 0, radius, torch.ones_like(radius))
    sinc = wc * torch.special.bessel_j1(wc * safe_r) / (2 * math.pi * safe_r)
    sinc = torch.where(radius > 0, sinc, (wc**2 / (4 * math.pi)).expand_as(sinc))
    pulse = (radius == 0).to(torch.float64).expand(batch, -1, -1)

    code = torch.tensor([KERNEL_KINDS.index(k) for k in kinds], device=device).view(-1, 1, 1)
    kernel = torch.where(code <= 1, gaussian, generalized)
    kernel = torch.where((code == 4) | (code == 5), plateau, kernel)
    kernel = torch.where(code == 6, sinc, kernel)
    kernel = torch.where(code == 7, pulse, kernel)
    kernel = kernel * _window_mask(sizes, pad_to)
    kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
    # float32 entries below the smallest normal float (far Gaussian tails) are set to zero: they
    # change no filtered value by more than 1e-38, and subnormal operands slow the convolution.
    return flush_subnormal(kernel.to(torch.float32))


def _draw_beta(g: torch.Generator, beta_range: Sequence[float]) -> float:
    """BasicSR's beta draw: half the time from [low, 1), else from [1, high)."""
    if uniform(g, 0.0, 1.0) < 0.5:
        return uniform(g, beta_range[0], 1.0)
    return uniform(g, 1.0, beta_range[1])


def draw_mixed_kernel_params(
    g: torch.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    kernel_sizes: Sequence[int],
    sigma_range: Sequence[float],
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
    sinc_prob: float = 0.0,
) -> dict:
    """Draw one sample's blur kernel parameters as Real-ESRGAN does (a JSON-able dict).

    Order of draws follows Real-ESRGAN: size, sinc-or-not, then the kind and its parameters.
    Sinc cutoff is in [pi/3, pi] for sizes < 13, else [pi/5, pi]. Isotropic kinds use
    sigma_y = sigma_x and theta = 0.
    """
    size = int(choice(g, list(kernel_sizes)))
    if sinc_prob > 0 and uniform(g, 0.0, 1.0) < sinc_prob:
        low = math.pi / 3 if size < 13 else math.pi / 5
        return {"kind": "sinc", "size": size, "cutoff": uniform(g, low, math.pi)}
    kind = str(choice(g, list(kernel_list), list(kernel_prob)))
    sigma_x = uniform(g, sigma_range[0], sigma_range[1])
    if kind.endswith("aniso"):
        sigma_y = uniform(g, sigma_range[0], sigma_range[1])
        theta = uniform(g, rotation_range[0], rotation_range[1])
    else:
        sigma_y, theta = sigma_x, 0.0
    params = {"kind": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    if kind.startswith("generalized"):
        params["beta"] = _draw_beta(g, betag_range)
    elif kind.startswith("plateau"):
        params["beta"] = _draw_beta(g, betap_range)
    return params


def draw_sinc_params(
    g: torch.Generator,
    prob: float,
    kernel_sizes: Sequence[int],
    cutoff_range: Sequence[float] = (math.pi / 3, math.pi),
) -> dict:
    """Real-ESRGAN's final sinc filter: with probability ``prob`` a sinc kernel, else a pulse."""
    if uniform(g, 0.0, 1.0) < prob:
        size = int(choice(g, list(kernel_sizes)))
        return {
            "kind": "sinc",
            "size": size,
            "cutoff": uniform(g, cutoff_range[0], cutoff_range[1]),
        }
    return {"kind": "pulse", "size": 1}


def kernels_from_params(
    params: Sequence[dict], pad_to: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Batched :func:`build_kernels` from per-sample parameter dicts: [B, pad_to, pad_to] float32."""

    def column(key: str, fill: float) -> torch.Tensor:
        return torch.tensor(
            [float(p.get(key, fill)) for p in params], dtype=torch.float64, device=device
        )

    return build_kernels(
        kinds=[p["kind"] for p in params],
        sizes=[int(p["size"]) for p in params],
        pad_to=pad_to,
        sigma_x=column("sigma_x", 1.0),
        sigma_y=column("sigma_y", 1.0),
        theta=column("theta", 0.0),
        beta=column("beta", 1.0),
        cutoff=column("cutoff", math.pi),
        device=device,
    )
