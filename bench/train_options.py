"""What one of train.py's speed options saves per stage-I step, measured inside one process.

Separate runs on a noisy machine differ by more than the effects, so one process alternates the two settings block
by block (a few sandwich steps per block after one untimed step) and compares the medians.

- `--option freed-memory` (train.py's --keep-freed-memory): switches glibc's malloc between keeping the memory a step
  frees (`mallopt`) and its default. The setting is process-wide, hence the blocks.
- `--option channels-last` (train.py's --channels-last): two copies of the same supernet, one in channels_last
  memory format, stepped in alternating blocks; freed memory is kept for both, as train.py does. Runs on CUDA too
  (`--device cuda`), synchronised around each step.
- `--option amp` (train.py's --amp): two copies of the same supernet (channels_last, as train.py trains), one
  stepped under autocast with a GradScaler (fp16 on CUDA; bf16 on the CPU, where no scaler is needed), the other in
  float32, in alternating blocks.

    python bench/train_options.py --option channels-last [--img-size 32] [--batch-size 128] [--threads 2]
                                  [--device cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from typing import Callable

import torch
from timm.utils import ModelEmaV3

import dsnet
from dsnet.cpu_memory import keep_freed_memory, return_freed_memory
from dsnet.sandwich import sandwich_step
from dsnet.timing import synchronize

from device import add_device_args, describe, setup_device


def make_step(model: dsnet.DSMobileNetV2, images: torch.Tensor, targets: torch.Tensor,
              amp_dtype: torch.dtype | None = None) -> Callable[[], None]:
    ema = ModelEmaV3(model, decay=0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    device_type = images.device.type
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sandwich_step(model, ema.module, images, targets, [3, 2, 1, 0], autocast=autocast,
                      backward=lambda loss: scaler.scale(loss).backward())
        scaler.step(optimizer)
        scaler.update()
        ema.update(model)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--option", choices=["freed-memory", "channels-last", "amp"], default="freed-memory")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    add_device_args(parser)
    parser.add_argument("--blocks", type=int, default=8, help="blocks of steps, the settings alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    args = parser.parse_args()
    device = setup_device(parser, args)
    if args.option == "freed-memory" and device.type != "cpu":
        parser.error("--option freed-memory is about the CPU's malloc: use --device cpu")
    model = dsnet.create_supernet(widths=[0.35, 0.5, 0.75, 1.0], num_classes=10, small_input=True,
                                  img_size=args.img_size).train().to(device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    targets = torch.randint(0, 10, (args.batch_size,), device=device)

    if args.option == "freed-memory":
        step = make_step(model, images, targets)
        steps = {"freed memory kept": step, "glibc default": step}

        def switch(on: bool) -> None:
            if not (keep_freed_memory() if on else return_freed_memory()):
                raise SystemExit("this C library is not glibc: nothing to compare")
    elif args.option == "amp":
        if not keep_freed_memory():
            print("note: not glibc; freed memory is not kept")
        model = model.to(memory_format=torch.channels_last)
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        name = "fp16 autocast + GradScaler" if dtype == torch.float16 else "bf16 autocast"
        steps = {name: make_step(copy.deepcopy(model), images, targets, dtype),
                 "float32": make_step(model, images, targets)}

        def switch(on: bool) -> None:
            pass
    else:
        if not keep_freed_memory():
            print("note: not glibc; freed memory is not kept")
        fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
        steps = {"channels_last": make_step(fast, images, targets), "contiguous": make_step(model, images, targets)}

        def switch(on: bool) -> None:
            pass

    (on_name, on_step), (off_name, off_step) = steps.items()
    times: dict[bool, list[float]] = {True: [], False: []}
    for block in range(args.blocks):
        on = block % 2 == 0
        switch(on)
        step = on_step if on else off_step
        step()
        for _ in range(args.steps):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[on].append(time.perf_counter() - start)
    on_time, off_time = statistics.median(times[True]), statistics.median(times[False])
    print(f"torch {torch.__version__}, {describe(device, args.threads)}, {args.img_size} px, batch {args.batch_size}, "
          f"sandwich 1.0/0.75/0.5/0.35, medians of {len(times[True])} steps per setting")
    print(f"{on_name} {on_time * 1e3:.0f} ms, {off_name} {off_time * 1e3:.0f} ms")
    print(f"ratio {on_time / off_time:.3f}")


if __name__ == "__main__":
    main()
