"""Benchmark DiffBIR stage-2 training: optimiser steps per second and peak memory.

One step is what ``Stage2ControlLDM.training_step`` does on a batch of GT crops (stage-1 network,
VAE encodes, text encoder, ControlNet + frozen UNet forward, backward through the ControlNet,
AdamW step), with every weight random (no files needed). The degradation is left out (it is
benchmarked by ``bench_degradations.py``): the batch carries ``lq`` directly.

    python scripts/bench_stage2.py                                   # tiny nets, CPU, fp32
    python scripts/bench_stage2.py --net sd21 --size 512 --batch 8 --device cuda \
        --precision bf16 --checkpointing both                        # the paper's size on a GPU

Prints one Markdown table row per (precision, gradient checkpointing) setting. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set size on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from functools import partial

import hydra
import torch
from hydra import compose, initialize_config_dir

from bir.cli import CONFIG_DIR
from bir.lit.stage2 import Stage2ControlLDM

NETS = {"tiny": ("controlnet_tiny", "swinir_tiny"), "sd21": ("controlnet_sd21", "swinir_diffbir")}


def build(net: str, checkpointing: bool, device: torch.device) -> Stage2ControlLDM:
    """Stage2ControlLDM from the real net configs with random weights."""
    controlnet_cfg, swinir_cfg = NETS[net]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"net={controlnet_cfg}", "net.sd_ckpt_path=null"])
        stage1_cfg = compose("train", overrides=[f"net={swinir_cfg}"]).net
    torch.manual_seed(0)
    controlldm = hydra.utils.instantiate(cfg.net)
    stage1 = hydra.utils.instantiate(stage1_cfg)
    module = Stage2ControlLDM(
        controlldm,
        stage1,
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
        gradient_checkpointing=checkpointing,
    )
    return module.to(device).train()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench(args: argparse.Namespace, precision: str, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    module = build(args.net, checkpointing, device)
    optimizer = module.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    batch = {"gt": gt, "lq": gt.clone(), "index": torch.arange(args.batch)}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        with autocast:
            loss, _ = module.diffusion_loss(batch, training=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    trainable = sum(p.numel() for p in module.model.controlnet.parameters())
    return {
        "net": args.net,
        "size": args.size,
        "batch": args.batch,
        "precision": precision,
        "checkpointing": "on" if checkpointing else "off",
        "steps/s": 1.0 / seconds,
        "images/s": args.batch / seconds,
        "peak GiB": peak_memory_gib(device),
        "trainable M": trainable / 1e6,
        "loss": loss,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", choices=sorted(NETS), default="tiny")
    parser.add_argument("--size", type=int, default=32, help="crop size in pixels")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"]
    )
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    args = parser.parse_args(argv)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    rows = [bench(args, p, c) for p in args.precision for c in modes]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
