"""`ntm report`: every table rebuilt from the results JSON, markers filled, nothing else touched."""
import json
import shutil
from pathlib import Path

from ntm.bench.report import fill_markers
from ntm.bench.tables import table_for
from ntm.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_tables_are_what_their_json_gives():
    for file in sorted((ROOT / "results").glob("*.json")):
        assert file.with_suffix(".md").read_text() == table_for(json.loads(file.read_text())), file.name


def test_report_fills_markers_and_rewrites_tables(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "docs").mkdir()
    src = ROOT / "results" / "toy.json"
    shutil.copy(src, tmp_path / "results" / "toy.json")
    stale = table_for(json.loads(src.read_text())).splitlines()[0] + "\n| an old row |\n"
    (tmp_path / "results" / "toy.md").write_text(stale)
    (tmp_path / "README.md").write_text("intro\n<!-- results: results/toy.json -->\nold table\n<!-- /results -->\nend\n")
    (tmp_path / "docs" / "a.md").write_text("no markers here\n")
    assert main(["report", "--root", str(tmp_path)]) == 0
    table = table_for(json.loads(src.read_text()))
    assert (tmp_path / "results" / "toy.md").read_text() == table
    assert (tmp_path / "README.md").read_text() == f"intro\n<!-- results: results/toy.json -->\n{table}<!-- /results -->\nend\n"
    assert (tmp_path / "docs" / "a.md").read_text() == "no markers here\n"
    assert "1 marked tables" in capsys.readouterr().out
    (tmp_path / "docs" / "b.md").write_text("<!-- results: results/missing.json -->\n<!-- /results -->\n")
    assert main(["report", "--root", str(tmp_path)]) == 1
    assert "missing.json" in capsys.readouterr().err and (tmp_path / "docs" / "b.md").read_text().endswith("-->\n")
    assert fill_markers("plain text", tmp_path) == ("plain text", 0)


def test_a_rows_marker_keeps_the_main_image_table_only(tmp_path):
    (tmp_path / "results").mkdir()
    shutil.copy(ROOT / "results" / "mnist.json", tmp_path / "results" / "mnist.json")
    full, n = fill_markers("<!-- results: results/mnist.json -->\n<!-- /results -->\n", tmp_path)
    rows, m = fill_markers("<!-- results: results/mnist.json rows -->\n<!-- /results -->\n", tmp_path)
    assert n == m == 1 and "Per-step uniform ELBO" in full and "Per-step uniform ELBO" not in rows
    body = rows.split("-->\n", 1)[1]
    assert full.split("-->\n", 1)[1].startswith(body.split("<!-- /results")[0])


def test_report_leaves_files_it_did_not_write_alone(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    shutil.copy(ROOT / "results" / "toy.json", tmp_path / "results" / "notes.json")
    (tmp_path / "results" / "notes.md").write_text("my notes\n")  # a user's file beside a bench result
    (tmp_path / "results" / "settings.json").write_text('{"lr": 0.001}')  # not a bench result
    assert main(["report", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "results" / "notes.md").read_text() == "my notes\n"
    assert not (tmp_path / "results" / "settings.md").exists()
    out = capsys.readouterr().out
    assert "0 results tables" in out and "results/notes.json" in out and "results/settings.json" in out
    (tmp_path / "results" / "broken.json").write_text("{not json")
    assert main(["report", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "broken.json" in err and len(err.strip().splitlines()) == 1
