"""The rules by which the gate meets a cost target, against brute force and known answers."""
import itertools

import pytest
import torch

from dsnet.gate_budget import budget_labels, calibrate_route_bias

COSTS = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)


@pytest.mark.parametrize("target", [1.4, 2.0, 2.5, 3.3])
def test_budget_labels_meet_the_target_and_no_labelling_within_their_cost_has_less_loss(target):
    torch.manual_seed(0)
    losses = torch.rand(6, 4, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.5, 1.0], dtype=torch.float64)
    labels = budget_labels(losses, COSTS, target)
    cost = float(COSTS[labels].mean())
    loss = float(losses.gather(1, labels[:, None]).sum())
    assert cost <= target + 1e-9
    rows = torch.arange(6)
    for assignment in itertools.product(range(4), repeat=6):  # every labelling of the 6 images
        chosen = torch.tensor(assignment)
        if float(COSTS[chosen].mean()) <= cost + 1e-9:
            assert float(losses[rows, chosen].sum()) >= loss - 1e-9


def test_budget_labels_give_an_image_the_route_whose_saving_pays_for_its_cost():
    losses = torch.tensor([[0.1, 0.1, 0.1, 0.1],    # every route right alike: the cheapest
                           [5.0, 0.2, 0.2, 0.2],    # the second route saves most of the loss
                           [5.0, 5.0, 5.0, 0.1],    # only the widest route is right
                           [0.5, 0.4, 0.3, 0.2]], dtype=torch.float64)
    assert budget_labels(losses, COSTS, 4.0).tolist() == [0, 1, 3, 3]  # no price: the least loss, ties cheapest
    assert budget_labels(losses, COSTS, 2.0).tolist() == [0, 1, 3, 0]
    assert budget_labels(losses, COSTS, 1.0).tolist() == [0, 0, 0, 0]  # the cheapest route's cost is the floor


@pytest.mark.parametrize("target", [1.2, 1.9, 2.5, 3.1, 3.8])
def test_the_route_bias_moves_the_argmax_routes_to_the_target_mean_cost(target):
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 4).double()
    batches = [torch.randn(500, 8, dtype=torch.float64) for _ in range(4)]
    bias = torch.full((4,), 7.0, dtype=torch.float64)  # a stale bias from before is replaced

    def route_logits(x):
        return head(x) + bias

    reached = calibrate_route_bias(route_logits, batches, bias, COSTS, target)
    routes = torch.cat([route_logits(x).argmax(1) for x in batches])
    assert float(COSTS[routes].mean()) == pytest.approx(reached)
    assert reached == pytest.approx(target, rel=0.01)
    price = -float(bias[0]) / float(COSTS[0] / COSTS.max())
    torch.testing.assert_close(bias, -price * COSTS / COSTS.max())  # one price times each route's cost


def test_a_least_share_lifts_the_routes_the_argmax_starves_and_keeps_the_target():
    torch.manual_seed(2)
    logits = torch.randn(2000, 4, dtype=torch.float64) * 0.3
    logits[:, 1:3] -= 1.0  # the middle routes are rarely ranked first
    bias = torch.zeros(4, dtype=torch.float64)
    assert calibrate_route_bias(lambda x: x + bias, [logits], bias, COSTS, 2.5) == pytest.approx(2.5, rel=0.01)
    shares = torch.bincount((logits + bias).argmax(1), minlength=4) / 2000
    assert float(shares[1:3].min()) < 0.1
    reached = calibrate_route_bias(lambda x: x + bias, [logits], bias, COSTS, 2.5, min_share=0.1)
    shares = torch.bincount((logits + bias).argmax(1), minlength=4) / 2000
    assert float(shares.min()) >= 0.1 - 1e-3
    assert reached == pytest.approx(2.5, rel=0.01)


def test_one_route_has_nothing_to_calibrate_or_label():
    cost = COSTS[-1:]
    bias = torch.full((1,), 3.0, dtype=torch.float64)
    assert calibrate_route_bias(lambda x: x + bias, [torch.rand(5, 1, dtype=torch.float64)], bias, cost, 2.0) == 4.0
    assert bias.tolist() == [0.0]
    assert budget_labels(torch.rand(5, 1, dtype=torch.float64), cost, 2.0).tolist() == [0] * 5
