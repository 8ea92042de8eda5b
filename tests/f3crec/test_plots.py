"""The F3CRec compare figures are readable: the a-matrix heat-maps sit in a grid (not one long row) on one
shared colour scale with one colorbar, with titles and axis labels. Synthetic a-matrices, no training."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from typing import get_args

from f3crec.compare import a_matrix_figure, plots
from f3crec.config import MethodName
from f3crec.evaluate import summarise


def _results(methods, seeds=2, blocks=4):
    rng = np.random.default_rng(0)
    out = {}
    for k, method in enumerate(methods):  # each method its own value range: separate scales would hide that
        out[method] = [{"summary": summarise([[{"ndcg": 0.02 * k + 0.1 * rng.random(), "recall": rng.random()}
                                               for _ in range(t + 1)] for t in range(blocks)])}
                       for _ in range(seeds)]
    return out


def test_a_matrix_heatmaps_grid_one_shared_scale(tmp_path):
    import matplotlib.pyplot as plt
    methods = list(get_args(MethodName))  # all nine, as in the committed docs figures
    assert len(methods) > 3
    results = _results(methods)
    fig = a_matrix_figure(results)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(methods)
    assert panels[0].get_subplotspec().get_gridspec().nrows > 1  # a grid, not one row
    norms = {(im.norm.vmin, im.norm.vmax) for ax in panels for im in ax.images}
    assert len(norms) == 1  # one colour scale for every method
    values = [c for runs in results.values() for t in range(4) for c in
              np.mean([r["summary"]["ndcg"]["a"][t] for r in runs], axis=0)]
    assert norms.pop() == pytest.approx((min(values), max(values)))
    colorbars = [ax for ax in fig.axes if ax not in panels and ax.get_visible() and ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1
    assert {ax.get_title() for ax in panels} == set(methods)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    assert fig._suptitle is not None and "NDCG@20" in fig._suptitle.get_text()
    plt.close(fig)
    written = plots(results, tmp_path)
    assert [p.name for p in written] == ["a_matrix_ndcg20.png", "la_ra_per_block.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
