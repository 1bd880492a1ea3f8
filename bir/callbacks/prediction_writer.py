"""Writes what predict modules return: images, kernels, curves, per-image records and a summary.

Layout under ``output_dir`` for an input named ``sub/img``::

    sub/img.png                 restored image (written last: its presence marks the image done)
    kernels/sub/img.png, .npy   estimated kernel, if the method returns one
    curves/sub/img.json         loss curve / guidance-scale trajectory, if returned
    curves/sub/img_scale.png    plot of the guidance scale over the sampling steps
    records/sub/img.json        per-image metrics (against the ground truth when given) and extras
    skipped/sub/img.json        why an image was skipped: its input (or ground truth) could not be
                                read, or the method's output was not finite (NaN/inf)
    metrics.csv, summary.md     one row per image / mean, std and count per metric, and the
                                skipped images (rank 0)

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
partial file under a final name, and a restarted run skips images whose output exists and is not
empty (``bir.data.io.remove_stale_temp_files`` clears temporary files of a killed run before it
starts). Records are strict JSON: a non-finite metric value (the infinite PSNR of an exact
restoration) is written as the string ``"inf"``, any other non-finite number as ``null``;
``metrics.csv`` writes ``inf``, and ``summary.md`` leaves such values out of the mean and counts
them next to the count (:mod:`bir.metrics.summary`). Metric names come from the one table
:data:`bir.metrics.METRICS`; a name the writer cannot compute per image (FID, KID) or a
backbone file that is not there stops the run before any work with one line. One bad image never stops the run: an unreadable input is
skipped with one warning naming it, a non-finite output is not written (one error line), both are
recorded under ``skipped/`` and counted in the summary; non-finite outputs make the run fail at
the end, after every other image is written. Under DDP each rank writes its own images (names are
unique); rank 0 builds the summary from the records on disk after a barrier, so the table also
covers images finished by an earlier, interrupted run.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from bir import metrics as M
from bir.data.io import atomic_write_bytes, save_image

log = logging.getLogger(__name__)


def _per_sample(value, i: int):
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        return value[i]
    if isinstance(value, list | tuple):
        return value[i]
    return value


class PredictionWriter(BasePredictionWriter):
    """Atomic, resumable, DDP-safe writer for predict outputs (docs/contracts.md).

    Args:
        output_dir: where to write.
        image_suffix: file type of restored images (".png").
        metrics: per-image metrics (:data:`bir.metrics.METRICS`): full-reference ones when the
            batch carries ``gt`` (PSNR and SSIM also on the Y channel, as ``psnr_y``,
            ``ssim_y``), no-reference ones on every output.
        crop_border: pixels cropped from each border before PSNR/SSIM.
        weights_dir: folder of the metric backbones' release files (``paths.weights``).
        weights: a file per weights key (``lpips_alex``, ``lpips_vgg``, ``dists``, ``niqe``,
            ...), used instead of the release file under ``weights_dir``.
        save_kernels / save_curves: write estimated kernels / loss and scale curves.
        log_images: log the first ``log_images`` (LQ | restored | GT) grids to the logger.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        image_suffix: str = ".png",
        metrics: tuple[str, ...] = ("psnr", "ssim"),
        crop_border: int = 0,
        save_kernels: bool = True,
        save_curves: bool = True,
        log_images: int = 8,
        weights_dir: str | os.PathLike | None = None,
        weights: dict[str, str | None] | None = None,
    ):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.image_suffix = image_suffix
        self.metrics, self.crop_border = tuple(metrics), crop_border
        self.save_kernels, self.save_curves = save_kernels, save_curves
        self.log_images = log_images
        self.failed: list[str] = []  # names whose output was not finite (this run)
        self.unreadable: dict[str, str] = {}  # names whose input could not be read (this run)
        self._logged = 0
        self._metric_warned: set[str] = set()
        self._metric_fns = self._build_metrics(dict(weights or {}), weights_dir)
        self._no_reference = any(not full_ref for full_ref, _ in self._metric_fns.values())

    def _build_metrics(self, weights: dict, weights_dir) -> dict[str, tuple[bool, object]]:
        """Column name -> (needs gt, per-image function), every weights file checked now."""
        kinds = (M.FULL_REFERENCE, M.NO_REFERENCE)
        fns = {}
        for name in M.check_metric_names(self.metrics, "metrics", kinds):
            full_ref = M.METRICS[name].kind == M.FULL_REFERENCE
            key = M.METRICS[name].weights_key
            config_key = f"callbacks.prediction_writer.weights.{key}" if key else None
            fn = M.per_image_metric(
                name, weights, self.crop_border, weights_dir=weights_dir, config_key=config_key
            )
            fns[name] = (full_ref, fn)
            if name in ("psnr", "ssim"):
                y_fn = M.per_image_metric(name, crop_border=self.crop_border, y_channel=True)
                fns[f"{name}_y"] = (True, y_fn)
        return fns

    # -- helpers -------------------------------------------------------------------------------
    def image_path(self, name: str) -> Path:
        return self.output_dir / f"{name}{self.image_suffix}"

    def done_names(self) -> set[str]:
        """Names whose restored image exists and is not empty (a resumed run skips these).

        A zero-byte file (a full disk, a copy tool's placeholder) is not done; hidden files are
        not images.
        """
        if not self.output_dir.exists():
            return set()
        skip = {"kernels", "curves", "records", "skipped"}
        out = set()
        for p in self.output_dir.rglob(f"*{self.image_suffix}"):
            rel = p.relative_to(self.output_dir)
            if rel.parts[0] in skip or any(part.startswith(".") for part in rel.parts):
                continue
            if p.is_file() and p.stat().st_size > 0:
                out.add(rel.with_suffix("").as_posix())
        return out

    def _record_skip(self, name: str, reason: str, error: str) -> None:
        """One file under ``skipped/`` per skipped image (counted by :meth:`write_summary`)."""
        atomic_write_bytes(
            self.output_dir / "skipped" / f"{name}.json",
            M.strict_json({"name": name, "reason": reason, "error": error}),
        )

    def _metrics(self, restored: torch.Tensor, gt: torch.Tensor | None) -> dict:
        """Per-image values for the record (non-finite ones as strings, see the module doc); a
        metric that fails on this image (SSIM under 11x11 px, LPIPS under 32x32) is left out
        with one warning per metric."""
        if gt is not None and restored.shape != gt.shape:
            log.warning(
                "ground truth %s differs in size from output %s; no full-reference metrics",
                tuple(gt.shape),
                tuple(restored.shape),
            )
            gt = None
        out = {}
        x = restored[None].float()
        y = None if gt is None else gt[None].float().to(restored.device)
        for name, (full_ref, fn) in self._metric_fns.items():
            if full_ref and y is None:
                continue
            try:
                value = fn(x, y) if full_ref else fn(x)
            except (ValueError, RuntimeError) as err:  # this image (too small), as bir-eval
                if name not in self._metric_warned:
                    self._metric_warned.add(name)
                    log.warning("metric %s skipped: %s", name, err)
                continue
            out[name] = M.record_value(value[0])
        return out

    def _write_kernel(self, name: str, kernel: torch.Tensor) -> None:
        k = kernel.detach().float().cpu()
        buf = io.BytesIO()
        np.save(buf, k.numpy())
        atomic_write_bytes(self.output_dir / "kernels" / f"{name}.npy", buf.getvalue())
        view = k if k.ndim == 3 else k[None]
        view = view.mean(0, keepdim=True) if view.shape[0] not in (1, 3) else view
        view = view / view.max().clamp(min=1e-12)
        view = torch.nn.functional.interpolate(
            view[None], scale_factor=max(1, 128 // view.shape[-1]), mode="nearest"
        )[0]
        save_image(
            view.expand(3, -1, -1) if view.shape[0] == 1 else view,
            self.output_dir / "kernels" / f"{name}.png",
        )

    def _write_curves(self, name: str, curves: dict[str, torch.Tensor]) -> None:
        data = {k: M.jsonable(v) for k, v in curves.items()}
        atomic_write_bytes(self.output_dir / "curves" / f"{name}.json", M.strict_json(data))
        if "scale_trajectory" in curves:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            s = curves["scale_trajectory"].detach().float().cpu().numpy()
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot(np.arange(len(s))[::-1], s)  # sampling runs from t = T-1 down to 0
            ax.set_xlabel("sampling step (T-1 -> 0)")
            ax.set_ylabel("guidance scale s")
            ax.invert_xaxis()
            ax.set_title(name)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
            atomic_write_bytes(self.output_dir / "curves" / f"{name}_scale.png", buf.getvalue())

    # -- Lightning hooks -----------------------------------------------------------------------
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record inputs the dataset dropped at start-up, and guard the module's predict step:
        a batch whose images were all unreadable (``batch["name"] == []``, see
        ``bir.data.datasets.collate``) is not passed to the method."""
        if trainer.is_global_zero:
            loaders = trainer.predict_dataloaders
            for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
                for name, err in getattr(
                    getattr(loader, "dataset", None), "unreadable", {}
                ).items():
                    self._record_skip(name, "unreadable", err)
        step = pl_module.predict_step
        if getattr(step, "_skips_empty_batches", False):
            return

        @functools.wraps(step)  # keeps the signature Lightning inspects
        def predict_step(batch, *args, **kwargs):
            if isinstance(batch, dict) and "name" in batch and len(batch["name"]) == 0:
                return None
            return step(batch, *args, **kwargs)

        predict_step._skips_empty_batches = True
        pl_module.predict_step = predict_step

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        for name, err in batch.get("unreadable", []) if isinstance(batch, dict) else []:
            self.unreadable[name] = err
            self._record_skip(name, "unreadable", err)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        if prediction is None:
            return
        restored = prediction["restored"]
        names = prediction.get("name", batch.get("name"))
        for i, name in enumerate(names):
            img = restored[i]
            if not torch.isfinite(img).all():
                self.failed.append(name)
                log.error("skipping %s: the method's output contains NaN/inf; not written", name)
                self._record_skip(
                    name,
                    "non-finite output",
                    f"{int((~torch.isfinite(img)).sum())} values are NaN or inf",
                )
                continue
            record: dict = {"name": name}
            gt = batch["gt"][i] if "gt" in batch else None
            if gt is not None or self._no_reference:
                record["metrics"] = self._metrics(img, gt)
            extras = prediction.get("extras", {})
            record["extras"] = {k: M.jsonable(_per_sample(v, i)) for k, v in extras.items()}
            if self.save_kernels and prediction.get("kernel") is not None:
                self._write_kernel(name, prediction["kernel"][i])
            curves = {
                k: prediction[k][i]
                for k in ("loss_curve", "scale_trajectory")
                if prediction.get(k) is not None
            }
            if self.save_curves and curves:
                self._write_curves(name, curves)
                record["final_loss"] = M.jsonable(curves.get("loss_curve", torch.zeros(1))[-1])
            atomic_write_bytes(self.output_dir / "records" / f"{name}.json", M.strict_json(record))
            save_image(img, self.image_path(name))  # last: marks the image done
            (self.output_dir / "skipped" / f"{name}.json").unlink(missing_ok=True)
            self._log_grid(trainer, batch, restored, i, name)

    def _log_grid(self, trainer, batch, restored, i, name) -> None:
        from bir.callbacks.images import comparison_grid, image_loggers, log_grid

        if self._logged >= self.log_images or not image_loggers(trainer):
            return
        columns = [batch["lq"][i][None]] if "lq" in batch else []  # resized to the output's size
        columns.append(restored[i][None])
        if "gt" in batch and batch["gt"][i].shape == restored[i].shape:
            columns.append(batch["gt"][i][None])
        grid = comparison_grid(*columns)
        log_grid(trainer, "predict/images", grid, caption=f"{name}: LQ | output | GT")
        self._logged += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module.__dict__.get("predict_step"), "_skips_empty_batches", False):
            del pl_module.predict_step  # the class's method again
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            rows = self.write_summary()
            logger = trainer.logger
            if logger is not None and hasattr(logger, "log_table") and rows:
                cols = sorted({k for r in rows for k in r})
                logger.log_table(
                    key="predict/metrics",
                    columns=cols,
                    data=[[r.get(c) for c in cols] for r in rows],
                )
        if self.failed:
            raise RuntimeError(
                f"{len(self.failed)} outputs were not finite (NaN/inf) and were not written: "
                + ", ".join(self.failed[:10])
                + f"; every other image was written to {self.output_dir}"
            )

    def skipped_names(self) -> dict[str, dict]:
        """Images recorded under ``skipped/`` whose output does not exist: name -> record."""
        folder = self.output_dir / "skipped"
        out = {}
        for p in sorted(folder.rglob("*.json")) if folder.exists() else []:
            rec = json.loads(p.read_text())
            if not self.image_path(rec["name"]).exists():
                out[rec["name"]] = rec
        return out

    def write_summary(self) -> list[dict]:
        """Build metrics.csv and summary.md from every record on disk; returns the rows.

        The table is :func:`bir.metrics.summary_table` of :func:`bir.metrics.summarize_columns`
        of the rows (the values ``bir-restore`` returns to sweepers come from the same rows). The
        summary ends with the skipped images (unreadable input, non-finite output), by reason.
        """
        skipped = self.skipped_names()
        rows = []
        records = self.output_dir / "records"
        for p in sorted(records.rglob("*.json")) if records.exists() else []:
            rec = json.loads(p.read_text())
            rows.append(
                {
                    "name": rec["name"],
                    **rec.get("metrics", {}),
                    **({"final_loss": rec["final_loss"]} if "final_loss" in rec else {}),
                }
            )
        if not rows and not skipped:
            return rows
        cols = ["name"] + sorted({k for r in rows for k in r} - {"name"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.output_dir / "metrics.csv", buf.getvalue().encode())
        lines = []
        stats = M.summarize_columns(rows)
        if stats:  # no metric (no gt=): no table, not an empty one
            lines = [M.summary_table(stats)]
        lines.append(f"{len(rows)} images; output in {self.output_dir}")
        if skipped:
            reasons: dict[str, list[str]] = {}
            for name, rec in skipped.items():
                reasons.setdefault(rec.get("reason", "skipped"), []).append(name)
            lines.append(f"{len(skipped)} images skipped (details in skipped/):")
            for reason, names in sorted(reasons.items()):
                more = f" and {len(names) - 20} more" if len(names) > 20 else ""
                lines.append(f"- {reason}: {len(names)} ({', '.join(names[:20])}{more})")
        text = "\n".join(lines)
        atomic_write_bytes(self.output_dir / "summary.md", (text + "\n").encode())
        # the CLI reads the summary again after predict: show the same table only once
        if text != getattr(self, "_summary_shown", None):
            log.info("summary:\n%s", text)
            self._summary_shown = text
        return rows
