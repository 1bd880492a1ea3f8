"""Hydra entry points: ``bir-train`` (fit / validate / test) and ``bir-restore`` (predict).

The mains only compose and instantiate; every piece of model logic lives in the modules the
configs name. Each run's folder holds the resolved config (``.hydra/config.yaml``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("bir")

#: the config tree shipped with bir (override with BIR_CONFIG_DIR)
CONFIG_DIR = os.environ.get("BIR_CONFIG_DIR", str(Path(__file__).resolve().parent.parent / "conf"))


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict_dataloader.*")
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
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5).stdout.strip()  # fmt: skip
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                    text=True, timeout=5).stdout.strip())  # fmt: skip
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


def _resolve_ckpt(ckpt_path: str | None, output_dir: str) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not last.exists():
            log.warning("ckpt_path=last but %s does not exist; starting from scratch", last)
            return None
        return str(last)
    if ckpt_path != "best" and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit / validate / test ``cfg.model`` on ``cfg.data``; returns the final logged metrics."""
    import lightning.pytorch as pl
    import torch

    _quiet()
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    logger = instantiate_logger(cfg.get("logger"), cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
    ckpt = _resolve_ckpt(cfg.get("ckpt_path"), cfg.paths.output_dir)
    try:
        if cfg.stage == "fit":
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
            if cfg.get("test_after_fit"):
                trainer.test(model, datamodule=datamodule, ckpt_path="best")
        elif cfg.stage == "validate":
            trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt)
        elif cfg.stage == "test":
            trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)
        else:
            raise ValueError(f"stage must be fit, validate or test, got {cfg.stage!r}")
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

    _quiet()
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    pl.seed_everything(cfg.seed, verbose=False)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    writers = [c for c in callbacks if isinstance(c, PredictionWriter)]
    if not writers:
        raise ValueError("restore needs a bir.callbacks.PredictionWriter in callbacks")
    writer = writers[0]
    done = writer.done_names() if cfg.resume else set()
    dataset = RestoreFolderDataset(cfg.input, gt=cfg.get("gt"), exclude=done)
    counts = {"total": len(dataset.all_names), "done_before": len(done),
              "to_restore": len(dataset), "unreadable": len(dataset.skipped)}  # fmt: skip
    log.info("restore: %s", counts)
    if len(dataset) == 0:
        log.info("nothing to restore: every output in %s exists", cfg.output)
        counts.update(summary_means(writer))
        return counts
    model = hydra.utils.instantiate(cfg.method)
    logger = instantiate_logger(cfg.get("logger"), cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger or False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.num_workers, collate_fn=collate)  # fmt: skip
    try:
        trainer.predict(model, dataloaders=loader, return_predictions=False)
    finally:
        _close_logger(logger)
    counts.update(summary_means(writer))
    return counts


def summary_means(writer) -> dict[str, float]:
    """Mean of every per-image metric on disk (what sweepers optimise)."""
    import math

    rows = writer.write_summary()
    means = {}
    for key in {k for r in rows for k in r} - {"name"}:
        vals = [
            r[key] for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        if vals:
            means[key] = sum(vals) / len(vals)
    return means


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # returned for sweepers (e.g. Optuna) that optimise a validation metric
    return metrics.get(cfg.get("optimized_metric", "val/psnr"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="restore")
def restore_main(cfg: DictConfig) -> float | None:
    result = restore(cfg)
    # returned for sweepers (e.g. Optuna) that optimise a metric against the ground truth
    return result.get(cfg.get("optimized_metric", "psnr"))
