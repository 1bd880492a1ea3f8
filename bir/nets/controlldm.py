"""ControlLDM: frozen Stable Diffusion (UNet, VAE, OpenCLIP text encoder) steered by LAControlNet.

``forward(z_t, t, context, cond)`` runs the ControlNet on ``cat(z_t, cond)`` and adds its 13
residuals (times ``control_scales``) to the frozen UNet: the last to the middle block, the others
to the skips before the decoder concatenates them. Only the ControlNet is trainable.

Weights (all local files, loaded strictly):

- ``sd_ckpt_path``: an ldm Stable Diffusion 2.1 checkpoint (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.model.*``).
- ``control_ckpt_path``: one of
  * DiffBIR's control-only state dict (``v2.pth``: ``time_embed``, ``input_blocks``,
    ``zero_convs``, ``middle_block``, ``middle_block_out``);
  * DiffBIR v1 full Lightning checkpoints (``general_full_v1.ckpt``, ``face_full_v1.ckpt``):
    ``control_model.*`` plus the SD parts and ``cond_encoder.*`` (v1 encodes the condition with
    its own frozen copy of the VAE encoder, which is then used instead of the SD VAE encoder);
    the stage-1 ``preprocess_model.*`` in the same file is loaded by :class:`bir.lit.diffbir.DiffBIR`;
  * a bir :class:`~bir.lit.stage2.Stage2ControlLDM` Lightning checkpoint (``ema_controlnet.*``
    when ``use_ema``, else ``model.controlnet.*``).
- Without ``control_ckpt_path`` the ControlNet is initialised from the UNet
  (:meth:`ControlNet.from_unet`), the start of stage-2 training.

Tensors: images at this module's boundary are in [0, 1]; the VAE sees [-1, 1]; latents are the
VAE latents times ``scale_factor`` (0.18215 for SD); ``f`` = the VAE factor (8 for SD).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from bir.nets.checkpoints import (
    load_checkpoint,
    load_state_dict_checked,
    net_weights,
    strip_prefix,
)
from bir.nets.clip import OpenCLIPTextEncoder
from bir.nets.controlnet import ControlNet, set_gradient_checkpointing
from bir.nets.unet import UNetModel
from bir.tiling import tiled_apply

Tensor = torch.Tensor

SD21_URL = "https://huggingface.co/stabilityai/stable-diffusion-2-1-base"
DIFFBIR_URL = "https://github.com/XPixelGroup/DiffBIR#pretrained-models"
DIFFBIR_V21_URL = "https://huggingface.co/lxq007/DiffBIR-v2"


class ControlLDM(nn.Module):
    """Frozen SD 2.x + trainable LAControlNet.

    Args:
        unet: the SD UNet (``bir.nets.unet.UNetModel``).
        vae: the SD :class:`~bir.nets.vae.AutoencoderKL` (images in [-1, 1], unscaled latents).
        clip: text encoder with ``encode(list[str]) -> [B, 77, context_dim]``.
        controlnet: the ControlNet; None builds it from ``unet`` after the SD weights are loaded.
        scale_factor: latent scaling of SD (0.18215).
        sd_ckpt_path: SD checkpoint for unet / vae / clip (None: keep their weights).
        control_ckpt_path: ControlNet weights (see the module docstring); None: init from UNet.
        use_ema: prefer the EMA ControlNet of a bir stage-2 checkpoint.
        gradient_checkpointing: checkpoint the ControlNet's blocks (and the frozen UNet's, whose
            activations are still stored for the residual gradients).
    """

    def __init__(
        self,
        unet: UNetModel,
        vae: nn.Module,
        clip: OpenCLIPTextEncoder,
        controlnet: ControlNet | None = None,
        scale_factor: float = 0.18215,
        sd_ckpt_path: str | None = None,
        control_ckpt_path: str | None = None,
        use_ema: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.unet, self.vae, self.clip = unet, vae, clip
        self.scale_factor = float(scale_factor)
        self.cond_encoder: nn.Module | None = None
        if sd_ckpt_path is not None:
            state = load_checkpoint(
                sd_ckpt_path,
                what="Stable Diffusion 2.1",
                # the zero-SNR v-prediction SD of DiffBIR v2.1 is published beside its ControlNet
                url=DIFFBIR_V21_URL if "zsnr" in Path(str(sd_ckpt_path)).name else SD21_URL,
                config_key="net.sd_ckpt_path",
            )
            self.load_sd_weights(state, name=str(sd_ckpt_path))
        self.controlnet = controlnet if controlnet is not None else ControlNet.from_unet(unet)
        if control_ckpt_path is not None:
            state = load_checkpoint(
                control_ckpt_path,
                what="DiffBIR ControlNet",
                url=DIFFBIR_URL,
                config_key="net.control_ckpt_path",
            )
            self.load_control_weights(state, use_ema=use_ema, name=str(control_ckpt_path))
        self.control_scales = [1.0] * self.controlnet.num_outputs
        for frozen in (self.unet, self.vae, self.clip):
            frozen.requires_grad_(False)
        self.set_gradient_checkpointing(gradient_checkpointing)
        self.train(False)

    # --- weights ------------------------------------------------------------------------------
    def load_sd_weights(self, state: dict[str, Tensor], name: str = "Stable Diffusion") -> None:
        """UNet, VAE and text encoder from an ldm checkpoint's flat state dict (strict each)."""
        load_state_dict_checked(self.unet, net_weights(self.unet, state), name=f"UNet ({name})")
        load_state_dict_checked(self.vae, net_weights(self.vae, state), name=f"VAE ({name})")
        self.clip.load_weights(state, name=f"CLIP ({name})")

    def load_control_weights(
        self, state: dict[str, Tensor], use_ema: bool = True, name: str = "ControlNet"
    ) -> None:
        """ControlNet weights from a control-only dict, a DiffBIR v1 full checkpoint (which also
        carries the SD parts and the v1 condition encoder) or a bir stage-2 checkpoint."""
        if any(k.startswith("control_model.") for k in state) and any(
            k.startswith("model.diffusion_model.") for k in state
        ):
            self.load_sd_weights(state, name=name)
            cond = strip_prefix(state, "cond_encoder.")
            if cond:
                self.cond_encoder = nn.Sequential(
                    OrderedDict(
                        encoder=copy.deepcopy(self.vae.encoder),
                        quant_conv=copy.deepcopy(self.vae.quant_conv),
                    )
                )
                load_state_dict_checked(
                    self.cond_encoder, cond, name=f"v1 condition encoder ({name})"
                )
                self.cond_encoder.requires_grad_(False)
        ema = ("ema_controlnet.",) if use_ema else ()  # bir stage-2 checkpoints' EMA copy
        sub = net_weights(self.controlnet, state, first=ema)
        load_state_dict_checked(self.controlnet, sub, name=f"ControlNet ({name})")

    def train(self, mode: bool = True) -> ControlLDM:
        # only the ControlNet ever leaves eval mode; the frozen parts keep dropout off
        super().train(False)
        self.controlnet.train(mode)
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_gradient_checkpointing(self.controlnet, enabled)
        set_gradient_checkpointing(self.unet, enabled)

    def set_control_strength(self, strength: float | Sequence[float]) -> None:
        """Set all 13 control scales to ``strength`` (or to a per-residual list)."""
        if isinstance(strength, int | float):
            self.control_scales = [float(strength)] * self.controlnet.num_outputs
        else:
            if len(strength) != self.controlnet.num_outputs:
                raise ValueError(f"need {self.controlnet.num_outputs} control scales")
            self.control_scales = [float(s) for s in strength]

    # --- VAE and text ----------------------------------------------------------------------
    def vae_encode(
        self,
        image: Tensor,
        generators: Sequence[torch.Generator] | None = None,
        tile: int | None = None,
        tile_overlap: int = 0,
    ) -> Tensor:
        """Scaled latent ``[B, 4, H/f, W/f]`` of ``image`` ``[B, 3, H, W]`` in [0, 1].

        The posterior mode, or a sample drawn with per-sample ``generators``. With ``tile``
        (pixels, a multiple of the VAE factor f), the moments are computed on overlapping tiles
        and blended (:meth:`AutoencoderKL.encode_tiled`).
        """
        x = image * 2 - 1
        if tile is not None and max(x.shape[-2:]) > tile:
            posterior = self.vae.encode_tiled(x, tile, tile_overlap)
        else:
            posterior = self.vae.encode(x)
        z = posterior.mode() if generators is None else posterior.sample(list(generators))
        return z * self.scale_factor

    def encode_condition(
        self, image: Tensor, tile: int | None = None, tile_overlap: int = 0
    ) -> Tensor:
        """Condition latent of the stage-1 output ``[B, 3, H, W]`` in [0, 1]: the VAE posterior
        mode x scale (v1 checkpoints: the mode of their own condition encoder)."""
        if self.cond_encoder is None:
            return self.vae_encode(image, None, tile, tile_overlap)
        x = image * 2 - 1
        if tile is not None and max(x.shape[-2:]) > tile:
            f = self.vae.downsample_factor
            moments = tiled_apply(self.cond_encoder, x, tile, tile_overlap, Fraction(1, f), "ramp")
        else:
            moments = self.cond_encoder(x)
        return moments[:, : moments.shape[1] // 2] * self.scale_factor  # posterior mean = mode

    def vae_decode(self, z: Tensor, tile: int | None = None, tile_overlap: int = 0) -> Tensor:
        """Image ``[B, 3, f*h, f*w]`` in [-1, 1] (not clamped) of scaled latents ``[B, 4, h, w]``;
        ``tile`` / ``tile_overlap`` in latent pixels (:meth:`AutoencoderKL.decode_tiled`)."""
        z = z / self.scale_factor
        if tile is not None and max(z.shape[-2:]) > tile:
            return self.vae.decode_tiled(z, tile, tile_overlap)
        return self.vae.decode(z)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Cross-attention context ``[B, 77, context_dim]`` (cached per prompt)."""
        return self.clip.encode(list(prompts))

    # --- the denoiser ---------------------------------------------------------------------
    def forward(
        self,
        z_t: Tensor,
        t: Tensor,
        context: Tensor,
        cond: Tensor,
        control_scales: Sequence[float] | None = None,
    ) -> Tensor:
        """Raw UNet output (eps or v) ``[B, 4, h, w]``.

        Args:
            z_t: noisy scaled latent ``[B, 4, h, w]``; t: LongTensor ``[B]`` original timesteps;
            context: ``[B, 77, C]`` text tokens; cond: condition latent ``[B, 4, h, w]``;
            control_scales: per-residual multipliers (default ``self.control_scales``).
        """
        scales = self.control_scales if control_scales is None else control_scales
        control = self.controlnet(z_t, cond, t, context)
        control = [c * s for c, s in zip(control, scales)]
        return self.unet(z_t, t, context=context, control=control)
