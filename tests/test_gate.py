"""Stage II: the gate, SGS labels, the MAdds loss, dynamic inference, `train.py --stage gate` and
`eval.py --mode dynamic`."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import dsnet
from dsnet import evaluate, train
from dsnet.bn_slots import calibrate_routes, supernet_norms
from dsnet.checkpoint import load_checkpoint, load_network, supernet_from_checkpoint
from dsnet.cli import run_main
from dsnet.config import parse_config
from dsnet.data import DataOptions, build_dataset, build_loader, calibration_batches
from dsnet.stages import gate_calibration_batches
from dsnet.trainer import Trainer
from dsnet.gate import GateConfig, GatedDSNet, insert_gate
from dsnet.gate_training import GateLosses, gate_step, madds_penalty, set_trainable, sgs_labels, sgs_routes

from conftest import DIGITS_SIZE, spread_routes

QUIET = ["--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: on a shared machine, waiting for a descheduled second thread costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state(digits_checkpoint):
    return load_checkpoint(digits_checkpoint)


@pytest.fixture(scope="module")
def data(state):
    """(calibration batches, a batch of validation images and labels, a batch of training images and labels)."""
    opts = DataOptions.from_config(state["config"])
    val_images, val_targets = next(iter(build_loader(build_dataset(opts, train=False), 96, train=False)))
    train_images, train_targets = next(iter(build_loader(build_dataset(opts, train=True), 64, train=True)))
    return calibration_batches(opts, 2, 64), (val_images, val_targets), (train_images, train_targets)


@pytest.fixture(scope="module")
def gated(state, data):
    """The digits supernet with a gate routing to every width; layers before the gate at the largest width."""
    supernet = supernet_from_checkpoint(state, "model")
    return insert_gate(supernet, GateConfig(routes=list(supernet.widths), input_width=1.0), data[0]).eval()


@pytest.fixture(scope="module")
def mixed(gated, data):
    return spread_routes(gated, data[1][0])


def one_hot_logits(predictions):
    return F.one_hot(torch.tensor(predictions), 4).float() * 3


def test_sgs_labels_follow_which_routes_classify_correctly():
    targets = torch.tensor([0, 1, 2, 3])
    smallest = one_hot_logits([0, 0, 2, 1])  # right for images 0 and 2
    second = one_hot_logits([1, 1, 0, 3])  # right for images 1 and 3
    third = one_hot_logits([0, 1, 2, 3])  # right for all
    checked, fallback = sgs_routes("sandwich", 4)
    assert (checked, fallback) == ([0], 3)
    assert sgs_labels([smallest], targets, checked, fallback).tolist() == [0, 3, 0, 3]
    checked, fallback = sgs_routes("graded", 4)
    assert (checked, fallback) == ([0, 1, 2], 3)
    assert sgs_labels([smallest, second, third], targets, checked, fallback).tolist() == [0, 1, 0, 1]
    nobody = one_hot_logits([3, 3, 3, 0])
    assert sgs_labels([nobody, nobody, nobody], targets, checked, fallback).tolist() == [3, 3, 3, 3]
    assert sgs_routes("sandwich", 2) == ([0], 1)


def test_gate_insertion_leaves_the_supernet_outputs_unchanged(state, data):
    original = supernet_from_checkpoint(state, "model")
    config = GateConfig(routes=[0.35, 0.5, 1.0], input_width=1.0)
    x = data[1][0][:16]
    with pytest.raises(ValueError, match="never collected"):  # a route whose statistics were not collected
        insert_gate(copy.deepcopy(original), config).eval()(x, route=0)
    gated = insert_gate(copy.deepcopy(original), config, data[0]).eval()
    assert gated.supernet.num_custom_slots == 4  # a slot of its own for each route, one spare
    with torch.no_grad():
        for choice in range(len(original.widths)):
            assert torch.equal(gated.supernet(x, choice), original(x, choice))
        for route, plan in enumerate(gated.route_plans):
            logits = gated(x, route=route)
            assert torch.equal(logits, gated.supernet(x, plan))  # the attention head starts as the identity
            if plan.choice is not None:
                assert torch.equal(logits, original(x, plan.choice))
            dense = dsnet.export_subnet(gated.supernet, plan)
            assert torch.allclose(dense(x), logits, atol=1e-5)
    assert [plan["blocks.2"] for plan in gated.route_plans] == [original.largest["blocks.2"]] * 3
    assert [plan["blocks.3"] for plan in gated.route_plans] == \
        [original.resolve_width(w)["blocks.3"] for w in (0.35, 0.5, 1.0)]


def test_eval_routes_are_the_same_on_every_pass(mixed, data):
    x = data[1][0]
    with torch.no_grad():
        logits, info = mixed(x, return_info=True)
        mixed.train()
        mixed(x, gumbel_tau=1.0)  # a training forward in between changes nothing
        mixed.eval()
        again, info_again = mixed(x, return_info=True)
    assert torch.equal(info.routes, info_again.routes) and torch.equal(logits, again)
    assert len(torch.unique(info.routes)) == 4


def test_batched_dynamic_forward_equals_each_input_alone(mixed, data):
    # In float64, so that the comparison sees the grouping and not how a convolution kernel rounds at another
    # batch size (in float32 they agree to about 1e-5 of the logits' scale).
    network, x = copy.deepcopy(mixed).double(), data[1][0][:24].double()
    with torch.no_grad():
        logits, info = network(x, return_info=True)
        alone = torch.cat([network(x[i:i + 1]) for i in range(len(x))])
        assert len(torch.unique(info.routes)) >= 3
        assert (logits - alone).abs().max() <= 1e-5
        # the masked training forward computes the same network as the sliced route of each input
        masked, sampled = network(x, gumbel_tau=1.0, return_info=True)
        sliced = torch.cat([network(x[i:i + 1], route=int(r)) for i, r in enumerate(sampled.routes)])
        assert (masked - sliced).abs().max() <= 1e-5
        assert torch.allclose(mixed(x.float()), alone.float(), atol=1e-4)


def test_madds_of_a_routed_input_are_count_madds_of_its_route_plus_the_gate(mixed, data):
    x = data[1][0][:24]
    with torch.no_grad():
        _, info = mixed(x, return_info=True)
    gate = mixed.gate
    channels, reduced = gate.conv_reduce.in_channels, gate.conv_reduce.out_channels
    gate_madds = 2 * channels * reduced + reduced * len(mixed.route_plans)
    for route, madds in zip(info.routes.tolist(), info.madds.tolist()):
        assert madds == dsnet.count_madds(mixed.supernet, mixed.route_plans[route], img_size=DIGITS_SIZE) + gate_madds
    route_madds = mixed.route_madds(DIGITS_SIZE).tolist()
    assert route_madds == sorted(route_madds) and len(set(route_madds)) == 4


def test_the_madds_loss_gradient_lowers_the_probability_of_wider_routes(mixed, data):
    route_madds = mixed.route_madds(DIGITS_SIZE).double()
    logits = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
    expected = (logits.softmax(1) @ route_madds).mean()
    madds_penalty(expected, "square", float(route_madds[-1])).backward()
    lowered = (logits - 10 * logits.grad).softmax(1).mean(0)
    assert lowered[3] < lowered[2] < 0.25 < lowered[1] < lowered[0]

    # through the gate: one step on the MAdds loss alone moves the routes toward narrower ones
    gate = copy.deepcopy(mixed).train()
    set_trainable(gate, finetune_supernet=False)
    images, targets = data[2]
    with torch.no_grad():
        before = gate(images, return_info=True)[1].route_logits.softmax(1).mean(0)
    optimizer = torch.optim.SGD([p for p in gate.parameters() if p.requires_grad], lr=1.0)
    gate_step(gate, images, targets, GateLosses(task_loss_weight=0.0, gate_loss_weight=0.0, madds_loss="square",
                                                madds_loss_weight=1.0))
    optimizer.step()
    with torch.no_grad():
        after = gate(images, return_info=True)[1].route_logits.softmax(1).mean(0)
    assert after[3] < before[3] and after[0] > before[0]
    assert after @ route_madds.float() < before @ route_madds.float()


@pytest.mark.parametrize("kind,below,above", [("target", -1, 1), ("excess", 0, 1), ("square", 1, 1)])
def test_the_madds_penalty_is_zero_at_the_target_and_grows_on_the_sides_its_mode_penalises(kind, below, above):
    """`below`/`above`: the sign of the penalty's slope under and over the target (0: flat and zero there). Only
    DS-Net's square penalty is not zero at the target: it pushes every cost down."""
    target = 4e6
    for madds, slope in ((0.5 * target, below), (1.5 * target, above)):
        m = torch.tensor(madds, dtype=torch.float64, requires_grad=True)
        penalty = madds_penalty(m, kind, target)
        penalty.backward()
        assert torch.sign(m.grad).item() == slope, (kind, madds)
        assert (penalty.item() > 0) == (slope != 0 or kind == "square")
    at = madds_penalty(torch.tensor(target, dtype=torch.float64), kind, target).item()
    assert at == (1.0 if kind == "square" else 0.0)
    assert madds_penalty(torch.tensor(1.5 * target), kind, target) > madds_penalty(torch.tensor(1.2 * target), kind,
                                                                                 target)


def test_gate_training_on_all_largest_labels_routes_everything_to_the_largest(mixed, data):
    gate = copy.deepcopy(mixed).train()
    set_trainable(gate, finetune_supernet=False)
    images, _ = data[2]
    with torch.no_grad():
        targets = (gate(images, route=0).argmax(1) + 1) % 10  # the smallest route gets every image wrong
        labels = sgs_labels(gate.forward_routes(images, [0]), targets, [0], 3)
        before = gate(images, return_info=True)[1].routes
    assert labels.tolist() == [3] * len(images)
    assert (before == 3).float().mean() < 0.5
    optimizer = torch.optim.SGD([p for p in gate.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(8):
        optimizer.zero_grad()
        gate_step(gate, images, targets, GateLosses(sgs="sandwich", task_loss_weight=0.0, gate_loss_weight=1.0,
                                                        madds_loss_weight=0.0))
        optimizer.step()
    with torch.no_grad():
        assert gate.eval()(images, return_info=True)[1].routes.tolist() == [3] * len(images)


def run(main, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("args,message", [
    ([], "--stage gate needs --init CHECKPOINT"),
    (["--init", "{ckpt}", "--widths", "0.5", "1.0"], "is a supernet of another architecture: its widths"),
    (["--init", "{ckpt}", "--gate-routes", "0.35", "0.6"], "gate routes [0.6] are not width choices"),
    (["--init", "{ckpt}", "--gate-block", "blocks.3.1"], "the gate must sit in the first block of a stage"),
    (["--init", "{tmp}/foreign.pth"], "is not a dsnet checkpoint"),
    (["--init", "{ckpt}", "--target-madds", "0.2"], "--target-madds 0.2 of the widest ("),
    (["--init", "{ckpt}", "--target-madds", "5e6"], "--target-madds 5e+06 (5.00M) is outside the routes' range: "),
])
def test_bad_gate_input_is_one_error_line_with_status_2(args, message, digits_checkpoint, tmp_path, capsys):
    torch.save({"weights": {}}, tmp_path / "foreign.pth")
    args = ["--stage", "gate", *[a.format(ckpt=digits_checkpoint, tmp=tmp_path) for a in args],
            "--output", tmp_path / "out"]
    code, out, err = run(train.main, args, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_gate_stage_trains_resumes_and_evaluates_dynamically(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "gate"
    flags = ["--stage", "gate", "--init", str(digits_checkpoint), "--output", str(out), "--epochs", "2",
             "--batch-size", "128", "--gate-calibration-batches", "2", "--gate-routes", "0.35", "0.75", "1.0",
             "--lr", "0.05", "--warmup-epochs", "0", "--val-every", "2", "--log-interval", "1000", "--ema"]
    Trainer(*parse_config([*flags, "--epoch-limit", "1"])).run()
    Trainer(*parse_config(["--resume", str(out / "last.pth")])).run()  # rebuilt from the checkpoint alone
    checkpoint = load_checkpoint(out / "last.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["gate"]["routes"] == [0.35, 0.75, 1.0]
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    for column in ("train_gate_acc", "train_madds", "train_route@0.35", "val_top1", "val_madds", "val_gate_acc",
                   "val_route@1", "ema_val_top1", "ema_val_route@0.75"):
        assert column in header, column

    network = load_network(out / "last.pth")
    assert isinstance(network, GatedDSNet) and network.route_widths == (0.35, 0.75, 1.0)
    supernet = supernet_from_checkpoint(checkpoint)  # sweep, static and export read the supernet part
    assert torch.equal(supernet.conv_stem.weight, network.supernet.conv_stem.weight)

    # Validation set the gate's cost bias: on the calibration images its routes meet the default target, halfway
    # between the narrowest route's MAdds and the widest's.
    costs = network.route_madds(DIGITS_SIZE).double()
    with torch.no_grad():
        routes = torch.cat([network.route_logits(x).argmax(1) for x in gate_calibration_batches(checkpoint["config"])])
    assert float(costs[routes].mean()) == pytest.approx(float(costs.min() + costs.max()) / 2, rel=0.05)
    assert network.gate.route_bias.abs().max() > 0
    from dsnet.dense_gated import export_gated  # the bias is part of the gate, so the export routes alike
    images = gate_calibration_batches(checkpoint["config"])[0]
    with torch.no_grad():
        expected, info = network(images, return_info=True)
        logits, exported_routes = export_gated(network)(images)
    assert torch.equal(exported_routes, info.routes)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    # The routes' BN statistics were collected again after training, through the trained gate, into slots of their
    # own: collecting them once more on the same batches changes nothing, and the supernet's widths keep stage I's.
    again = copy.deepcopy(network)
    calibrate_routes(again, gate_calibration_batches(checkpoint["config"]), routes=range(3))
    stage_one = supernet_from_checkpoint(load_checkpoint(digits_checkpoint), "model")
    choices = len(stage_one.widths)
    for bn, recollected, initial in zip(supernet_norms(network.supernet), supernet_norms(again.supernet),
                                        supernet_norms(stage_one)):
        torch.testing.assert_close(bn.running_var, recollected.running_var, rtol=0, atol=1e-5)
        torch.testing.assert_close(bn.running_mean, recollected.running_mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(bn.running_mean[:choices], initial.running_mean[:choices], rtol=0, atol=1e-6)
    projection = network.supernet.block(network.gate_index).projection_norm()
    widest = network.route_slot(2)
    assert widest >= choices  # its own slot, not width 1.0's
    assert (projection.running_mean[widest] - projection.running_mean[choices - 1]).abs().max() > 1e-4

    code, _, err = run(evaluate.main, ["--mode", "dynamic", "--checkpoint", out / "last.pth", "--latency-repeats",
                                       "2", "--latency-warmup", "1", "--latency-batch-size", "4", "--json",
                                       tmp_path / "dynamic.json", *QUIET], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "dynamic.json").read_text())
    evaluate.validate_report(report)
    row, *curve_rows = report["rows"]
    assert report["mode"] == "dynamic" and row["kind"] == "dynamic" and row["latency_ms_b1"] > 0
    # The uniform widths that bracket the mean MAdds follow, and the dynamic row interpolates their top-1.
    all_madds = [dsnet.count_madds(supernet, plan, DIGITS_SIZE) for plan in supernet.choice_plans]
    below = [m for m in all_madds if m <= row["madds"]]
    above = [m for m in all_madds if m >= row["madds"]]
    assert [r["madds"] for r in curve_rows] == sorted({*below[-1:], *above[:1]})
    assert all(r["kind"] == "width" for r in curve_rows)
    assert row["static_curve"]["widths"] == [r["width"] for r in curve_rows]
    if len(curve_rows) == 2:
        low, high = curve_rows
        share = (row["madds"] - low["madds"]) / (high["madds"] - low["madds"])
        assert row["static_curve"]["top1"] == pytest.approx(low["top1"] * (1 - share) + high["top1"] * share)
    routes = row["routes"]
    assert [r["width"] for r in routes] == [0.35, 0.75, 1.0]
    assert sum(r["images"] for r in routes) == report["num_samples"] == 360
    route_madds = network.route_madds(DIGITS_SIZE).tolist()
    assert [r["madds"] for r in routes] == route_madds
    assert row["madds"] == round(sum(r["images"] * m for r, m in zip(routes, route_madds)) / 360)
    correct = sum(r["top1"] * r["images"] / 100 for r in routes if r["images"])
    assert row["top1"] == pytest.approx(100 * correct / 360)
    assert row["top1"] > 50

    code, _, err = run(evaluate.main, ["--mode", "dynamic", "--checkpoint", out / "last.pth", "--no-latency",
                                       "--no-static-curve", "--json", tmp_path / "again.json", *QUIET], capsys)
    assert code == 0, err
    [again] = json.loads((tmp_path / "again.json").read_text())["rows"]
    assert "static_curve" not in again
    assert (again["top1"], again["top5"], again["loss"], again["madds"], again["routes"]) == \
        (row["top1"], row["top5"], row["loss"], row["madds"], routes)  # the same checkpoint evaluates the same


def test_collecting_the_routes_again_follows_the_gate_and_leaves_the_widths_alone(gated, data):
    """Once the attention head has changed the features, every route's statistics are collected again, each into
    its own slot: the dense export computes the gated network, and every width of the supernet computes what it did."""
    from dsnet.dense_gated import export_gated

    net = copy.deepcopy(gated)
    images = data[1][0]
    routes = range(len(net.route_plans))
    with torch.no_grad():
        before = [net.supernet(images, w) for w in net.supernet.widths]
        net.gate.conv_expand.weight.normal_(0, 0.5)
        calibrate_routes(net, data[0], routes=routes)
        for w, logits in zip(net.supernet.widths, before):
            assert torch.equal(net.supernet(images, w), logits), f"width {w}"
        slots = [net.route_slot(r) for r in routes]
        assert len(set(slots)) == len(slots) and min(slots) >= len(net.supernet.widths)
        projection = net.supernet.block(net.gate_index).projection_norm()
        widest = net.route_plans[-1].choice
        assert (projection.running_mean[slots[-1]] - projection.running_mean[widest]).abs().max() > 1e-3
        logits, _ = export_gated(net)(images)
        torch.testing.assert_close(logits, net(images), rtol=0, atol=1e-5)


def test_the_task_loss_reaches_the_slimming_head_through_the_straight_through_route(mixed, data):
    """With the gate and MAdds losses off, the task loss alone gives the slimming head a gradient: the one-hot route
    weights of the Gumbel forward carry it through the routed BN and masks. A detach anywhere on that path zeroes it."""
    gate = copy.deepcopy(mixed).train()
    set_trainable(gate, finetune_supernet=False)
    images, targets = data[2]
    torch.manual_seed(0)
    gate_step(gate, images, targets, GateLosses(task_loss_weight=1.0, gate_loss_weight=0.0, madds_loss_weight=0.0))
    grad = gate.gate.slimming.weight.grad
    assert grad is not None and grad.abs().max().item() > 1e-6


def test_a_supernet_with_squeeze_excitation_is_gated_trained_and_exported(data):
    """se_ratio > 0: the gate takes over the gate block's SE as its attention head (sigmoid); one training step, then
    the dense export computes the gated network (float64), with the later blocks' SE exported as layers."""
    from conftest import DIGITS_MODEL
    from dsnet.dense_gated import export_gated
    from dsnet.slim import SlimSqueezeExcite

    torch.manual_seed(0)
    supernet = dsnet.create_supernet(**{**DIGITS_MODEL, "se_ratio": 0.25}).eval()
    calibration, (images, _), (train_images, train_targets) = data
    for i in range(len(supernet.widths)):
        dsnet.recalibrate_bn(supernet, i, calibration)
    gated = insert_gate(supernet, GateConfig(routes=list(supernet.widths), input_width=1.0), calibration)
    assert gated.gate.attention == "sigmoid"
    gated.train()
    set_trainable(gated, finetune_supernet=False)
    optimizer = torch.optim.SGD([p for p in gated.parameters() if p.requires_grad], lr=0.1)
    gate_step(gated, train_images, train_targets, GateLosses())
    optimizer.step()
    gated = spread_routes(gated.eval(), images).double()
    dense = export_gated(gated)
    assert sum(isinstance(m, SlimSqueezeExcite) for m in gated.supernet.modules()) > 0
    x = images[:48].double()
    with torch.no_grad():
        logits, info = gated(x, return_info=True)
        dense_logits, routes = dense(x)
    assert len(set(info.routes.tolist())) > 1
    assert torch.equal(routes, info.routes) and (dense_logits - logits).abs().max().item() <= 1e-10
