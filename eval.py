"""Evaluate a dsnet checkpoint: accuracy, loss, size, MAdds and latency per width. See `python eval.py --help`."""
from dsnet.cli import run_main
from dsnet.evaluate import main

if __name__ == "__main__":
    run_main(main)
