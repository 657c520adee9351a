"""The stage-I step: sandwich sampling and in-place ensemble bootstrapping, against hand-computed losses."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dsnet
from dsnet.sandwich import random_stage_plans, sandwich_step, sandwich_widths


def test_sandwich_widths_depend_only_on_seed_and_step():
    draws = [sandwich_widths(14, 2, seed=5, step=s) for s in range(20)]
    assert draws == [sandwich_widths(14, 2, seed=5, step=s) for s in range(20)]
    for widths in draws:
        assert widths[0] == 13 and widths[-1] == 0 and len(widths) == 4
        assert 0 < widths[2] < widths[1] < 13  # distinct, widest first
    assert len({tuple(w) for w in draws}) > 10  # they differ between steps
    assert sandwich_widths(14, 2, seed=6, step=0) != sandwich_widths(14, 2, seed=5, step=0) or \
        sandwich_widths(14, 2, seed=6, step=1) != sandwich_widths(14, 2, seed=5, step=1)
    middles = {w for s in range(200) for w in sandwich_widths(14, 2, seed=0, step=s)[1:-1]}
    assert middles == set(range(1, 13))  # every width in between is drawn


def student_teacher_and_batch():
    """A 4-width supernet in training mode, a teacher that differs from it, and a batch of 8 random images."""
    torch.manual_seed(0)
    model = dsnet.create_supernet(widths=[0.35, 0.5, 0.75, 1.0], num_classes=10, small_input=True).train()
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, teacher, torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))


def test_random_stage_plans_depend_only_on_seed_and_step():
    draws = [random_stage_plans(14, 9, 2, seed=5, step=s) for s in range(20)]
    assert draws == [random_stage_plans(14, 9, 2, seed=5, step=s) for s in range(20)]
    assert all(len(plans) == 2 and all(len(p) == 9 for p in plans) for plans in draws)
    assert len({p for plans in draws for p in plans}) == 40  # they differ between steps and within one
    assert random_stage_plans(14, 9, 1, seed=6, step=0) != random_stage_plans(14, 9, 1, seed=5, step=0)
    indices = {i for s in range(50) for p in random_stage_plans(14, 9, 1, seed=0, step=s) for i in p}
    assert indices == set(range(14))  # every choice, the largest and smallest too, in every stage's draw
    assert random_stage_plans(14, 9, 0, seed=0, step=0) == []
    assert sandwich_widths(14, 2, seed=5, step=3) == sandwich_widths(14, 2, seed=5, step=3)  # a separate stream


def test_random_plans_learn_from_the_teacher_largest_outside_the_ensemble():
    model, teacher, images, targets = student_teacher_and_batch()
    plan = (3, 3, 3, 3, 0, 0, 1, 2, 3)  # wide before a "gate", narrow after it
    reference = copy.deepcopy(model)
    with torch.no_grad():
        t3, t1 = (F.softmax(teacher(images, w), -1) for w in (3, 1))

    def soft_ce(logits, p):
        return -(p * F.log_softmax(logits, -1)).sum(-1).mean()

    expected = (F.cross_entropy(reference(images, 3), targets) + soft_ce(reference(images, 1), t3)
                + soft_ce(reference(images, plan, running_stats=False), t3)
                + soft_ce(reference(images, 0), (t3 + t1) / 2))
    expected.backward()
    custom_stats = model.bn2.running_mean[model.custom_slot:].clone()
    losses = sandwich_step(model, teacher, images, targets, [3, 1, 0], plans=[plan])
    assert abs(losses.total - expected.item()) < 1e-5
    assert [w for w, _ in losses.per_width] == [3, 1, plan, 0]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # The plan ran on batch statistics: no custom slot was claimed or updated.
    assert not model.has_bn_statistics(model.resolve_width(plan)) and not model.calibrated_plans.any()
    assert torch.equal(model.bn2.running_mean[model.custom_slot:], custom_stats)
    with pytest.raises(ValueError, match="running_stats=False needs training mode"):
        model.eval()(images, plan, running_stats=False)


def test_step_loss_and_gradients_equal_the_hand_computed_sandwich():
    model, teacher, images, targets = student_teacher_and_batch()
    widths = [3, 2, 1, 0]

    reference = copy.deepcopy(model)
    with torch.no_grad():
        t3, t2, t1 = (F.softmax(teacher(images, w), -1) for w in (3, 2, 1))

    def soft_ce(logits, p):
        return -(p * F.log_softmax(logits, -1)).sum(-1).mean()

    expected = (F.cross_entropy(reference(images, 3), targets, label_smoothing=0.1)
                + soft_ce(reference(images, 2), t3) + soft_ce(reference(images, 1), t3)
                + soft_ce(reference(images, 0), (t3 + t2 + t1) / 3))
    expected.backward()

    losses = sandwich_step(model, teacher, images, targets, widths, label_smoothing=0.1, ensemble_smallest=True)
    assert abs(losses.total - expected.item()) < 1e-5
    assert [w for w, _ in losses.per_width] == widths
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_a_teacher_on_batch_statistics_takes_its_targets_from_the_batch_and_changes_nothing():
    model, teacher, images, targets = student_teacher_and_batch()
    teacher.dropout.p = 0.5  # the teacher's dropout stays off all the same
    before = copy.deepcopy(teacher.state_dict())
    widths = [3, 1, 0]
    on_batch = copy.deepcopy(teacher).train()
    on_batch.dropout.p = 0.0
    reference = copy.deepcopy(model)
    with torch.no_grad():
        t3, t1 = (F.softmax(on_batch(images, w, running_stats=False), -1) for w in (3, 1))
        stale = F.softmax(teacher(images, 3), -1)
    assert (t3 - stale).abs().max() > 1e-2  # the two kinds of target differ on this batch

    def soft_ce(logits, p):
        return -(p * F.log_softmax(logits, -1)).sum(-1).mean()

    expected = (F.cross_entropy(reference(images, 3), targets) + soft_ce(reference(images, 1), t3)
                + soft_ce(reference(images, 0), (t3 + t1) / 2))
    losses = sandwich_step(model, teacher, images, targets, widths, teacher_batch_stats=True)
    assert abs(losses.total - expected.item()) < 1e-5
    assert not teacher.training and not teacher.dropout.training
    for name, value in teacher.state_dict().items():  # no running statistics moved
        assert torch.equal(value, before[name]), name


def test_without_ensemble_or_teacher_the_targets_fall_back():
    torch.manual_seed(0)
    model = dsnet.create_supernet(widths=[0.35, 0.5, 1.0], num_classes=10, small_input=True).train()
    images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    reference = copy.deepcopy(model)
    largest = reference(images, 2)
    live = F.softmax(largest.detach(), -1)  # in-place distillation from the live largest width
    expected = (F.cross_entropy(largest, targets) - (live * F.log_softmax(reference(images, 1), -1)).sum(-1).mean()
                - (live * F.log_softmax(reference(images, 0), -1)).sum(-1).mean())
    losses = sandwich_step(model, None, images, targets, [2, 1, 0], ensemble_smallest=True)
    assert abs(losses.total - expected.item()) < 1e-5


def test_channels_last_gives_the_same_step_and_the_same_export():
    """The speed option changes memory layout only: the same losses and gradients, and a channels_last supernet
    still equals its exported subnet. In float64: in float32 a deep network's backward amplifies the changed
    summation order to about 2e-3 of the largest gradient."""
    torch.manual_seed(0)
    model = dsnet.create_supernet(widths=[0.35, 0.5, 0.75, 1.0], num_classes=10, small_input=True).train().double()
    teacher = copy.deepcopy(model).eval()
    fast, fast_teacher = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (model, teacher))
    images, targets = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    widths = [3, 2, 1, 0]
    reference = sandwich_step(model, teacher, images, targets, widths, label_smoothing=0.1)
    losses = sandwich_step(fast, fast_teacher, images, targets, widths, label_smoothing=0.1)
    assert fast.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert [w for w, _ in losses.per_width] == widths
    for (_, a), (_, b) in zip(losses.per_width, reference.per_width):
        assert abs(a - b) < 1e-10
    # Against the largest gradient: the biases of BNs that feed another BN have a true gradient of zero, and
    # their rounding residue differs with the summation order.
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, a), b in zip(fast.named_parameters(), model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-9 * scale, rtol=1e-7), name
    fast.eval()
    for width in (1, 0.6):
        plan = fast.resolve_width(width)
        if plan.choice is None:
            dsnet.recalibrate_bn(fast, plan, [images])
        with torch.no_grad():
            assert torch.allclose(fast(images, plan), dsnet.export_subnet(fast, plan)(images), atol=1e-10)
