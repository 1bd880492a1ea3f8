"""Blur operators ``y = k * x``: a known kernel, a free learnable kernel, and BIRD's kernel MLP.

Every kernel is held per image (``[B, c, k, k]``, ``c`` = 1 for one kernel shared by the colour
channels or ``C`` for a depthwise kernel per channel) and applied in one grouped convolution.

Two conventions matter when reproducing released code:

- Direction. ``correlate=False`` (bir's default for a known kernel) is a true convolution (the
  kernel is flipped), so a known asymmetric PSF means what it says. ``correlate=True`` is the
  cross-correlation of ``F.conv2d`` that BIRD's released code uses, both to blur its test image
  with ``data/kernel.npy`` and to apply the kernel its MLP learns; for a learned kernel it only
  mirrors the estimate, but it decides which tap a given set of MLP weights lands on. Whatever
  the direction, :meth:`estimate` reports the convolution PSF (flipped back when correlating),
  so estimates compare with a true kernel one way.
- Border. The released BIRD code blurs images on the [-1, 1] scale with
  ``F.conv2d(..., padding="same")``: zeros *there* are mid-grey (0.5) on bir's [0, 1] scale, not
  black. ``padding="zeros_signed"`` computes exactly that, ``(k * pad_0(2x - 1) + 1) / 2``; for a
  kernel that sums to 1 it equals padding [0, 1] with 0.5. It differs from ``zeros`` (black) by
  the kernel applied to a grey frame, whatever the image: with the released 41x41
  ``data/kernel.npy`` at 256 px, 17.5 % of the pixels by more than 0.01, up to 0.49.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bir.operators.base import Operator, Shape, batch_size_of
from bir.operators.synthetic import motion_kernel

#: torch ``F.pad`` modes by the names used in configs; ``zeros_signed`` pads with zeros on the
#: [-1, 1] scale (the released BIRD code's ``conv2d(padding="same")``; see the module docstring);
#: ``valid`` does not pad (the output is ``k - 1`` pixels smaller, GDP's deblurring blur)
PADDING_MODES = {
    "reflect": "reflect",
    "circular": "circular",
    "zeros": "constant",
    "zeros_signed": "constant",
    "valid": None,
}
#: the paddings that keep the image size (the blur operators of this module)
SAME_SIZE_PADDINGS = ("reflect", "circular", "zeros", "zeros_signed")


def check_padding(padding: str, allowed: Sequence[str] = SAME_SIZE_PADDINGS) -> None:
    """ValueError naming the choices unless ``padding`` is one of ``allowed``."""
    if padding not in allowed:
        raise ValueError(f"padding must be one of {list(allowed)}, got {padding!r}")


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Isotropic Gaussian ``[size, size]`` sampled at the taps around the centre ``(size - 1) / 2``,
    normalised to sum 1: the outer product of the normalised 1-D profile ``exp(-r^2 / (2
    sigma^2))`` (OpenCV's ``getGaussianKernel`` squared, as SSIM's window and BasicSR's USM).
    Computed in float64, returned in ``dtype`` (numpy callers: ``dtype=torch.float64`` and
    ``.numpy()``)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


def convolve_per_image(
    x: torch.Tensor, kernel: torch.Tensor, padding: str = "reflect", correlate: bool = False
) -> torch.Tensor:
    """Blur every image with its own kernel, output the same size as the input.

    ``y[i, j] = sum_{u, v} k[u, v] x[i - u + r, j - v + r]`` (convolution, ``r = k // 2``), or
    ``sum_{u, v} k[u, v] x[i + u - r, j + v - r]`` when ``correlate`` (``F.conv2d``).

    Args:
        x: ``[B, C, H, W]`` (in [0, 1] for ``zeros_signed``).
        kernel: ``[B or 1, c, k, k]`` with ``c`` 1 (shared by channels) or ``C`` (depthwise);
            odd ``k``.
        padding: ``reflect`` (mirror without repeating the edge, torch's ``reflect``),
            ``circular``, ``zeros`` (black), ``zeros_signed`` (zeros on the [-1, 1] scale:
            the result is ``(k * pad_0(2x - 1) + 1) / 2``, the released BIRD code's
            ``conv2d(padding="same")`` on [-1, 1] images seen on [0, 1]) or ``valid`` (no
            padding: ``[B, C, H - k + 1, W - k + 1]``).
        correlate: cross-correlate (the kernel is not flipped), as ``F.conv2d``.
    Returns:
        ``[B, C, H, W]`` (smaller for ``valid``), differentiable w.r.t. ``x`` and ``kernel``.
    """
    check_padding(padding, tuple(PADDING_MODES))
    b, c = x.shape[:2]
    k = kernel.shape[-1]
    if k % 2 != 1 or kernel.shape[-2] != k:
        raise ValueError(f"kernel must be square with odd size, got {tuple(kernel.shape)}")
    kernel = kernel.to(x.dtype).expand(b, c, k, k)  # shared-channel or broadcast batch
    signed = padding == "zeros_signed"
    if signed:
        x = 2 * x - 1
    if PADDING_MODES[padding] is not None:
        p = k // 2
        x = F.pad(x, (p, p, p, p), mode=PADDING_MODES[padding])
    # one group per (image, channel); conv2d correlates, so flip for a convolution
    weight = (kernel if correlate else kernel.flip(-1, -2)).reshape(b * c, 1, k, k)
    out = F.conv2d(x.reshape(1, b * c, *x.shape[-2:]), weight, groups=b * c)
    out = out.reshape(b, c, *out.shape[-2:])
    return (out + 1) / 2 if signed else out


def as_psf(kernel: torch.Tensor, correlate: bool) -> torch.Tensor:
    """The convolution PSF of a kernel applied with ``correlate`` (flipped when correlating)."""
    return kernel.flip(-1, -2) if correlate else kernel


def _as_kernel(kernel: torch.Tensor | Sequence) -> torch.Tensor:
    """A kernel from a list/array/tensor as ``[B or 1, c, k, k]`` float32."""
    t = torch.as_tensor(kernel, dtype=torch.float32)
    while t.ndim < 4:
        t = t.unsqueeze(0)
    return t


class FixedKernelBlur(Operator):
    """Blur with a known kernel (non-blind deblurring, or synthetic degradation).

    Args:
        kernel: ``[k, k]``, ``[c, k, k]`` or ``[B, c, k, k]`` (nested list or tensor), used as
            given (not renormalised); None builds a Gaussian from ``kernel_size`` and ``sigma``.
        kernel_size: odd size of the Gaussian when ``kernel`` is None.
        sigma: standard deviation (pixels) of the Gaussian when ``kernel`` is None.
        padding: ``reflect`` | ``circular`` | ``zeros`` | ``zeros_signed`` (module docstring).
        correlate: apply ``kernel`` by cross-correlation (``F.conv2d``, as the released BIRD code
            blurs its test image with ``data/kernel.npy``) instead of convolution.
    """

    def __init__(
        self,
        kernel: torch.Tensor | Sequence | None = None,
        kernel_size: int = 21,
        sigma: float = 2.0,
        padding: str = "reflect",
        correlate: bool = False,
    ):
        super().__init__()
        check_padding(padding)
        k = gaussian_kernel(kernel_size, sigma) if kernel is None else kernel
        self.register_buffer("kernel", _as_kernel(k))
        self.padding, self.correlate = padding, correlate
        self.batch_size = 1

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        self.batch_size = batch_size_of(shape, generators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> blurred ``[B, C, H, W]``."""
        return convolve_per_image(x, self.kernel, self.padding, self.correlate)

    def estimate(self) -> dict[str, torch.Tensor]:
        b = max(self.batch_size, self.kernel.shape[0])
        psf = as_psf(self.kernel, self.correlate)
        return {"kernel": psf.expand(b, *self.kernel.shape[1:]).detach().clone()}


class MotionBlur(FixedKernelBlur):
    """Blur with a known motion kernel that each image draws from its own random camera
    trajectory (:func:`bir.operators.synthetic.motion_kernel`, a random walk whose heading
    drifts, after Boracchi & Foi 2012): the truth of synthetic motion-blur observations.

    :meth:`init_batch` draws image ``b``'s kernel from ``generators[b]`` (without generators
    from seed ``b``); before it, the operator holds the kernel of seed 0.

    Args:
        kernel_size: odd kernel size.
        intensity: in [0, 1], how much the heading turns (0: a straight line).
        steps: unit steps of the trajectory.
        padding: ``reflect`` | ``circular`` | ``zeros`` | ``zeros_signed`` (module docstring).
        correlate: apply the kernel by cross-correlation (module docstring).
    """

    def __init__(
        self,
        kernel_size: int = 41,
        intensity: float = 0.5,
        steps: int = 64,
        padding: str = "reflect",
        correlate: bool = False,
    ):
        k = int(kernel_size)
        super().__init__(torch.zeros(1, 1, k, k), padding=padding, correlate=correlate)
        self.kernel_size, self.intensity, self.steps = k, float(intensity), int(steps)
        self.kernel = self._draw([torch.Generator().manual_seed(0)])

    def _draw(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        k, i, n = self.kernel_size, self.intensity, self.steps
        return torch.stack([motion_kernel(k, i, g, n) for g in generators])[:, None]

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        """Draw each image's kernel (``[B, 1, k, k]``, sums to 1) from its generator."""
        super().init_batch(shape, generators)
        if generators is None:
            generators = [torch.Generator().manual_seed(b) for b in range(self.batch_size)]
        self.kernel = self._draw(generators).to(self.kernel.device)


class LearnableKernelBlur(Operator):
    """Blur with a free per-image kernel: ``kernel = softmax(logits)`` over its k*k taps, so it
    stays non-negative and sums to 1 whatever the optimiser does.

    Args:
        kernel_size: odd kernel size k.
        channels: 1 (one kernel for all colour channels) or C (depthwise, one per channel).
        init: ``delta`` | ``uniform`` | ``gaussian`` starting kernel.
        init_sigma: sigma (pixels) of the ``gaussian`` start.
        init_floor: weight added to every tap before taking the log for the logits; a pure delta
            would saturate the softmax (its gradient k(1-k) ~ 0) and the kernel could not move.
        padding: ``reflect`` | ``circular`` | ``zeros`` | ``zeros_signed`` (module docstring).
        correlate: apply the kernel by cross-correlation (module docstring).
    """

    def __init__(
        self,
        kernel_size: int = 31,
        channels: int = 1,
        init: str = "delta",
        init_sigma: float = 2.0,
        init_floor: float = 1e-3,
        padding: str = "reflect",
        correlate: bool = False,
    ):
        super().__init__()
        if init not in ("delta", "uniform", "gaussian"):
            raise ValueError(f"init must be delta, uniform or gaussian, got {init!r}")
        check_padding(padding)
        self.kernel_size, self.channels, self.init = kernel_size, channels, init
        self.init_sigma, self.init_floor, self.padding = init_sigma, init_floor, padding
        self.correlate = correlate
        self.logits = nn.Parameter(torch.zeros(1, channels, kernel_size * kernel_size))

    def initial_kernel(self) -> torch.Tensor:
        """The starting kernel ``[k, k]`` (sums to 1)."""
        k = self.kernel_size
        if self.init == "delta":
            start = torch.zeros(k, k)
            start[k // 2, k // 2] = 1.0
        elif self.init == "uniform":
            start = torch.full((k, k), 1.0 / (k * k))
        else:
            start = gaussian_kernel(k, self.init_sigma)
        return start

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        batch_size = batch_size_of(shape, generators)
        logits = torch.log(self.initial_kernel() + self.init_floor).flatten()
        logits = logits.to(self.logits.device).expand(batch_size, self.channels, -1)
        self.logits = nn.Parameter(logits.clone())

    def kernel(self) -> torch.Tensor:
        """``[B, c, k, k]``, non-negative, each sums to 1."""
        k = self.kernel_size
        return self.logits.softmax(-1).reshape(*self.logits.shape[:2], k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return convolve_per_image(x, self.kernel(), self.padding, self.correlate)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.logits], "lr": lr, "name": "kernel"}]

    def estimate(self) -> dict[str, torch.Tensor]:
        return {"kernel": as_psf(self.kernel(), self.correlate).detach().clone()}


class KernelMLPBlur(Operator):
    """BIRD's kernel parameterisation: a per-image MLP maps a fixed random code to the kernel,
    ``kernel = softmax(W2 relu6(W1 z + b1) + b2)`` reshaped to k x k (reference ``fcn``:
    Linear(200, 1000) -> ReLU6 -> Linear(1000, k*k) -> Softmax).

    Every image has its own code z and its own MLP weights, stored stacked (``W1 [B, hidden,
    latent]``...) and evaluated with batched matrix products, so estimates never interact.

    Args:
        kernel_size: odd kernel size k (BIRD: 41).
        latent_dim: size of the code z (BIRD: 200).
        hidden: hidden width (BIRD: 1000).
        channels: 1 (one kernel for all channels, as BIRD) or C (depthwise).
        latent_init: ``uniform`` (the reference ``get_noise``: U[0, 1) x ``latent_scale``) or
            ``normal`` (N(0, 1) x ``latent_scale``).
        latent_scale: multiplier of the code (reference: 0.1).
        padding: ``zeros_signed`` (the released code's ``conv2d(padding="same")`` on [-1, 1]
            images: mid-grey on [0, 1]), ``zeros`` (black), ``reflect`` or ``circular``.
        correlate: apply the kernel by cross-correlation, as the released code's ``conv2d``
            (the MLP's output taps then sit where the released code puts them);
            :meth:`estimate` reports the convolution PSF either way.
    """

    def __init__(
        self,
        kernel_size: int = 41,
        latent_dim: int = 200,
        hidden: int = 1000,
        channels: int = 1,
        latent_init: str = "uniform",
        latent_scale: float = 0.1,
        padding: str = "zeros_signed",
        correlate: bool = True,
    ):
        super().__init__()
        if latent_init not in ("uniform", "normal"):
            raise ValueError(f"latent_init must be uniform or normal, got {latent_init!r}")
        check_padding(padding)
        self.kernel_size, self.latent_dim, self.hidden = kernel_size, latent_dim, hidden
        self.channels, self.latent_init = channels, latent_init
        self.latent_scale, self.padding, self.correlate = latent_scale, padding, correlate
        self.init_batch((1, channels, 1, 1), [torch.Generator().manual_seed(0)])

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        """Draw each image's code and MLP weights from its own generator (CPU generators or
        generators on the parameters' device)."""
        batch_size = batch_size_of(shape, generators)
        if generators is None:
            generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
        out = self.channels * self.kernel_size**2
        shapes = {
            "z": (self.latent_dim,),
            "w1": (self.hidden, self.latent_dim),
            "b1": (self.hidden,),
            "w2": (out, self.hidden),
            "b2": (out,),
        }
        draws: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
        for g in generators:
            for name, shape in shapes.items():
                u = torch.rand(shape, generator=g, device=g.device)
                if name == "z":
                    z = torch.randn(shape, generator=g, device=g.device)
                    v = (u if self.latent_init == "uniform" else z) * self.latent_scale
                else:
                    # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    fan_in = self.latent_dim if name in ("w1", "b1") else self.hidden
                    v = (2 * u - 1) / math.sqrt(fan_in)
                draws[name].append(v)
        device = getattr(self, "w1", torch.empty(0)).device
        self.register_buffer("z", torch.stack(draws["z"]).to(device))
        self.w1 = nn.Parameter(torch.stack(draws["w1"]).to(device))
        self.b1 = nn.Parameter(torch.stack(draws["b1"]).to(device))
        self.w2 = nn.Parameter(torch.stack(draws["w2"]).to(device))
        self.b2 = nn.Parameter(torch.stack(draws["b2"]).to(device))

    def kernel(self) -> torch.Tensor:
        """``[B, c, k, k]``, non-negative, each sums to 1."""
        hidden = F.relu6(torch.einsum("bhl,bl->bh", self.w1, self.z) + self.b1)
        logits = torch.einsum("boh,bh->bo", self.w2, hidden) + self.b2
        k = self.kernel_size
        return logits.reshape(-1, self.channels, k * k).softmax(-1).reshape(-1, self.channels, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return convolve_per_image(x, self.kernel(), self.padding, self.correlate)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.w1, self.b1, self.w2, self.b2], "lr": lr, "name": "kernel_mlp"}]

    def estimate(self) -> dict[str, torch.Tensor]:
        return {"kernel": as_psf(self.kernel(), self.correlate).detach().clone()}
