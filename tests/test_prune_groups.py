"""Coupled channel groups, permutation and masking, and the width cuts of static pruning."""
import copy

import pytest
import torch

import dsnet
from dsnet.export import export_subnet
from dsnet.prune.cuts import (floor_of, global_cut_for_target, global_prune_sequence, keep_after,
                              uniform_cut_for_target, uniform_keep)
from dsnet.prune.groups import derive_groups
from dsnet.prune.permute import permute_groups

from conftest import randomize_bn


def _supernet(**overrides):
    torch.manual_seed(3)
    model = dsnet.create_supernet(num_classes=10, small_input=True, img_size=32, widths=[0.5, 1.0], **overrides)
    randomize_bn(model)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1)  # logits of order 1, so a changed channel shows
    # Statistics of real activations: with random ones the signal fades before the head and hides every change.
    batches = [torch.randn(8, 3, 32, 32)]
    for i in range(len(model.widths)):
        dsnet.recalibrate_bn(model, i, batches)
    return model.eval()


def test_mobilenetv2_group_count_is_derived():
    model = dsnet.create_supernet(num_classes=10)
    groups = derive_groups(model)
    stages = model.config.stages
    expanding_blocks = sum(n for t, _c, n, _s in stages if t != 1)
    assert len(groups) == 1 + len(stages) + expanding_blocks + 1 == 25  # stem, streams, hidden, head
    by_name = {g.name: g for g in groups}
    assert [g.name for g in groups] == list(model.group_names)
    # A stage with residuals: one stream group holding every block output and every reader.
    stream = by_name["blocks.2"]
    assert stream.producers == ["blocks.2.0.conv_pwl", "blocks.2.1.conv_pwl", "blocks.2.2.conv_pwl"]
    assert stream.consumers == ["blocks.2.1.conv_pw", "blocks.2.2.conv_pw", "blocks.3.0.conv_pw"]
    assert stream.bns == ["blocks.2.0.bn3", "blocks.2.1.bn3", "blocks.2.2.bn3"]
    # A hidden group: expand out, its BN, the depthwise conv, its BN, the project conv's input.
    hidden = {(m.tensor, m.dim) for m in by_name["blocks.3.1.hidden"].members}
    assert hidden == {("blocks.3.1.conv_pw.weight", 0), ("blocks.3.1.conv_dw.weight", 0),
                      ("blocks.3.1.conv_pwl.weight", 1)} | {
        (f"blocks.3.1.{bn}.{t}", 0) for bn in ("bn1", "bn2") for t in ("weight", "bias", "running_mean",
                                                                          "running_var")}
    # The stem feeds the first block's depthwise convolution, which keeps the group going to its pointwise conv.
    assert by_name["stem"].consumers == ["blocks.0.0.conv_pw"]
    assert "blocks.0.0.conv_dw.weight" in {m.tensor for m in by_name["stem"].members}
    assert by_name["head"].consumers == ["classifier"]
    assert [g.channels for g in groups] == list(model.max_channels)


def test_squeeze_excitation_joins_the_hidden_group():
    groups = {g.name: g for g in derive_groups(_supernet(se_ratio=0.25))}
    members = {(m.tensor, m.dim) for m in groups["blocks.1.0.hidden"].members}
    assert {("blocks.1.0.se.conv_reduce.weight", 1), ("blocks.1.0.se.conv_expand.weight", 0),
            ("blocks.1.0.se.conv_expand.bias", 0)} <= members
    assert len(groups) == 25  # the reduced channels of squeeze-excitation are not a group


@pytest.mark.parametrize("se_ratio", [0.0, 0.25])
def test_random_permutation_of_every_group_keeps_the_output(se_ratio):
    # Float64: a permutation reorders the sums inside every convolution, and float32 rounding, amplified by the
    # depth of a randomly initialised network, would blur the comparison.
    model = _supernet(se_ratio=se_ratio).double()
    groups = derive_groups(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = [model(x, w) for w in (model.largest, 0)]
    permuted = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    orders = {g.name: torch.randperm(g.channels, generator=generator) for g in groups}
    permute_groups(permuted, groups, orders)
    moved = permuted.conv_stem.weight.detach()
    assert not torch.equal(moved, model.conv_stem.weight.detach())  # something really moved
    with torch.no_grad():
        got = permuted(x, permuted.largest)
    torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=0)
    # The live supernet is untouched; the narrow widths of the permuted copy are another network.
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0), expected[1], atol=0, rtol=0)
        assert (permuted(x, 0) - expected[1]).abs().max() > 1e-3


@pytest.mark.parametrize("group_name,k", [("stem", 5), ("blocks.0", 3), ("blocks.2", 11), ("blocks.3.1.hidden", 70),
                                          ("blocks.6", 100), ("head", 300)])
def test_slicing_a_permuted_group_equals_masking_its_last_channels(group_name, k):
    model = _supernet().double()
    groups = derive_groups(model)
    generator = torch.Generator().manual_seed(1)
    permute_groups(model, groups, {g.name: torch.randperm(g.channels, generator=generator) for g in groups})
    group = next(g for g in groups if g.name == group_name)
    plan = model.resolve_width({**model.largest.as_dict(), group_name: k})
    # The sliced plan runs with the largest width's statistics (the kept channels' are the same).
    slot = model.claim_custom_slot(plan)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, dsnet.slim.SlimBatchNorm2d):
                bn.running_mean[slot].copy_(bn.running_mean[model.largest.choice])
                bn.running_var[slot].copy_(bn.running_var[model.largest.choice])
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    dense = export_subnet(model, model.largest)
    modules = dict(dense.named_modules())

    def zero_last(_module, inputs):
        x = inputs[0].clone()
        x[:, k:] = 0
        return (x,)

    handles = [modules[c].register_forward_pre_hook(zero_last) for c in group.consumers]
    with torch.no_grad():
        masked = dense(x)
        sliced = model(x, plan)
        unmasked_differs = (export_subnet(model, model.largest)(x) - sliced).abs().max()
    for h in handles:
        h.remove()
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=0)
    assert unmasked_differs > 1e-3  # the mask really removed something


def test_permutation_must_be_a_permutation():
    model = _supernet()
    groups = derive_groups(model)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_groups(model, groups, {"stem": torch.zeros(groups[0].channels, dtype=torch.long)})


def _madds_of(model):
    return lambda keep: dsnet.count_madds(model, model.resolve_width(keep))


def test_global_cut_meets_target_and_never_prunes_a_group_to_zero():
    model = _supernet()
    groups = derive_groups(model)
    largest = dsnet.count_madds(model)
    # Scores that make the stem and first stream the least important: a cut without a floor would remove them.
    scores = {g.name: torch.rand(g.channels) + (0.0 if g.name in ("stem", "blocks.0") else 10.0) for g in groups}
    madds_of = _madds_of(model)
    for min_channels in (1, 8):
        keep = global_cut_for_target(groups, scores, min_channels, madds_of, largest // 2)
        assert madds_of(keep) <= largest // 2
        assert all(keep[g.name] >= floor_of(g, min_channels) >= 1 for g in groups)
        assert keep["stem"] == min_channels  # pruned down to its floor, not below
        # The least pruning that meets the target: one channel fewer pruned would not meet it.
        sequence = global_prune_sequence(groups, scores, min_channels)
        pruned = sum(g.channels - keep[g.name] for g in groups)
        assert madds_of(keep_after(groups, sequence, pruned - 1)) > largest // 2
    everything = keep_after(groups, global_prune_sequence(groups, scores, 1), 10**9)
    assert min(everything.values()) == 1
    with pytest.raises(ValueError, match="minimum width"):
        global_cut_for_target(groups, scores, 8, madds_of, 1000)


def test_uniform_cut_meets_target_with_the_least_fraction():
    model = _supernet()
    groups = derive_groups(model)
    madds_of = _madds_of(model)
    target = dsnet.count_madds(model) // 2

    def keep_count(n, f):
        return n - int(f * n)

    fraction, keep = uniform_cut_for_target(groups, 8, keep_count, madds_of, target)
    assert madds_of(keep) <= target
    assert madds_of(uniform_keep(groups, fraction - 0.01, 8, keep_count)) > target
    assert 0.2 < fraction < 0.5  # MAdds fall roughly with the square of the kept fraction
