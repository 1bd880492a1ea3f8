"""BIR-D's universal degradation model ``y = K * x + M``: a learnable depthwise kernel plus an
additive mask (Tu, Yang & Fei 2024, "Taming Generative Diffusion Prior for Universal Blind Image
Restoration", the optimisable convolution kernel).

The kernel is a free ``k x k`` filter per colour channel (the released code uses 9x9 for blur
and 3x3 for low light; the paper text says 7x7) and is *not* constrained to be non-negative or to
sum to 1, so it can also model a brightness change; the mask ``M`` is one map per image, shared
by the colour channels as the released ``light_mask`` ([H, W]). Both are updated by plain
gradient descent inside the sampler (released code: ``weight - lr * grad``).

Released-code conventions, which are this operator's defaults: ``nn.Conv2d`` (cross-correlation,
``correlate=True``) with zero padding ``k // 2`` on the [0, 1] image, initial kernel
``gkern(9, 2)`` (``init="gkern"``), mask ``rand / 10000``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bir.operators.base import Operator, Shape, additive_mask, batch_size_of, draw_uniform
from bir.operators.blur import check_padding, convolve_per_image, gaussian_kernel

#: the paddings of :func:`bir.operators.blur.convolve_per_image` this operator takes (not
#: ``zeros_signed``: the kernel need not sum to 1, so a grey frame is not a zero frame here)
PADDINGS = ("zeros", "reflect", "circular", "valid")
INITS = ("gkern", "gaussian", "delta", "rand")


def gkern(size: int, nsig: float) -> torch.Tensor:
    """The GDP / BIR-D scripts' ``gkern(kernlen, nsig)``: ``[size, size]``, sums to 1.

    The 1-D profile is the standard normal's probability mass in ``size`` equal bins spanning
    ``[-nsig - h/2, nsig + h/2]`` with ``h = (2 nsig + 1) / size``; the 2-D kernel is the square
    root of the outer product of the profile with itself, normalised. (``gkern(9, 2)`` peaks at
    0.0252, a sampled Gaussian of sigma 2.5 at 0.0294.) Computed in float64.
    """
    h = (2 * nsig + 1.0) / size
    edges = torch.linspace(-nsig - h / 2, nsig + h / 2, size + 1, dtype=torch.float64)
    profile = torch.diff(torch.special.ndtr(edges))
    raw = torch.sqrt(torch.outer(profile, profile))
    return (raw / raw.sum()).float()


class KernelMaskOperator(Operator):
    """``y = K * x + M`` with a per-image depthwise kernel ``K`` and additive mask ``M``.

    Args:
        kernel_size: odd kernel size k (BIR-D code: 9 for blur, 3 for low light).
        channels: image channels C; the kernel is ``[B, C, k, k]`` (depthwise).
        init: starting kernel: ``gkern`` (the released scripts' ``gkern(k, init_sigma)``),
            ``gaussian`` (sampled Gaussian of sigma ``init_sigma`` pixels), ``delta``, or ``rand``
            (uniform in ``[0, init_scale)`` per tap from each image's generator: the low-light
            script's ``rand / 100``).
        init_sigma: ``nsig`` of ``gkern`` (2 in the scripts) or the Gaussian's sigma.
        init_scale: range of the ``rand`` start.
        init_kernel: an explicit starting kernel ``[k, k]`` or ``[C, k, k]`` (nested list), used
            as given; overrides ``init`` (the blind and multi-degradation scripts hard-code one).
        mask_init_scale: the mask starts uniform in ``[0, mask_init_scale)`` (code: 1e-4).
        use_mask: add ``M`` at all (the deblurring, blind and multi scripts leave it out).
        learn_kernel / learn_mask: whether :meth:`param_groups` offers them to the optimiser.
        kernel_lr / mask_lr: gradient-descent step sizes (code: 0.01 for the 9x9 kernel, 1 for
            the low-light kernel and mask); ``None`` uses the method's default.
        padding: ``zeros`` (code) | ``reflect`` | ``circular`` | ``valid`` (no padding: the
            observation is ``k - 1`` pixels smaller, as GDP's deblurring blur).
        correlate: ``True`` cross-correlates as the code's ``nn.Conv2d``; ``False`` flips the
            kernel (a true convolution). :meth:`estimate` always reports the convolution PSF.
    """

    def __init__(
        self,
        kernel_size: int = 9,
        channels: int = 3,
        init: str = "gkern",
        init_sigma: float = 2.0,
        init_scale: float = 0.01,
        init_kernel: Sequence | torch.Tensor | None = None,
        mask_init_scale: float = 1e-4,
        use_mask: bool = True,
        learn_kernel: bool = True,
        learn_mask: bool = True,
        kernel_lr: float | None = 0.01,
        mask_lr: float | None = 0.01,
        padding: str = "zeros",
        correlate: bool = True,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        check_padding(padding, PADDINGS)
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        given = None
        if init_kernel is not None:
            given = torch.as_tensor(init_kernel, dtype=torch.float32)
            if given.shape[-2:] != (kernel_size, kernel_size) or given.ndim not in (2, 3):
                raise ValueError(
                    f"init_kernel must be [{kernel_size}, {kernel_size}] or "
                    f"[C, {kernel_size}, {kernel_size}], got {tuple(given.shape)}"
                )
        self.kernel_size, self.channels, self.init = kernel_size, channels, init
        self.init_sigma, self.init_scale, self.given = init_sigma, init_scale, given
        self.mask_init_scale, self.use_mask = mask_init_scale, use_mask
        self.learn_kernel, self.learn_mask = learn_kernel, learn_mask
        self.kernel_lr, self.mask_lr = kernel_lr, mask_lr
        self.padding, self.correlate = padding, correlate
        self.kernel = nn.Parameter(torch.zeros(1, channels, kernel_size, kernel_size))
        self.mask: nn.Parameter | None = None

    def initial_kernel(self) -> torch.Tensor:
        """The deterministic starting kernel ``[C, k, k]`` (``init`` other than ``rand``)."""
        k = self.kernel_size
        if self.given is not None:
            return self.given.expand(self.channels, k, k).clone()
        if self.init == "gkern":
            start = gkern(k, self.init_sigma)
        elif self.init == "gaussian":
            start = gaussian_kernel(k, self.init_sigma)
        elif self.init == "delta":
            start = torch.zeros(k, k)
            start[k // 2, k // 2] = 1.0
        else:
            raise ValueError("init='rand' has no deterministic start; see init_batch")
        return start.expand(self.channels, k, k).clone()

    def init_batch(self, shape: Shape, generators: Sequence[torch.Generator] | None = None) -> None:
        """One kernel per image and, with ``use_mask``, one mask at the observation's size."""
        b = batch_size_of(shape, generators)
        device = generators[0].device if generators else self._device()
        k = self.kernel_size
        if self.init == "rand" and self.given is None and generators is not None:
            start = draw_uniform((self.channels, k, k), generators, self.init_scale, device)
        elif self.init == "rand" and self.given is None:
            start = torch.full((b, self.channels, k, k), self.init_scale / 2, device=device)
        else:
            start = self.initial_kernel().to(device).expand(b, -1, -1, -1)
        dtype = self.kernel.dtype  # the module's dtype (after .double(), for instance)
        self.kernel = nn.Parameter(start.to(dtype).clone())
        self.mask = None
        if self.use_mask:
            hw = self.output_size(tuple(shape[-2:]))
            mask = additive_mask(b, hw, generators, self.mask_init_scale, device)
            self.mask = nn.Parameter(mask.detach().to(dtype))

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        shrink = self.kernel_size - 1 if self.padding == "valid" else 0
        return in_hw[0] - shrink, in_hw[1] - shrink

    def input_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        grow = self.kernel_size - 1 if self.padding == "valid" else 0
        return out_hw[0] + grow, out_hw[1] + grow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> ``K * x (+ M)`` (not clamped)."""
        y = convolve_per_image(x, self.kernel, self.padding, self.correlate)
        if self.use_mask:
            y = y + self._mask_like(y).to(x.dtype)
        return y

    def forward_window(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        y = convolve_per_image(x, self.kernel, self.padding, self.correlate)
        if self.use_mask:
            h, w = y.shape[-2:]
            y = y + self._mask_like(None)[..., top : top + h, left : left + w].to(x.dtype)
        return y

    def _mask_like(self, y: torch.Tensor | None) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("KernelMaskOperator: call init_batch(x.shape, generators) first")
        if y is not None and self.mask.shape[-2:] != y.shape[-2:]:
            raise ValueError(
                f"the mask is {tuple(self.mask.shape[-2:])} but the observation is "
                f"{tuple(y.shape[-2:])}: call init_batch with this batch's shape"
            )
        return self.mask

    def param_groups(self, lr: float) -> list[dict]:
        groups = []
        if self.learn_kernel:
            groups.append({"params": [self.kernel], "lr": self.kernel_lr or lr, "name": "kernel"})
        if self.learn_mask and self.use_mask and self.mask is not None:
            groups.append({"params": [self.mask], "lr": self.mask_lr or lr, "name": "mask"})
        return groups

    def estimate(self) -> dict[str, torch.Tensor]:
        """``kernel``: ``[B, C, k, k]`` the convolution PSF normalised to sum 1 per channel (the
        contract's format); ``kernel_gain``: ``[B, C]`` the raw kernel's sums (its brightness
        gain); ``mask_mean``: ``[B]`` (when the mask is used)."""
        k = self.kernel.detach()
        if self.correlate:
            k = k.flip(-1, -2)
        gain = k.sum(dim=(-1, -2))
        out = {"kernel": k / gain[..., None, None], "kernel_gain": gain.clone()}
        if self.use_mask and self.mask is not None:
            out["mask_mean"] = self.mask.detach().mean(dim=(1, 2, 3))
        return out
