"""Classical restoration baselines as predict modules (same writer, metrics and CLI as the
diffusion methods), so every table in bir has a reference row that needs no learned prior.

- ``identity``: the degraded input itself (upsampled to the output size for SR).
- ``bicubic``: bicubic upsampling by ``scale``.
- ``wiener``: Wiener-Hunt deconvolution with the *true* kernel (skimage.restoration.wiener).
- ``richardson_lucy``: Richardson-Lucy deconvolution with the true kernel.
- ``tv``: total-variation denoising (Chambolle).
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """Isotropic Gaussian PSF of odd ``size``, normalised to sum 1."""
    r = np.arange(size) - size // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


class ClassicalBaseline(pl.LightningModule):
    """A non-learned restoration method.

    Args:
        kind: identity | bicubic | wiener | richardson_lucy | tv.
        scale: upsampling factor (identity/bicubic for SR).
        kernel: the true blur PSF for wiener/richardson_lucy, as a 2-D list/array, or None to
            build a Gaussian of ``kernel_size`` and ``kernel_sigma``.
        balance: Wiener regularisation weight.
        num_iter: Richardson-Lucy iterations.
        tv_weight: TV denoising weight (larger = smoother).
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
        tv_weight: float = 0.08,
    ):
        super().__init__()
        if kind not in ("identity", "bicubic", "wiener", "richardson_lucy", "tv"):
            raise ValueError(f"unknown baseline {kind!r}")
        self.kind, self.scale = kind, scale
        self.psf = (np.asarray(kernel, dtype=np.float64) if kernel is not None
                    else gaussian_kernel(kernel_size, kernel_sigma))  # fmt: skip
        self.psf = self.psf / self.psf.sum()
        self.balance, self.num_iter, self.tv_weight = balance, num_iter, tv_weight

    def restore(self, lq: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] in [0, 1] -> [B, 3, h*scale, w*scale] in [0, 1]."""
        if self.kind in ("identity", "bicubic"):
            if self.scale == 1:
                return lq.clone()
            mode = "nearest" if self.kind == "identity" else "bicubic"
            up = F.interpolate(lq, scale_factor=self.scale, mode=mode)
            return up.clamp(0, 1)
        from skimage import restoration

        out = []
        for img in lq.detach().cpu().double().numpy():
            hwc = img.transpose(1, 2, 0)
            if self.kind == "tv":
                res = restoration.denoise_tv_chambolle(hwc, weight=self.tv_weight, channel_axis=-1)
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
