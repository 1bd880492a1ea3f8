"""OpenCLIP text encoder as Stable Diffusion 2.x uses it (ldm ``FrozenOpenCLIPEmbedder``).

The text tower of OpenCLIP ViT-H/14 (width 1024, 24 layers, 16 heads, context 77), run up to its
*penultimate* residual block, then the final LayerNorm; the token sequence ``[B, 77, 1024]`` is the
cross-attention context of the SD 2.1 UNet. open-clip-torch builds the architecture (no pretrained
download) and ships the BPE tokenizer; weights come from an SD checkpoint's
``cond_stage_model.model.*`` keys (or a bare text-tower state dict).
"""

from __future__ import annotations

import torch
from open_clip import get_tokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from bir.nets.checkpoints import load_checkpoint, load_state_dict_checked, net_weights

Tensor = torch.Tensor

#: keys of the full CLIP model that the text-only tower does not have (dropped when loading)
_NOT_TEXT = ("logit_scale", "visual.", "attn_mask")


class OpenCLIPTextEncoder(nn.Module):
    """Frozen OpenCLIP text tower returning per-token embeddings.

    Args:
        width: transformer width = context dimension (ViT-H/14: 1024).
        layers: number of residual blocks (ViT-H/14: 24).
        heads: attention heads (ViT-H/14: 16).
        output_dim: pooled projection size (unused for SD; kept so the weights load strictly).
        context_length: tokens per prompt (77).
        vocab_size: BPE vocabulary size (49408; the shipped tokenizer needs the full vocabulary).
        layer: ``penultimate`` (SD 2.x) or ``last``.
        tokenizer: open_clip tokenizer name (``ViT-H-14``).
        ckpt_path: weights file (SD checkpoint or bare text-tower dict); None keeps random
            weights (tests).
        checkpoint_what / checkpoint_url / checkpoint_key: for the missing-file error.

    Call :meth:`encode` with a list of prompts; embeddings are cached per prompt string.
    """

    #: where the text tower sits in an SD checkpoint (before bir.nets.checkpoints'
    #: WRAPPER_PREFIXES; the prefixes are of ``self.model``, the tower itself)
    checkpoint_prefixes = ("cond_stage_model.model.", "model.cond_stage_model.model.")

    def __init__(
        self,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        output_dim: int = 1024,
        context_length: int = 77,
        vocab_size: int = 49408,
        layer: str = "penultimate",
        tokenizer: str = "ViT-H-14",
        ckpt_path: str | None = None,
        checkpoint_what: str = "OpenCLIP ViT-H/14 text encoder",
        checkpoint_url: str | None = "https://huggingface.co/stabilityai/stable-diffusion-2-1-base",
        checkpoint_key: str = "net.clip.ckpt_path",
    ):
        super().__init__()
        if layer not in ("penultimate", "last"):
            raise ValueError(f"layer must be penultimate or last, got {layer!r}")
        self.model = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=output_dim,
        )
        self.layer = layer
        self.context_length = context_length
        self.context_dim = width
        self.tokenizer = get_tokenizer(tokenizer, context_length=context_length)
        self._cache: dict[str, Tensor] = {}
        if ckpt_path is not None:
            state = load_checkpoint(
                ckpt_path, what=checkpoint_what, url=checkpoint_url, config_key=checkpoint_key
            )
            self.load_weights(state, name=f"{checkpoint_what} ({ckpt_path})")
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, state: dict[str, Tensor], name: str = "text encoder") -> None:
        """Load from an SD / Lightning checkpoint or a bare text-tower state dict (strict)."""
        state = net_weights(self.model, state, first=self.checkpoint_prefixes)
        state = {k: v for k, v in state.items() if not k.startswith(_NOT_TEXT)}
        load_state_dict_checked(self.model, state, name=name)
        self._cache.clear()

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        # frozen: always in eval mode
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """LongTensor ``[B, context_length]`` of BPE ids (start, tokens, end, zero padding)."""
        return self.tokenizer(list(prompts))

    @torch.no_grad()
    def _encode_tokens(self, tokens: Tensor) -> Tensor:
        """``[B, L]`` ids -> ``[B, L, width]`` (penultimate block, then the final LayerNorm)."""
        m = self.model
        x, attn_mask = m._embeds(tokens)
        blocks = m.transformer.resblocks
        n = len(blocks) - 1 if self.layer == "penultimate" else len(blocks)
        for block in blocks[:n]:  # open_clip's transformer is batch-first
            x = block(x, attn_mask=attn_mask)
        return m.ln_final(x)

    def encode(self, prompts: list[str]) -> Tensor:
        """Per-token embeddings ``[B, context_length, width]`` for a list of prompts (cached)."""
        device = self.model.positional_embedding.device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            tokens = self.tokenize(missing).to(device)
            for p, emb in zip(missing, self._encode_tokens(tokens)):
                self._cache[p] = emb
        return torch.stack([self._cache[p].to(device) for p in prompts])

    def forward(self, prompts: list[str]) -> Tensor:
        return self.encode(prompts)

    def _apply(self, fn, recurse: bool = True):
        # moving / casting the module invalidates cached embeddings
        self._cache.clear()
        return super()._apply(fn, recurse)
