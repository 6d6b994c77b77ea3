"""One style, PNG + SVG, byte-identical on re-save (no timestamps), ci figures kept out of reports/."""
import matplotlib.pyplot as plt

from spatialstudy import plotting


def test_savefig_png_svg_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALSTUDY_ROOT", str(tmp_path))
    plotting.setup_style()

    def draw():
        fig, ax = plt.subplots()
        ax.bar(["A", "B"], [1, 2])
        return fig

    first = [p.read_bytes() for p in plotting.savefig(draw(), "bars", "smoke")]
    paths = plotting.savefig(draw(), "bars", "smoke")
    assert [p.read_bytes() for p in paths] == first
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["reports/figures/smoke/bars.png",
                                                                  "reports/figures/smoke/bars.svg"]
    ci = plotting.savefig(draw(), "bars", "ci")[0]
    assert ci.relative_to(tmp_path).parts[:2] == ("runs", "ci")
    plt.close("all")


def test_accuracy_bars_pairs_controls_and_draws_chance_per_group():
    series = {"student": {"overall": (40, 35, 45), "seen (sft)": (30, 25, 35)},
              "student blind": {"overall": (26, 22, 30), "seen (sft)": (33, 28, 38)},
              "teacher": {"overall": (50, 45, 55), "seen (sft)": (35, 30, 40)},
              "teacher blind": {"overall": (25, 21, 29), "seen (sft)": (34, 29, 39)}}
    ax = plotting.accuracy_bars(series, chance={"overall": 27.0, "seen (sft)": 33.3}, paired=True).axes[0]
    from matplotlib.container import BarContainer
    bars = [c.patches for c in ax.containers if isinstance(c, BarContainer)]
    for model, control in (bars[0:2], bars[2:4]):  # a control: its model's colour, lighter and hatched
        assert control[0].get_facecolor()[:3] == model[0].get_facecolor()[:3] == control[0].get_edgecolor()[:3]
        assert control[0].get_hatch() and not model[0].get_hatch()
        assert control[0].get_facecolor()[3] < model[0].get_facecolor()[3]
    assert bars[0][0].get_facecolor() != bars[2][0].get_facecolor()  # the two pairs tell apart
    (segments,) = [c for c in ax.collections if c.get_label() == "chance"]
    levels = sorted((round(s[0][1], 1), round(s[0][0], 2)) for s in segments.get_segments())
    assert levels == [(27.0, -0.45), (33.3, 0.55)]  # one chance segment over each group's bars
    plt.close("all")
