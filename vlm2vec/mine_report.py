"""The mining report (vlm2vec/mine.py): per subset the rows, pool size, candidates each step removed,
rows left with fewer than K negatives and the positive / negative score distributions, as
`mining_report.json`, `mining_report.md` and `scores.png`.

matplotlib is not an install dependency of the trainer (it is in the `dev` and `bench` extras): without
it the histograms stay in the JSON (bin edges and counts) and the markdown says the PNG was skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

HIST_BINS = 40


def histogram(values: list[float], edges: np.ndarray) -> list[int]:
    return (
        np.histogram(np.asarray(values, dtype=np.float64), bins=edges)[0].tolist()
        if values
        else [0] * (len(edges) - 1)
    )


def subset_entry(
    rows: int, pool_size: int, k: int, pos_scores: list[float], neg_scores: list[list[float]], removed: dict
) -> dict[str, Any]:
    """One subset's numbers for the report."""
    flat = [s for row in neg_scores for s in row]
    counts = [len(r) for r in neg_scores]
    both = np.asarray(pos_scores + flat, dtype=np.float64)
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, HIST_BINS + 1)
    return {
        "rows": rows,
        "pool_size": pool_size,
        "removed": removed,
        "rows_with_fewer_than_k": sum(c < k for c in counts),
        "rows_with_no_negative": sum(c == 0 for c in counts),
        "negatives_written": len(flat),
        "mean_positive_score": float(np.mean(pos_scores)) if pos_scores else None,
        "mean_negative_score": float(np.mean(flat)) if flat else None,
        "histogram": {
            "edges": edges.tolist(),
            "positive": histogram(pos_scores, edges),
            "negative": histogram(flat, edges),
        },
    }


def write_report(out: Path, report: dict[str, Any]) -> None:
    """mining_report.json, mining_report.md and (matplotlib permitting) scores.png under `out`."""
    png = _plot(out / "scores.png", report["subsets"])
    report["histogram_png"] = "scores.png" if png else None
    (out / "mining_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "mining_report.md").write_text(render(report, png))


def render(report: dict[str, Any], png: bool) -> str:
    s = report["settings"]
    lines = [
        f"# Mined hard negatives: {report['model']}",
        "",
        f"Data `{report['data']}`, K = {s['num_negatives']}, pool per {s['pool']}, rank window "
        f"{s['rank_range'][0]}:{s['rank_range'][1]}, max_score_ratio {s['max_score_ratio']}, margin "
        f"{s['margin']}, sampling {s['sampling']} (seed {s['seed']}). Removed: candidates dropped per "
        "row, summed over rows.",
        "",
        "| subset | rows | pool | removed: own positive / same item | max_score_ratio | margin | rows < K | "
        "rows with none | mean pos | mean neg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in report["subsets"].items():
        r = e["removed"]
        lines.append(
            f"| {name} | {e['rows']} | {e['pool_size']} | {r['own_positive_or_same_item']} | "
            f"{r['max_score_ratio']} | {r['margin']} | {e['rows_with_fewer_than_k']} | "
            f"{e['rows_with_no_negative']} | {_fmt(e['mean_positive_score'])} | "
            f"{_fmt(e['mean_negative_score'])} |"
        )
    lines.append("")
    lines.append(
        "Score histograms: `scores.png`."
        if png
        else "Score histograms: in mining_report.json (matplotlib is "
        "not installed, so no scores.png; `pip install matplotlib` to get it)."
    )
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plot(path: Path, subsets: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(subsets)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, e) in zip(axes.flat, subsets.items()):
        h = e["histogram"]
        edges = np.asarray(h["edges"])
        mids, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        ax.bar(mids, h["positive"], width=width, alpha=0.6, label="positive")
        ax.bar(mids, h["negative"], width=width, alpha=0.6, label="mined negatives")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
