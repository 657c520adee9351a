"""Evaluate a dsnet checkpoint (sweep, static, dynamic). Not yet available in this version."""
import sys

if __name__ == "__main__":
    print("error: eval.py is not yet available in this version of dsnet", file=sys.stderr)
    sys.exit(2)
