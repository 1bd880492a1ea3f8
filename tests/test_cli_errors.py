"""Mistakes a user can fix stop a command with one line on stderr and exit status 2; bugs keep
their traceback (bir.cli.user_errors). The entry points run in-process on composed configs;
tests/test_console_scripts.py checks the same through the installed scripts."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from bir import config_checks
from bir.cli import (
    CONFIG_DIR,
    USER_ERROR_EXIT,
    degrade,
    evaluate,
    restore,
    train,
    user_error_message,
    user_errors,
)
from bir.data.io import save_image
from bir.errors import UsageError
from bir.nets.checkpoints import CheckpointMismatchError, MissingCheckpointError
from tests.conftest import EXPERIMENT_CHOICES, compose_run, experiment_entry

BIN = Path(sys.executable).parent


def _choices(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (Path(CONFIG_DIR) / group).iterdir())


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """run(task, entry, overrides) -> (exit status, stderr) of the task under user_errors, on the
    config Hydra composes for ``entry`` (run folder under tmp_path, cwd tmp_path)."""
    monkeypatch.chdir(tmp_path)

    def go(task, entry: str, overrides: list[str]) -> tuple[int | None, str]:
        cfg = compose_run(entry, overrides, tmp_path)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            user_errors(f"bir-{entry}")(task)(cfg)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"bir-{entry}: error: ")
        return stop.value.code, err

    return go


@pytest.fixture
def folders(tmp_path):
    save_image(torch.rand(3, 8, 8), tmp_path / "in" / "a.png")
    return [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"]


def test_zero_shot_method_without_prior_and_operator_names_both_groups(run, folders, tmp_path):
    code, err = run(restore, "restore", ["method=bird", *folders])
    assert code == USER_ERROR_EXIT
    assert "add prior=NAME, one of: " + ", ".join(_choices("prior")) in err
    assert "add operator=NAME, one of: " + ", ".join(_choices("operator")) in err
    assert not (tmp_path / "out").exists()  # stopped before any work
    code, err = run(restore, "restore", ["method=gdp", "prior=tiny", *folders])
    assert code == USER_ERROR_EXIT and "operator=NAME" in err and "prior=NAME" not in err


def test_argument_of_the_wrong_type_or_name_is_named(run, folders):
    code, err = run(restore, "restore", ["method=diffbir", "method.steps=abc", *folders])
    assert code == USER_ERROR_EXIT and "method.steps must be an integer; got 'abc'" in err
    code, err = run(restore, "restore", ["method=baseline", "method.kernel_sigma=wide", *folders])
    assert "method.kernel_sigma must be a number; got 'wide'" in err
    code, err = run(restore, "restore", ["method=baseline", "+method.sigma=2", *folders])
    assert "method.sigma is not an argument of bir.lit.baselines.ClassicalBaseline" in err
    assert "kernel_sigma" in err  # the accepted names are listed
    # an int-or-str argument: the respacing parser names the key (Hydra's full_key leads)
    gdp = ["method=gdp", "prior=tiny", "operator=gaussian_blur_known", "method.steps=abc"]
    code, err = run(restore, "restore", [*gdp, *folders])
    assert code == USER_ERROR_EXIT and "method: steps='abc' is not a respacing" in err


def test_writer_metrics_it_cannot_compute_stop_the_run_with_one_line(run, folders, tmp_path):
    writer = "callbacks.prediction_writer"
    code, err = run(
        restore, "restore", ["method=baseline", f"{writer}.metrics=[psnr,fid]", *folders]
    )
    assert code == USER_ERROR_EXIT and "['fid']" in err and "bir-eval" in err
    empty = tmp_path / "no_weights"
    empty.mkdir()
    args = [f"{writer}.metrics=[lpips]", f"{writer}.weights_dir={empty}"]
    code, err = run(restore, "restore", ["method=baseline", *args, *folders])
    assert code == USER_ERROR_EXIT and str(empty / "alexnet-owt-7be5be79.pth") in err
    assert f"{writer}.weights.lpips_alex" in err


def test_unset_input_or_output_comes_first(run, tmp_path):
    code, err = run(restore, "restore", ["method=swinir"])
    assert code == USER_ERROR_EXIT and "input= is required" in err
    code, err = run(restore, "restore", ["method=bird", f"input={tmp_path}"])
    assert "output= is required" in err  # before the missing prior
    _, err = run(degrade, "degrade", [f"output={tmp_path / 'lq'}"])
    assert "input= is required" in err
    _, err = run(evaluate, "eval", [])
    assert "pred= is required" in err


def test_resume_without_an_earlier_run_names_the_runs_that_can_resume(run, tmp_path):
    args = ["experiment=quickstart", "ckpt_path=last", "run_name=new"]
    code, err = run(train, "train", args)
    assert code == USER_ERROR_EXIT and "no run in" in err and "drop ckpt_path" in err
    for name in ("b_run", "a_run"):
        ckpt = tmp_path / "outputs" / "quickstart" / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    (tmp_path / "outputs" / "quickstart" / "no_ckpt").mkdir()
    _, err = run(train, "train", args)
    assert "run_name=new has no checkpoints/last.ckpt" in err and "run_name=<a_run|b_run>" in err
    _, err = run(train, "train", ["experiment=quickstart", "ckpt_path=nope.ckpt"])
    assert "ckpt_path=nope.ckpt does not exist" in err


def test_only_user_errors_become_one_line():
    assert user_error_message(RuntimeError("a bug")) is None
    assert user_error_message(KeyError("x")) is None
    try:
        try:
            raise UsageError("steps=abc is not a respacing")
        except UsageError as cause:
            raise InstantiationException("Error in call ...\nfull_key: method") from cause
    except InstantiationException as wrapped:
        assert user_error_message(wrapped) == "method: steps=abc is not a respacing"
    try:
        try:
            raise ZeroDivisionError("bug in a constructor")
        except ZeroDivisionError as cause:
            raise InstantiationException("Error in call ...\nfull_key: method") from cause
    except InstantiationException as wrapped:
        assert user_error_message(wrapped) is None
    assert "nope.ckpt" in user_error_message(MissingCheckpointError("not found at nope.ckpt"))
    mismatch = CheckpointMismatchError("SwinIR", ["a.weight"], [], [])
    assert user_error_message(mismatch) == str(mismatch)

    def bug(cfg):
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        user_errors("bir-x")(bug)(None)


def test_console_script_prints_one_line_and_exits_2(tmp_path, folders):
    proc = subprocess.run(
        [str(BIN / "bir-restore"), "method=bird", "prior=tiny", *folders],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "bir-restore: error: method.operator needs an operator: add operator=NAME, one of: "
        + ", ".join(_choices("operator"))
    ]


def test_every_shipped_experiment_and_method_passes_the_checks(tmp_path):
    """No false alarm: the checks accept every experiment and method as shipped, given what a
    user must choose (a prior; an operator for a bare zero-shot method; the folders)."""
    folders = ["input=in", "output=out", "ckpt=x"]
    cases = [
        ("restore", [f"method={m}", "prior=tiny", "operator=gaussian_blur_known", *folders])
        for m in _choices("method")
    ]
    for exp in _choices("experiment"):
        cases.append(
            ("restore", [f"experiment={exp}", "prior=tiny", *folders])
            if experiment_entry(exp) == "restore"
            else ("train", [f"experiment={exp}", *EXPERIMENT_CHOICES.get(exp, [])])
        )
    cases += [("degrade", ["input=in", "output=out"]), ("eval", ["pred=p"])]
    for entry, overrides in cases:
        cfg = compose_run(entry, overrides, tmp_path)
        config_checks.resolve_all(cfg, CONFIG_DIR)
        config_checks.check_arguments(cfg)


def test_pickled_code_in_a_checkpoint_is_refused_unless_trusted(tmp_path):
    """``bir-restore method=swinir ckpt=evil.ckpt`` ran the file's code; now it stops with one
    line naming the refused object and the opt-in, and the opt-in names the file."""
    import os

    from hydra.utils import instantiate

    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "code-ran"),))

    net = instantiate(OmegaConf.load(f"{CONFIG_DIR}/net/swinir_tiny.yaml"))
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "payload": RunsCode()}, tmp_path / "evil.ckpt")
    (tmp_path / "in").mkdir()
    save_image(torch.rand(3, 16, 16), tmp_path / "in" / "a.png")
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "bir-restore"), "method=swinir", "net@method.net=swinir_tiny"]
    cmd += [f"ckpt={tmp_path / 'evil.ckpt'}", f"input={tmp_path / 'in'}"]
    cmd += [f"output={tmp_path / 'out'}", "logger=none"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert not (tmp_path / "code-ran").exists()
    err_lines = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(err_lines) == 1 and "trust_pickle=[" in err_lines[0] and "mkdir" in err_lines[0]
    assert "Traceback" not in run.stderr
    cmd.append(f"trust_pickle=[{tmp_path / 'evil.ckpt'}]")
    trusted = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert (tmp_path / "code-ran").exists() and (tmp_path / "out" / "a.png").exists()
