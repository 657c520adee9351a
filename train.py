"""Train a dsnet supernet (stage I) or its gate (stage II). Not yet available in this version."""
import sys

if __name__ == "__main__":
    print("error: train.py is not yet available in this version of dsnet", file=sys.stderr)
    sys.exit(2)
