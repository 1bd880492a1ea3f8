"""bir-restore end to end through the real console script (subprocesses, as a user runs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bir.data.io import read_image, save_image
from tests.conftest import NO_VALIDATION

BIN = Path(sys.executable).parent


def run_cli(
    cmd: str, args: list[str], cwd: Path, timeout: int = 240
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(BIN / cmd), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def _inputs(root: Path, n: int) -> list[str]:
    names = []
    for k in range(n):
        name = f"sub/im{k}" if k % 2 else f"im{k}"
        save_image(torch.rand(3, 12, 16), root / f"{name}.png")
        names.append(name)
    return names


def test_restore_baseline_writes_every_image_and_resumes(tmp_path):
    names = _inputs(tmp_path / "in", 3)
    save_image(torch.rand(3, 12, 16), tmp_path / "in" / ".hidden.png")  # never an input
    out = tmp_path / "out"
    args = [
        "method=baseline",
        f"input={tmp_path / 'in'}",
        f"output={out}",
        "callbacks.progress_bar=null",
    ]
    mask = os.umask(0o022)  # the child inherits it; files must be 0644, not mkstemp's 0600
    try:
        assert run_cli("bir-restore", args, tmp_path).returncode == 0
    finally:
        os.umask(mask)
    for n in names:
        assert torch.equal(read_image(out / f"{n}.png"), read_image(tmp_path / "in" / f"{n}.png"))
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} >= {".png", ".json", ".csv", ".md"}
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    assert not list(out.rglob(".*"))  # the hidden input was not restored
    # the resolved config is saved with the run
    cfgs = list((tmp_path / "outputs" / "restore").glob("*/.hydra/config.yaml"))
    assert len(cfgs) == 1 and "baseline" in cfgs[0].read_text()
    # interrupted run: one output missing, one empty, and a temporary file of a killed write;
    # a restart redoes only those two and removes the temporary file
    mtimes = {n: (out / f"{n}.png").stat().st_mtime_ns for n in names}
    (out / "sub" / "im1.png").unlink()
    (out / "im2.png").write_bytes(b"")
    stale = out / ".im0.png.k3j9x0ab.tmp"  # the name atomic_write_bytes gives it
    stale.write_bytes(b"partial")
    assert run_cli("bir-restore", args, tmp_path).returncode == 0
    assert (out / "sub" / "im1.png").exists()
    assert read_image(out / "im2.png").shape == (3, 12, 16)
    assert (out / "im0.png").stat().st_mtime_ns == mtimes["im0"]
    assert not stale.exists()


def test_restore_refuses_to_write_where_it_reads(tmp_path):
    names = _inputs(tmp_path / "in", 2)
    before = {n: (tmp_path / "in" / f"{n}.png").read_bytes() for n in names}
    proc = run_cli(
        "bir-restore",
        ["method=baseline", f"input={tmp_path / 'in'}", f"output={tmp_path / 'in'}"],
        tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "same folder as input=" in lines[0], proc.stderr
    assert {n: (tmp_path / "in" / f"{n}.png").read_bytes() for n in names} == before
    assert sorted(p.name for p in (tmp_path / "in").rglob("*")) == ["im0.png", "im1.png", "sub"]


def test_restore_bad_inputs_are_reported(tmp_path):
    _inputs(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"garbage")
    # a truncated JPEG passes the start-up check and fails to decode mid-run: skipped, counted
    save_image(torch.rand(3, 32, 32), tmp_path / "in" / "cut.jpg")
    data = (tmp_path / "in" / "cut.jpg").read_bytes()
    (tmp_path / "in" / "cut.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = run_cli(
        "bir-restore", ["method=baseline", f"input={tmp_path / 'in'}", f"output={out}"], tmp_path
    )
    assert proc.returncode == 0
    assert "broken.png" in proc.stdout + proc.stderr and "cut.jpg" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.rglob("*.png")) == ["im0.png", "im1.png"]
    summary = (out / "summary.md").read_text()
    assert "2 images skipped" in summary and "- unreadable: 2 (broken, cut)" in summary
    proc = run_cli(
        "bir-restore",
        ["method=baseline", f"input={tmp_path / 'nothing'}", f"output={out}"],
        tmp_path,
    )
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = run_cli(
        "bir-restore",
        ["method=baseline", "method.nonsense_key=1", f"input={tmp_path / 'in'}", f"output={out}"],
        tmp_path,
    )
    assert proc.returncode != 0 and "nonsense_key" in proc.stderr


@pytest.mark.ddp
def test_restore_ddp_cpu_writes_each_image_exactly_once(tmp_path):
    names = _inputs(tmp_path / "in", 5)  # odd: the ranks get 3 and 2
    out = tmp_path / "out"
    args = [
        "method=baseline",
        "trainer=ddp_cpu",
        f"input={tmp_path / 'in'}",
        f"output={out}",
        "callbacks.progress_bar=null",
    ]
    proc = run_cli("bir-restore", args, tmp_path)
    assert proc.returncode == 0
    written = sorted(str(p.relative_to(out).with_suffix("")) for p in out.rglob("*.png"))
    assert written == sorted(names)
    records = sorted(json.loads(p.read_text())["name"] for p in (out / "records").rglob("*.json"))
    assert records == sorted(names)  # each once, none duplicated by padding
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + len(names)


def test_wandb_offline_logs_config_git_images_and_table(tmp_path):
    _inputs(tmp_path / "in", 2)
    # ground truth = inputs, so per-image metrics exist and the metric table is logged
    args = [
        "method=baseline",
        "logger=wandb",
        "tags=[ablation]",
        f"input={tmp_path / 'in'}",
        f"gt={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}",
        "callbacks.progress_bar=null",
    ]
    proc = run_cli("bir-restore", args, tmp_path)
    assert proc.returncode == 0
    runs = list((tmp_path / "outputs" / "restore").glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    for needle in (b"ClassicalBaseline", b'"commit"', b'"dirty"', b"ablation", b"predict/metrics"):
        assert needle in blob, needle
    media = list(runs[0].parent.glob("files/media/images/predict/*.png"))
    assert len(media) == 2


def _train(args: list[str], cwd: Path) -> Path:
    """``bir-train`` for one step without validation; the run's last.ckpt."""
    fast = ["trainer.max_steps=1", *NO_VALIDATION]
    proc = run_cli("bir-train", [*args, *fast, "run_name=r", "logger=none"], cwd, timeout=600)
    assert proc.returncode == 0
    return next((cwd / "outputs").glob("*/r/checkpoints/last.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stage2", "prior"])
def test_restore_a_bir_checkpoint_with_nothing_but_its_path(tmp_path, kind):
    """A stage-2 ControlNet and a pixel prior that bir trained (each with a network other than
    the restore config's default) restore with only their checkpoint's path; the images equal
    those restored with the network given explicitly, as before."""
    if kind == "stage2":
        ckpt = _train(["experiment=diffbir_stage2_tiny"], tmp_path)
        restore = ["method=diffbir", f"method.controlldm.control_ckpt_path={ckpt}"]
        restore += ["net@method.stage1=swinir_tiny", "method.stage1_ckpt_path=null"]
        restore += ["method.steps=2"]
        explicit = ["net@method.controlldm=controlnet_tiny"]
        node, size = "method.controlldm", 16
    else:
        net = ["model_channels=64", "channel_mult=[1,2]", "attention_resolutions=[2]"]
        train = ["experiment=prior_samples", "data.batch_size=2", "data.train.crop_size=32"]
        train += ["model.sample_every_n_steps=0", "model.image_size=32"]
        ckpt = _train([*train, *(f"net.{a}" for a in net)], tmp_path)
        restore = ["method=gdp", "operator=gaussian_blur_known", "method.steps=2"]
        restore += ["prior=samples", f"prior.ckpt_path={ckpt}", "prior.image_size=32"]
        explicit = [f"prior.net.{a}" for a in net]
        node, size = "prior.net", 32
    save_image(torch.rand(3, size, size), tmp_path / "in" / "a.png")
    common = [*restore, f"input={tmp_path / 'in'}", "logger=none", "callbacks.progress_bar=null"]
    proc = run_cli("bir-restore", [*common, f"output={tmp_path / 'stored'}"], tmp_path)
    assert proc.returncode == 0
    assert f"{node}: the network stored in {ckpt}" in proc.stdout + proc.stderr
    proc = run_cli("bir-restore", [*common, *explicit, f"output={tmp_path / 'given'}"], tmp_path)
    assert proc.returncode == 0
    assert f"{node}: the network of this run's config and overrides" in proc.stdout + proc.stderr
    out = read_image(tmp_path / "stored" / "a.png")
    assert out.shape == (3, size, size)
    assert torch.equal(out, read_image(tmp_path / "given" / "a.png"))
