"""The four Hydra console scripts as installed: each run as a subprocess of the virtual
environment's script, from a folder outside the source tree, with ``--help`` and one real run."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bir.cli import CONFIG_DIR
from bir.data.io import read_image, save_image
from tests.conftest import NO_VALIDATION

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["bir-train", "bir-restore", "bir-degrade", "bir-eval"]


def run_script(name: str, args: list[str], cwd: Path, timeout: int = 300, **extra_env: str):
    """``BIN/name args`` in ``cwd``, with nothing of the source tree on the path."""
    assert REPO not in cwd.resolve().parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BIR_CONFIG_DIR")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **extra_env)
    proc = subprocess.run(
        [str(BIN / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_the_config_groups(name, tmp_path):
    proc = run_script(name, ["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{name} is powered by Hydra.")
    assert "== Configuration groups ==" in proc.stdout and "paths: default" in proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_config_dir_from_the_environment(name, tmp_path):
    """BIR_CONFIG_DIR replaces the config tree for every script."""
    conf = tmp_path / "myconf"
    shutil.copytree(CONFIG_DIR, conf)
    entry = conf / f"{name.removeprefix('bir-')}.yaml"
    text = entry.read_text()
    assert "\ntask_name: " in text
    entry.write_text(text.replace("\ntask_name: ", "\ntask_name: from_env_dir  #", 1))
    proc = run_script(name, ["--cfg", "job"], tmp_path, timeout=120, BIR_CONFIG_DIR=str(conf))
    assert proc.returncode == 0, proc.stderr
    assert "task_name: from_env_dir" in proc.stdout  # a value only the copy holds


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10 * math.log10(1 / mse)


def test_degrade_restore_eval_chain(tmp_path):
    """bir-degrade writes LQ copies, bir-restore (identity baseline) copies them to the output,
    bir-eval scores them against the clean images: the CSV holds PSNR(LQ, clean)."""
    g = torch.Generator().manual_seed(0)
    for name in ("a", "sub/b"):
        save_image(torch.rand(3, 24, 32, generator=g), tmp_path / "clean" / f"{name}.png")
    proc = run_script(
        "bir-degrade",
        [
            "input=clean",
            "output=lq",
            "degradation=single_stage",
            "degradation.blur_kernel_size=9",
            "seed=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 2
    proc = run_script(
        "bir-restore",
        [
            "method=baseline",
            "input=lq",
            "output=restored",
            "gt=clean",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
    )
    assert proc.returncode == 0
    for name in ("a", "sub/b"):  # identity: the restoration is the LQ image
        assert torch.equal(
            read_image(tmp_path / "restored" / f"{name}.png"),
            read_image(tmp_path / "lq" / f"{name}.png"),
        )
    proc = run_script(
        "bir-eval", ["pred=restored", "gt=clean", "metrics=[psnr]", "out=m.csv"], tmp_path
    )
    assert proc.returncode == 0 and "| psnr |" in proc.stdout
    with open(tmp_path / "m.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    for name in ("a", "sub/b"):
        want = _psnr(
            read_image(tmp_path / "lq" / f"{name}.png"),
            read_image(tmp_path / "clean" / f"{name}.png"),
        )
        assert abs(float(rows[name]["psnr"]) - want) < 1e-3
    # each script kept its run folder (and log) under the launch folder
    for task in ("degrade", "restore", "eval"):
        assert list((tmp_path / "outputs" / task).glob(f"*/bir-{task}.log"))


def test_train_one_step_quickstart(tmp_path):
    args = [
        "experiment=quickstart",
        "trainer.max_steps=1",
        "data.train.crop_size=32",
        "data.batch_size=2",
        *NO_VALIDATION,
        "model.log_images_every_n_steps=0",
        "model.scheduler.total_steps=1",
        "run_name=one",
        "logger=none",  # the learning-rate monitor has nothing to log into: dropped, not fatal
    ]
    proc = run_script("bir-train", args, tmp_path)
    assert proc.returncode == 0
    run = tmp_path / "outputs" / "quickstart" / "one"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    assert (run / ".hydra" / "config.yaml").exists() and (run / "bir-train.log").exists()
    assert (tmp_path / ".cache" / "samples" / "train").is_dir()  # data under the launch folder

    # the checkpoint says which net it holds: restoring it needs nothing but its path
    stored = ckpt["bir_net"]
    assert stored["choice"] == "swinir_tiny" and stored["overrides"]["embed_dim"] == 24
    (tmp_path / "in").mkdir()
    save_image(torch.rand(3, 16, 16), tmp_path / "in" / "a.png")
    restore = ["method=swinir", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "logger=none"]
    restore += [f"input={tmp_path / 'in'}"]
    proc = run_script("bir-restore", [*restore, f"output={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 0
    assert "method.net: the network stored in" in proc.stdout + proc.stderr
    # an explicit net wins: the wrong one names the fix, the fix restores the same image
    wrong = [*restore, f"output={tmp_path / 'out2'}", "net@method.net=swinir_tiny"]
    proc = run_script("bir-restore", wrong, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    fix = proc.stderr.split("fix: add these overrides: ")[1].split()
    assert fix[0] == "net@method.net=swinir_tiny" and "method.net.embed_dim=24" in fix
    proc = run_script("bir-restore", [*restore, f"output={tmp_path / 'out2'}", *fix], tmp_path)
    assert proc.returncode == 0 and "this run's config and overrides" in proc.stdout + proc.stderr
    out = read_image(tmp_path / "out" / "a.png")
    assert out.shape == (3, 16, 16) and torch.equal(out, read_image(tmp_path / "out2" / "a.png"))
