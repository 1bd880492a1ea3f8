"""One answer for an infinite PSNR (bir.metrics.summary): a real predict job through the CLI, with
one output identical to its ground truth, gives the same mean, count and number left out in
summary.md, the per-image CSV, the value handed to sweepers, bir-report and bir-eval."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bir.data.io import read_image, save_image
from bir.eval import evaluate_folders
from bir.report import report

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _psnr_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """10 log10(255^2 / MSE) on the 8-bit scale, in numpy (independent of bir.metrics)."""
    mse = np.mean((a.double().numpy() * 255 - b.double().numpy() * 255) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse > 0 else math.inf


@pytest.mark.slow
def test_identical_image_gets_one_answer_in_every_output(tmp_path):
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        x = torch.rand(3, 16, 16, generator=g)
        save_image(x, tmp_path / "in" / f"img{k}.png")
        # img0's ground truth is its input (the identity baseline restores it exactly)
        gt = x if k == 0 else (x + 0.1 * (k + 1) * torch.randn(3, 16, 16, generator=g)).clamp(0, 1)
        save_image(gt, tmp_path / "gt" / f"img{k}.png")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
    args = [
        "-m",
        "method=baseline",
        "method.kind=identity",
        "input=in",
        "gt=gt",
        "output=${hydra:runtime.output_dir}/images",
        "callbacks.progress_bar=null",
        "+hydra.callbacks.save_return._target_=cli_helpers.SaveReturn",
    ]
    proc = subprocess.run(
        [str(BIN / "bir-restore"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "restore").iterdir()
    job = sweep / "0"
    images = job / "images"

    expected = [
        _psnr_reference(
            read_image(images / f"img{k}.png"), read_image(tmp_path / "gt" / f"img{k}.png")
        )
        for k in range(3)
    ]
    assert math.isinf(expected[0]) and all(math.isfinite(v) for v in expected[1:])
    mean = (expected[1] + expected[2]) / 2
    std = abs(expected[1] - expected[2]) / 2

    # the per-image CSV keeps the value itself
    with (images / "metrics.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["img0"]["psnr"] == "inf" and rows["img0"]["psnr_y"] == "inf"
    for k in (1, 2):
        assert float(rows[f"img{k}"]["psnr"]) == pytest.approx(expected[k], abs=1e-9)
    # summary.md: mean and std over the finite values, the identical image counted beside them
    summary = (images / "summary.md").read_text()
    assert f"| psnr | {mean:.4f} | {std:.4f} | 2 (+1 non-finite) |" in summary
    (ssim_row,) = [line for line in summary.splitlines() if line.startswith("| ssim |")]
    assert ssim_row.endswith("| 3 |")  # SSIM of the identical image is 1: counted as usual
    assert "left out" in summary
    # the value the sweeper receives
    assert json.loads((job / "return.json").read_text()) == pytest.approx(mean, abs=1e-9)
    # bir-report
    res = report(sweep)
    (row,) = res["rows"]
    assert row["psnr"] == pytest.approx(mean, abs=1e-9)
    assert row["psnr_nonfinite"] == 1.0 and row["psnr_y_nonfinite"] == 1.0
    assert row["images"] == 3.0 and "ssim_nonfinite" not in row
    # bir-eval on the same folders
    _, ev = evaluate_folders(images, tmp_path / "gt", metrics=["psnr"])
    assert ev["metrics"]["psnr"]["mean"] == pytest.approx(mean, abs=1e-9)
    assert ev["metrics"]["psnr"]["count"] == 2 and ev["metrics"]["psnr"]["nonfinite"] == 1
