"""What keeping freed memory (train.py's default --keep-freed-memory) saves per stage-I step.

The allocator setting is process-wide, so the two settings cannot run side by side in separate processes on a noisy
machine; instead one process switches glibc's malloc between its default and the kept setting (`mallopt`) block by
block, a few sandwich steps per block after one untimed step, and compares the medians.

    python bench/freed_memory.py [--img-size 32] [--batch-size 128] [--threads 2] [--blocks 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.utils import ModelEmaV3

import dsnet
from dsnet.cpu_memory import keep_freed_memory, return_freed_memory
from dsnet.supernet import sandwich_step

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8, help="blocks of steps, the settings alternating")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dsnet.create_supernet(widths=[0.35, 0.5, 0.75, 1.0], num_classes=10, small_input=True,
                                  img_size=args.img_size).train()
    ema = ModelEmaV3(model, decay=0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    targets = torch.randint(0, 10, (args.batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sandwich_step(model, ema.module, images, targets, [3, 2, 1, 0])
        optimizer.step()
        ema.update(model)

    times: dict[bool, list[float]] = {True: [], False: []}
    for block in range(args.blocks):
        kept = block % 2 == 0
        if not (keep_freed_memory() if kept else return_freed_memory()):
            raise SystemExit("this C library is not glibc: nothing to compare")
        step()
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times[kept].append(time.perf_counter() - start)
    kept, default = statistics.median(times[True]), statistics.median(times[False])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.img_size} px, batch {args.batch_size}, "
          f"sandwich 1.0/0.75/0.5/0.35, medians of {len(times[True])} steps per setting")
    print(f"freed memory kept {kept * 1e3:.0f} ms, glibc default {default * 1e3:.0f} ms")
    print(f"ratio {kept / default:.3f}")


if __name__ == "__main__":
    main()
