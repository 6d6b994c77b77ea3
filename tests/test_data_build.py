"""build_datasets (the notebook's one call) and the figure helpers, at tiny sizes."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from spatialstudy.data import build_datasets, load_omnispatial, make_items  # noqa: E402
from spatialstudy.data import viz  # noqa: E402


def test_build_procedural_then_local(tmp_path):
    s = build_datasets(tmp_path / "run", n_train=12, n_test=4, n_omni=24, seed=1, measure_throughput=False)
    assert s["spacethinker"]["train"] == 12 and s["spacethinker"]["test"] == 4
    assert s["omnispatial"]["n"] == 24 and s["omnispatial"]["report"]["n_skipped"] == 0
    assert sum(s["omnispatial"]["letter"].values()) == 24 and s["spacethinker"]["mcq"]["converted"] == 12
    local = build_datasets(tmp_path / "other", source={"spacethinker": s["spacethinker"]["path"],
                                                        "omnispatial": s["omnispatial"]["path"]},
                           measure_throughput=False)
    assert local["source"] == "local" and local["omnispatial"]["family"] == s["omnispatial"]["family"]
    assert not (tmp_path / "other").exists()                     # local copies are read, nothing written


def test_figures(tmp_path):
    its = make_items(4, seed=0, keep_scene=True)
    s = build_datasets(tmp_path, n_train=4, n_test=2, n_omni=12, measure_throughput=False)
    recs = load_omnispatial(s["omnispatial"]["path"])
    figs = [viz.example_grid(its), viz.example_grid(recs, n=4), viz.scene_figure(its[0].scene),
            viz.grayscale_figure([it.image for it in its]),
            viz.distribution_figure({"family": [r.family for r in recs], "letter": s["omnispatial"]["letter"]})]
    for f in figs:
        assert f.axes
        plt.close(f)
