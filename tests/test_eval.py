"""bir.eval: folder matching, robustness to bad inputs, summary files and the bir-eval CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bir import metrics as M
from bir.data.io import DuplicateNameError, read_image, save_image
from bir.errors import UsageError
from bir.eval import evaluate_folders, match_folders, write_results

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folders(tmp_path):
    """pred/ and gt/ with: 2 good pairs (one in a subfolder, other suffix), one size mismatch,
    one corrupt prediction, one prediction without gt and one gt without prediction."""
    g = torch.Generator().manual_seed(0)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for name, suffix in (("a", ".png"), ("sub/b", ".bmp")):
        img = torch.rand(3, 24, 24, generator=g)
        save_image(img, gt / f"{name}.png")
        save_image(
            (img + 0.1 * torch.rand(3, 24, 24, generator=g)).clamp(0, 1), pred / f"{name}{suffix}"
        )
    save_image(torch.rand(3, 24, 24, generator=g), pred / "c.png")
    save_image(torch.rand(3, 24, 32, generator=g), gt / "c.png")  # wrong size
    (pred / "d.png").write_bytes(b"\x89PNG garbage, not an image")
    save_image(torch.rand(3, 24, 24, generator=g), gt / "d.png")
    save_image(torch.rand(3, 24, 24, generator=g), pred / "only_pred.png")
    save_image(torch.rand(3, 24, 24, generator=g), gt / "only_gt.png")
    return pred, gt


def test_match_folders_by_relative_stem(folders):
    pred, gt = folders
    m = match_folders(pred, gt)
    assert [s for s, _, _ in m.pairs] == ["a", "c", "d", "sub/b"]
    assert [s for s, _ in m.only_pred] == ["only_pred"]
    assert [s for s, _ in m.only_gt] == ["only_gt"]


def test_evaluate_reports_problems_and_continues(folders):
    pred, gt = folders
    rows, summary = evaluate_folders(pred, gt, metrics=["psnr", "ssim"])
    status = {r["name"]: r["status"] for r in rows}
    assert status == {
        "a": "ok",
        "sub/b": "ok",
        "c": "size_mismatch",
        "d": "unreadable",
        "only_pred": "unmatched_pred",
        "only_gt": "unmatched_gt",
    }
    counts = summary["counts"]
    assert (counts["ok"], counts["size_mismatch"], counts["unreadable"]) == (2, 1, 1)
    assert (counts["unmatched_pred"], counts["unmatched_gt"]) == (1, 1)
    assert "d.png" in next(r for r in rows if r["name"] == "d")["error"]
    # per-image values are the metric functions' values on the decoded files
    expected = []
    for name, suffix in (("a", ".png"), ("sub/b", ".bmp")):
        x, y = read_image(pred / f"{name}{suffix}")[None], read_image(gt / f"{name}.png")[None]
        row = next(r for r in rows if r["name"] == name)
        assert row["psnr"] == pytest.approx(M.psnr(x, y).item())
        assert row["ssim"] == pytest.approx(M.ssim(x, y).item())
        expected.append(row["psnr"])
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(sum(expected) / 2)
    assert summary["metrics"]["psnr"]["count"] == 2


def test_crop_border_and_y_channel_are_passed_through(folders):
    pred, gt = folders
    rows, _ = evaluate_folders(pred, gt, metrics=["psnr"], crop_border=3, y_channel=True)
    x, y = read_image(pred / "a.png")[None], read_image(gt / "a.png")[None]
    row = next(r for r in rows if r["name"] == "a")
    assert row["psnr"] == pytest.approx(M.psnr(x, y, crop_border=3, y_channel=True).item())
    assert row["psnr"] != pytest.approx(M.psnr(x, y).item())


def test_folder_fid_with_small_feature_extractor(folders, tmp_path):
    pred, gt = folders
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dark = tmp_path / "dark"
    for p in (gt / "a.png", gt / "sub/b.png", gt / "only_gt.png"):
        save_image(read_image(p).pow(3), dark / p.relative_to(gt))
    _, same = evaluate_folders(gt, gt, metrics=["fid"], feature_extractor=net)
    _, diff = evaluate_folders(dark, gt, metrics=["fid"], feature_extractor=net)
    assert abs(same["distribution"]["fid"]) < 1e-6
    assert diff["distribution"]["fid"] > 100 * max(abs(same["distribution"]["fid"]), 1e-6)


def test_unknown_metric_and_missing_gt_are_errors(folders):
    pred, _ = folders
    # user errors (bir.errors.UsageError): one line from bir-eval, no traceback
    with pytest.raises(UsageError, match="unknown metrics"):
        evaluate_folders(pred, pred, metrics=["psnrr"])
    with pytest.raises(UsageError, match="ground-truth"):
        evaluate_folders(pred, None, metrics=["psnr"])


def test_write_results_csv_and_summaries(folders, tmp_path):
    pred, gt = folders
    rows, summary = evaluate_folders(pred, gt, metrics=["psnr"])
    out, md, js = write_results(rows, summary, tmp_path / "res" / "scores.csv")
    assert md.name == "scores.summary.md" and js.name == "scores.summary.json"
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {"name", "status", "psnr", "error"} <= set(table[0])
    loaded = json.loads(js.read_text())
    assert loaded["counts"]["unreadable"] == 1
    assert f"| psnr | {summary['metrics']['psnr']['mean']:.4f}" in md.read_text()


def test_bir_eval_cli_on_mismatched_folders(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "cli.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bir.eval",
            f"pred={pred}",
            f"gt={gt}",
            "metrics=[psnr,ssim]",
            "crop_border=2",
            "y_channel=true",
            f"out={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| psnr |" in proc.stdout and "unreadable: 1" in proc.stdout
    summary = json.loads((tmp_path / "cli.summary.json").read_text())
    assert summary["crop_border"] == 2 and summary["y_channel"] is True
    assert summary["counts"]["size_mismatch"] == 1 and summary["metrics"]["ssim"]["count"] == 2


def test_a_metric_failing_on_one_image_is_recorded_in_its_row(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    g = torch.Generator().manual_seed(1)
    good = torch.rand(3, 16, 16, generator=g)
    save_image(good, gt / "a.png")
    save_image((good * 0.9).clamp(0, 1), pred / "a.png")
    save_image(torch.full((3, 1, 1), 0.5), gt / "tiny.png")  # SSIM needs 11x11
    save_image(torch.full((3, 1, 1), 0.25), pred / "tiny.png")
    rows, summary = evaluate_folders(pred, gt, metrics=["psnr", "ssim"])
    tiny = next(r for r in rows if r["name"] == "tiny")
    assert tiny["status"] == "metric_error" and "ssim" in tiny["error"] and "11x11" in tiny["error"]
    x, y = read_image(pred / "tiny.png")[None], read_image(gt / "tiny.png")[None]
    assert tiny["psnr"] == pytest.approx(M.psnr(x, y).item())  # the other metric still counts
    assert summary["counts"]["metric_error"] == 1 and summary["counts"]["ok"] == 1
    assert summary["metrics"]["psnr"]["count"] == 2 and summary["metrics"]["ssim"]["count"] == 1
    out, _, _ = write_results(rows, summary, tmp_path / "scores.csv")
    with open(out) as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "metric_error"]


def test_two_files_of_one_stem_stop_evaluation_with_the_list(folders):
    pred, gt = folders
    save_image(torch.zeros(3, 24, 24), pred / "a.jpg")  # next to a.png
    save_image(torch.zeros(3, 24, 24), gt / "sub" / "b.bmp")  # next to sub/b.png
    with pytest.raises(DuplicateNameError, match=r"a \(a.jpg, a.png\)"):
        evaluate_folders(pred, gt, metrics=["psnr"])
    with pytest.raises(DuplicateNameError, match=r"sub/b \(b.bmp, b.png\)"):
        match_folders(gt, None)


def test_summary_json_is_strict(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    save_image(torch.full((3, 16, 16), 0.5), pred / "same.png")
    save_image(torch.full((3, 16, 16), 0.5), gt / "same.png")  # PSNR +inf, std NaN
    rows, summary = evaluate_folders(pred, gt, metrics=["psnr", "ssim"])
    _, _, js = write_results(rows, summary, tmp_path / "s.csv")

    def refuse(token):
        raise ValueError(f"bare {token} in {js}")

    loaded = json.loads(js.read_text(), parse_constant=refuse)
    assert loaded["metrics"]["psnr"]["mean"] is None  # no finite value: NaN, not a JSON number
    assert loaded["metrics"]["psnr"]["nonfinite"] == 1
    assert loaded["metrics"]["ssim"]["mean"] == pytest.approx(1.0)


def test_infinite_psnr_is_kept_per_image_and_left_out_of_the_mean(tmp_path):
    """bir.metrics.summary's policy: CSV ``inf``, mean over the finite values, count beside it."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for name, p, g in [("same", 0.5, 0.5), ("a", 0.5, 0.4), ("b", 0.5, 0.3)]:
        save_image(torch.full((3, 16, 16), p), pred / f"{name}.png")
        save_image(torch.full((3, 16, 16), g), gt / f"{name}.png")
    rows, summary = evaluate_folders(pred, gt, metrics=["psnr"])
    out, md, _ = write_results(rows, summary, tmp_path / "s.csv")
    with out.open() as f:
        psnr = {r["name"]: r["psnr"] for r in csv.DictReader(f)}
    assert psnr["same"] == "inf"
    finite = [float(psnr["a"]), float(psnr["b"])]
    s = summary["metrics"]["psnr"]
    assert s["mean"] == pytest.approx(sum(finite) / 2) and (s["count"], s["nonfinite"]) == (2, 1)
    assert f"| psnr | {s['mean']:.4f} | {s['std']:.4f} | 2 (+1 non-finite) |" in md.read_text()
