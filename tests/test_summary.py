"""`python -m dsnet.summary`: one row per width choice, figures from the analytic counter."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

import dsnet
from dsnet.summary import main

REPO = Path(__file__).resolve().parent.parent


def test_json_rows_match_the_counters(capsys):
    recipe = REPO / "configs" / "digits.yaml"
    assert main(["--json", "-c", str(recipe)]) == 0
    rows = json.loads(capsys.readouterr().out)
    values = yaml.safe_load(recipe.read_text())
    model = dsnet.create_supernet(widths=[r["width"] for r in rows], num_classes=10, small_input=True,
                                  depth_multiplier=values["depth_multiplier"])
    assert len(rows) == 14
    img_size = values["img_size"]
    for row in rows:
        assert row["madds"] == dsnet.count_madds(model, row["width"], img_size)
        assert row["params"] == dsnet.count_params(model, row["width"])
        assert row["stem"] == model.resolve_width(row["width"])["stem"]


def test_default_is_imagenet_mobilenetv2(capsys):
    assert main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["width"] == 1.0 and round(rows[-1]["madds"] / 1e6, 1) == 300.8
    assert rows[-1]["stages"] == [16, 24, 32, 64, 96, 160, 320] and rows[-1]["head"] == 1280


def test_missing_config_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsnet.summary", "-c", str(tmp_path / "no.yaml")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("error:") and result.stderr.count("\n") == 1
