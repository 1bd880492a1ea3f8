"""Training-step throughput of DiffBIR's stage-1 SwinIR (tiny and released size).

One step = forward on a random LQ batch, MSE (sum) against a random GT, backward, AdamW step.
Every row is compared with the fp32 eager run of the same model, device, batch and crop measured
in the same invocation.

    python scripts/bench_train_step.py                      # CPU (and GPU when there is one)
    python scripts/bench_train_step.py --steps 20 --gpu-crop 512 --batches 1 4 12

On CPU: fp32 eager and channels_last (the full model at 64 px crops to keep it short). On GPU:
fp32 eager, bf16 autocast, channels_last and torch.compile on/off.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bir.nets.swinir import SwinIR

CONF = Path(__file__).resolve().parents[1] / "bir" / "conf" / "net"


@dataclass(frozen=True)
class Variant:
    """How a step runs: autocast dtype, memory format, compilation."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32"]
        parts += ["channels_last"] if self.channels_last else []
        parts += ["compile"] if self.compile else ["eager"]
        return "+".join(parts)


def net_config(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    cfg.pop("_target_")
    return cfg


def steps_per_second(
    cfg: dict,
    batch: int,
    crop: int,
    device: torch.device,
    variant: Variant,
    steps: int,
    warmup: int,
) -> float:
    """Mean training steps per second after ``warmup`` steps (compilation happens there)."""
    torch.manual_seed(0)
    net = SwinIR(**cfg).to(device).train()
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    model = torch.compile(net) if variant.compile else net
    lq = torch.rand(batch, 3, crop, crop, device=device).to(memory_format=memory_format)
    gt = torch.rand(batch, 3, crop, crop, device=device).to(memory_format=memory_format)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            out = model(lq)
        loss = F.mse_loss(out.float(), gt, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["swinir_tiny", "swinir_diffbir"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--cpu-crop", type=int, default=64, help="crop side on CPU (pixels)")
    parser.add_argument("--gpu-crop", type=int, default=256, help="crop side on GPU (pixels)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile) per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [(torch.device("cpu"), args.cpu_crop, [Variant(), Variant(channels_last=True)])]
    if torch.cuda.is_available() and not args.no_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        gpu_variants = [
            Variant(),
            Variant(compile=True),
            Variant(bf16=True),
            Variant(bf16=True, channels_last=True),
            Variant(bf16=True, compile=True),
            Variant(bf16=True, channels_last=True, compile=True),
        ]
        devices.append((torch.device("cuda"), args.gpu_crop, gpu_variants))

    header = f"{'model':<16}{'device':<8}{'batch':>6}{'crop':>6}  {'variant':<28}{'steps/s':>10}{'vs fp32':>9}"
    print(header)
    print("-" * len(header))
    for model in args.models:
        cfg = net_config(model)
        for device, crop, variants in devices:
            for batch in args.batches:
                baseline = None
                for variant in variants:
                    try:
                        rate = steps_per_second(
                            cfg, batch, crop, device, variant, args.steps, args.warmup
                        )
                    except Exception as err:  # e.g. torch.compile without a compiler
                        print(
                            f"{model:<16}{device.type:<8}{batch:>6}{crop:>6}  {variant.name:<28}"
                            f"{'failed':>10}  {type(err).__name__}: {str(err)[:60]}"
                        )
                        continue
                    baseline = rate if variant == Variant() else baseline
                    ratio = f"{rate / baseline:.2f}x" if baseline else "-"
                    print(
                        f"{model:<16}{device.type:<8}{batch:>6}{crop:>6}  {variant.name:<28}"
                        f"{rate:>10.3f}{ratio:>9}",
                        flush=True,
                    )
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
