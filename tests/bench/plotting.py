"""What every benchmark plot shares: matplotlib without a display, the look of an axis against
a size or a count, and writing the figure where the report lists it."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend (the benchmarks run without a display); imported
    only when a report is drawn, since only `make bench` needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def style(axes, xlabel: str, log_base: int = 10, legend_size: int | None = 8) -> None:
    """A log x axis with its label and grid, and each axis's legend (none: no legend)."""
    for ax in axes:
        ax.set_xscale("log", base=log_base)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        if legend_size is not None:
            ax.legend(loc="best", fontsize=legend_size)


def save(fig, path: Path, written: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    written.append(str(path))
