"""Figures are written atomically, into their folder even when it does not exist yet."""
from ntm.tools.plots import line_plot


def test_a_figure_makes_its_missing_folder_and_leaves_no_temporary_file(tmp_path):
    png = tmp_path / "ood" / "iw-vs-k.png"  # the OOD bench's pictures folder before any Glow run made it
    line_plot({"IW bound": ([1, 2, 4], [1.7, 1.65, 1.6])}, png, "K", "bits/dim", log_x=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["iw-vs-k.png"]
