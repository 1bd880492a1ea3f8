"""Degrade a folder of images with a pipeline (fixed seed, resumable); ``bir-degrade`` runs it.

bir-degrade input=DIR output=DIR degradation=second_order seed=0
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from bir.data.io import (
    ImageReadError,
    MissingFolderError,
    NotAFolderError,
    check_separate_folders,
    index_by_name,
    prepare_output_folder,
    read_image,
    save_image,
)
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
    Images whose output exists and is not empty are skipped (resumable); unreadable files are
    skipped with one warning each.

    Before any work, as ``bir-restore`` (:mod:`bir.data.io`): ``output_dir`` must not be, hold
    or lie inside ``input_dir``; two inputs of one name (``dup.jpg``, ``dup.png``, both to
    ``dup.png``) are an error that lists them; the output folder must be writable; temporary files
    of a killed run are removed. Hidden files are not inputs.

    Returns:
        counts: ``{"total", "written", "skipped_existing", "unreadable"}``.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        if input_dir.exists():
            raise NotAFolderError(f"input={input_dir} is a file; give the folder of clean images")
        raise MissingFolderError(f"input={input_dir} does not exist; give the folder of images")
    check_separate_folders(output_dir, input=input_dir)
    files = index_by_name(input_dir)
    prepare_output_folder(output_dir, input=input_dir)
    counts = {"total": len(files), "written": 0, "skipped_existing": 0, "unreadable": 0}
    with open(output_dir / PARAMS_FILE, "a", encoding="utf-8") as records:
        for index, (name, path) in enumerate(files.items()):
            target = output_dir / f"{name}{suffix}"  # not with_suffix: "a.b" must stay "a.b"
            if target.is_file() and target.stat().st_size > 0:
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
            records.write(json.dumps({"name": name, **result.params[0]}) + "\n")
            records.flush()
            counts["written"] += 1
    return counts


if __name__ == "__main__":  # python -m bir.degradations.folder: the bir-degrade console script
    from bir.cli import degrade_main

    degrade_main()
