"""Train a dsnet supernet (`--stage supernet`) or its gate (`--stage gate --init CKPT`); see `--help`.

Defaults train on the built-in digits set; `torchrun --nproc_per_node=N train.py …` trains distributed.
"""
from dsnet.cli import run_main
from dsnet.train import main

if __name__ == "__main__":
    run_main(main)
