"""The few plots selectune writes next to a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_heatmap(grid: list[list[float]], columns: list[str], path: Path, title: str, label: str,
                 fmt: str = "{:.1f}") -> None:
    """rows = layers, columns = module types; each cell annotated with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(grid) + 1.6))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(grid)), [f"layer {i}" for i in range(len(grid))])
    top = max((max(row) for row in grid), default=0)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, fmt.format(v), ha="center", va="center", color="white" if v < top / 2 else "black",
                    fontsize=8)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves(series: dict[str, tuple[list[float], list[float]]], path: Path, title: str, xlabel: str,
           ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
