"""Plot helpers every report figure goes through (a library module: what a report shows is fingerprinted
with the stage that draws it)."""

from __future__ import annotations

from typing import Any


def subplots(**kwargs: Any):
    """matplotlib `subplots` on the non-interactive Agg backend (workers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def integer_ticks(axis) -> None:
    """Ticks only at integers, for an axis that counts (steps, indices)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def figure_png(fig) -> bytes:
    """Render and close a figure; PNG bytes go into the store and the run report."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
