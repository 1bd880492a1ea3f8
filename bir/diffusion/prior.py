"""A frozen pixel-space diffusion prior: a network, its weights and its training schedule."""

from __future__ import annotations

import torch
from torch import nn

from bir.diffusion.schedules import make_betas, rescale_zero_terminal_snr
from bir.nets.checkpoints import load_checkpoint, load_state_dict_checked, select_prefix

# Where the weights can sit inside a checkpoint, most preferred first: bir's PixelDDPM stores the
# EMA copy under "ema_net." next to the trained "net."; DataParallel files use "module.".
PRIOR_PREFIXES = ("ema_net.", "net_ema.", "ema.", "net.", "model.", "module.", "")


class PixelPrior(nn.Module):
    """A pretrained unconditional pixel diffusion model, frozen.

    Args:
        net: the network, called as ``net(x_t, t)`` with x_t in [-1, 1] and original timesteps t;
            returns ``[B, C, H, W]`` (eps) or ``[B, 2C, H, W]`` (eps and learned-range variance
            values in [-1, 1], as ADM) when ``learned_sigma``.
        ckpt_path: local weights file; ``None`` keeps the random initialisation (tests only).
        schedule: training schedule of the prior: ``kind``, ``T``, ``beta_start``, ``beta_end``,
            optional ``zero_terminal_snr``.
        learned_sigma: whether the net outputs variance channels.
        image_size: the resolution the prior was trained at (patch size for large images).
        checkpoint_what / checkpoint_url / checkpoint_key: used in the error when the file is missing.
    """

    def __init__(
        self,
        net: nn.Module,
        ckpt_path: str | None = None,
        schedule: dict | None = None,
        learned_sigma: bool = True,
        image_size: int = 256,
        channels: int = 3,
        checkpoint_what: str = "diffusion prior",
        checkpoint_url: str | None = None,
        checkpoint_key: str = "prior.ckpt_path",
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
        if ckpt_path is not None:
            state = load_checkpoint(
                ckpt_path, what=checkpoint_what, url=checkpoint_url, config_key=checkpoint_key
            )
            state = select_prefix(state, PRIOR_PREFIXES, net.state_dict().keys())
            name = f"{checkpoint_what} ({ckpt_path})"
            load_state_dict_checked(net, state, name=name, source=ckpt_path, net_key="prior.net")
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
