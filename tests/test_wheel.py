"""bir as a wheel: built offline from a copy of the sources, installed into a folder of its own
(dependencies from this environment, bir from the wheel), and run from a folder outside the
source tree: the configs travel inside the package."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONF, NO_VALIDATION

REPO = Path(__file__).resolve().parent.parent

# one training step of the quickstart recipe at toy size, without validation
ONE_STEP = [
    "experiment=quickstart",
    "data.train.crop_size=32",
    "data.batch_size=2",
    "trainer.max_steps=1",
    *NO_VALIDATION,
    "callbacks.model_checkpoint.filename='step{step:03d}'",
    "model.log_images_every_n_steps=0",
    "model.scheduler.total_steps=20",
    "run_name=one_step",
]


def run(args: list[str], cwd: Path, site: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``args`` with bir importable from ``site`` only (nothing of the source tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BIR_CONFIG_DIR")}
    env.update(
        PYTHONPATH=str(site),
        PIP_NO_INDEX="1",
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    src, dist, site, work = (tmp_path / d for d in ("src", "dist", "site", "work"))
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "bir", src / "bir", ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], work, site)
    (wheel,) = dist.glob("bir-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("bir/conf/")}
    expected = {f"bir/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert shipped == expected  # every config file, nothing else
    run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], work, site)

    where = run(
        [sys.executable, "-c", "import bir.cli; print(bir.__file__, bir.cli.CONFIG_DIR)"],
        work,
        site,
    )
    module, config_dir = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "bir" / "conf"

    scripts = site / "bin"
    assert run([str(scripts / "bir-train"), "--help"], work, site).stdout.startswith(
        "bir-train is powered by Hydra."
    )
    job = run(
        [
            str(scripts / "bir-restore"),
            "--cfg",
            "job",
            "method=bird",
            "prior=tiny",
            "operator=gaussian_blur_known",
        ],
        work,
        site,
    ).stdout
    assert (
        "_target_: bir.lit.bird.BIRD" in job
        and "_target_: bir.lit.pixel_ddpm.load_pixel_prior" in job
    )
    run([str(scripts / "bir-train"), *ONE_STEP], work, site)
    assert (work / "outputs" / "quickstart" / "one_step" / "checkpoints" / "last.ckpt").is_file()
