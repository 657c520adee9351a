"""Realized speed-up of each width choice: the exported dense network's latency against width 1.0's, beside the
MAdds ratio, in PyTorch and in ONNX Runtime, at each batch size and thread count.

The supernet is the ImageNet layout with random weights (latency does not depend on them). Each width is exported as
it is deployed: the dense subnet with BatchNorm folded into the convolutions (`dsnet.export.fold_batch_norms`) run by
PyTorch eager under no_grad, and its ONNX export run by an ONNX Runtime session (intra-op threads = the thread
count, spinning off: the idle sessions of the other widths would otherwise spin on the cores the running one needs).
For one runtime, batch size and thread count, every width's call is interleaved with the others repeat by repeat
after a warm-up (`dsnet/timing.py`), so the ratios come from one side-by-side run; each figure is a median.

    python bench/speedup.py [--img-size 224] [--batch-sizes 1 32] [--threads 1 2] [--runtimes torch onnxruntime]
                            [--widths 0.35 0.5 1.0] [--repeats 7] [--json bench/results/speedup.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import onnxruntime
import torch

import dsnet
from dsnet.export import fold_batch_norms
from dsnet.files import write_text_atomic
from dsnet.timing import median_seconds, reserve_kernel_cache

from export import onnx_session

RUNTIMES = ("torch", "onnxruntime")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--widths", type=float, nargs="+", help="width choices to time (default: all 14)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    reserve_kernel_cache()  # before the first convolution: the interleaved loop times many networks
    torch.manual_seed(0)
    supernet = dsnet.create_supernet(num_classes=1000, img_size=args.img_size).eval()
    widths = sorted(set(args.widths or supernet.widths) | {1.0})
    missing = [w for w in widths if supernet.choice_index(w) is None]
    if missing:
        parser.error(f"widths {missing} are not width choices ({', '.join(f'{w:g}' for w in supernet.widths)})")
    madds = {w: dsnet.count_madds(supernet, w, args.img_size) for w in widths}
    dense = {w: fold_batch_norms(dsnet.export_subnet(supernet, w)) for w in widths}
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {args.img_size} px, BN folded, medians "
          f"of {args.repeats} after {args.warmup} warm-up; speed-up = latency of width 1.0 / latency of the width")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {}
            for w in widths if "onnxruntime" in args.runtimes else []:
                folder = f"{tmp}/{threads}-{w}"
                os.makedirs(folder)
                sessions[w] = onnx_session(dense[w], args.img_size, threads, folder, spinning=False)
            for batch in args.batch_sizes:
                x = torch.randn(batch, 3, args.img_size, args.img_size)
                for runtime in args.runtimes:
                    if runtime == "torch":
                        calls = [lambda w=w: dense[w](x) for w in widths]
                    else:
                        feed = {"input": x.numpy()}
                        calls = [lambda w=w: sessions[w].run(["logits"], feed) for w in widths]
                    seconds = dict(zip(widths, median_seconds(calls, args.repeats, args.warmup)))
                    print(f"\n{runtime}, {threads} thread(s), batch {batch}")
                    print(f"{'width':>6} {'MAdds':>9} {'ms':>9} {'speed-up':>9} {'MAdds ratio':>12}")
                    for w in widths:
                        row = {"runtime": runtime, "threads": threads, "batch_size": batch, "width": w,
                               "madds": madds[w], "ms": seconds[w] * 1e3,
                               "speedup": seconds[1.0] / seconds[w], "madds_ratio": madds[1.0] / madds[w]}
                        rows.append(row)
                        print(f"{w:>6g} {madds[w] / 1e6:>8.1f}M {row['ms']:>9.2f} {row['speedup']:>8.2f}× "
                              f"{row['madds_ratio']:>11.2f}×", flush=True)
    narrowest = [r for r in rows if r["width"] == widths[0]]
    print("\nwidth {:g} against 1.0: ".format(widths[0]) + "; ".join(
        f"{r['runtime']} {r['threads']}t b{r['batch_size']} {r['speedup']:.2f}×" for r in narrowest)
        + f" (MAdds ratio {narrowest[0]['madds_ratio']:.2f}×)")
    if args.json:
        write_text_atomic(args.json, json.dumps({"img_size": args.img_size, "torch": torch.__version__,
                                                 "onnxruntime": onnxruntime.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
