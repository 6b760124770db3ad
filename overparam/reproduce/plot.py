"""The experiment figure: training loss minus its optimum on a log axis against iterations, one panel per loss."""

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from overparam.reproduce.runs import ExperimentRuns  # noqa: E402

BAND_DESCRIPTION = "line: geometric mean over seeds; band: minimum to maximum over seeds"


def plot_experiment(runs: ExperimentRuns, path: Path) -> Path:
    """Draw every panel of the experiment into one PNG at ``path``.

    Each model at its chosen rate is a line with a band over seeds (``BAND_DESCRIPTION``).
    An end-to-end emulation is dashed, in the color of the network it emulates. A seed that diverged ends in a cross at its last finite gap, drawn at the top of the axis when that gap is above it.
    """
    spec = runs.spec
    panels = spec.panels
    width = max(8.0, 6.2 * len(panels))
    figure, axes = plt.subplots(1, len(panels), figsize=(width, 4.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for axis, panel in zip(axes[0], panels):
        model_colors: dict[str, str] = {}
        for model in spec.panel_models(panel):
            if not model.is_end_to_end:
                model_colors[model.key] = colors[len(model_colors) % len(colors)]
        for model in spec.panel_models(panel):
            result = runs.models[model.key]
            # An emulation shares the color of the network it emulates.
            color = model_colors.get(model.emulates if model.is_end_to_end else model.key, "black")
            style = "--" if model.is_end_to_end else "-"
            curves = result.curves
            if curves is None:
                axis.plot([], [], style, color=color, label=f"{model.label} (every lr diverged)")
                continue

            lr = result.choice.lr
            tuned = "tuned " if model.tuned else ""
            axis.plot(curves.iterations, curves.central(), style, color=color, lw=1.6,
                      label=f"{model.label} ({tuned}lr {lr:.3g})")
            low, high = curves.band()
            axis.fill_between(curves.iterations, low, high, color=color, alpha=0.18, lw=0)

            for column, diverged_at in enumerate(curves.diverged_at):
                if diverged_at is None:
                    continue
                finite = np.flatnonzero(np.isfinite(curves.gaps[:, column]))
                if finite.size:
                    last = finite[-1]
                    top = 2.5 * np.nanmax(curves.gaps[0])
                    height = min(max(curves.gaps[last, column], curves.floor), top)
                    axis.plot(curves.iterations[last], height, "x", color=color, ms=8, mew=2)

        # A run that blows up before it is frozen would stretch the axis over many decades, so the
        # top of the axis sits a little above the largest starting gap.
        starts = [
            float(np.nanmax(runs.models[model.key].curves.gaps[0]))
            for model in spec.panel_models(panel)
            if runs.models[model.key].curves is not None and np.isfinite(runs.models[model.key].curves.gaps[0]).any()
        ]
        axis.set_yscale("log")
        if starts:
            axis.set_ylim(top=3.0 * max(starts))
        axis.set_xlabel("iteration")
        axis.set_ylabel("training loss - optimum L*")
        axis.set_title(panel.title)
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(fontsize=8)

    scale_note = "" if runs.settings.scale == 1 else f" (scale {runs.settings.scale:g}: shortened horizon)"
    # About 14 characters of a 10-point title fit in an inch of figure width.
    title = textwrap.fill(f"{spec.title}{scale_note}", width=int(width * 14))
    figure.suptitle(f"{title}\n{BAND_DESCRIPTION}, {len(runs.seeds)} seeds", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
