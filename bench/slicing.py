"""Latency of the supernet's sliced forward over the exported dense subnet of the same width.

Both run in eval mode on the same input, interleaved repeat by repeat (which goes first alternates) after a warm-up,
with a fixed thread count (on CUDA, synchronised around each call); each figure is a median. Batch 1 gets
`--repeats-b1` repeats (a forward takes milliseconds there, and the machine's noise is of that order). Like train.py,
the process keeps freed memory for reuse (`--system-malloc`: not). The last line is `max ratio <value>` over every
width and batch size.

    python bench/slicing.py [--img-size 224] [--batch-sizes 1 32] [--threads 2] [--device cuda] [--system-malloc]
"""
from __future__ import annotations

import argparse

import torch

import dsnet
from dsnet.cpu_memory import keep_freed_memory
from dsnet.timing import median_seconds, reserve_kernel_cache

from device import add_device_args, describe, setup_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--small-input", action="store_true", help="small-input stem (use with --img-size 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--widths", type=float, nargs="+", help="subset of the width choices (default: all)")
    add_device_args(parser)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--repeats-b1", type=int, default=60, help="repeats at batch 1")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc returning freed memory to the OS")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    reserve_kernel_cache()  # before the first convolution: the interleaved loop times many networks
    device = setup_device(parser, args)
    kept = not args.system_malloc and keep_freed_memory()
    model = dsnet.create_supernet(num_classes=1000, small_input=args.small_input, img_size=args.img_size)
    model = model.eval().to(device)
    widths = args.widths or list(model.widths)
    print(f"torch {torch.__version__}, {describe(device, args.threads)}, {args.img_size} px, medians of {args.repeats} "
          f"({args.repeats_b1} at batch 1), freed memory {'kept' if kept else 'returned to the OS'}")
    print(f"{'width':>6} {'batch':>5} {'sliced ms':>10} {'dense ms':>10} {'ratio':>7}")
    worst = 0.0
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
        for w in widths:
            dense = dsnet.export_subnet(model, w).to(device)
            repeats = args.repeats_b1 if batch == 1 else args.repeats
            sliced_s, dense_s = median_seconds([lambda: model(x, w), lambda: dense(x)], repeats, args.warmup, device)
            ratio = sliced_s / dense_s
            worst = max(worst, ratio)
            print(f"{w:>6.2f} {batch:>5} {sliced_s * 1e3:>10.2f} {dense_s * 1e3:>10.2f} {ratio:>7.3f}", flush=True)
    print(f"max ratio {worst:.3f}")


if __name__ == "__main__":
    main()
