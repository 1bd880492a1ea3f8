"""Print what a checkpoint holds and whether it loads into a bir network config.

Usage:
    python scripts/inspect_checkpoint.py PATH [--net bir/conf/net/unet_sd21.yaml] [--prefix auto]
        [--depth 2] [--show 20] [--trust-pickle]

Prints the detected format (ldm full / Lightning / bare / ...), key counts per leading prefix,
the first keys with shapes and, with ``--net``, a strict comparison against the network built on
the meta device (no memory): missing, unexpected and shape-mismatched keys.

The file is read without running code from it (``torch.load(weights_only=True)``); one that
holds other pickled objects is refused with the name of the object, unless ``--trust-pickle``
says that this file may be unpickled in full.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bir.nets.checkpoints import (
    common_prefixes,
    compare_state_dict,
    load_checkpoint,
    net_weights,
    strip_prefix,
    trust_pickle_files,
)


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """A human label for the layout of a flat state dict."""
    keys = list(state)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        ema = (
            " with EMA copy (model_ema.*, dots removed)"
            if any(k.startswith("model_ema.") for k in keys)
            else ""
        )
        return (
            "ldm full checkpoint (model.diffusion_model / first_stage_model / cond_stage_model)"
            + ema
        )
    if any(k.startswith("temb.dense.") or k.startswith("module.temb.dense.") for k in keys):
        return "DDPM/DDIM pixel UNet (temb.dense, down.*, mid.*, up.*)"
    if any(k.startswith("input_blocks.") for k in keys) and any(".qkv." in k for k in keys):
        return "guided-diffusion ADM UNet (bare)"
    if any(k.startswith("input_blocks.") for k in keys):
        return "ldm UNet / ControlNet (bare)"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "ldm AutoencoderKL (bare)"
    if any(k.startswith("layers.") and "residual_group" in k for k in keys):
        return "SwinIR (bare)"
    return "unknown layout"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="checkpoint file (.ckpt/.pt/.pth/.bin/.safetensors)")
    parser.add_argument(
        "--net", help="a bir/conf/net/*.yaml network config to test loading against"
    )
    parser.add_argument(
        "--prefix", default="auto", help="key prefix of the network ('auto': best match)"
    )
    parser.add_argument("--depth", type=int, default=2, help="name components per prefix group")
    parser.add_argument("--show", type=int, default=20, help="how many keys to list")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle PATH in full (it can run code: only for files you trust)",
    )
    args = parser.parse_args(argv)

    if args.trust_pickle:
        trust_pickle_files([args.path])
    try:
        state = load_checkpoint(args.path, what="checkpoint")
    except (OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    print(f"file: {args.path}")
    print(f"format: {detect_format(state)}")
    print(f"tensors: {len(state)}  elements: {total:,}")
    print("prefixes:")
    for prefix, count in sorted(common_prefixes(state, args.depth).items()):
        print(f"  {prefix:50s} {count}")
    print(f"first {args.show} keys:")
    for k in list(state)[: args.show]:
        v = state[k]
        print(f"  {k:70s} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}")

    if not args.net:
        return 0
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with torch.device("meta"):
        module = instantiate(OmegaConf.load(args.net))
    if args.prefix == "auto":  # where bir's loaders look: the class's prefixes, then wrappers
        sub = net_weights(module, state)
    else:
        sub = strip_prefix(state, args.prefix)
    missing, unexpected, mismatched = compare_state_dict(module, sub)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"net {Path(args.net).name}: {type(module).__name__}, {n_params:,} parameters")
    for title, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatches", mismatched),
    ):
        print(f"  {title}: {len(keys)}")
        for k in keys[: args.show]:
            print(f"    {k}")
    ok = not (missing or unexpected or mismatched)
    print("loads with strict=True: " + ("yes" if ok else "no"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
