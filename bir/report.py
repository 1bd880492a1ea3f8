"""``bir-report``: one table (CSV and Markdown) and a plot for a Hydra multirun folder.

    bir-report multirun/restore/2026-11-23_10-00-00 [--metrics psnr lpips] [--out DIR]

Every job folder of the sweep holds ``.hydra/overrides.yaml`` (what was swept) and
``.hydra/config.yaml``. Metrics come from the job's predict summary (``<output>/metrics.csv``,
averaged over images) or from its training logs (``csv/metrics.csv``, last logged value of each
column), whichever exists. The plot shows each metric against the swept value that varies, one line
per setting of the other swept keys (e.g. PSNR against guidance scale, adaptive vs fixed).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import yaml

from bir.data.io import atomic_write_bytes


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def job_metrics(job: Path, config: dict) -> dict[str, float]:
    """Mean of each numeric column over images (predict) or last logged values (training)."""
    out: dict[str, float] = {}
    output = config.get("output")
    candidates = [Path(output) / "metrics.csv"] if isinstance(output, str) else []
    candidates += [job / "images" / "metrics.csv"]
    for path in candidates:
        if path.is_file():
            rows = _read_csv(path)
            cols = defaultdict(list)
            for r in rows:
                for k, v in r.items():
                    if k != "name" and _num(v) is not None:
                        cols[k].append(_num(v))
            out.update({k: sum(v) / len(v) for k, v in cols.items() if v})
            out["images"] = float(len(rows))
            return out
    train_csv = job / "csv" / "metrics.csv"
    if train_csv.is_file():
        for r in _read_csv(train_csv):
            for k, v in r.items():
                if _num(v) is not None and k not in ("epoch",):
                    out[k] = _num(v)
    return out


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job: its overrides (as columns) and its metrics."""
    rows = []
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job = ov.parent.parent
        overrides = yaml.safe_load(ov.read_text()) or []
        cfg_path = job / ".hydra" / "config.yaml"
        config = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        row: dict = {"job": str(job.relative_to(sweep_dir))}
        for o in overrides:
            key, _, value = o.partition("=")
            if key.lstrip("+~") in ("input", "output", "gt", "ckpt", "sweep"):
                continue
            row[key.lstrip("+~")] = value
        row.update(job_metrics(job, config or {}))
        rows.append(row)
    return rows


def swept_keys(rows: list[dict], metric_keys: set[str]) -> list[str]:
    keys = [k for k in rows[0] if k != "job" and k not in metric_keys] if rows else []
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict], x_key: str, group_keys: list[str], metrics: list[str], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(str(r.get(k)) for k in group_keys)].append(r)
    for ax, m in zip(axes[0], metrics):
        for g, rs in sorted(groups.items()):
            pts = sorted((_num(r.get(x_key)), r.get(m)) for r in rs
                         if _num(r.get(x_key)) is not None and r.get(m) is not None)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), marker="o", label=", ".join(g) or None)
        ax.set_xlabel(x_key)
        ax.set_ylabel(m)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def report(
    sweep_dir: str | Path, metrics: list[str] | None = None, out: str | Path | None = None
) -> dict:
    """Write ``report.csv``, ``report.md`` and ``report.png`` for a multirun folder."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no Hydra job folders (.hydra/overrides.yaml) under {sweep_dir}")
    out = Path(out) if out else sweep_dir
    metric_keys = {k for r in rows for k in r} - {
        k for r in rows for k in r if not isinstance(r[k], float)
    }
    swept = swept_keys(rows, metric_keys)
    chosen = [m for m in (metrics or sorted(metric_keys)) if m in metric_keys]
    columns = [
        "job",
        *[k for k in rows[0] if k not in metric_keys and k != "job"],
        *sorted(metric_keys),
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "report.csv", buf.getvalue().encode())
    md = to_markdown(rows, columns)
    atomic_write_bytes(out / "report.md", md.encode())
    numeric_swept = [k for k in swept if all(_num(r.get(k)) is not None for r in rows)]
    if numeric_swept and chosen:
        x = numeric_swept[0]
        plot(rows, x, [k for k in swept if k != x], chosen, out / "report.png")
    print(md)
    return {"rows": rows, "swept": swept, "metrics": chosen}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bir-report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="a Hydra multirun folder")
    p.add_argument("--metrics", nargs="*", default=None, help="metrics to plot (default: all)")
    p.add_argument("--out", default=None, help="where to write report.* (default: sweep_dir)")
    a = p.parse_args(argv)
    report(a.sweep_dir, a.metrics, a.out)


if __name__ == "__main__":
    main()
