import csv

import pytest
import yaml

from bir.report import report


def _job(root, k, scale, adaptive, psnr_values):
    job = root / f"{k}_job"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"method.scale={scale}", f"method.adaptive_scale={adaptive}", "input=/x"])
    )
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"output": "${hydra:runtime.output_dir}/images"})
    )
    (job / "images").mkdir()
    with (job / "images" / "metrics.csv").open("w") as f:
        w = csv.writer(f)
        w.writerow(["name", "psnr", "ssim"])
        for i, p in enumerate(psnr_values):
            w.writerow([f"im{i}", p, 0.5])


def test_report_table_and_plot(tmp_path):
    _job(tmp_path, 0, 100, False, [20, 22])
    _job(tmp_path, 1, 1000, False, [24, 26])
    _job(tmp_path, 2, 100, True, [30, 30])
    res = report(tmp_path, metrics=["psnr"])
    assert res["swept"] == ["method.scale", "method.adaptive_scale"]
    rows = {r["job"]: r for r in res["rows"]}
    assert rows["0_job"]["psnr"] == pytest.approx(21.0) and rows["1_job"]["psnr"] == pytest.approx(
        25.0
    )
    assert "input" not in rows["0_job"]
    md = (tmp_path / "report.md").read_text()
    assert "| 1_job | 1000 | False |" in md.replace("false", "False")
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert len((tmp_path / "report.csv").read_text().splitlines()) == 4


def test_report_on_empty_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="overrides.yaml"):
        report(tmp_path)
