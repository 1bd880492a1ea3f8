"""Degrade a folder of images with a pipeline (fixed seed, resumable) and the ``bir-degrade`` main.

bir-degrade input=DIR output=DIR degradation=second_order seed=0
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from bir.data.io import ImageReadError, list_images, read_image, save_image
from bir.degradations.pipelines import DegradationResult
from bir.random import sample_generators

log = logging.getLogger(__name__)

PARAMS_FILE = "params.jsonl"


def degrade_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    pipeline: Callable[[torch.Tensor, list[torch.Generator]], DegradationResult],
    seed: int,
    suffix: str = ".png",
    device: str | torch.device = "cpu",
    stream: int = 0,
) -> dict[str, int]:
    """Write a degraded copy of every image under ``input_dir`` to ``output_dir``.

    Image i of the sorted (recursive) file list is degraded alone with
    ``sample_generators(seed, [i], device, stream)``, so its LQ depends only on (seed, i).
    The LQ goes to the same relative path with ``suffix`` (atomic write), and one JSON line
    ``{"name": relative path without suffix, **params}`` is appended to ``output_dir/params.jsonl``.
    Images whose output exists are skipped (resumable); unreadable files are skipped with one
    warning each.

    Returns:
        counts: ``{"total", "written", "skipped_existing", "unreadable"}``.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = list_images(input_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = {"total": len(files), "written": 0, "skipped_existing": 0, "unreadable": 0}
    with open(output_dir / PARAMS_FILE, "a", encoding="utf-8") as records:
        for index, path in enumerate(files):
            rel = path.relative_to(input_dir).with_suffix("")
            target = output_dir / rel.with_suffix(suffix)
            if target.exists():
                counts["skipped_existing"] += 1
                continue
            try:
                gt = read_image(path).unsqueeze(0).to(device)
            except ImageReadError as e:
                log.warning("skipping unreadable image: %s", e)
                counts["unreadable"] += 1
                continue
            generators = sample_generators(seed, [index], device, stream)
            with torch.no_grad():
                result = pipeline(gt, generators)
            save_image(result.lq[0], target)
            records.write(json.dumps({"name": rel.as_posix(), **result.params[0]}) + "\n")
            records.flush()
            counts["written"] += 1
    return counts


def main() -> None:
    """Hydra entry point ``bir-degrade`` (config ``conf/degrade.yaml``)."""
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="degrade")
    def _run(cfg: DictConfig) -> None:
        pipeline = hydra.utils.instantiate(cfg.degradation)
        counts = degrade_folder(
            cfg.input, cfg.output, pipeline, seed=cfg.seed, suffix=cfg.suffix, device=cfg.device
        )
        log.info("bir-degrade: %s", counts)
        print(json.dumps(counts))

    _run()


if __name__ == "__main__":
    main()
