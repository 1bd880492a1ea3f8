"""A frozen pixel-space diffusion prior: a loaded network and its training schedule.

The prior receives its network with the weights in it: loading a file is
:func:`bir.lit.pixel_ddpm.load_pixel_prior`'s business (the ``prior=...`` configs' target).
"""

from __future__ import annotations

import torch
from torch import nn

from bir.diffusion.schedules import make_betas, rescale_zero_terminal_snr


class PixelPrior(nn.Module):
    """A pretrained unconditional pixel diffusion model, frozen.

    Args:
        net: the network with its weights, called as ``net(x_t, t)`` with x_t in [-1, 1] and
            original timesteps t; returns ``[B, C, H, W]`` (eps) or ``[B, 2C, H, W]`` (eps and
            learned-range variance values in [-1, 1], as ADM) when ``learned_sigma``.
        schedule: training schedule of the prior: ``kind``, ``T``, ``beta_start``, ``beta_end``,
            optional ``zero_terminal_snr``.
        learned_sigma: whether the net outputs variance channels.
        image_size: the resolution the prior was trained at (patch size for large images).
        channels: image channels.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        schedule: dict | None = None,
        learned_sigma: bool = True,
        image_size: int = 256,
        channels: int = 3,
    ):
        super().__init__()
        self.net = net
        self.learned_sigma = learned_sigma
        self.image_size = image_size
        self.channels = channels
        sched = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
        sched.update(dict(schedule or {}))
        betas = make_betas(sched["kind"], sched["T"], sched["beta_start"], sched["beta_end"])
        if sched.get("zero_terminal_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        self.register_buffer("betas", betas, persistent=False)
        self.net.eval()
        self.net.requires_grad_(False)

    def train(self, mode: bool = True) -> PixelPrior:
        # The prior stays in eval mode (dropout off) whatever the surrounding module does.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output for x_t in [-1, 1] and original timesteps t (LongTensor[B])."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.net(x_t, t)

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, variance values in [-1, 1] or None)."""
        if self.learned_sigma:
            eps, var_values = out.chunk(2, dim=1)
            return eps, var_values
        return out[:, : self.channels], None
