"""Width travels with the call: forms, validation, determinism and per-width BN statistics."""
import pytest
import torch

import dsnet
from dsnet.sandwich import soft_cross_entropy


def test_same_width_same_output_and_no_state_left_behind(small_supernet):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        first = small_supernet(x, 0.5)
        second = small_supernet(x, 0.5)
        fresh_k = small_supernet(x, 0.75)
        small_supernet(x, 0.35)  # a call at width j ...
        after_j = small_supernet(x, 0.75)  # ... leaves nothing behind for width k
    assert torch.equal(first, second)
    assert torch.equal(fresh_k, after_j)


def test_every_width_form_resolves_to_the_same_plan(small_supernet):
    m = small_supernet
    idx = m.choice_index(0.6)
    by_multiplier = m.resolve_width(0.6)
    assert by_multiplier.choice == idx
    assert m.resolve_width(idx) == by_multiplier
    assert m.resolve_width([0.6] * len(m.stage_names)) == by_multiplier
    assert m.resolve_width([idx] * len(m.stage_names)) == by_multiplier
    assert m.resolve_width(by_multiplier.as_dict()) == by_multiplier
    assert m.resolve_width(None) == m.resolve_width(1.0) == m.largest
    assert m.resolve_width(-1) == m.largest


def test_per_stage_widths_mix_choices(small_supernet):
    m = small_supernet
    widths = [1.0] * 4 + [0.35] * (len(m.stage_names) - 4)
    plan = m.resolve_width(widths)
    assert plan.choice is None
    assert plan["stem"] == m.largest["stem"] and plan["head"] == m.largest["head"]
    assert plan["blocks.5"] == m.smallest["blocks.5"]
    # the expansion width follows the rounded input width: first block of stage 3 reads stage 2's full stream
    assert plan["blocks.3.0.hidden"] == m.largest["blocks.3.0.hidden"]
    assert plan["blocks.3.1.hidden"] == m.smallest["blocks.3.1.hidden"]


@pytest.mark.parametrize("width,message", [
    ({"stem": 8}, "lacks layer"),
    ({"nonsense": 3}, "unknown layer(s) ['nonsense']"),
    (2.0, "allowed: (0, 1.0]"),
    (99, "out of range"),
    ([0.5, 0.5], "per-stage widths need"),
    ("wide", "width must be"),
])
def test_bad_widths_raise_value_error(small_supernet, width, message):
    with pytest.raises(ValueError, match=None) as info:
        small_supernet.resolve_width(width)
    assert message in str(info.value)


def test_plan_channel_out_of_range_names_the_layer_and_allowed_values(small_supernet):
    plan = small_supernet.largest.as_dict()
    plan["blocks.3.1.hidden"] = 10_000
    with pytest.raises(ValueError, match=r"layer 'blocks.3.1.hidden' 10000 channels; allowed: 1\.\.384"):
        small_supernet.resolve_width(plan)
    plan["blocks.3.1.hidden"] = 0
    with pytest.raises(ValueError, match=r"'blocks.3.1.hidden' 0 channels"):
        small_supernet.resolve_width(plan)


def test_each_width_keeps_its_own_bn_statistics():
    model = dsnet.create_supernet(num_classes=10, small_input=True, widths=[0.5, 0.75, 1.0])
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(torch.randn(4, 3, 32, 32) * 3 + 1, 0.75)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    for key in before:
        changed = (before[key] != after[key]).any(dim=-1) if before[key].dim() > 1 else None
        assert changed is not None
        assert changed.tolist() == [False, True, False, False], key  # slots: 0.5, 0.75, 1.0, custom


def test_uncollected_custom_plan_is_refused_in_eval_and_recalibration_touches_only_its_slot():
    model = dsnet.create_supernet(num_classes=10, small_input=True, widths=[0.5, 1.0]).eval()
    plan = model.resolve_width(0.7)
    assert plan.choice is None
    with pytest.raises(ValueError, match="never collected"):
        model(torch.randn(1, 3, 32, 32), plan)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    used = dsnet.recalibrate_bn(model, plan, [torch.randn(4, 3, 32, 32) + 2 for _ in range(3)])
    assert used == 3
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert torch.equal(value[:2], state[key][:2]), key
            assert not torch.equal(value[2], state[key][2]), key
        elif key != "calibrated_plans" and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    model(torch.randn(1, 3, 32, 32), plan)  # now allowed


def test_recalibration_is_the_exact_average_over_batches():
    model = dsnet.create_supernet(num_classes=10, small_input=True, widths=[0.5, 1.0]).eval()
    batches = [torch.randn(4, 3, 32, 32) * (i + 1) for i in range(3)]
    dsnet.recalibrate_bn(model, 0.5, batches)
    stem = model.conv_stem
    means = [stem(b, model.smallest["stem"]).mean(dim=(0, 2, 3)) for b in batches]
    expected = torch.stack(means).mean(0)
    got = model.bn1.running_mean[0, :model.smallest["stem"]]
    assert torch.allclose(got, expected, atol=1e-5)


def test_several_custom_plans_keep_their_own_statistics_and_one_slot_checkpoints_load_padded():
    one_slot = dsnet.create_supernet(num_classes=10, small_input=True, widths=[0.5, 1.0]).eval()
    first, second = one_slot.resolve_width(0.7), one_slot.resolve_width(0.6)
    batches = [torch.randn(4, 3, 32, 32) + 1 for _ in range(2)]
    dsnet.recalibrate_bn(one_slot, first, batches)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = {0: one_slot(x, 0), 1: one_slot(x, 1), "first": one_slot(x, first)}

    three_slots = dsnet.create_supernet(num_classes=10, small_input=True, widths=[0.5, 1.0], custom_bn_slots=3)
    three_slots.load_state_dict(one_slot.state_dict(), strict=True)  # the two new slots are added empty
    three_slots.eval()
    assert three_slots.calibrated_plans.shape == (3, len(three_slots.group_names))
    assert three_slots.has_bn_statistics(first) and not three_slots.has_bn_statistics(second)
    dsnet.recalibrate_bn(three_slots, second, [b * 2 for b in batches])
    assert three_slots.stats_slot(first) == 2 and three_slots.stats_slot(second) == 3
    with torch.no_grad():
        for key, value in expected.items():
            assert torch.equal(three_slots(x, first if key == "first" else key), value), key
        assert not torch.allclose(three_slots(x, second), one_slot(x, 0), atol=1e-3)
    # a third custom plan takes the last free slot; a fourth replaces the last slot, the others stay
    third, fourth = three_slots.resolve_width(0.8), three_slots.resolve_width(0.9)
    dsnet.recalibrate_bn(three_slots, third, batches)
    dsnet.recalibrate_bn(three_slots, fourth, batches)
    assert [three_slots.has_bn_statistics(p) for p in (first, second, third, fourth)] == [True, True, False, True]


def test_inference_slices_follow_weight_updates():
    model = dsnet.create_supernet(num_classes=10, small_input=True, widths=[0.5, 1.0]).eval()
    torch.nn.init.normal_(model.classifier.weight)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x, 0.5)
        model.conv_head.weight.mul_(-1.0)  # in place: the cached slice must not be reused
        model.bn2.bias.add_(1.0)
        after = model(x, 0.5)
        reference = dsnet.export_subnet(model, 0.5)(x)
    assert (before - after).abs().max() > 1e-3
    assert torch.allclose(after, reference, atol=1e-5)
    model.load_state_dict({k: v * 1 for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(model(x, 0.5), reference, atol=1e-5)
    model.double()  # swaps every param.data without a version bump: the cache must not survive it
    with torch.no_grad():
        model.conv_head.weight.data = -model.conv_head.weight.data
        model.double()
        doubled = model(x.double(), 0.5)
        assert doubled.dtype == torch.float64
        assert torch.allclose(doubled, dsnet.export_subnet(model, 0.5)(x.double()), atol=1e-10)
        model.bn2.running_mean = model.bn2.running_mean + 0.5  # replaced by assignment: the views must not survive
        model.conv_head.weight = torch.nn.Parameter(-model.conv_head.weight)
        replaced = model(x.double(), 0.5)
        assert (replaced - doubled).abs().max() > 1e-3
        assert torch.allclose(replaced, dsnet.export_subnet(model, 0.5)(x.double()), atol=1e-10)


def test_a_model_copies_after_inference_and_in_place_training_updates():
    """The inference cache holds views of the weights; copies and pickles leave it behind (an EMA teacher that ran
    inference and was then updated in place must still deep-copy)."""
    import copy
    import pickle

    from timm.utils import ModelEmaV3

    model = dsnet.create_supernet(num_classes=10, small_input=True, widths=[0.5, 1.0])
    ema = ModelEmaV3(model, decay=0.9)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ema.module(x, 0.5)  # the teacher's inference fills its cache
    soft_cross_entropy(model(x, 0.5), torch.full((2, 10), 0.1)).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    ema.update(model)  # in place
    for clone in (copy.deepcopy(ema.module), pickle.loads(pickle.dumps(ema.module))):
        assert not any(key in m.__dict__ for m in clone.modules() for key in dsnet.slim._INFERENCE_CACHES)
        with torch.no_grad():
            assert torch.equal(clone(x, 0.5), ema.module(x, 0.5))

