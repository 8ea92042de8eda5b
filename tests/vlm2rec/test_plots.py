"""The VLM2Rec diagnostics figure is readable: the eight panels sit in a grid (not one row of eight), each
with a title and axis labels; the compared pairs share their y axis. Synthetic metrics.jsonl, no model."""
import json
import math

import pytest

pytest.importorskip("matplotlib")

from vlm2rec.diagnostics import PLOT_KEYS, PLOT_LABELS, diagnostics_figure, plot_run


def _records(steps=40):
    out = []
    for step in range(1, steps + 1):
        row = {"step": step, "grad_ratio_u": 4.0 / step ** 0.5, "grad_ratio_e": 0.3 + 0.01 * step,
               "loss_text": 3.0 * math.exp(-step / 15), "loss_image": 2.0 * math.exp(-step / 25),
               "gamma": 1 + 0.3 * math.tanh(step / 10 - 1)}
        if step % 10 == 0:
            row.update({"valid_full_image_NDCG@10": 0.01 * step / 10, "valid_erank_image": 5 + step / 10,
                        "valid_erank_text": 20 - step / 10})
        out.append(row)
    return out


def test_diagnostics_grid_with_titles_labels_and_shared_y(tmp_path):
    import matplotlib.pyplot as plt
    fig = diagnostics_figure(_records(), "run x")
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert len(panels) == len(PLOT_KEYS) == 8
    grid = panels[0].get_subplotspec().get_gridspec()
    assert grid.nrows > 1 and grid.ncols < len(PLOT_KEYS)
    assert [ax.get_title() for ax in panels] == [PLOT_LABELS[k][0] for k in PLOT_KEYS]
    assert all(ax.get_xlabel() == "training step" and ax.get_ylabel() for ax in panels)
    by_key = dict(zip(PLOT_KEYS, panels))
    assert by_key["loss_text"].get_ylim() == by_key["loss_image"].get_ylim()  # compared on one scale
    assert by_key["grad_ratio_u"].get_yscale() == "log"
    plt.close(fig)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    path = plot_run(tmp_path)
    assert path == tmp_path / "diagnostics.png" and path.stat().st_size > 10_000
    assert plot_run(tmp_path / "empty-run-without-metrics") is None
