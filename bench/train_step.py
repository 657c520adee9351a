"""What a stage-I sandwich step costs over the dense networks it stands for.

A: dsnet's full stage-I step — EMA-teacher forwards, forward and backward of each sandwich width through the sliced
   supernet (in-place ensemble bootstrapping losses), one optimizer step, one EMA update.
B: the same arithmetic on separate dense `torch.nn` networks of those widths — dense teacher forwards, forward and
   backward of each dense student with the same losses — plus one optimizer step and one EMA update over the
   largest width's parameters.

Both use the same batch and a fixed sandwich (largest, two fixed middle widths, smallest), interleaved step by step
(which side goes first alternates) after a warm-up, threads fixed (on CUDA, synchronised around each timed part);
figures are medians. Prints A/B per batch size, a breakdown of where A's time goes against B's, and as the last line
`ratio <A/B>` at the last batch size (128 by default).

    python bench/train_step.py [--threads 2] [--device cuda] [--batch-sizes 32 128] [--img-size 32] [--imagenet]
                               [--contiguous] [--amp] [--system-malloc]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import dsnet
from dsnet.cpu_memory import keep_freed_memory
from dsnet.sandwich import sandwich_step, soft_cross_entropy
from dsnet.timing import synchronize

from device import add_device_args, describe, setup_device


class Clock:
    """Accumulates wall time per named part within one step."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.parts: dict[str, float] = defaultdict(float)

    def time(self, name: str, fn):
        synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        synchronize(self.device)
        self.parts[name] += time.perf_counter() - start
        return out


def step_sliced(model, ema, optimizer, images, targets, widths, clock: Clock) -> None:
    """A: the supernet step, with the same arithmetic as `dsnet.sandwich.sandwich_step`, timed by part."""
    largest, middle, smallest = widths[0], widths[1:-1], widths[-1]
    teacher = ema.module

    def teacher_forwards():
        with torch.no_grad():
            return {w: F.softmax(teacher(images, w), -1) for w in [largest, *middle]}

    probs = clock.time("teacher forwards", teacher_forwards)
    optimizer.zero_grad(set_to_none=True)
    clock.time("largest fwd+bwd", lambda: F.cross_entropy(model(images, largest), targets,
                                                          label_smoothing=0.1).backward())
    for w in middle:
        clock.time("middle fwd+bwd", lambda: soft_cross_entropy(model(images, w), probs[largest]).backward())
    ensemble = torch.stack(list(probs.values())).mean(0)
    clock.time("smallest fwd+bwd", lambda: soft_cross_entropy(model(images, smallest), ensemble).backward())
    clock.time("optimizer step", optimizer.step)
    clock.time("EMA update", lambda: ema.update(model))


def check_same_arithmetic(model, ema, images, targets, widths) -> None:
    """A's timed step repeats `dsnet.sandwich.sandwich_step` part by part: check once that the gradients agree."""
    replica, teacher = copy.deepcopy(model), copy.deepcopy(ema)
    probe = create_optimizer_v2(replica, opt="sgd", lr=0.0)
    step_sliced(replica, teacher, probe, images, targets, widths, Clock())
    reference = copy.deepcopy(model)
    sandwich_step(reference, ema.module, images, targets, widths, label_smoothing=0.1)
    for (name, a), b in zip(replica.named_parameters(), reference.parameters()):
        # CUDA's convolution backward may sum in a different order from one call to the next
        tolerance = 1e-5 if a.device.type == "cpu" else 1e-4
        if (a.grad is None) != (b.grad is None) or (a.grad is not None and not torch.allclose(
                a.grad, b.grad, atol=tolerance, rtol=tolerance)):
            raise SystemExit(f"the timed step differs from dsnet.sandwich.sandwich_step in the gradient of {name}")


def step_dense(students, teachers, optimizer, ema, images, targets, clock: Clock) -> None:
    """B: dense networks of the same widths: students[0] is the largest and owns the optimizer and EMA."""

    def teacher_forwards():
        with torch.no_grad():
            return [F.softmax(t(images), -1) for t in teachers]

    probs = clock.time("teacher forwards", teacher_forwards)
    optimizer.zero_grad(set_to_none=True)
    for s in students[1:]:
        for p in s.parameters():
            p.grad = None
    clock.time("largest fwd+bwd", lambda: F.cross_entropy(students[0](images), targets,
                                                          label_smoothing=0.1).backward())
    for s in students[1:-1]:
        clock.time("middle fwd+bwd", lambda: soft_cross_entropy(s(images), probs[0]).backward())
    ensemble = torch.stack(probs).mean(0)
    clock.time("smallest fwd+bwd", lambda: soft_cross_entropy(students[-1](images), ensemble).backward())
    clock.time("optimizer step", optimizer.step)
    clock.time("EMA update", lambda: ema.update(students[0]))


def median_parts(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--imagenet", action="store_true", help="ImageNet layout (no small-input stem)")
    parser.add_argument("--sandwich", type=float, nargs=4, default=[1.0, 0.75, 0.5, 0.35], metavar="W",
                        help="largest, two middle widths, smallest")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--contiguous", action="store_true",
                        help="both sides in the contiguous (NCHW) memory format (train.py's --no-channels-last); by "
                             "default both are channels_last, as train.py trains")
    parser.add_argument("--amp", action="store_true",
                        help="both sides under bf16 autocast on either device (train.py's --amp is bf16 on CPU, fp16 "
                             "with a GradScaler on CUDA)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc returning freed memory to the OS (train.py's "
                             "--no-keep-freed-memory); by default both sides keep it, as train.py does")
    args = parser.parse_args()
    device = setup_device(parser, args)
    kept = not args.system_malloc and keep_freed_memory()
    memory_format = torch.contiguous_format if args.contiguous else torch.channels_last

    model = dsnet.create_supernet(widths=sorted(args.sandwich), num_classes=args.classes,
                                  small_input=not args.imagenet, img_size=args.img_size).train()
    model = model.to(device, memory_format=memory_format)
    widths = [model.choice_index(w) for w in args.sandwich]
    ema = ModelEmaV3(model, decay=0.99)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=1e-4)

    students = [dsnet.export_subnet(model, w).train().to(device, memory_format=memory_format) for w in args.sandwich]
    teachers = [copy.deepcopy(s).eval() for s in students[:-1]]
    dense_optimizer = create_optimizer_v2(students[0], opt="sgd", lr=0.01, weight_decay=1e-4)
    dense_ema = ModelEmaV3(students[0], decay=0.99)

    print(f"torch {torch.__version__}, {describe(device, args.threads)}, {args.img_size} px, "
          f"{'ImageNet layout' if args.imagenet else 'small-input stem'}, sandwich {args.sandwich}, "
          f"{args.classes} classes, medians of {args.steps} steps after {args.warmup} warm-up"
          f"{', contiguous' if args.contiguous else ', channels_last'}{', bf16 autocast' if args.amp else ''}"
          f"{', freed memory kept' if kept else ', freed memory returned to the OS'}")
    ratio = float("nan")
    for batch in args.batch_sizes:
        images = torch.randn(batch, 3, args.img_size, args.img_size).to(device, memory_format=memory_format)
        targets = torch.randint(0, args.classes, (batch,)).to(device)
        check_same_arithmetic(model, ema, images, targets, widths)
        totals = {"A": [], "B": []}
        parts = {"A": [], "B": []}
        for i in range(args.warmup + args.steps):
            for side in ("A", "B") if i % 2 else ("B", "A"):  # alternate which side runs first
                clock = Clock(device)
                synchronize(device)
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    if side == "A":
                        step_sliced(model, ema, optimizer, images, targets, widths, clock)
                    else:
                        step_dense(students, teachers, dense_optimizer, dense_ema, images, targets, clock)
                synchronize(device)
                if i >= args.warmup:
                    totals[side].append(time.perf_counter() - start)
                    parts[side].append(dict(clock.parts))
        a, b = statistics.median(totals["A"]), statistics.median(totals["B"])
        ratio = a / b
        pa, pb = median_parts(parts["A"]), median_parts(parts["B"])
        print(f"\nbatch {batch}: A {a * 1e3:.1f} ms, B {b * 1e3:.1f} ms, A/B {ratio:.3f}")
        print(f"  {'part':<18} {'A ms':>9} {'B ms':>9} {'A-B ms':>9}")
        for name in pa:
            print(f"  {name:<18} {pa[name] * 1e3:>9.1f} {pb[name] * 1e3:>9.1f} {(pa[name] - pb[name]) * 1e3:>+9.1f}")
        rest_a, rest_b = a - sum(pa.values()), b - sum(pb.values())
        print(f"  {'other (Python)':<18} {rest_a * 1e3:>9.1f} {rest_b * 1e3:>9.1f} {(rest_a - rest_b) * 1e3:>+9.1f}")
    print(f"ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
