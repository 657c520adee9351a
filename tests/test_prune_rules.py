"""The pure pruning rules of `dsnet.prune.rules` against the known answers of the published formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from dsnet.prune.rules import (
    agp_sparsity,
    dcp_greedy_select,
    dcp_keep_count,
    distiller_prune_count,
    fold_gate,
    gate_decorator_rewrite,
    global_threshold_masks,
    histogram_valley_threshold,
    network_slimming_threshold,
    polarization_regularizer,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- Polarization ---

@pytest.mark.parametrize("gamma, t, expected", [
    ([0.1, 0.2, 0.9, 0.8, 0.0], 1.4, 1.0),
    ([0.0, 0.5, 1.0, 1.0], 1.2, 1.5),
    ([0.0, 0.0, 1.0, 1.0], 1.0, 0.0),
])
def test_polarization_regularizer_known_values(gamma, t, expected):
    r = polarization_regularizer(torch.tensor(gamma, dtype=torch.float64), t, alpha=1.0)
    assert r.dim() == 0
    assert r.item() == pytest.approx(expected, abs=1e-9)


def test_polarization_regularizer_gradient():
    gamma = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.0], dtype=torch.float64, requires_grad=True)
    polarization_regularizer(gamma, t=1.4).backward()
    # d/dγ_i = t·sign(γ_i) − (s_i − mean(s)) with s = sign(γ − mean γ) = [−1, −1, 1, 1, −1], mean(s) = −0.2.
    assert gamma.grad.tolist() == pytest.approx([2.2, 2.2, 0.2, 0.2, 0.8], abs=1e-9)


def test_polarization_regularizer_alpha_scales_the_mean():
    gamma = torch.tensor([0.0, 0.5, 1.0, 1.0])
    # α = 0: R = (t − 1)·Σ|γ|.
    assert polarization_regularizer(gamma, t=1.2, alpha=0.0).item() == pytest.approx(0.2 * 2.5, abs=1e-6)


def _values_in_bins(counts: dict[int, int], bins: int = 100) -> torch.Tensor:
    """`counts[i]` values at the centre of bin i of a `bins`-bin histogram on [0, 1]."""
    return torch.cat([torch.full((n,), (i + 0.5) / bins) for i, n in counts.items()])


def test_histogram_valley_threshold_known_answer():
    values = torch.cat([_values_in_bins({0: 5, 1: 3, 2: 1}), torch.full((20,), 0.5)])
    threshold = histogram_valley_threshold(values)
    assert threshold == pytest.approx(0.03, abs=1e-12)
    keep = values >= threshold
    assert int(keep.sum()) == 20
    assert bool((values[keep] == 0.5).all())


def test_histogram_valley_threshold_edge_cases():
    # No values: the first bin is already a valley (0 ≤ 0), so the threshold is `low` and everything is kept.
    assert histogram_valley_threshold(torch.empty(0)) == 0.0
    # Counts falling strictly over all 100 bins: no valley, so the threshold is `high`.
    falling = _values_in_bins({i: 100 - i for i in range(100)})
    assert histogram_valley_threshold(falling) == 1.0
    # Custom range and bin count: 10 bins on [0, 2], counts 4, 2, 2, ... → valley at bin 1, edge 0.2.
    values = torch.tensor([0.1] * 4 + [0.3] * 2 + [0.5] * 2 + [1.9] * 6)
    assert histogram_valley_threshold(values, bins=10, low=0.0, high=2.0) == pytest.approx(0.2, abs=1e-12)


# --- Distiller ---

@pytest.mark.parametrize("epoch, expected", [
    (0, 0.1), (2, 0.179738), (4, 0.248105), (14, 0.45), (28, 0.5),
    (-3, 0.1), (29, 0.5), (40, 0.5),
])
def test_agp_sparsity_every_two_epochs(epoch, expected):
    assert agp_sparsity(epoch, initial=0.1, final=0.5, start=0, end=30, freq=2) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("epoch, expected", [(0, 0.0), (10, 0.3904), (20, 0.6272), (50, 0.8)])
def test_agp_sparsity_every_ten_epochs(epoch, expected):
    assert agp_sparsity(epoch, initial=0.0, final=0.8, start=0, end=51, freq=10) == pytest.approx(expected, abs=1e-6)


def test_agp_sparsity_offset_start():
    # start 5: the schedule is the one of start 0 shifted by 5 epochs.
    kwargs = dict(initial=0.1, final=0.5, end=35, freq=2)
    assert agp_sparsity(3, start=5, **kwargs) == pytest.approx(0.1, abs=1e-6)
    assert agp_sparsity(7, start=5, **kwargs) == pytest.approx(0.179738, abs=1e-6)


@pytest.mark.parametrize("n, fraction, expected", [(32, 0.45, 14), (16, 0.999, 15), (16, 1.0, 16), (10, 0.3, 3)])
def test_distiller_prune_count(n, fraction, expected):
    assert distiller_prune_count(n, fraction) == expected


# --- Network Slimming ---

def test_network_slimming_threshold_known_answer():
    gammas = torch.tensor([0.9, 0.05, 0.3, 0.01, 0.7, 0.2, 0.02, 0.6, 0.4, 0.03])
    threshold = network_slimming_threshold(gammas, 0.3)
    assert threshold == pytest.approx(0.05, abs=1e-7)
    assert int((gammas.abs() <= threshold).sum()) == 4


def test_network_slimming_threshold_uses_abs_and_clamps():
    gammas = torch.tensor([-0.9, 0.05, -0.3, 0.01])
    assert network_slimming_threshold(gammas, 0.5) == pytest.approx(0.3, abs=1e-7)
    assert network_slimming_threshold(gammas, 1.0) == pytest.approx(0.9, abs=1e-7)


# --- Gate Decorator ---

def test_gate_decorator_rewrite_known_answer():
    gamma = torch.tensor([0.5, -2.0, 0.001])
    beta = torch.tensor([1.0, 0.5, 0.5])
    beta_prime, gate = gate_decorator_rewrite(gamma, beta)
    assert beta_prime.tolist() == pytest.approx([2.0, -0.25, 10.0], abs=1e-6)
    assert torch.equal(gate, gamma)
    weight, bias = fold_gate(beta_prime, gate)
    assert torch.equal(weight, gamma)
    assert bias.tolist() == pytest.approx([1.0, 0.5, 0.01], abs=1e-6)
    # Unclamped channels compute the same function: γ·x + β = g·(x + β').
    x = torch.randn(7, 3)
    assert torch.allclose((gamma * x + beta)[:, :2], (gate * (x + beta_prime))[:, :2], atol=1e-6)


def test_gate_decorator_rewrite_zero_gamma():
    beta_prime, gate = gate_decorator_rewrite(torch.zeros(3), torch.tensor([1.0, -1.0, 0.0]), limit=5.0)
    assert beta_prime.tolist() == [5.0, -5.0, 0.0]
    assert gate.tolist() == [0.0, 0.0, 0.0]
    weight, bias = fold_gate(beta_prime, gate)
    assert not torch.isnan(bias).any()
    assert bias.tolist() == [0.0, 0.0, 0.0]


def test_global_threshold_masks_known_answer():
    scores = {"A": torch.tensor([5.0, 1.0, 3.0, 0.5]), "B": torch.tensor([2.0, 4.0, 0.2, 6.0])}
    threshold, masks = global_threshold_masks(scores, prune=2)
    assert threshold == pytest.approx(0.5)
    assert masks["A"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert masks["B"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert masks["A"].dtype == torch.float32


def test_global_threshold_masks_min_keep_skips():
    # A's second-lowest (0.2) would leave A with 1 < 2 channels: skipped, B's 0.3 is pruned instead.
    scores = {"A": torch.tensor([0.1, 0.2, 5.0]), "B": torch.tensor([0.3, 4.0, 6.0])}
    threshold, masks = global_threshold_masks(scores, prune=2, min_keep=2)
    assert threshold == pytest.approx(0.3)
    assert masks["A"].tolist() == [0.0, 1.0, 1.0]
    assert masks["B"].tolist() == [0.0, 1.0, 1.0]
    # Asking for more than min_keep allows: prune as many as possible, then stop.
    threshold, masks = global_threshold_masks(scores, prune=10, min_keep=2)
    assert threshold == pytest.approx(0.3)
    assert [int(m.sum()) for m in masks.values()] == [2, 2]


def test_global_threshold_masks_nothing_pruned():
    threshold, masks = global_threshold_masks({"A": torch.tensor([1.0, 2.0])}, prune=0)
    assert threshold == -math.inf
    assert masks["A"].tolist() == [1.0, 1.0]


# --- DCP ---

@pytest.mark.parametrize("channels, eta, expected", [(16, 0.5, 8), (10, 0.75, 3), (10, 0.33, 7), (64, 0.3, 45)])
def test_dcp_keep_count(channels, eta, expected):
    assert dcp_keep_count(channels, eta) == expected


def _orthogonal_inputs(n: int = 64, c: int = 8, scale: float = 4.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n))
    return scale * q[:, :c]


def _assert_only_columns(weights: torch.Tensor, cols: list[int]):
    others = [c for c in range(weights.shape[1]) if c not in cols]
    assert torch.equal(weights[:, others], torch.zeros_like(weights[:, others]))


def test_dcp_greedy_select_finds_the_target_channels():
    x = _orthogonal_inputs()
    w = torch.randn(3, 8)
    y = x[:, [2, 5]] @ torch.randn(2, 3)
    selected, (refit,) = dcp_greedy_select([(x, w, y)], keep=2)
    assert selected.dtype == torch.long
    assert selected.tolist() == [2, 5]
    assert refit.shape == w.shape
    _assert_only_columns(refit, [2, 5])
    assert F.mse_loss(x @ refit.T, y).item() < 1e-10


def test_dcp_greedy_select_chunks():
    x = _orthogonal_inputs()
    y = x[:, [2, 5, 6]] @ torch.tensor([[3.0], [2.0], [1.0]])
    selected, (refit,) = dcp_greedy_select([(x, torch.zeros(1, 8), y)], keep=2, chunk=2)
    assert selected.tolist() == [2, 5]
    selected, (refit,) = dcp_greedy_select([(x, torch.zeros(1, 8), y)], keep=3, chunk=2)
    assert selected.tolist() == [2, 5, 6]
    assert F.mse_loss(x @ refit.T, y).item() < 1e-10


def test_dcp_greedy_select_shares_channels_across_problems():
    x1, x2 = _orthogonal_inputs(), _orthogonal_inputs(n=40)
    y1 = x1[:, [2]] @ torch.tensor([[1.0, -1.0]])  # problem 1 wants channel 2
    y2 = x2[:, [5]] @ torch.tensor([[10.0, 5.0]])  # problem 2 wants channel 5, more strongly
    p1, p2 = (x1, torch.zeros(2, 8), y1), (x2, torch.zeros(2, 8), y2)
    assert dcp_greedy_select([p1], keep=1)[0].tolist() == [2]
    assert dcp_greedy_select([p1, p2], keep=1)[0].tolist() == [5]

    selected, (w1, w2) = dcp_greedy_select([p1, p2], keep=2)
    assert selected.tolist() == [2, 5]
    for w in (w1, w2):
        _assert_only_columns(w, [2, 5])
    assert F.mse_loss(x1 @ w1.T, y1).item() < 1e-10
    assert F.mse_loss(x2 @ w2.T, y2).item() < 1e-10


def test_dcp_greedy_select_with_aux_loss():
    x = _orthogonal_inputs()
    y = x[:, [2, 5]] @ torch.randn(2, 3)
    head = torch.randn(4, 3)
    labels = torch.randint(0, 4, (x.shape[0],))
    calls = []

    def aux_loss(outputs):
        calls.append(len(outputs))
        return F.cross_entropy(outputs[0] @ head.T, labels)

    selected, (refit,) = dcp_greedy_select([(x, torch.zeros(3, 8), y)], keep=2, aux_loss=aux_loss, lam=1e-3)
    assert selected.tolist() == [2, 5]
    _assert_only_columns(refit, [2, 5])
    assert calls and set(calls) == {1}

    # The descent moved off the least-squares fit and lowered the combined loss.
    lstsq = torch.zeros(3, 8)
    lstsq[:, [2, 5]] = torch.linalg.lstsq(x[:, [2, 5]], y).solution.T

    def combined(w):
        out = x @ w.T
        return F.mse_loss(out, y) + 1e-3 * F.cross_entropy(out @ head.T, labels)

    assert not torch.equal(refit, lstsq)
    assert combined(refit).item() < combined(lstsq).item()
    assert F.mse_loss(x @ refit.T, y).item() < 1e-3


@pytest.mark.parametrize("t", [1.0, 1.2, 1.5])
def test_polarization_penalty_uses_the_t_it_is_given(t):
    """λ·Σ R(γ) over every group's scale factors, with R's t from the settings (--polarization-t)."""
    from types import SimpleNamespace

    from dsnet.prune.base import PruneSettings
    from dsnet.prune.polarization import Polarization

    gammas = [torch.tensor([0.9, 0.1, 0.5, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.2], dtype=torch.float64)]
    settings = PruneSettings("polarization", penalty=0.5, polarization_t=t)
    method = Polarization(SimpleNamespace(settings=settings, all_gammas=lambda: gammas))
    expected = 0.5 * sum(t * g.abs().sum() - (g - g.mean()).abs().sum() for g in gammas)
    assert method.penalty_term().item() == pytest.approx(expected.item(), abs=1e-12)
    assert f"t = {t:g}" in method.phase_settings()


def test_dcp_greedy_select_reads_a_kxk_consumer_channel_by_channel():
    """A 3×3 consumer's unfolded input has 9 columns per channel: the target reads channels 1 and 3 through a 3×3
    conv, a 1×1 consumer of the same channels reads channel 3, and the shared selection keeps exactly 1 and 3,
    with every column of the other channels zero."""
    torch.manual_seed(0)
    images = torch.randn(6, 4, 5, 5)
    conv = torch.nn.Conv2d(4, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[:, [0, 2]] = 0
    x3 = F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, 36)  # (N·25, 4·9), channel-major
    y3 = x3 @ conv.weight.flatten(1).T
    x1 = images.permute(0, 2, 3, 1).reshape(-1, 4)
    y1 = x1[:, [3]] * 2.0
    selected, (w3, w1) = dcp_greedy_select([(x3, torch.zeros(2, 36), y3), (x1, torch.zeros(1, 4), y1)], keep=2,
                                           channels=4)
    assert selected.tolist() == [1, 3]
    _assert_only_columns(w3, list(range(9, 18)) + list(range(27, 36)))
    _assert_only_columns(w1, [1, 3])
    assert F.mse_loss(x3 @ w3.T, y3).item() < 1e-10 and F.mse_loss(x1 @ w1.T, y1).item() < 1e-10
