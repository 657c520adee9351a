"""The stage-I trainer end to end on digits: EMA, resume, preemption, NaN, bad input (several processes:
tests/test_distributed.py)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dsnet.checkpoint import load_checkpoint
from dsnet.config import parse_config
from dsnet.trainer import Trainer, TrainingDiverged
from dsnet.sandwich import sandwich_step, sandwich_widths
from dsnet.train import main as train_main

from conftest import TINY, run_command

REPO = Path(__file__).resolve().parent.parent


def make_trainer(tmp_path, *flags, name="run"):
    config, explicit = parse_config([*TINY, "--output", str(tmp_path / name), *flags])
    return Trainer(config, explicit)


def run_cli(*args, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_ema_after_one_update_is_the_decayed_average(tmp_path):
    trainer = make_trainer(tmp_path, "--ema-decay", "0.9", "--no-ema-warmup")
    old_ema = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    images, targets = next(iter(trainer.train_loader))
    sandwich_step(trainer.model, trainer.ema.module, images, targets, sandwich_widths(4, 2, 0, 0))
    trainer.step = 1
    trainer._update(epoch=0)
    new_model = trainer.model.state_dict()
    changed = 0
    for key, ema_value in trainer.ema.module.state_dict().items():
        if ema_value.is_floating_point():
            expected = 0.9 * old_ema[key] + 0.1 * new_model[key]
            assert torch.allclose(ema_value, expected, atol=1e-6), key
            changed += not torch.equal(ema_value, old_ema[key])
    assert changed > 0


@pytest.mark.parametrize("flags,expected_norm", [((), None), (("--clip-grad", "0"), None),
                                                   (("--clip-grad", "0.01"), 0.01)])
def test_the_optimizer_steps_on_the_clipped_gradient_and_clip_0_is_off(tmp_path, flags, expected_norm):
    trainer = make_trainer(tmp_path, *flags)
    images, targets = next(iter(trainer.train_loader))
    sandwich_step(trainer.model, trainer.ema.module, images, targets, sandwich_widths(4, 2, 0, 0))
    raw_norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters() if p.grad is not None])
    seen = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (seen.append(torch.nn.utils.get_total_norm(
        [p.grad for p in trainer.model.parameters() if p.grad is not None])), step(*a, **k))[1]
    trainer._update(epoch=0)
    assert raw_norm > 0.1
    assert seen[0].item() == pytest.approx(expected_norm or raw_norm.item(), rel=1e-4)


def test_a_single_width_trains_on_the_labels_alone(tmp_path):
    # bench/supernet_vs_static.py trains each static network as a one-width supernet with the recipe's settings,
    # random per-stage plans included; with one width choice there are none, and the step is plain cross-entropy.
    trainer = make_trainer(tmp_path, "--widths", "1.0", "--val-widths", "1.0", "--num-random-plans", "1")
    images, targets = next(iter(trainer.train_loader))
    with torch.no_grad():
        expected = F.cross_entropy(copy.deepcopy(trainer.model)(images, 0), targets,
                                   label_smoothing=trainer.config["label_smoothing"]).item()
    result = trainer.train_step(images, targets, lambda loss: loss.backward())
    assert list(result.scalars) == ["loss@1.0"]
    assert result.total == pytest.approx(expected, abs=1e-5)


# One random width per step (not two) and two validated widths to keep the runs short; the sampled widths still
# depend on the step.
SHORT = ["--epochs", "2", "--num-random-widths", "1", "--val-widths", "0.35", "1.0"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs without a stop, what every resumed run must end with; it also writes a mid-epoch last.pth every 2
    steps (--save-every-steps), each kept as stepN.pth beside the run."""
    import shutil

    import dsnet.trainer

    folder = tmp_path_factory.mktemp("straight")
    save = dsnet.trainer.save_checkpoint

    def keep_mid_epoch_copies(path, state):
        save(path, state)
        if state["position"] is not None and path.name == "last.pth":
            shutil.copy(path, folder / f"step{state['step']}.pth")

    dsnet.trainer.save_checkpoint = keep_mid_epoch_copies
    try:
        make_trainer(folder, *SHORT, "--save-every-steps", "2", name="run").run()
    finally:
        dsnet.trainer.save_checkpoint = save
    return folder


@pytest.mark.xdist_group("straight_run")
def test_resume_is_exact(tmp_path, straight_run):
    short = SHORT
    first = make_trainer(tmp_path, *short, "--epoch-limit", "1", name="split")
    first.run()
    assert load_checkpoint(tmp_path / "split" / "last.pth")["epoch"] == 0
    config, explicit = parse_config(["--resume", str(tmp_path / "split" / "last.pth")])
    resumed = Trainer(config, explicit)
    assert resumed.start_epoch == 1
    resumed.run()
    a = load_checkpoint(straight_run / "run" / "last.pth")
    b = load_checkpoint(tmp_path / "split" / "last.pth")
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"]
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.allclose(a[part][key].double(), b[part][key].double(), atol=1e-6), (part, key)
    summary = (tmp_path / "split" / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "ema_val_top1@0.35" in summary[0] and "val_top1@1.0" in summary[0]
    assert yaml.safe_load((tmp_path / "split" / "args.yaml").read_text())["epochs"] == 2


def assert_same_weights(a, b):
    for part in ("model", "ema", "optimizer"):
        flat_a, flat_b = torch.utils._pytree.tree_flatten(a[part])[0], torch.utils._pytree.tree_flatten(b[part])[0]
        assert len(flat_a) == len(flat_b), part
        for x, y in zip(flat_a, flat_b):
            if isinstance(x, torch.Tensor):
                assert torch.allclose(x.double(), y.double(), atol=1e-6), part
            else:
                assert x == y, part


@pytest.mark.xdist_group("straight_run")
def test_sigterm_mid_epoch_saves_and_the_resumed_run_ends_where_the_straight_one_does(tmp_path, monkeypatch,
                                                                                       capsys, straight_run):
    """The straight run wrote mid-epoch checkpoints (--save-every-steps); a run stopped by SIGTERM inside its second
    epoch, resumed, ends with the straight run's weights, EMA and optimizer state."""
    import signal

    short = SHORT
    per_epoch = 1437 // 256  # TINY's batch size
    assert sorted(p.name for p in straight_run.glob("step*.pth")) == ["step2.pth", "step4.pth", "step6.pth",
                                                                      "step8.pth"]

    stop_at = per_epoch + 2  # the signal arrives during the third step of the second epoch
    train_step = Trainer.train_step

    def signalled(self, images, targets, backward, **kwargs):
        if self.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, images, targets, backward, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    code, out, err = run_command(train_main, [*TINY, *short, "--output", tmp_path / "stopped"], capsys)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM received" in err and "stopped by SIGTERM at epoch 2, step 7" in out
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pth")
    assert stopped["step"] == stop_at and stopped["position"]["epoch"] == 1 and stopped["position"]["batch"] == 2
    assert stopped["epoch"] == 0 and len(stopped["summary"]) == 1

    straight = load_checkpoint(straight_run / "run" / "last.pth")
    config, explicit = parse_config(["--resume", str(tmp_path / "stopped" / "last.pth")])
    resumed = Trainer(config, explicit)
    assert resumed.start_epoch == 1
    resumed.run()
    ended = load_checkpoint(tmp_path / "stopped" / "last.pth")
    assert ended["step"] == straight["step"] == 2 * per_epoch and ended["position"] is None
    assert_same_weights(ended, straight)
    assert len(ended["summary"]) == 2
    assert ended["summary"][-1]["train_loss"] == pytest.approx(straight["summary"][-1]["train_loss"], rel=1e-6)
    mid_epoch = load_checkpoint(straight_run / "step4.pth")
    assert mid_epoch["position"]["batch"] == 4 and mid_epoch["epoch"] == -1


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_the_first_signal_is_a_request_and_the_second_ends_the_process(signum):
    import signal
    import time

    from dsnet.stop_signals import StopRequests

    signum = getattr(signal, signum)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: asked once, it says so and keeps running; asked twice, the signal ends it
        try:
            with StopRequests(announce=False) as requests:
                os.kill(os.getpid(), signum)
                time.sleep(0.1)
                os.write(write_end, b"asked" if requests.signal == signum else b"?")
                os.kill(os.getpid(), signum)
                time.sleep(5)
        finally:
            os._exit(3)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    assert os.read(read_end, 16) == b"asked"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum


def test_a_mid_epoch_checkpoint_resumes_only_with_its_batch_layout(tmp_path, capsys, monkeypatch):
    import signal

    train_step = Trainer.train_step

    def signalled(self, images, targets, backward, **kwargs):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, images, targets, backward, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    code, out, _ = run_command(train_main, [*TINY, "--batch-size", "128", "--output", tmp_path / "run"], capsys)
    assert code == 128 + signal.SIGINT and "stopped by SIGINT at epoch 1, step 2" in out
    code, _, err = run_command(train_main, ["--resume", tmp_path / "run" / "last.pth", "--batch-size", "64"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "written inside epoch 1 with batch_size 128 on 1 process(es), accum_steps 1; resume it with the same" in err


def test_diverging_loss_stops_and_keeps_the_last_good_epoch(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "--epochs", "2", name="nan")
    original = Trainer.train_one_epoch

    def poisoned(self, epoch):
        if epoch == 1:  # after one good epoch, a weight turns NaN
            with torch.no_grad():
                self.model.classifier.weight.fill_(float("nan"))
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2"):
        trainer.run()
    kept = load_checkpoint(tmp_path / "nan" / "last.pth")
    assert kept["epoch"] == 0
    assert torch.isfinite(kept["model"]["classifier.weight"]).all()


@pytest.mark.parametrize("args,message", [
    (["--data", "cifar10"], "needs --data-dir"),
    (["--data", "imagenet21k"], "invalid choice"),
    (["--data", "cifar10", "--data-dir", "/no/such/dir"], "does not exist"),
    (["--stage", "gate"], "--stage gate needs --init CHECKPOINT"),
    (["--epochs", "0"], "argument --epochs: must be ≥ 1, got 0"),
    (["--clip-grad", "-1"], "argument --clip-grad: must be ≥ 0, got -1"),
])
def test_bad_input_is_one_line_and_non_zero(tmp_path, args, message, capsys):
    code, _, err = run_command(train_main, [*args, "--output", tmp_path / "out"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_key_lists_the_valid_ones(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("epochs: 2\nlearning_rate: 0.1\n")
    result = run_cli("-c", str(recipe), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "unknown config key(s) ['learning_rate']" in result.stderr and "lr_base" in result.stderr


@pytest.mark.parametrize("text,message", [
    ("epochs: three\n", "config key 'epochs' in"),
    ("epochs: 2.5\n", "must be an integer, got 2.5"),
    ("widths: [0.5, wide]\n", "must be a list of numbers"),
    ("ema: 1\n", "must be true or false"),
    ("opt: sgd\nsgs: best\n", "must be one of ['budget', 'sandwich', 'graded']"),
])
def test_a_recipe_value_the_flag_would_refuse_is_one_line(tmp_path, text, message, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    code, _, err = run_command(train_main, ["-c", recipe, "--output", tmp_path / "out"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "bad.yaml" in lines[0], err


def test_corrupt_resume_file_and_occupied_output_are_refused(tmp_path, capsys):
    make_trainer(tmp_path, "--epochs", "1", name="done").run()
    last = tmp_path / "done" / "last.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(last.read_bytes()[:1000])
    code, _, err = run_command(train_main, ["--resume", truncated, "--output", tmp_path / "other"], capsys)
    assert code == 2 and "corrupt or truncated" in err and err.count("\n") == 1
    code, _, err = run_command(train_main, [*TINY, "--output", tmp_path / "done"], capsys)
    assert code == 2 and "holds another run" in err and err.count("\n") == 1
    assert torch.equal(load_checkpoint(last)["model"]["conv_stem.weight"],
                       torch.load(last, weights_only=False)["model"]["conv_stem.weight"])


def test_speed_options_train_a_supernet_that_equals_its_export(tmp_path):
    """channels_last, bf16 autocast and kept freed memory together: training runs, the weights stay finite, and the
    checkpoint's supernet equals its exported subnets."""
    import dsnet
    from dsnet.checkpoint import supernet_from_checkpoint

    trainer = make_trainer(tmp_path, "--epochs", "1", "--channels-last", "--amp", "--keep-freed-memory",
                           "--widths", "0.5", "1.0", name="fast")
    assert trainer.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.run()
    state = load_checkpoint(tmp_path / "fast" / "last.pth")
    assert state["config"]["channels_last"] and state["config"]["amp"]
    model = supernet_from_checkpoint(state, "ema").eval()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for i in range(len(model.widths)):
            assert torch.allclose(model(images, i), dsnet.export_subnet(model, i)(images), atol=1e-5)
