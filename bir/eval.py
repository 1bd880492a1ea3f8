"""``bir-eval``: metrics between a folder of outputs and a folder of ground truths.

    bir-eval pred=DIR gt=DIR metrics=[psnr,ssim,lpips] crop_border=0 y_channel=false out=FILE.csv

Files are matched by stem (relative path without suffix: ``sub/img01.png`` matches
``sub/img01.jpg``); two files of one stem in a folder (``dup.jpg``, ``dup.png``) are an error
listing every collision, before any work, as in ``bir-restore`` and ``bir-degrade``
(:func:`bir.data.io.index_by_name`). Unmatched files, size mismatches, unreadable files and
metrics that fail on an image (SSIM on an image under 11x11) are reported per row and counted in
the summary; evaluation carries on. Metric names come from the one table
:data:`bir.metrics.METRICS`. Per-image rows go to ``out`` (CSV; the infinite PSNR of an output
identical to its ground truth is written ``inf``), the summary (mean, std, count per metric;
counts of problems; folder metrics such as FID) to ``<out stem>.summary.md`` and
``.summary.json`` (strict: a non-finite value is ``null``) and is printed as a table. Means leave
non-finite values out and count them (``nonfinite``), as every bir summary does
(:mod:`bir.metrics.summary`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bir import metrics as M
from bir.data.io import (
    ImageReadError,
    atomic_write_bytes,
    check_writable_folder,
    index_by_name,
    read_image,
)
from bir.errors import UsageError

log = logging.getLogger(__name__)

#: Row statuses; every status other than "ok" is counted in the summary. "metric_error": a
#: metric failed on this image (its message is in ``error``); the others' values are kept.
STATUSES = ("ok", "unmatched_pred", "unmatched_gt", "size_mismatch", "unreadable", "metric_error")


@dataclass
class FolderMatch:
    """Result of matching two folders by stem."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (stem, pred, gt)
    only_pred: list[tuple[str, Path]] = field(default_factory=list)
    only_gt: list[tuple[str, Path]] = field(default_factory=list)


def match_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike | None) -> FolderMatch:
    """Pair images of ``pred_dir`` and ``gt_dir`` by relative path without suffix.

    With ``gt_dir=None`` every prediction is "unmatched" (no-reference evaluation). Two files of
    one stem in either folder raise :class:`bir.data.io.DuplicateNameError` listing them.
    """
    match = FolderMatch()
    preds = index_by_name(pred_dir)
    gts = index_by_name(gt_dir) if gt_dir is not None else {}
    for stem, p in preds.items():
        if stem in gts:
            match.pairs.append((stem, p, gts[stem]))
        else:
            match.only_pred.append((stem, p))
    match.only_gt = [(s, p) for s, p in gts.items() if s not in preds]
    return match


def _read(path: Path) -> tuple[torch.Tensor | None, str | None]:
    try:
        return read_image(path), None
    except ImageReadError as err:
        return None, str(err)


def _readable_images(paths: Sequence[Path]) -> Iterator[torch.Tensor]:
    for p in paths:
        img, _ = _read(p)
        if img is not None:
            yield img


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike | None,
    metrics: Sequence[str] = ("psnr", "ssim"),
    crop_border: int = 0,
    y_channel: bool = False,
    device: torch.device | str = "cpu",
    weights: Mapping[str, str | None] | None = None,
    feature_extractor: nn.Module | None = None,
    kid_subset_size: int = 1000,
) -> tuple[list[dict], dict]:
    """Evaluate every prediction against the ground truth with the same stem.

    Args:
        pred_dir: folder of restored images (searched recursively).
        gt_dir: folder of ground truths, or None for no-reference metrics only.
        metrics: names from ``bir.metrics.FULL_REFERENCE_METRICS`` (per image, need ``gt_dir``),
            ``DISTRIBUTION_METRICS`` (FID/KID between the folders) and ``NO_REFERENCE_METRICS``
            (per prediction, pyiqa).
        crop_border, y_channel: PSNR/SSIM options (BasicSR conventions).
        device: where metrics run.
        weights: local weights files by key (``lpips_alex``, ``lpips_vgg``, ``dists``,
            ``inception``, ``niqe``, ...); missing keys fall back to ``$BIR_WEIGHTS/<release name>``.
        feature_extractor: FID/KID feature network instead of Inception.
        kid_subset_size: KID subset size (clipped to the number of images).
    Returns:
        ``rows``: one dict per file (``name``, ``status``, metric values, ``error``), and
        ``summary``: ``{"metrics": {name: {mean, std, count, nonfinite}}, "distribution":
        {fid, kid, kid_std}, "counts": {status: n}, ...settings}``.
    """
    weights = dict(weights or {})
    metrics = M.check_metric_names(metrics)
    full_ref = [m for m in metrics if m in M.FULL_REFERENCE_METRICS]
    no_ref = [m for m in metrics if m in M.NO_REFERENCE_METRICS]
    dist = [m for m in metrics if m in M.DISTRIBUTION_METRICS]
    if gt_dir is None and (full_ref or dist):
        raise UsageError(f"metrics {full_ref + dist} need a ground-truth folder (gt=DIR)")
    device = torch.device(device)

    fr_fns = {m: M.per_image_metric(m, weights, crop_border, y_channel) for m in full_ref}
    nr_models = {m: M.per_image_metric(m, weights, device=device) for m in no_ref}
    acc = M.MetricAccumulator(full_ref + no_ref).to(device)

    match = match_folders(pred_dir, gt_dir)
    rows: list[dict] = []
    for stem, p, g in match.pairs:
        row: dict = {"name": stem, "status": "ok", "pred": str(p), "gt": str(g)}
        x, err_x = _read(p)
        y, err_y = _read(g)
        if x is None or y is None:
            row.update(status="unreadable", error="; ".join(e for e in (err_x, err_y) if e))
        elif x.shape != y.shape:
            row.update(
                status="size_mismatch",
                error=f"pred {tuple(x.shape[1:])} vs gt {tuple(y.shape[1:])}",
            )
        else:
            _score(row, x[None].to(device), y[None].to(device), fr_fns, nr_models, acc)
        rows.append(row)
    for stem, p in match.only_pred:
        row = {"name": stem, "status": "unmatched_pred", "pred": str(p), "gt": ""}
        if gt_dir is None and no_ref:  # no-reference evaluation: every prediction counts
            x, err = _read(p)
            if x is None:
                row.update(status="unreadable", error=err)
            else:
                row["status"] = "ok"
                _score(row, x[None].to(device), None, {}, nr_models, acc)
        rows.append(row)
    rows += [
        {"name": s, "status": "unmatched_gt", "pred": "", "gt": str(p)} for s, p in match.only_gt
    ]
    rows.sort(key=lambda r: (r["name"], r["status"]))

    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    for r in rows:
        if r["status"] != "ok":
            log.warning("%s: %s %s", r["name"], r["status"], r.get("error", ""))
    summary: dict = {
        "pred_dir": str(pred_dir),
        "gt_dir": None if gt_dir is None else str(gt_dir),
        "crop_border": crop_border,
        "y_channel": y_channel,
        "metrics": acc.compute() if (full_ref or no_ref) else {},
        "distribution": {},
        "counts": counts,
    }
    if dist:
        ok_pred = [Path(r["pred"]) for r in rows if r["pred"]]
        gt_files = [Path(r["gt"]) for r in rows if r["gt"]]
        summary["distribution"] = M.distribution_metrics(
            _readable_images(ok_pred),
            _readable_images(gt_files),
            metrics=dist,
            feature_extractor=feature_extractor,
            inception_weights=weights.get("inception"),
            kid_subset_size=kid_subset_size,
            device=device,
        )
    return rows, summary


def _score(
    row: dict,
    x: torch.Tensor,
    y: torch.Tensor | None,
    full_ref: Mapping[str, Callable],
    no_ref: Mapping[str, nn.Module],
    acc: M.MetricAccumulator,
) -> None:
    """Run each metric on one image (``x``, ``y``: [1, 3, H, W]); a metric that fails (e.g. SSIM
    on a 1x1 image) leaves its message in the row (status "metric_error"), the others count."""
    values, errors = {}, []
    for m, fn in [*full_ref.items(), *no_ref.items()]:
        try:
            values[m] = fn(x, y) if m in full_ref else fn(x)
        except (ValueError, RuntimeError) as err:
            errors.append(f"{m}: {err}")
    acc.update(values)
    row.update({m: float(v[0]) for m, v in values.items()})
    if errors:
        row.update(status="metric_error", error="; ".join(errors))


def summary_markdown(summary: dict) -> str:
    """The summary as a Markdown table (:func:`bir.metrics.summary_table`: metric, mean, std,
    count, non-finite values left out) plus the problem counts."""
    counts = ", ".join(f"{k}: {v}" for k, v in summary["counts"].items())
    crop = f"crop_border={summary['crop_border']}, y_channel={summary['y_channel']}"
    return (
        M.summary_table(summary["metrics"], summary["distribution"])
        + f"\nfiles: {counts}\npred: {summary['pred_dir']}  gt: {summary['gt_dir']}  {crop}\n"
    )


def write_results(
    rows: list[dict], summary: dict, out: str | os.PathLike
) -> tuple[Path, Path, Path]:
    """Write ``out`` (CSV), ``<out stem>.summary.md`` and ``.summary.json`` atomically."""
    out = Path(out)
    fixed = ["name", "status"]
    metric_cols = sorted({k for r in rows for k in r} - {"name", "status", "pred", "gt", "error"})
    cols = fixed + metric_cols + ["pred", "gt", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out, buf.getvalue().encode())
    base = out.with_suffix("") if out.suffix else out
    md, js = Path(f"{base}.summary.md"), Path(f"{base}.summary.json")
    atomic_write_bytes(md, summary_markdown(summary).encode())
    atomic_write_bytes(js, M.strict_json(summary))
    return out, md, js


def evaluate(cfg: DictConfig) -> dict:
    """The body of ``bir-eval``: evaluate, write the files, print the summary table."""
    weights = OmegaConf.to_container(cfg.weights, resolve=True) if cfg.get("weights") else {}
    check_writable_folder(Path(cfg.out).parent, key="out (its folder)")  # before any work
    rows, summary = evaluate_folders(
        cfg.pred,
        cfg.gt,
        metrics=list(cfg.metrics),
        crop_border=int(cfg.crop_border),
        y_channel=bool(cfg.y_channel),
        device=cfg.device,
        weights=weights,
        kid_subset_size=int(cfg.kid_subset_size),
    )
    out, md, js = write_results(rows, summary, cfg.out)
    print(summary_markdown(summary))
    print(f"per-image rows: {out}\nsummary: {md}, {js}")
    return summary


if __name__ == "__main__":  # python -m bir.eval: the bir-eval console script
    from bir.cli import eval_main

    eval_main()
