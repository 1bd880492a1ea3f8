import csv

import pytest
import yaml

from bir.report import log_scale, main, report, short_names


def _job(root, folder, overrides, psnr_values, ssim=0.5):
    """A sweep job folder as Hydra + bir-restore leave it: overrides, config, per-image metrics."""
    job = root / folder
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "input=/x"]))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"output": "${hydra:runtime.output_dir}/images"})
    )
    (job / "images").mkdir()
    with (job / "images" / "metrics.csv").open("w") as f:
        w = csv.writer(f)
        w.writerow(["name", "psnr", "ssim"])
        for i, p in enumerate(psnr_values):
            w.writerow([f"im{i}", p, ssim])


def _sweep(root, scales, adaptive=("false", "true")):
    """A guidance-scale x adaptive grid in Hydra's job order; psnr = f(scale, adaptive)."""
    k = 0
    for a in adaptive:
        for s in scales:
            psnr = 20 + s / 10000 + (3 if a == "true" else 0)
            _job(
                root,
                str(k),
                [f"method.guidance_scale={s}", f"method.adaptive_scale={a}", "method=gdp"],
                [psnr - 1, psnr + 1],
            )
            k += 1


def test_report_table_names_jobs_by_swept_values_in_job_order(tmp_path):
    _sweep(tmp_path, [1000, 2000, 6000, 20000, 80000])  # 10 jobs: folders 0..9 sort as numbers
    res = report(tmp_path, metrics=["psnr"])
    assert res["swept"] == ["method.guidance_scale", "method.adaptive_scale"]
    rows = res["rows"]
    assert [r["folder"] for r in rows] == [str(k) for k in range(10)]
    assert rows[3]["job"] == "guidance_scale=20000 adaptive_scale=false"
    assert rows[3]["psnr"] == pytest.approx(22.0)  # mean of 21 and 23 over the two images
    assert rows[7]["psnr"] == pytest.approx(20 + 0.6 + 3)
    md = (tmp_path / "report.md").read_text()
    assert "| guidance_scale=20000 adaptive_scale=false | 22.0000 | 0.5000 |" not in md
    assert "| guidance_scale=20000 adaptive_scale=false | 22.0000 |" in md
    assert "method.guidance_scale=20000,method.adaptive_scale" not in md  # no override strings
    # constant columns are stated once, not tabulated: the method, images per job, ssim
    assert md.startswith("Same in every job: method=gdp, images=2, ssim=0.5\n")
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert header == "| job | psnr |"
    # the CSV keeps everything, with the swept values as their own columns
    with (tmp_path / "report.csv").open() as f:
        got = list(csv.DictReader(f))
    assert len(got) == 10 and got[9]["method.guidance_scale"] == "80000"
    assert got[9]["images"] == "2.0" and got[9]["folder"] == "9"


def test_report_plots_varying_metrics_only_on_a_log_axis_for_decades(tmp_path):
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    _sweep(wide, [1000, 2000, 6000, 20000, 80000])
    res = report(wide)
    # images (2 in every job) and ssim (0.5 everywhere) are constant: not plotted
    assert res["metrics"] == ["psnr"]
    assert res["x_axis"] == {"key": "method.guidance_scale", "scales": {"psnr": "log"}}
    assert (wide / "report.png").stat().st_size > 1000
    _sweep(narrow, [1, 2, 3])
    assert report(narrow)["x_axis"]["scales"] == {"psnr": "linear"}


def test_log_scale_and_short_names():
    assert log_scale([1e3, 2e3, 6e3, 2e4, 8e4])  # 80x: more than 1.5 decades
    assert not log_scale([100, 200, 1000])  # 10x
    assert not log_scale([0, 10, 1000])  # not positive
    assert short_names(["method.guidance_scale", "method.adaptive_scale"]) == {
        "method.guidance_scale": "guidance_scale",
        "method.adaptive_scale": "adaptive_scale",
    }
    # a shared last part keeps enough of the path to tell the keys apart
    assert short_names(["method.lr", "operator.lr", "seed"]) == {
        "method.lr": "method.lr",
        "operator.lr": "operator.lr",
        "seed": "seed",
    }


def test_report_cli_prints_the_table(tmp_path, capsys):
    _sweep(tmp_path, [1000, 80000], adaptive=("false",))
    main([str(tmp_path), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "| guidance_scale=80000 | 28.0000 |" in out
    assert (tmp_path / "rep" / "report.md").read_text().strip() == out.strip()


def test_report_on_empty_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="overrides.yaml"):
        report(tmp_path)


def test_report_leaves_infinite_psnr_out_of_the_mean_and_counts_it(tmp_path):
    """bir.metrics.summary's policy, as summary.md and the sweeper's value follow it."""
    _job(tmp_path, "0", ["method.balance=0.1"], [30.0, "inf", 34.0])
    _job(tmp_path, "1", ["method.balance=0.2"], [28.0, 30.0])
    rows = {r["job"]: r for r in report(tmp_path, metrics=["psnr"])["rows"]}
    assert rows["balance=0.1"]["psnr"] == pytest.approx(32.0)
    assert rows["balance=0.1"]["psnr_nonfinite"] == 1.0
    assert rows["balance=0.2"]["psnr_nonfinite"] == 0.0
    assert rows["balance=0.1"]["images"] == 3.0
    assert "psnr_nonfinite" in (tmp_path / "report.md").read_text()
    # nothing left out in any job: no count column at all
    _job(tmp_path / "b", "0", ["method.balance=0.1"], [30.0, 31.0])
    _job(tmp_path / "b", "1", ["method.balance=0.2"], [28.0, 30.0])
    assert all("psnr_nonfinite" not in r for r in report(tmp_path / "b")["rows"])
