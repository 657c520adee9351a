"""The `train.py` command line: parse the config, then run the trainer."""
from __future__ import annotations

from .config import parse_config

DESCRIPTION = """Train a dsnet supernet (--stage supernet: a sandwich of widths per step, in-place ensemble
bootstrapping from an EMA teacher) or its gate (--stage gate --init STAGE1_CHECKPOINT: double-headed gate, sandwich
gate sparsification, MAdds loss). The defaults are the digits recipe (configs/digits.yaml): the bare command trains
on the built-in digits set in a few minutes on a CPU. Every key of a YAML recipe (-c) is also a flag below; flags
override the recipe.

examples:
  python train.py --stage supernet                  # digits, the built-in default
  python train.py -c configs/cifar10.yaml --data-dir /data/cifar10
  torchrun --nproc_per_node=2 train.py --output runs/ddp
  python train.py --resume runs/supernet-digits/last.pth   # also after SIGTERM or Ctrl-C, from the next step
  python train.py --stage gate --init runs/supernet-digits/best.pth
"""


def main(argv: list[str] | None = None) -> int:
    from .trainer import Trainer

    config, explicit = parse_config(argv, prog="train.py", description=DESCRIPTION)
    trainer = Trainer(config, explicit)
    trainer.run()
    # Stopped by SIGTERM or SIGINT (last.pth saved): the status a shell gives a process the signal ended.
    return 0 if trainer.stopped_by is None else 128 + trainer.stopped_by
