"""The end of ``make demo``: restore a held-out photograph with the quickstart model.

    python -m bir.demo [RUN_DIR]     (default: the newest outputs/quickstart/* run)

Loads the run's config and last checkpoint, degrades the held-out ``astronaut`` photograph with
the run's own degradation pipeline (fixed seed), restores it, prints the PSNR of the degraded input
and of the restored image against the original, and writes ``demo_grid.png`` (LQ | restored | GT)
in the run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from bir.callbacks.images import comparison_grid
from bir.data.io import save_image
from bir.data.samples import holdout_image
from bir.lit.stage1 import Stage1Restoration
from bir.metrics import psnr, ssim
from bir.random import sample_generators


def newest_run(root: Path = Path("outputs/quickstart")) -> Path:
    runs = sorted(p.parent.parent for p in root.glob("*/checkpoints/last.ckpt"))
    if not runs:
        raise FileNotFoundError(
            f"no finished quickstart run under {root}; run `bir-train experiment=quickstart`"
        )
    return max(runs, key=lambda p: (p / "checkpoints" / "last.ckpt").stat().st_mtime)


def run(run_dir: Path, size: int = 256, seed: int = 2024) -> dict[str, float]:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    net = hydra.utils.instantiate(cfg.net)
    degradation = hydra.utils.instantiate(cfg.degradation)
    model = Stage1Restoration.for_inference(net, run_dir / "checkpoints" / "last.ckpt")
    gt = holdout_image("astronaut", size)[None]
    with torch.no_grad():
        lq = degradation(gt, sample_generators(seed, [0])).lq
        restored = model.restore(lq)
    out = {
        "psnr_degraded": float(psnr(lq, gt)[0]),
        "psnr_restored": float(psnr(restored, gt)[0]),
        "ssim_degraded": float(ssim(lq, gt)[0]),
        "ssim_restored": float(ssim(restored, gt)[0]),
    }
    grid = comparison_grid(lq, restored, gt)
    save_image(grid, run_dir / "demo_grid.png")
    print(
        f"held-out photograph 'astronaut' ({size}x{size}), degradation: {cfg.degradation._target_}"
    )
    print(f"  degraded: PSNR {out['psnr_degraded']:.2f} dB  SSIM {out['ssim_degraded']:.4f}")
    print(f"  restored: PSNR {out['psnr_restored']:.2f} dB  SSIM {out['ssim_restored']:.4f}")
    print(f"  grid (LQ | restored | GT): {run_dir / 'demo_grid.png'}")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run(Path(argv[0]) if argv else newest_run())


if __name__ == "__main__":
    main()
