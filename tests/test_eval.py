"""eval.py: sweep and static evaluation of a checkpoint, its reports, and its one-line errors."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

import dsnet
from conftest import DIGITS_MODEL, DIGITS_SIZE
from dsnet import evaluate
from dsnet.checkpoint import load_checkpoint, save_checkpoint, supernet_from_checkpoint
from dsnet.cli import run_main
from dsnet.data import DataOptions, build_dataset, build_loader, calibration_batches
from dsnet.report import CSV_COLUMNS

REPO = Path(__file__).resolve().parents[1]
# CPU and one thread: the same figures on every machine, and no thread contention on a shared one.
QUIET = ["--device", "cpu", "--threads", "1", "--no-progress"]


def run_eval(args, capsys):
    """Run the command as `python eval.py` would, in-process: (exit status, stdout, stderr). `args` come last, so
    they may override QUIET's flags."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(evaluate.main, [str(a) for a in QUIET + list(args)])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def validation_loader(checkpoint_path, batch_size=128):
    opts = DataOptions.from_config(load_checkpoint(checkpoint_path)["config"])
    return build_loader(build_dataset(opts, train=False), batch_size, train=False)


@pytest.fixture(scope="module")
def sweep_dir(digits_checkpoint, tmp_path_factory):
    """A sweep of every width of the digits checkpoint, with JSON, CSV and plot (reference points, log axis)."""
    out = tmp_path_factory.mktemp("sweep")
    (out / "reference.csv").write_text("label,madds,top1\nbaseline,5e6,90\nlarger,2.5e7,96.5\n")
    args = ["--mode", "sweep", "--checkpoint", digits_checkpoint, "--no-latency", "--json", out / "sweep.json",
            "--csv", out / "sweep.csv", "--plot", out / "sweep.png", "--reference", out / "reference.csv",
            "--log-madds"]
    assert evaluate.main([str(a) for a in args] + QUIET) == 0
    return out


@pytest.fixture(scope="module")
def sweep_report(sweep_dir):
    return json.loads((sweep_dir / "sweep.json").read_text())


def test_sweep_matches_a_loop_over_the_dense_subnets(digits_checkpoint, sweep_report):
    model = supernet_from_checkpoint(load_checkpoint(digits_checkpoint), "model")
    loader = validation_loader(digits_checkpoint)
    assert [row["width"] for row in sweep_report["rows"]] == list(model.widths)
    for row in sweep_report["rows"]:
        dense = dsnet.export_subnet(model, row["width"])
        correct1 = correct5 = count = 0
        loss = 0.0
        with torch.no_grad():
            for images, targets in loader:
                logits = dense(images)
                top5 = logits.topk(5, dim=1).indices
                correct1 += (top5[:, 0] == targets).sum().item()
                correct5 += (top5 == targets[:, None]).any(dim=1).sum().item()
                loss += F.cross_entropy(logits, targets, reduction="sum").item()
                count += len(targets)
        assert sweep_report["num_samples"] == count == 360
        assert row["top1"] == 100.0 * correct1 / count
        assert row["top5"] == 100.0 * correct5 / count
        assert row["loss"] == pytest.approx(loss / count, abs=1e-5)
        assert row["params"] == dsnet.count_params(model, row["width"])
        assert row["madds"] == dsnet.count_madds(model, row["width"], img_size=DIGITS_SIZE)
        assert row["top1"] > 30, "a trained width should be well above chance"
    assert sweep_report["weights"] == "model" and sweep_report["dataset"] == "digits"


def test_json_report_validates_and_csv_holds_the_same_rows(sweep_dir, sweep_report):
    evaluate.validate_report(sweep_report)
    assert sweep_report["latency"] is None and sweep_report["mode"] == "sweep"
    with open(sweep_dir / "sweep.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(sweep_report["rows"])
    for record, row in zip(records, sweep_report["rows"]):
        assert set(record) == set(CSV_COLUMNS)
        assert record["kind"] == row["kind"] == "width" and record["label"] == row["label"]
        assert record["plan"] == "" and "plan" not in row
        for key in ("width", "top1", "top5", "loss"):
            assert float(record[key]) == row[key]
        for key in ("params", "madds", "bn_recalibration_batches"):
            assert int(record[key]) == row[key]
        assert record["latency_ms_b1"] == record["latency_ms_bN"] == ""


def test_validator_names_what_is_wrong(sweep_report):
    missing = json.loads(json.dumps(sweep_report))
    del missing["rows"][1]["top5"]
    with pytest.raises(ValueError, match=r"rows\[1\] lacks key 'top5'"):
        evaluate.validate_report(missing)
    wrong_type = json.loads(json.dumps(sweep_report))
    wrong_type["rows"][0]["madds"] = "22M"
    with pytest.raises(ValueError, match="madds"):
        evaluate.validate_report(wrong_type)
    latency_without_figures = json.loads(json.dumps(sweep_report))
    latency_without_figures["latency"] = {"batch_size": 32, "repeats": 10, "warmup": 3, "freed_memory_kept": True}
    with pytest.raises(ValueError, match="latency_ms_b1"):
        evaluate.validate_report(latency_without_figures)
    del latency_without_figures["latency"]["freed_memory_kept"]
    with pytest.raises(ValueError, match="freed_memory_kept"):
        evaluate.validate_report(latency_without_figures)


def test_plot_is_a_png_of_the_documented_size(sweep_dir):
    png = sweep_dir / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (640, 480)
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["reference.csv", "sweep.csv", "sweep.json", "sweep.png"]


def test_bn_recalibration_changes_only_the_measured_slot(digits_checkpoint):
    checkpoint = load_checkpoint(digits_checkpoint)
    model = supernet_from_checkpoint(checkpoint, "model")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Fewer, smaller batches than the checkpoint's own calibration, so the statistics must come out different.
    batches = calibration_batches(DataOptions.from_config(checkpoint["config"]), 2, 32)
    plan = model.resolve_width(0.5)
    slot = plan.choice
    images, targets = next(iter(validation_loader(digits_checkpoint, batch_size=64)))
    row = evaluate.subnet_row(model, plan, [(images, targets)], torch.device("cpu"), DIGITS_SIZE, calibration=batches)
    assert row["bn_recalibration_batches"] == 2
    after = model.state_dict()
    changed_stats = 0
    for key, old in before.items():
        new = after[key]
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            others = [i for i in range(model.num_slots) if i != slot]
            assert torch.equal(new[others], old[others]), f"{key}: another width's statistics changed"
            if key.endswith("num_batches_tracked"):
                assert new[slot] == 2
            else:
                assert not torch.equal(new[slot], old[slot]), f"{key}: width 0.5 was not recalibrated"
                changed_stats += 1
        else:
            assert torch.equal(new, old), f"{key} changed"
    assert changed_stats == 2 * sum(isinstance(m, dsnet.slim.SlimBatchNorm2d) for m in model.modules())


def test_a_per_layer_plan_is_recalibrated_automatically(digits_checkpoint, tmp_path, capsys):
    model = supernet_from_checkpoint(load_checkpoint(digits_checkpoint), "model")
    plan = model.resolve_width(0.5).as_dict()
    plan.update({"blocks.6": 120, "head": 1000})  # not a width choice: no statistics in the checkpoint
    (tmp_path / "narrow-head.json").write_text(json.dumps({"plan": plan}))
    code, out, err = run_eval(["--mode", "static", "--checkpoint", digits_checkpoint, "--plan",
                               tmp_path / "narrow-head.json", "--no-latency", "--json", tmp_path / "plan.json"],
                              capsys)
    assert code == 0, err
    assert "no BN statistics" in err and "recalibrating them on 8 training batches" in err
    report = json.loads((tmp_path / "plan.json").read_text())
    evaluate.validate_report(report)
    [row] = report["rows"]
    assert row["kind"] == "plan" and row["width"] is None and row["plan"] == plan
    assert row["label"] == "narrow-head" and row["bn_recalibration_batches"] == 8
    assert row["madds"] == dsnet.count_madds(model, plan, img_size=DIGITS_SIZE)
    assert row["top1"] > 30
    assert "narrow-head" in out.splitlines()[1]


def test_the_same_checkpoint_twice_gives_identical_figures(digits_checkpoint, sweep_report, tmp_path, capsys):
    code, _out, err = run_eval(["--checkpoint", digits_checkpoint, "--widths", "1.0", "0.35", "--no-latency",
                                "--json", tmp_path / "again.json"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "again.json").read_text())["rows"]
    first = {row["width"]: row for row in sweep_report["rows"]}
    assert [row["width"] for row in again] == [1.0, 0.35]
    for row in again:
        for key in ("top1", "top5", "loss"):
            assert row[key] == first[row["width"]][key]


def test_eval_py_static_width_with_latency(digits_checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, "eval.py", "--mode", "static", "--checkpoint", str(digits_checkpoint), "--width", "0.5",
         "--latency-repeats", "2", "--latency-warmup", "1", "--latency-batch-size", "4",
         "--json", str(tmp_path / "static.json"), *QUIET],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    # The real process: exit 0 and nothing on stderr (its error path is BAD_INPUTS', run as the entry point runs).
    assert result.returncode == 0 and result.stderr == "", result.stderr
    header, line = result.stdout.splitlines()[:2]
    assert header.split() == ["width", "top-1", "top-5", "loss", "params", "MAdds", "b1", "ms", "b4", "ms"]
    assert line.split()[0] == "0.5"
    report = json.loads((tmp_path / "static.json").read_text())
    evaluate.validate_report(report)
    assert report["mode"] == "static" and report["latency"] == {"batch_size": 4, "repeats": 2, "warmup": 1,
                                                                    "freed_memory_kept": True}
    [row] = report["rows"]
    assert isinstance(row["latency_ms_b1"], float) and row["latency_ms_b1"] > 0
    assert isinstance(row["latency_ms_bN"], float) and row["latency_ms_bN"] > 0


@pytest.fixture(scope="module")
def bad_checkpoints(digits_checkpoint, tmp_path_factory):
    """Files eval.py must refuse: not a dsnet checkpoint, weights of other widths, a 100-class model on digits."""
    folder = tmp_path_factory.mktemp("bad")
    state = load_checkpoint(digits_checkpoint)
    torch.save({"state_dict": {}}, folder / "foreign.pth")
    other_widths = dsnet.create_supernet(**{**DIGITS_MODEL, "widths": [0.5, 1.0]})
    save_checkpoint(folder / "other-widths.pth", {**state, "model": other_widths.state_dict()})
    save_checkpoint(folder / "no-config.pth", {k: v for k, v in state.items() if k != "model_config"})
    renamed = {("head.weight" if k == "classifier.weight" else k): v for k, v in state["model"].items()}
    save_checkpoint(folder / "renamed.pth", {**state, "model": renamed})
    hundred = dsnet.create_supernet(**{**DIGITS_MODEL, "num_classes": 100})
    save_checkpoint(folder / "100-classes.pth", {**state, "model_config": hundred.config.to_dict(),
                                                 "model": hundred.state_dict()})
    return folder


BAD_INPUTS = {
    "missing checkpoint": (["--checkpoint", "{bad}/missing.pth"], "does not exist"),
    "not a dsnet checkpoint": (["--checkpoint", "{bad}/foreign.pth"], "is not a dsnet checkpoint"),
    "no recorded architecture": (["--checkpoint", "{bad}/no-config.pth"],
                                 "records no supernet configuration ('model_config')"),
    "unknown device": (["--checkpoint", "{ckpt}", "--device", "tpu"], "unknown device 'tpu'; use cpu, cuda or cuda:N"),
    "weights of other widths": (["--checkpoint", "{bad}/other-widths.pth"],
                                "checkpoint weights do not fit its recorded architecture: size mismatch for "),
    "a tensor renamed": (["--checkpoint", "{bad}/renamed.pth"],
                         "do not fit its recorded architecture: 1 missing (first: 'classifier.weight'), 1 unexpected "
                         "(first: 'head.weight')"),
    "dataset with other classes": (["--checkpoint", "{bad}/100-classes.pth"],
                                   "checkpoint has 100 classes but dataset 'digits' has 10"),
    "width not a choice": (["--checkpoint", "{ckpt}", "--widths", "0.5", "0.6"],
                           "width 0.6 is not a width choice of this checkpoint; choices: 0.35, 0.5, 0.75, 1"),
    "dynamic without gate": (["--mode", "dynamic", "--checkpoint", "{ckpt}"],
                             "has no gate; train one with python train.py --stage gate"),
    "output in a missing directory": (["--checkpoint", "{ckpt}", "--json", "{out}/no-such-dir/report.json"],
                                      "does not exist"),
    "output is a directory": (["--checkpoint", "{ckpt}", "--plot", "{out}"], "is a directory"),
    "static curve outside dynamic mode": (["--checkpoint", "{ckpt}", "--no-static-curve"],
                                          "--no-static-curve is for --mode dynamic, not --mode sweep"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_with_status_2(case, digits_checkpoint, bad_checkpoints, tmp_path, capsys):
    args, message = BAD_INPUTS[case]
    args = [a.format(bad=bad_checkpoints, ckpt=digits_checkpoint, out=tmp_path) for a in args]
    code, out, err = run_eval(args + ["--no-latency"], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == [], "nothing may be left behind"


def test_the_static_curve_interpolates_between_the_bracketing_widths(digits_checkpoint):
    model = supernet_from_checkpoint(load_checkpoint(digits_checkpoint))
    costs = [dsnet.count_madds(model, plan, DIGITS_SIZE) for plan in model.choice_plans]
    assert costs == sorted(costs)
    midway = (costs[1] + costs[2]) / 2
    assert [p.choice for p in evaluate.static_curve_neighbours(model, midway, DIGITS_SIZE)] == [1, 2]
    assert [p.choice for p in evaluate.static_curve_neighbours(model, costs[2], DIGITS_SIZE)] == [2]
    assert [p.choice for p in evaluate.static_curve_neighbours(model, costs[0] - 1, DIGITS_SIZE)] == [0]
    assert [p.choice for p in evaluate.static_curve_neighbours(model, costs[-1] + 1, DIGITS_SIZE)] == [len(costs) - 1]

    rows = [{"width": 0.5, "madds": 100, "top1": 80.0}, {"width": 0.75, "madds": 200, "top1": 90.0}]
    assert evaluate.static_curve(125, rows) == {"widths": [0.5, 0.75], "top1": 82.5}
    assert evaluate.static_curve(200, rows[1:]) == {"widths": [0.75], "top1": 90.0}
    assert evaluate.static_curve(250, rows[1:]) == {"widths": [0.75], "top1": None}
