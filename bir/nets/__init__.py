"""Checkpoint-faithful networks: SwinIR, UNet (SD 2.1 and ADM flavours), VAE, ControlNet."""
