"""Checkpoints are read weights-only: a file whose pickle would run code is refused by every command, and the code
does not run; a checkpoint dsnet writes (random-number states included) reads back and resumes the generators."""
import random

import numpy as np
import pytest
import torch

from dsnet.checkpoint import load_checkpoint, save_checkpoint
from dsnet.rng import capture_rng, restore_rng

from conftest import run_command


class _CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling calls open(path, "w"): a file appears if the pickle is ever run
        return (open, (self.path, "w"))


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "the-pickle-ran"
    path = tmp_path / "crafted.pth"
    torch.save({"format": "dsnet-checkpoint", "version": 2, "model_config": {}, "model": _CreatesFile(marker)}, path)
    return path, marker


def test_load_checkpoint_refuses_a_pickle_that_would_run_code(crafted):
    from dsnet.errors import UserError

    path, marker = crafted
    with pytest.raises(UserError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def _commands(path, tmp_path):
    from dsnet import evaluate, export, search
    from dsnet import train as train_command
    from dsnet.prune import __main__ as prune

    out = tmp_path / "out"
    return [
        (train_command.main, ["--resume", path, "--output", out / "resume"]),
        (train_command.main, ["--stage", "gate", "--init", path, "--output", out / "gate"]),
        (evaluate.main, ["--checkpoint", path, "--no-latency"]),
        (export.main, ["--checkpoint", path, "--width", "1.0", "--format", "onnx", "--out", tmp_path / "x.onnx"]),
        (search.main, ["--checkpoint", path, "--target-madds", "0.5", "--out", tmp_path / "plan.json"]),
        (prune.main, ["--checkpoint", path, "--method", "l1", "--target-madds", "0.5", "--out", tmp_path / "prune"]),
    ]


def test_every_command_that_takes_a_checkpoint_refuses_one_that_would_run_code(crafted, tmp_path, capsys):
    path, marker = crafted
    for main, argv in _commands(path, tmp_path):
        status, out, err = run_command(main, argv, capsys)
        assert status != 0, (main.__module__, out)
        assert "could run code" in err and len(err.strip().splitlines()) == 1, (main.__module__, err)
        assert not marker.exists()


def test_random_number_states_survive_a_weights_only_checkpoint(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(tmp_path / "rng.pth", {"rng": capture_rng()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_version_1_checkpoint_loads_with_its_numpy_random_state_and_nothing_more(tmp_path, digits_checkpoint,
                                                                                     capsys):
    """Version 1 stored NumPy's random state as an array: such a file is read (that array type allowed, nothing
    else), upgraded in memory, and evaluates; one that needs any other object is still refused unrun."""
    from dsnet import evaluate
    from dsnet.errors import UserError

    state = torch.load(digits_checkpoint, weights_only=True)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    old = {**state, "version": 1,
           "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(old, tmp_path / "v1.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = load_checkpoint(tmp_path / "v1.pth")
    assert loaded["version"] == 2 and torch.equal(loaded["model"]["conv_stem.weight"], state["model"]["conv_stem.weight"])
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    status, out, err = run_command(evaluate.main, ["--checkpoint", tmp_path / "v1.pth", "--no-latency"], capsys)
    assert status == 0 and "top-1" in out, err

    marker = tmp_path / "the-pickle-ran"
    torch.save({**old, "extra": _CreatesFile(marker)}, tmp_path / "v1-crafted.pth")
    with pytest.raises(UserError, match="could run code"):
        load_checkpoint(tmp_path / "v1-crafted.pth")
    assert not marker.exists()
