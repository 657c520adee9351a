"""The five pruning methods on an ordinary CIFAR ResNet-20, against a ResNet-20 of the same MAdds trained from scratch.

1. Trains one ResNet-20 at width 1.0 alone (no sandwich: cross-entropy with label smoothing and the recipe's
   optimisation) for --epochs.
2. Prunes it to --target of its MAdds with each method (`python -m dsnet.prune --checkpoint`), with --prune-epochs
   of the method's training phase and --finetune-epochs of fine-tuning.
3. Trains from scratch the uniform-width ResNet-20 whose MAdds are the largest within the target, for --epochs plus
   --finetune-epochs (the pruned networks' training, less their methods' phases).

Prints the table (MAdds, params, val top-1) and, with --json, writes it. Flags after the options below go to every
train.py run (the data, for example); the pruning runs read the data from the checkpoint.

    python bench/prune_ordinary.py --out runs/prune-ordinary --json bench/results/prune-ordinary.json \
        --data imagefolder --data-dir DIR
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ("l1", "bn-scale", "polarization", "taylor", "dcp")


def run(command: list[str], log: Path) -> None:
    print(" ".join(command[1:]), flush=True)
    with open(log, "w") as f:
        if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"error: a run failed; see {log}")


def final_top1(run_dir: Path, width: float) -> float:
    from dsnet.stages import width_label

    with open(run_dir / "summary.csv") as f:
        return float(list(csv.DictReader(f))[-1][f"val_top1@{width_label(width)}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/prune-ordinary", help="folder for the runs")
    parser.add_argument("--recipe", default=str(REPO / "configs" / "cifar10-resnet20.yaml"))
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the network before pruning")
    parser.add_argument("--prune-epochs", type=int, default=1, help="epochs of each method's training phase")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs after each cut")
    parser.add_argument("--target", type=float, default=0.5, help="MAdds target, a fraction of the network's")
    parser.add_argument("--json", help="also write the table as JSON here")
    args, train_flags = parser.parse_known_args()
    sys.path.insert(0, str(REPO))
    import dsnet
    from dsnet.files import write_text_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alone = ["--num-random-widths", "0", "--num-random-plans", "0", "--no-ema", "--workers", "1"]

    def train(name: str, width: float, epochs: int) -> Path:
        run([sys.executable, str(REPO / "train.py"), "-c", args.recipe, *train_flags, *alone, "--widths", str(width),
             "--val-widths", str(width), "--epochs", str(epochs), "--output", str(out / name), "--overwrite"],
            out / f"{name}.log")
        return out / name

    base = train("resnet20", 1.0, args.epochs)
    model = dsnet.load_supernet(base / "best.pth")
    full = dsnet.count_madds(model, 1.0, 32)
    rows = [{"network": "ResNet-20 before pruning", "madds": full, "params": dsnet.count_params(model, 1.0),
             "top1": final_top1(base, 1.0)}]
    for method in METHODS:
        pruned = out / f"pruned-{method}"
        run([sys.executable, "-m", "dsnet.prune", "--checkpoint", str(base / "best.pth"), "--method", method,
             "--target-madds", str(args.target), "--epochs", str(args.prune_epochs), "--finetune-epochs",
             str(args.finetune_epochs), "--out", str(pruned)], out / f"pruned-{method}.log")
        report = json.loads((pruned / "report.json").read_text())
        rows.append({"network": f"pruned: {method}", "madds": report["pruned"]["madds"],
                     "params": report["pruned"]["params"], "top1": report["pruned"]["top1_finetuned"],
                     "top1_before_finetuning": report["pruned"]["top1_recalibrated"]})
    # The widest uniform ResNet-20 within the target, trained from scratch.
    candidates = [round(0.3 + 0.05 * i, 2) for i in range(15)]
    costs = {w: dsnet.count_madds(dsnet.create_model(arch="resnet20", widths=[w], num_classes=10), w, 32)
             for w in candidates}
    width = max(w for w in candidates if costs[w] <= args.target * full)
    scratch = train(f"scratch-{width:g}", width, args.epochs + args.finetune_epochs)
    rows.append({"network": f"ResNet-20 at width {width:g}, from scratch", "madds": costs[width],
                 "params": dsnet.count_params(dsnet.load_supernet(scratch / "best.pth"), width),
                 "top1": final_top1(scratch, width)})

    print(f"\n{'network':<40} {'MAdds':>8} {'params':>8} {'top-1':>7}")
    for r in rows:
        print(f"{r['network']:<40} {r['madds'] / 1e6:>7.2f}M {r['params'] / 1e6:>7.3f}M {r['top1']:>7.2f}")
    if args.json:
        write_text_atomic(args.json, json.dumps({"command": sys.argv, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
