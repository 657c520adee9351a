"""The device and thread options every benchmark here takes, and their setup."""
from __future__ import annotations

import argparse

import torch

from dsnet.errors import UserError
from dsnet.cli_inputs import resolve_device


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads (default: 2)")


def setup_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Fix the thread count and the seed; the --device flag as a device, or the parser's one-line error."""
    try:
        device = resolve_device(args.device)
    except UserError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device


def describe(device: torch.device, threads: int) -> str:
    """The device for a bench's first line: the GPU's name, or the CPU thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU, {threads} threads"
