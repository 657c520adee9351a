"""Runs of several processes under torchrun (2 gloo ranks on the CPU): identical ranks, SIGTERM, a rank that dies,
ranks given different configs. Each launch starts three Python processes, so they are kept few, and they share one
xdist group: two launches at once on a two-core machine leave each rank waiting for its peer's time slice at every
all-reduce."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsnet.checkpoint import load_checkpoint

from conftest import TINY

REPO = Path(__file__).resolve().parent.parent


DDP_WORKER = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
import dsnet.trainer
from dsnet.config import parse_config
from dsnet.trainer import Trainer
by_hand = os.environ.get("SYNC") == "by-hand"
if by_hand:  # the reference: DDP never reduces; before each update the summed gradients are averaged by hand
    dsnet.trainer.grad_sync = lambda ddp, update_follows: lambda last_pass: ddp.no_sync()
trainer = Trainer(*parse_config(sys.argv[1:]))
counts = {"reductions": 0, "updates": 0}
def counting(state, bucket):
    counts["reductions"] += bucket.index() == 0  # one per all-reduce of the whole gradient
    return allreduce_hook(dist.group.WORLD, bucket)
trainer.ddp.register_comm_hook(None, counting)
update = trainer._update
def counted(epoch):
    counts["updates"] += 1
    if by_hand:
        for p in trainer.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
    update(epoch)
trainer._update = counted
trainer.run()
torch.save({"state": trainer.model.state_dict(), **counts},
           os.environ["DUMP_PREFIX"] + "-rank" + os.environ["RANK"] + ".pt")
"""

# Stage I under torchrun: 4 widths per step over 2 accumulated batches, so 8 backward passes per optimizer step.
# Without the EMA teacher: it normalises with running BN statistics, which DDP broadcasts from rank 0 in a
# synchronised forward, so in the by-hand reference, which never synchronises, rank 1's teacher would see others.
STAGE_ONE = [*TINY, "--epochs", "1", "--batch-size", "64", "--accum-steps", "2", "--num-random-widths", "2",
             "--no-ema"]


pytestmark = pytest.mark.xdist_group("torchrun")


def test_the_launches_share_one_test_process(request):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("one test process: nothing runs beside the launches")
    assert request.node.nodeid.endswith("@torchrun"), \
        "pytest-xdist ignored the xdist_group mark (--dist loadgroup): check the pytest and pytest-xdist versions"


def free_port() -> int:
    """A port nothing listens on now: a fixed one can still be held by an earlier launch's closing sockets."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(worker, out, *args, **env) -> subprocess.Popen:
    """A 2-process torchrun of `worker` with `args`, writing to `out`, its output piped; `env` adds variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUMP_PREFIX": str(out), **env}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                             str(free_port()), str(worker), *args, "--output", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def torchrun(worker, out, *args) -> str:
    """Run a launch to its end; it must succeed. Returns its standard output."""
    launched = launch(worker, out, *args)
    try:
        stdout, stderr = launched.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        launched.kill()
        raise
    assert launched.returncode == 0, stderr[-2000:]
    return stdout


# A run long enough to be stopped or killed once its first checkpoint is written.
STOPPABLE_RUN = [*TINY, "--batch-size", "32", "--epochs", "3", "--save-every-steps", "2"]


@pytest.fixture(scope="session")
def stage_one_run(tmp_path_factory):
    """(worker script, run folder, its output) of a 2-process stage-I run with STAGE_ONE's flags."""
    folder = tmp_path_factory.mktemp("ddp")
    worker = folder / "worker.py"
    worker.write_text(DDP_WORKER)
    out = folder / "stage1"
    return worker, out, torchrun(worker, out, *STAGE_ONE)


def test_two_process_torchrun_keeps_ranks_identical(stage_one_run, tmp_path):
    """Stage I, then stage II from its checkpoint, each a 2-process run: identical weights on both ranks, logs and
    files from rank 0 only."""
    worker, out, stdout = stage_one_run
    gate = tmp_path / "ddp-gate"
    gate_stdout = torchrun(worker, gate, "--stage", "gate", "--init", out / "best.pth", "--epochs", "1",
             "--batch-size", "256", "--gate-calibration-batches", "2", "--warmup-epochs", "0", "--log-interval",
             "1000")
    for run, printed in ((out, stdout), (gate, gate_stdout)):
        rank0 = torch.load(f"{run}-rank0.pt")["state"]
        rank1 = torch.load(f"{run}-rank1.pt")["state"]
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (run.name, key)
        assert printed.count("epoch 1/1") == 1  # the epoch line comes from rank 0 only
        assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events")) == \
            ["args.yaml", "best.pth", "last.pth", "summary.csv"]
    assert "gate.slimming.weight" in rank0  # the second run trained the gated network


def test_one_gradient_all_reduce_per_optimizer_step(stage_one_run, tmp_path, monkeypatch):
    """Of the 8 backward passes of an optimizer step only the last all-reduces, and the weights are those of averaging
    the summed gradients by hand before each update (to 1e-6)."""
    worker, out, _ = stage_one_run
    monkeypatch.setenv("SYNC", "by-hand")
    torchrun(worker, tmp_path / "by-hand", *STAGE_ONE)
    once, reference = torch.load(f"{out}-rank0.pt"), torch.load(tmp_path / "by-hand-rank0.pt")
    assert once["updates"] == reference["updates"] >= 4
    assert once["reductions"] == once["updates"] and reference["reductions"] == 0
    for key, value in once["state"].items():
        if value.is_floating_point() and "running_" not in key:  # DDP broadcasts rank 0's BN statistics
            assert (value - reference["state"][key]).abs().max().item() <= 1e-6, key


STOPPABLE_WORKER = """
import json, os, sys
from dsnet.config import parse_config
from dsnet.trainer import Trainer
trainer = Trainer(*parse_config(sys.argv[1:]))
trainer.run()
with open(os.environ["DUMP_PREFIX"] + "-rank" + os.environ["RANK"] + ".json", "w") as f:
    json.dump({"step": trainer.step, "stopped_by": trainer.stopped_by}, f)
sys.exit(0 if trainer.stopped_by is None else 128 + trainer.stopped_by)
"""


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun passes SIGTERM on to both processes, which receive it at different moments: they agree on the step
    to stop after, rank 0 saves it, and both exit."""
    import json
    import signal
    import time

    worker = tmp_path / "worker.py"
    worker.write_text(STOPPABLE_WORKER)
    out = tmp_path / "ddp"
    launched = launch(worker, out, *STOPPABLE_RUN)
    deadline = time.monotonic() + 120
    while not (out / "last.pth").exists() and launched.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    launched.send_signal(signal.SIGTERM)
    stdout, stderr = launched.communicate(timeout=60)
    assert launched.returncode != 0
    ranks = [json.loads((tmp_path / f"ddp-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["stopped_by"] == signal.SIGTERM, (ranks, stderr[-2000:])
    state = load_checkpoint(out / "last.pth")
    assert state["step"] == ranks[0]["step"] and state["position"] is not None and state["position"]["world_size"] == 2
    assert f"step {ranks[0]['step']}; continue with: python train.py --resume" in stdout


FAULTY_WORKER = """
import os, sys
from dsnet.cli import run_main
from dsnet.train import main
rank, fault = int(os.environ["RANK"]), os.environ["FAULT"]
open(os.environ["DUMP_PREFIX"] + "-pid" + str(rank), "w").write(str(os.getpid()))
argv = sys.argv[1:]
if rank == 1 and fault == "widths":
    argv += ["--widths", "0.5", "1.0"]
run_main(main, argv)
"""


def launch_faulty(tmp_path, fault):
    import time

    worker = tmp_path / "worker.py"
    worker.write_text(FAULTY_WORKER)
    out = tmp_path / "ddp"
    return launch(worker, out, *STOPPABLE_RUN, FAULT=fault), out, time.monotonic()


def test_a_killed_rank_ends_the_run_with_a_message_that_names_it(tmp_path):
    import signal
    import time

    launched, out, start = launch_faulty(tmp_path, "none")
    while not (out / "last.pth").exists() and launched.poll() is None and time.monotonic() < start + 120:
        time.sleep(0.2)
    os.kill(int((tmp_path / "ddp-pid1").read_text()), signal.SIGKILL)
    start = time.monotonic()
    _, stderr = launched.communicate(timeout=60)
    assert launched.returncode != 0 and time.monotonic() - start < 60
    assert "error: rank 1 ended without a message (killed?); rank 0 stops too" in stderr.splitlines(), stderr[-3000:]


def test_the_roll_call_names_the_missing_rank_and_what_it_said(monkeypatch):
    """The roll call the processes of a failed run take (in the key-value store torchrun holds; here a store of
    the test's own): a rank that reported its error is named with it, one that never answers as killed."""
    import datetime

    import torch.distributed as dist

    from dsnet.distributed import Distributed

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    from dsnet.errors import UserError

    Distributed(rank=1, world_size=3).fail_loudly(UserError("cannot read image 'x.jpg': Truncated File Read"))
    assert Distributed(rank=0, world_size=3).missing_ranks(wait_s=1.0) == {
        1: "cannot read image 'x.jpg': Truncated File Read", 2: None}
    store.set("dsnet/0/alive/2", "1")  # rank 2 answers after all
    with pytest.raises(UserError) as info:
        Distributed(rank=0, world_size=3).fail_loudly(RuntimeError("[gloo/tcp/pair.cc:561] Connection closed by peer"))
    assert str(info.value) == "rank 1 failed: cannot read image 'x.jpg': Truncated File Read; rank 0 stops too"
    Distributed(rank=0, world_size=3).fail_loudly(ValueError("not a collective"))  # left to the caller to raise


def test_ranks_given_different_configs_are_refused_at_start(tmp_path):
    launched, out, _ = launch_faulty(tmp_path, "widths")
    _, stderr = launched.communicate(timeout=120)
    assert launched.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines and lines[0].startswith("error: rank ") and "widths is [0." in lines[0], stderr[-3000:]
    assert "start every process with the same flags" in lines[0]
    assert not (out / "last.pth").exists()

