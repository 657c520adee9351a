"""Latency tables: a plan's prediction against a known answer on a fake clock, the table files, and the latency
budgets of search and the gate, with their bad inputs."""
import json
import random

import pytest
import torch

import dsnet
from dsnet import latency as lut
from dsnet.errors import UserError
from dsnet.latency import LatencyTable, TableBuilder, build_table, deployed_network, network_description

from conftest import DIGITS_MODEL, DIGITS_SIZE, run_command

OVERHEAD = 3e-6  # what the fake clock charges per call


def fake_seconds(entries):
    """A fake clock: each call costs its module's parameters in nanoseconds, plus a fixed cost per call. Parameters
    are bilinear in a part's two channel counts, so the interpolated prediction of any plan is exact."""
    return [OVERHEAD + 1e-9 * sum(p.numel() for p in e.module.parameters()) for e in entries]


def small_model(**overrides):
    torch.manual_seed(0)
    return dsnet.create_supernet(**{**DIGITS_MODEL, "widths": [0.5, 0.75, 1.0], "img_size": 16, **overrides}).eval()


def small_resnet():
    torch.manual_seed(0)
    return dsnet.create_model(arch="resnet20", widths=[0.5, 0.75, 1.0], num_classes=10, img_size=16).eval()


def settings_of(model, img_size=16):
    return {"network": network_description(model), "img_size": img_size, "batch_size": 1, "threads": 1,
            "device": "cpu", "runtime": "torch"}


TIMED = []  # every entry the fake table's clock timed


def table_of(model, timed=None):
    """The fake clock's table of `model`; each entry it times is appended to `timed`."""
    builder = TableBuilder(model, 16, 1, model.widths, min_channels=8)

    def counting(entries):
        (timed if timed is not None else []).extend(entries)
        return fake_seconds(entries)

    return model, LatencyTable(build_table(builder, counting, settings_of(model)), "fake")


@pytest.fixture(scope="module")
def fake_table():
    return table_of(small_model(), TIMED)


@pytest.fixture(scope="module", params=["mobilenetv2", "resnet20"])
def any_fake_table(request, fake_table):
    """The fake table of a MobileNetV2 and of a ResNet (whose parts include shortcut downsamplings)."""
    return fake_table if request.param == "mobilenetv2" else table_of(small_resnet())


def test_a_plan_is_predicted_as_the_sum_of_its_parts(any_fake_table):
    model, table = any_fake_table
    # The line fitted from the parts' sums to the whole networks: the whole pays one call instead of one per part.
    parts = len(model.export_parts(model.largest, 0))
    assert table.scale == pytest.approx(1.0, abs=1e-9)
    assert table.overhead == pytest.approx(OVERHEAD - parts * OVERHEAD, rel=1e-6)
    rng = random.Random(1)
    plans = list(model.choice_plans) + [
        model.resolve_width({n: rng.randint(min(8, m), m) for n, m in zip(model.group_names, model.max_channels)})
        for _ in range(6)]
    for plan in plans:
        (whole,) = fake_seconds([lut.Timed(deployed_network(model, plan), ())])
        assert table.predict(plan) == pytest.approx(whole, rel=1e-9)


def test_the_parts_chain_into_the_whole_network(any_fake_table):
    model, _ = any_fake_table
    plan = model.resolve_width({n: max(1, m // 2 + 1) for n, m in zip(model.group_names, model.max_channels)})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h, block_input, shortcut = x, None, None
        for part in model.export_parts(plan, model.stats_slot(model.largest)):
            if part.name.endswith(".downsample"):
                shortcut = part(block_input)
                continue
            if part.name.endswith(".features"):
                block_input = shortcut = h
            h = part(h, shortcut if part.skip else None)
        torch.testing.assert_close(h, deployed_network(model, plan)(x), rtol=1e-5, atol=1e-5)


def test_identical_parts_are_timed_once(fake_table):
    model, table = fake_table
    keys = [k for part in table.data["parts"] for k in json.dumps(part["keys"]).split('"') if len(k) == 16]
    assert len(set(keys)) < len(keys)  # the repeated blocks of a stage share entries
    assert len(TIMED) == len(table.data["seconds"]) + len(model.widths)  # each entry once, then the wholes


def test_a_channel_count_outside_the_table_is_refused(fake_table):
    model, table = fake_table
    plan = model.resolve_width({**model.largest.as_dict(), "head": 4})
    with pytest.raises(UserError, match=r"layer group 'head' at 4 channels: it covers 8 to"):
        table.predict(plan)


def test_a_table_of_another_network_or_size_is_refused(fake_table):
    _, table = fake_table
    with pytest.raises(UserError, match="width set is"):
        table.check(small_model(widths=[0.5, 1.0]), 16)
    with pytest.raises(UserError, match="num_classes"):
        table.check(small_model(num_classes=7), 16)
    with pytest.raises(UserError, match="made for 16×16 inputs; this network runs at 32×32"):
        table.check(small_model(), 32)


@pytest.mark.parametrize("text, seconds", [("4ms", 4e-3), ("800 us", 8e-4), ("0.5s", 0.5), ("2µs", 2e-6)])
def test_latencies_parse_with_their_unit(text, seconds):
    assert lut.parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["4", "fast", "-1ms", "0ms"])
def test_a_latency_without_a_unit_is_refused(text):
    with pytest.raises(UserError, match="positive time with a unit"):
        lut.parse_latency(text)


def test_a_latency_budgeted_search_meets_its_budget(fake_table):
    from dsnet.search import narrowest_plan, search_plan

    model, table = fake_table
    fastest, slowest = table.predict(narrowest_plan(model, 8)), table.predict(model.largest)
    budget = fastest + 0.4 * (slowest - fastest)
    torch.manual_seed(0)
    images = torch.randn(16, 3, 16, 16)
    batches = [(images, torch.randint(0, 10, (16,)))]
    result = search_plan(model, budget, [images], batches, step=8, min_channels=8, img_size=16, steps=4,
                         cost=table.predict)
    assert table.predict(result.plan) <= budget
    assert [s.cost for s in result.trajectory] == sorted((s.cost for s in result.trajectory), reverse=True)
    assert result.trajectory[-1].cost == pytest.approx(table.predict(result.searched))


# ---- the command line, on the digits checkpoint ------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_table(digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lut") / "lut.json"
    code, _, err = run_command(lut.main, ["--checkpoint", digits_checkpoint, "--out", out, "--repeats", "1",
                                          "--warmup", "0", "--threads", "1", "--widths", "0.35", "1.0",
                                          "--no-progress"], _Capture())
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def digits_fake_table(digits_checkpoint, tmp_path_factory):
    """A table of the digits supernet on the fake clock: predictions that follow the widths, as a real table's do at
    sizes where compute dominates (at 8 px the real ones are all per-call cost)."""
    supernet = dsnet.load_supernet(digits_checkpoint)
    out = tmp_path_factory.mktemp("fake-lut") / "lut.json"
    builder = TableBuilder(supernet, DIGITS_SIZE, 1, [0.35, 1.0], 8)
    lut.write_table(out, build_table(builder, fake_seconds, settings_of(supernet, DIGITS_SIZE)))
    return out


class _Capture:
    """run_command's capsys for a module-scoped fixture: nothing to capture."""

    def readouterr(self):
        return "", ""


def test_the_table_command_writes_a_table_resumes_and_recalibrates(digits_checkpoint, digits_table, tmp_path, capsys,
                                                                    monkeypatch):
    full = json.loads(digits_table.read_text())
    supernet = dsnet.load_supernet(digits_checkpoint)
    table = LatencyTable.read(digits_table)
    table.check(supernet, DIGITS_SIZE)
    assert all(table.predict(p) > 0 for p in supernet.choice_plans)
    # A run stopped after three parts resumes: the entries timed already are kept, not timed again.
    partial = {**full, "parts": full["parts"][:3], "overhead": None, "scale": None, "calibration": []}
    kept = {k for part in partial["parts"] for k in json.dumps(part["keys"]).split('"') if len(k) == 16}
    partial["seconds"] = {k: full["seconds"][k] for k in kept}
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(partial))
    with pytest.raises(UserError, match="incomplete"):
        LatencyTable.read(path)
    command = ["--checkpoint", digits_checkpoint, "--out", path, "--repeats", "1", "--warmup", "0", "--threads", "1",
               "--widths", "0.35", "1.0", "--no-progress"]
    code, out, err = run_command(lut.main, command, capsys)
    assert code == 0, err
    assert f"resuming {path}: {len(kept)} entries already timed" in out
    resumed = json.loads(path.read_text())
    assert len(resumed["parts"]) == len(full["parts"])
    assert all(resumed["seconds"][k] == partial["seconds"][k] for k in kept)
    # Run again on the finished table, it recalibrates: only the whole networks are timed, and the line is fitted
    # to the new timings of them.
    timed = []
    monkeypatch.setattr(lut, "torch_timer", lambda *args: lambda entries: timed.extend(entries) or [
        2 * e for e in fake_seconds(entries)])
    code, out, err = run_command(lut.main, command, capsys)
    assert code == 0, err
    assert f"recalibrating {path}" in out
    recalibrated = json.loads(path.read_text())
    assert recalibrated["seconds"] == resumed["seconds"]
    assert [sum(p.numel() for p in e.module.parameters()) for e in timed] == [
        sum(p.numel() for p in deployed_network(supernet, plan).parameters()) for plan in supernet.choice_plans]
    measured = [c["measured"] for c in recalibrated["calibration"]]
    assert measured == [2 * s for s in fake_seconds(timed)]
    scale, overhead = lut.fit_line([c["parts"] for c in recalibrated["calibration"]], measured)
    assert (recalibrated["scale"], recalibrated["overhead"]) == pytest.approx((scale, overhead))
    # Another batch size is another table: refused, the file left as it is.
    before, threads = path.read_text(), torch.get_num_threads()
    code, _, err = run_command(lut.main, ["--checkpoint", digits_checkpoint, "--out", path, "--batch-size", "4",
                                          "--threads", str(threads + 1)], capsys)
    assert code == 2 and "another batch size" in err and len(err.strip().splitlines()) == 1
    assert path.read_text() == before
    assert torch.get_num_threads() == threads  # the command's --threads does not outlive it


def test_search_with_a_latency_budget(digits_checkpoint, digits_fake_table, tmp_path, capsys):
    from dsnet import search

    supernet = dsnet.load_supernet(digits_checkpoint)
    table = LatencyTable.read(digits_fake_table)
    fastest = table.predict(search.narrowest_plan(supernet, 8))
    budget = (fastest + table.predict(supernet.largest)) / 2
    out = tmp_path / "plan.json"
    code, printed, err = run_command(search.main, [
        "--checkpoint", digits_checkpoint, "--target-latency", f"{budget * 1e6:.3f}us", "--lut", digits_fake_table,
        "--out", out, "--eval-batches", "2", "--recalibrate-batches", "1", "--steps", "3"], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    plan = supernet.resolve_width(result["plan"])
    assert result["predicted_latency_s"] == pytest.approx(table.predict(plan))
    assert table.predict(plan) <= budget * (1 + 1e-6)
    assert "predicted latency" in printed

    code, _, err = run_command(search.main, [
        "--checkpoint", digits_checkpoint, "--target-latency", f"{fastest * 0.5 * 1e6:.3f}us", "--lut",
        digits_fake_table, "--out", tmp_path / "no.json"], capsys)
    assert code == 2 and "is below the" in err and "fastest allowed plan" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "no.json").exists()


def test_a_table_of_another_network_is_refused_by_the_commands(digits_checkpoint, fake_table, tmp_path, capsys):
    from dsnet import search

    path = tmp_path / "other.json"
    lut.write_table(path, fake_table[1].data)
    code, _, err = run_command(search.main, ["--checkpoint", digits_checkpoint, "--target-latency", "1ms",
                                             "--lut", path, "--out", tmp_path / "plan.json"], capsys)
    assert code == 2 and "was made for another network: its width set" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_predicts_every_row(digits_checkpoint, digits_fake_table, tmp_path, capsys):
    from dsnet import evaluate

    report_path = tmp_path / "report.json"
    code, printed, err = run_command(evaluate.main, [
        "--checkpoint", digits_checkpoint, "--lut", digits_fake_table, "--widths", "0.35", "1.0",
        "--latency-repeats", "1", "--latency-warmup", "0", "--no-progress", "--json", report_path], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    supernet = dsnet.load_supernet(digits_checkpoint)
    table = LatencyTable.read(digits_fake_table)
    for row in report["rows"]:
        assert row["predicted_latency_ms"] == pytest.approx(1e3 * table.predict(supernet.resolve_width(row["width"])))
    assert report["latency_table"]["batch_size"] == 1 and "pred b1 ms" in printed


def test_the_gate_refuses_a_latency_target_outside_its_routes(digits_checkpoint, digits_fake_table, tmp_path, capsys):
    from dsnet import train

    code, _, err = run_command(train.main, [
        "--stage", "gate", "--init", digits_checkpoint, "--output", tmp_path / "gate", "--epochs", "1",
        "--target-latency", "1us", "--lut", digits_fake_table], capsys)
    assert code == 2 and "--target-latency 0.001 ms is outside the routes' range" in err
    assert len(err.strip().splitlines()) == 1
