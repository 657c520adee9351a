"""Latency of the exported dense subnet against timm's MobileNetV2 of the same width and an ONNX Runtime session.

For each width, the dense subnet (`dsnet.export_subnet`), the same with BatchNorm folded into the convolutions (what
the TorchScript and ONNX exports hold, `dsnet.export.fold_batch_norms`), timm's `mobilenetv2_*` holding the same
weights, and an ONNX Runtime session of the subnet's ONNX export (intra-op threads = --threads) run in eval mode on
the same input on the CPU, interleaved repeat by repeat (the order reversing every other repeat) after a warm-up; each
figure is a median. The last lines are `max dense/timm ratio <value>` over every width and batch size (the exported
subnet should be no slower than timm's model: ratio ≤ 1.02) and `max folded/timm ratio at batch 1 <value>`.
With --compile, the folded subnet under `torch.compile` (default inductor backend) too, its compilation timed apart
and excluded from the medians.

    python bench/export.py [--threads 2] [--img-size 224] [--batch-sizes 1 32] [--widths 0.35 0.5 0.75 1.0]
                           [--compile]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import timm
import torch

import dsnet
from dsnet.export import DEFAULT_OPSET, fold_batch_norms, write_export
from dsnet.mobilenetv2 import TIMM_MODELS
from dsnet.timing import median_seconds, reserve_kernel_cache


def onnx_session(dense: torch.nn.Module, img_size: int, threads: int, directory: str,
                 spinning: bool = True) -> onnxruntime.InferenceSession:
    path = Path(directory) / "subnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_export("onnx", dense, torch.randn(1, 3, img_size, img_size), path, DEFAULT_OPSET)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.35, 0.5, 0.75, 1.0],
                        help="widths that timm registers a mobilenetv2_* for")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the folded subnet under torch.compile")
    args = parser.parse_args()
    reserve_kernel_cache()  # before the first convolution: the interleaved loop times many networks
    unknown = [w for w in args.widths if w not in TIMM_MODELS]
    if unknown:
        parser.error(f"timm has no mobilenetv2_* of width {unknown}; choose from {sorted(TIMM_MODELS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dsnet.create_supernet(num_classes=1000, widths=sorted(set(args.widths)), img_size=args.img_size).eval()
    print(f"torch {torch.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"{args.threads} threads, {args.img_size} px, medians of {args.repeats} after {args.warmup} warm-up")
    print(f"{'width':>6} {'batch':>5} {'dense ms':>10} {'folded ms':>10} {'timm ms':>10} {'dense/timm':>10} "
          f"{'fold/timm':>10} {'ORT ms':>10} {'dense/ORT':>10}")
    worst, worst_folded = 0.0, 0.0
    with tempfile.TemporaryDirectory() as directory:
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.img_size, args.img_size)
            x_numpy = x.numpy()
            for w in args.widths:
                dense = dsnet.export_subnet(model, w)
                reference = timm.create_model(TIMM_MODELS[w], num_classes=1000)
                reference.load_state_dict(dense.state_dict(), strict=True)
                reference.eval()
                folded = fold_batch_norms(dense)
                session = onnx_session(dense, args.img_size, args.threads, directory)
                calls = [lambda: dense(x), lambda: folded(x), lambda: reference(x),
                         lambda: session.run(None, {"input": x_numpy})]
                if args.compile:
                    compiled = torch.compile(folded)
                    start = time.perf_counter()
                    with torch.no_grad():
                        compiled(x)
                    compile_s = time.perf_counter() - start
                    calls.append(lambda: compiled(x))
                with torch.no_grad():
                    dense_s, folded_s, timm_s, ort_s, *compiled_s = median_seconds(calls, args.repeats, args.warmup)
                worst = max(worst, dense_s / timm_s)
                if batch == 1:
                    worst_folded = max(worst_folded, folded_s / timm_s)
                print(f"{w:>6.2f} {batch:>5} {dense_s * 1e3:>10.2f} {folded_s * 1e3:>10.2f} {timm_s * 1e3:>10.2f} "
                      f"{dense_s / timm_s:>10.3f} {folded_s / timm_s:>10.3f} {ort_s * 1e3:>10.2f} "
                      f"{dense_s / ort_s:>10.3f}"
                      + (f"  compiled {compiled_s[0] * 1e3:.2f} ms, /folded {compiled_s[0] / folded_s:.3f}, compile "
                         f"{compile_s:.1f} s" if args.compile else ""), flush=True)
    print(f"max dense/timm ratio {worst:.3f}")
    if 1 in args.batch_sizes:
        print(f"max folded/timm ratio at batch 1 {worst_folded:.3f}")


if __name__ == "__main__":
    main()
