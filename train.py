"""Train a dsnet supernet: `python train.py --stage supernet [-c configs/digits.yaml] [--flags]`.

Stage I trains every width of the supernet with sandwich sampling and in-place ensemble bootstrapping from an EMA
teacher. Defaults train on the built-in digits set; `torchrun --nproc_per_node=N train.py …` trains distributed.
"""
from dsnet.cli import run_main
from dsnet.train import main

if __name__ == "__main__":
    run_main(main)
