"""Tables and figure of the feature study: mean ± std over seeds, by pretraining images seen."""

from __future__ import annotations

import math
from pathlib import Path

from ce_pretrain.atomic import write_atomic
from transfer.study.budgets import METRIC, PAPER, ROW_TITLES, VOC


def summarise(cells: dict[str, dict]) -> dict[tuple[str, int, str], tuple[float, float, int]]:
    """``(row, images, column) → (mean, std, seeds)`` over seeds."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for cell in cells.values():
        groups.setdefault((cell["row"], cell["images"], cell["column"]), []).append(cell["score"])
    out = {}
    for k, v in groups.items():
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        out[k] = (mean, std, len(v))
    return out


def mixed_environments(cells: dict[str, dict], env: dict) -> str:
    """A sentence for the table's header when some ``cells`` were measured in another environment than ``env``
    (device, versions, CPU threads: a study resumed on another machine), else ``""``. Cells from before
    environments were recorded count as unknown."""
    other = sum(1 for c in cells.values() if c.get("environment") not in (None, env))
    unknown = sum(1 for c in cells.values() if c.get("environment") is None)
    parts = [f"{n} in {where}" for n, where in ((other, "another environment"), (unknown, "an unrecorded one")) if n]
    return f" Of its {len(cells)} cells, {' and '.join(parts)} (each cell's is in results.json)." if parts else ""


def _fmt(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def format_table(cells: dict[str, dict], rows: list[str], columns: list[str], header: str) -> str:
    """The final-weights table (each row at its most pretraining images) and the table by images seen."""
    stats = summarise(cells)
    final = {r: max((k[1] for k in stats if k[0] == r), default=0) for r in rows}
    lines = [header, "", "| pretraining | images seen | " + " | ".join(f"{c} {METRIC[c]}" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {ROW_TITLES.get(r, r)} | {final[r]:,} | "
                     + " | ".join(_fmt(stats.get((r, final[r], c))) for c in columns) + " |")
    lines += ["", "By pretraining images seen:", "", "| pretraining | images seen | "
              + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in rows:
        for images in sorted({k[1] for k in stats if k[0] == r}):
            lines.append(f"| {ROW_TITLES.get(r, r)} | {images:,} | "
                         + " | ".join(_fmt(stats.get((r, images, c))) for c in columns) + " |")
    voc = [c for c in columns if c in VOC]
    if voc:
        lines += ["", "Paper, Table 2 (AlexNet, full budget), VOC cls / det / seg: "
                  + "; ".join(f"{ROW_TITLES[r]} {' / '.join(map(str, v))}" for r, v in PAPER.items())]
    return "\n".join(lines)


def plot(cells: dict[str, dict], rows: list[str], columns: list[str], path: Path, title: str) -> None:
    """Score against pretraining images seen, one panel per column, one line per row (random rows dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(cells)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    most = max((k[1] for k in stats), default=1) or 1
    for ax, column in zip(axes[0], columns):
        for i, r in enumerate(rows):
            pts = sorted((k[1], v) for k, v in stats.items() if k[0] == r and k[2] == column)
            if not pts:
                continue
            color = f"C{i}"
            if len(pts) == 1 and pts[0][0] == 0:  # an initialisation: a level to beat
                mean, std, _ = pts[0][1]
                ax.axhline(mean, color=color, ls="--", label=ROW_TITLES.get(r, r))
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
                continue
            xs = [x for x, _ in pts]
            ax.errorbar(xs, [s[0] for _, s in pts], yerr=[s[1] for _, s in pts], marker="o", color=color,
                        capsize=3, label=ROW_TITLES.get(r, r))
        ax.set_xlim(0, most * 1.05)
        ax.set_title(f"{column} ({METRIC[column]})")
        ax.set_xlabel("pretraining images seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
