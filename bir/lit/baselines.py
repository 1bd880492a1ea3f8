"""Classical restoration baselines as predict modules (same writer, metrics and CLI as the
diffusion methods), so every table in bir has a reference row that needs no learned prior.

- ``identity``: the degraded input itself (upsampled to the output size for SR).
- ``bicubic``: bicubic upsampling by ``scale``.
- ``wiener``: Wiener-Hunt deconvolution with a given (the *true*) kernel (skimage.restoration.wiener).
- ``richardson_lucy``: Richardson-Lucy deconvolution with a given (the true) kernel.
- ``blind_richardson_lucy``: blind deconvolution that estimates the kernel itself: Richardson-Lucy
  steps alternating between the image and the kernel (Fish, Brinicombe, Pike & Walker, "Blind
  deconvolution by means of the Richardson-Lucy algorithm", JOSA A 1995), from a Gaussian of
  ``kernel_sigma`` on a ``kernel_size`` support.
- ``tv``: total-variation denoising (Chambolle), weight ``tv_weight`` or, when None, the noise
  level it estimates itself (:func:`estimate_noise_sigma`).
- ``biharmonic``: inpainting of the pixels a given mask marks missing (skimage's biharmonic).
- ``gain``: low-light gain estimated from the image: the 99th percentile of y is mapped to 1.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from bir.operators.blur import convolve_per_image, gaussian_kernel

KINDS = (
    "identity",
    "bicubic",
    "wiener",
    "richardson_lucy",
    "blind_richardson_lucy",
    "tv",
    "biharmonic",
    "gain",
)


def estimate_noise_sigma(img: torch.Tensor) -> float:
    """White Gaussian noise std of ``[C, H, W]`` from the finest diagonal Haar wavelet band:
    ``median(|HH|) / 0.6745`` (Donoho & Johnstone 1994), averaged over channels. With the
    orthonormal Haar band ``HH = (a - b - c + d) / 2`` of each 2x2 block, noise keeps its std."""
    h, w = img.shape[-2] // 2 * 2, img.shape[-1] // 2 * 2
    if h == 0 or w == 0:
        raise ValueError(f"noise estimation needs at least 2x2 pixels, got {tuple(img.shape)}")
    x = img[..., :h, :w].double()
    hh = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return float((hh.abs().flatten(1).median(dim=1).values / 0.6744897501960817).mean())


def blind_richardson_lucy(
    y: torch.Tensor, kernel: torch.Tensor, num_iter: int = 30, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blind Richardson-Lucy (Fish et al. 1995): alternate one multiplicative RL step on the image
    and one on the kernel. With the blur ``A(x, k)`` (bilinear) and ``r = y / A(x, k)``:

        x <- x . A_x^T r / A_x^T 1          (A_x^T: adjoint in x for the current k)
        k <- k . A_k^T r / A_k^T 1,   k <- k / sum(k)   (A_k^T: adjoint in k for the current x)

    Both adjoints are exact (vector-Jacobian products of the reflect-padded blur), so the border
    is treated like the interior.

    Args:
        y: one blurred image ``[C, H, W]`` in [0, 1] (C channels share the kernel).
        kernel: the initial kernel ``[k, k]`` (odd k, non-negative); its support is the support
            of the estimate.
        num_iter: alternations.
    Returns:
        the restored image ``[C, H, W]`` (float32, clamped to [0, 1]) and the kernel estimate.
    """
    size = kernel.shape[0]
    if size % 2 == 0 or kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"blind Richardson-Lucy needs a square kernel of odd size, got {tuple(kernel.shape)}"
        )
    y = y.detach().double().clamp_min(0)[None]
    k = (kernel.double() / kernel.sum()).clamp_min(0)
    x = y.clone().clamp_min(eps)

    def blur(img: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
        return convolve_per_image(img, kern[None, None], "reflect", correlate=True)

    def rl_factor(wrt: int) -> torch.Tensor:
        """A^T r / A^T 1 in the image (wrt 0) or the kernel (wrt 1)."""
        args = [x.clone().requires_grad_(wrt == 0), k.clone().requires_grad_(wrt == 1)]
        with torch.enable_grad():
            out = blur(*args)
            ratio = y / out.detach().clamp_min(eps)
            num = torch.autograd.grad(out, args[wrt], ratio, retain_graph=True)[0]
            den = torch.autograd.grad(out, args[wrt], torch.ones_like(ratio))[0]
        return num / den.clamp_min(eps)

    for _ in range(num_iter):
        x = x * rl_factor(0)
        k = k * rl_factor(1)
        k = k / k.sum().clamp_min(eps)
    return x[0].float().clamp(0, 1), k.float()


class ClassicalBaseline(pl.LightningModule):
    """A non-learned restoration method.

    Args:
        kind: identity | bicubic | wiener | richardson_lucy | blind_richardson_lucy | tv |
            biharmonic | gain.
        scale: upsampling factor (identity/bicubic for SR).
        kernel: the true blur PSF for wiener/richardson_lucy, as a 2-D list/array, or None to
            build a Gaussian of ``kernel_size`` and ``kernel_sigma`` (blind_richardson_lucy:
            the initial kernel).
        balance: Wiener regularisation weight.
        num_iter: Richardson-Lucy iterations (blind: alternations of one image and one kernel
            step).
        tv_weight: TV denoising weight (larger = smoother); None = the estimated noise sigma.
    """

    def __init__(
        self,
        kind: str = "identity",
        scale: int = 1,
        kernel=None,
        kernel_size: int = 21,
        kernel_sigma: float = 2.0,
        balance: float = 0.01,
        num_iter: int = 30,
        tv_weight: float | None = 0.08,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.scale = kind, scale
        self.psf = (
            np.asarray(kernel, dtype=np.float64)
            if kernel is not None
            else gaussian_kernel(kernel_size, kernel_sigma, dtype=torch.float64).numpy()
        )
        self.psf = self.psf / self.psf.sum()
        self.balance, self.num_iter, self.tv_weight = balance, num_iter, tv_weight

    def restore(self, lq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, h, w] in [0, 1] -> [B, 3, h*scale, w*scale] in [0, 1]; ``mask`` ([B or 1, 1, h,
        w], 1 = observed) is the known mask of ``biharmonic``."""
        if self.kind == "blind_richardson_lucy":
            init = torch.from_numpy(self.psf)
            return torch.stack([blind_richardson_lucy(img, init, self.num_iter)[0] for img in lq])
        if self.kind == "gain":
            q = torch.quantile(lq.flatten(1), 0.99, dim=1).clamp_min(1e-3)
            return (lq / q[:, None, None, None]).clamp(0, 1)
        if self.kind == "biharmonic" and mask is None:
            raise ValueError("the biharmonic baseline needs the mask of the missing pixels")
        if self.kind in ("identity", "bicubic"):
            if self.scale == 1:
                return lq.clone()
            mode = "nearest" if self.kind == "identity" else "bicubic"
            up = F.interpolate(lq, scale_factor=self.scale, mode=mode)
            return up.clamp(0, 1)
        from skimage import restoration

        out = []
        for i, img in enumerate(lq.detach().cpu().double().numpy()):
            hwc = img.transpose(1, 2, 0)
            if self.kind == "tv":
                weight = self.tv_weight
                if weight is None:
                    weight = estimate_noise_sigma(torch.from_numpy(img))
                res = restoration.denoise_tv_chambolle(hwc, weight=weight, channel_axis=-1)
            elif self.kind == "biharmonic":
                m = mask[i if mask.shape[0] > 1 else 0, 0].detach().cpu().numpy() < 0.5
                res = restoration.inpaint_biharmonic(hwc, m, channel_axis=-1)
            else:
                chans = []
                for c in range(hwc.shape[2]):
                    # pad by reflection so the FFT-based deconvolution sees no wrap-around edges
                    p = self.psf.shape[0]
                    ch = np.pad(hwc[:, :, c], p, mode="reflect")
                    if self.kind == "wiener":
                        r = restoration.wiener(ch, self.psf, self.balance, clip=False)
                    else:
                        r = restoration.richardson_lucy(
                            ch, self.psf, num_iter=self.num_iter, clip=False
                        )
                    chans.append(r[p:-p, p:-p])
                res = np.stack(chans, -1)
            out.append(torch.from_numpy(np.ascontiguousarray(res.transpose(2, 0, 1))))
        return torch.stack(out).float().clamp(0, 1).to(lq.device)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"name": batch["name"], "restored": self.restore(batch["lq"])}
