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
