import csv
import io
import subprocess
import sys

from cbam.cli import main


def test_info_prints_ours_beside_the_papers(capsys):
    assert main(["info", "--models", "resnet50", "mobilenet_v1"]) == 0
    out = capsys.readouterr().out
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): line
        for line in out.splitlines()
        if line.startswith("| ")
    }
    assert "| 28.09 | 28.09 |" in rows[("resnet50", "cbam")]
    assert "| 2.71 | 2.71 |" in rows[("mobilenet_v1(width_mult=0.7)", "se")]
    assert "| 4.23 |  |" in rows[("mobilenet_v1(width_mult=1.0)", "none")]  # no paper figure
    assert "flop_counter" in out


def test_info_csv(capsys):
    assert (
        main(["info", "--models", "resnet20", "--attentions", "none", "bam", "--format", "csv"])
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["attention"] for r in rows] == ["none", "bam"]
    assert rows[0]["params (M)"] == "0.27" and rows[0]["input"] == "32x32"
    assert float(rows[1]["+GMACs vs none"]) > 0


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "--models", "resnet5O"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet5O'" in err and "resnet50" in err


def test_console_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "cbam", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("cbam ")
