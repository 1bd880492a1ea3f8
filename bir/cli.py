"""Hydra entry points, all four: ``bir-train`` (fit / validate / test), ``bir-restore``
(predict), ``bir-degrade`` (write LQ copies of a folder) and ``bir-eval`` (metrics of a folder).

The mains only check, compose and instantiate; every piece of model logic lives in the modules the
configs name. Each run's folder holds the resolved config (``.hydra/config.yaml``). All four read
one config tree, :data:`CONFIG_DIR`.

Mistakes a user can fix (an unset ``input=``, an unchosen ``prior=``, ``method.steps=abc``, a
missing checkpoint, ``ckpt_path=last`` with nothing to resume) stop the command before any work
with one message on stderr and exit status 2 (:func:`user_errors`); every other exception keeps
its traceback, because it is a bug to report.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from bir import config_checks
from bir.errors import UsageError

log = logging.getLogger("bir")

#: the config tree of every entry point (override with the BIR_CONFIG_DIR environment variable)
CONFIG_DIR = os.environ.get("BIR_CONFIG_DIR", str(Path(__file__).resolve().parent / "conf"))

#: exit status of a command stopped by a user error (as argparse uses for bad arguments)
USER_ERROR_EXIT = 2


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes whose message tells the user what to change (imported when needed, so
    ``--help`` does not load torch)."""
    from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue

    from bir.nets.checkpoints import (
        CheckpointMismatchError,
        MissingCheckpointError,
        UnsafeCheckpointError,
    )

    return (
        UsageError,
        MissingCheckpointError,
        CheckpointMismatchError,
        UnsafeCheckpointError,
        MissingMandatoryValue,
        InterpolationKeyError,
    )


def user_error_message(err: BaseException) -> str | None:
    """The message to print for a user error, or None when ``err`` is a bug (keep its traceback).

    Hydra wraps what a constructor raises in ``InstantiationException``; the cause is looked at,
    and the config key Hydra names (``full_key: method``) leads the message.
    """
    from hydra.errors import InstantiationException

    kinds = _user_error_types()
    prefix = ""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        key = re.search(r"full_key: (\S+)", str(err))
        prefix = prefix or (f"{key.group(1)}: " if key else "")
        err = err.__cause__
    if not isinstance(err, kinds):
        return None
    msg = str(err)
    if hasattr(err, "full_key") and not isinstance(err, UsageError):
        # OmegaConf errors: keep the first line; the rest is its own debugging detail
        msg = msg.splitlines()[0] + (f" (at {err.full_key})" if err.full_key else "")
    return prefix + msg


def user_errors(prog: str) -> Callable[[Callable], Callable]:
    """Decorate a task function: a user error becomes ``prog: error: <message>`` on stderr and
    exit status 2 (no traceback); anything else propagates unchanged."""

    def wrap(task: Callable) -> Callable:
        @functools.wraps(task)
        def run(cfg: DictConfig):
            try:
                return task(cfg)
            except Exception as err:
                msg = user_error_message(err)
                if msg is None:
                    raise
                log.debug("user error", exc_info=True)
                print(f"{prog}: error: {msg}", file=sys.stderr)
                sys.exit(USER_ERROR_EXIT)

        return run

    return wrap


def check_config(cfg: DictConfig, required: dict[str, str] | None = None) -> None:
    """Before anything is built: required top-level values, every interpolation, and every
    ``_target_`` node's argument names and scalar types (:mod:`bir.config_checks`)."""
    config_checks.require(cfg, required or {})
    config_checks.resolve_all(cfg, CONFIG_DIR)
    config_checks.check_arguments(cfg)
    if cfg.get("trust_pickle"):
        from bir.nets.checkpoints import trust_pickle_files

        # the only way a weights file is unpickled in full: named by the user, for this run
        trust_pickle_files(list(cfg.trust_pickle))


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict_dataloader.*")
    # bir.data.datamodule.ResumableSampler positions itself from the trainer's restored progress
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail at once instead of retrying


def instantiate_callbacks(cfg: DictConfig | None) -> list:
    """Callbacks from a dict of ``_target_`` nodes; entries set to null are dropped."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(node) for node in cfg.values() if node and "_target_" in node]


def instantiate_logger(cfg: DictConfig | None, run_cfg: DictConfig):
    """The logger, or None for ``logger=none``. Sweep jobs get the sweep folder as W&B group."""
    if not cfg or "_target_" not in cfg:
        return None
    extra = {}
    if cfg._target_.endswith("WandbLogger"):
        hc = hydra.core.hydra_config.HydraConfig.get()
        if cfg.get("group") is None and hc.mode.name == "MULTIRUN":
            extra["group"] = Path(hc.sweep.dir).name
        os.environ.setdefault("WANDB_DIR", str(cfg.save_dir))
    logger = hydra.utils.instantiate(cfg, **extra)
    if hasattr(logger, "log_hyperparams"):
        params = OmegaConf.to_container(run_cfg, resolve=True)
        params["git"] = _git_state()
        logger.log_hyperparams(params)
    return logger


def _git_state() -> dict:
    """Commit and dirty flag of the bir checkout, when there is one (for run tracking)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _close_logger(logger) -> None:
    """Finish the logger even when the run failed (W&B would otherwise leave the run open)."""
    if logger is None:
        return
    try:
        logger.finalize("failed" if sys.exc_info()[0] else "success")
    except Exception as err:  # never mask the original error
        log.warning("could not finalize logger: %s", err)
    exp = getattr(logger, "_experiment", None)
    if exp is not None and hasattr(exp, "finish"):
        exp.finish()


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``bir-train``'s ``ckpt_path``: None, ``"best"``, an existing file, or ``"last"`` (this
    run folder's ``checkpoints/last.ckpt``). Raises :class:`UsageError` for a file that is not
    there and for ``last`` with nothing to resume, listing the ``run_name`` values that can."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        run = Path(output_dir)
        last = run / "checkpoints" / "last.ckpt"
        if last.exists():
            return str(last)
        runs = sorted(p.parent.parent.name for p in run.parent.glob("*/checkpoints/last.ckpt"))
        if runs:
            raise UsageError(
                f"ckpt_path=last: run_name={run.name} has no checkpoints/last.ckpt; to resume a "
                f"run in {run.parent}, give its name: run_name=<{'|'.join(runs)}>"
            )
        raise UsageError(
            f"ckpt_path=last: no run in {run.parent} has a checkpoints/last.ckpt to resume; "
            "drop ckpt_path to start a new run, or give ckpt_path=/path/to/file.ckpt"
        )
    if ckpt_path != "best" and not Path(ckpt_path).is_file():
        raise UsageError(
            f"ckpt_path={ckpt_path} does not exist: give a checkpoint file, or ckpt_path=last "
            "with the run_name of the run to resume"
        )
    return ckpt_path


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit / validate / test ``cfg.model`` on ``cfg.data``; returns the final logged metrics."""
    import lightning.pytorch as pl
    import torch

    _quiet()
    check_config(cfg)
    if cfg.stage not in ("fit", "validate", "test"):
        raise UsageError(f"stage must be fit, validate or test; got stage={cfg.stage}")
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if cfg.get("net") is not None and "_target_" in cfg.net:
        from bir.callbacks.net_config import StoreNetConfig, net_config_record

        hc = hydra.core.hydra_config.HydraConfig
        choice = hc.get().runtime.choices.get("net") if hc.initialized() else None
        callbacks.append(StoreNetConfig(net_config_record(cfg.net, choice, CONFIG_DIR)))
    logger = instantiate_logger(cfg.get("logger"), cfg)
    if logger is None:  # logger=none: nothing to monitor into (Lightning would stop the run)
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
    try:
        if cfg.stage == "fit":
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
            if cfg.get("test_after_fit"):
                trainer.test(model, datamodule=datamodule, ckpt_path="best")
        elif cfg.stage == "validate":
            trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt)
        else:
            trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)
    finally:
        _close_logger(logger)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero and metrics:
        log.info("final metrics: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


def restore(cfg: DictConfig) -> dict:
    """Restore every image under ``cfg.input`` into ``cfg.output`` with ``cfg.method``.

    Images whose output exists are skipped (``resume=true``), so an interrupted run continues
    where it stopped. Returns a dict with the counts.
    """
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from bir.callbacks import PredictionWriter
    from bir.data.datasets import RestoreFolderDataset, collate
    from bir.data.io import check_restore_folders

    _quiet()
    # an unset input= or output= is the most common slip: say so before anything else
    required = {
        "input": "the folder of images to restore",
        "output": "the folder for the restored images",
    }
    check_config(cfg, required)
    # creates the output folder, so it runs once the config is known to be sound
    check_restore_folders(cfg.input, cfg.output, cfg.get("gt"))
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    pl.seed_everything(cfg.seed, verbose=False)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    writers = [c for c in callbacks if isinstance(c, PredictionWriter)]
    if not writers:
        raise ValueError("restore needs a bir.callbacks.PredictionWriter in callbacks")
    writer = writers[0]
    done = writer.done_names() if cfg.resume else set()
    dataset = RestoreFolderDataset(cfg.input, gt=cfg.get("gt"), exclude=done)
    counts = {
        "total": len(dataset.all_names),
        "done_before": len(done),
        "to_restore": len(dataset),
        "unreadable": len(dataset.skipped),
    }
    log.info("restore: %s", counts)
    if len(dataset) == 0:
        log.info("nothing to restore: every output in %s exists", cfg.output)
        counts.update(summary_means(writer))
        return counts
    from bir.callbacks.net_config import use_stored_net_configs

    # a checkpoint bir trained builds its own network, unless the command line chooses one
    hc = hydra.core.hydra_config.HydraConfig
    use_stored_net_configs(cfg, list(hc.get().overrides.task) if hc.initialized() else [])
    model = hydra.utils.instantiate(cfg.method)
    logger = instantiate_logger(cfg.get("logger"), cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=collate,
    )
    try:
        trainer.predict(model, dataloaders=loader, return_predictions=False)
    finally:
        _close_logger(logger)
    counts.update(summary_means(writer))
    return counts


def summary_means(writer) -> dict[str, float]:
    """Mean of every per-image metric on disk (what sweepers optimise), the numbers of
    ``summary.md``: non-finite values (PSNR of an exact restoration) are left out of the mean and
    counted as ``<metric>_nonfinite`` (:mod:`bir.metrics.summary`)."""
    from bir.metrics import flat_means, summarize_columns

    return flat_means(summarize_columns(writer.write_summary()))


def degrade(cfg: DictConfig) -> dict[str, int]:
    """``bir-degrade``: write a degraded copy of ``cfg.input`` into ``cfg.output``
    (:func:`bir.degradations.folder.degrade_folder`); returns its counts."""
    from bir.degradations.folder import degrade_folder

    required = {
        "input": "the folder of clean images to degrade",
        "output": "the folder for the degraded (LQ) copies",
    }
    check_config(cfg, required)
    pipeline = hydra.utils.instantiate(cfg.degradation)
    counts = degrade_folder(
        cfg.input, cfg.output, pipeline, seed=cfg.seed, suffix=cfg.suffix, device=cfg.device
    )
    log.info("bir-degrade: %s", counts)
    print(json.dumps(counts))
    return counts


def evaluate(cfg: DictConfig) -> dict:
    """``bir-eval``: metrics of ``cfg.pred`` against ``cfg.gt`` (:func:`bir.eval.evaluate`)."""
    from bir.eval import evaluate as evaluate_config

    check_config(cfg, {"pred": "the folder of restored images to score"})
    return evaluate_config(cfg)


# ------------------------------------------------------------------------------ console scripts
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@user_errors("bir-train")
def train_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # returned for sweepers (e.g. Optuna) that optimise a validation metric
    return metrics.get(cfg.get("optimized_metric", "val/psnr"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="restore")
@user_errors("bir-restore")
def restore_main(cfg: DictConfig) -> float | None:
    result = restore(cfg)
    # returned for sweepers (e.g. Optuna) that optimise a metric against the ground truth: the
    # mean summary.md shows (non-finite values left out and counted, bir.metrics.summary)
    return result.get(cfg.get("optimized_metric", "psnr"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="degrade")
@user_errors("bir-degrade")
def degrade_main(cfg: DictConfig) -> None:
    degrade(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@user_errors("bir-eval")
def eval_main(cfg: DictConfig) -> None:
    evaluate(cfg)
