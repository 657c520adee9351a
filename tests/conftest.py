import copy
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
from filelock import FileLock

import dsnet
from dsnet.cpu_memory import keep_freed_memory

# As train.py does by default: otherwise every large activation is a fresh mmap, page-faulted and zeroed again in
# each step, and the tests that train run about a quarter slower.
keep_freed_memory()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One process per core (pytest -n): threads per process beyond that only make the processes wait on each other.
    # The commands the tests start inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def random_plan(model: dsnet.DSMobileNetV2, rng: random.Random) -> dict[str, int]:
    """A per-layer plan with every group at a random width between 1 channel and its maximum."""
    return {name: rng.randint(1, m) for name, m in zip(model.group_names, model.max_channels)}


@pytest.fixture(scope="session")
def imagenet_supernet():
    """The default 14-width ImageNet-layout supernet with non-trivial BN statistics in every slot."""
    torch.manual_seed(1)
    model = dsnet.create_supernet(num_classes=10)
    randomize_bn(model)
    return model.eval()


@pytest.fixture(scope="session")
def small_supernet():
    torch.manual_seed(2)
    model = dsnet.create_supernet(num_classes=10, small_input=True, img_size=32)
    randomize_bn(model)
    return model.eval()


def randomize_bn(model: torch.nn.Module) -> None:
    """Give every BN distinct affine and statistics so a wrong slice or slot cannot go unnoticed."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (dsnet.slim.SlimBatchNorm2d, torch.nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)


# The default recipe's digits supernet, at four widths: 8 px, MobileNetV2 at half its depth (11 blocks, residual
# blocks in four stages).
DIGITS_SIZE = 8
DIGITS_MODEL = dict(widths=[0.35, 0.5, 0.75, 1.0], num_classes=10, small_input=True, img_size=DIGITS_SIZE,
                    depth_multiplier=0.5)
DIGITS_DATA = dict(data="digits", img_size=DIGITS_SIZE, crop_pct=1.0, crop_scale_min=0.6)


# train.py's flags for a trainer test: the digits' own 8 px, four widths, big batches, BN recalibration before
# validation on 2 batches (not 8), no per-stage plans (tests/test_supernet_step.py covers them).
TINY = ["--img-size", str(DIGITS_SIZE), "--widths", "0.35", "0.5", "0.75", "1.0", "--batch-size", "256",
        "--val-batch-size", "512", "--warmup-epochs", "0", "--log-interval", "1000", "--ema",
        "--bn-recalibrate-batches", "2", "--num-random-plans", "0"]


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """Path of a checkpoint of a small supernet trained briefly on digits (every width well above chance), trained
    once per test session: under pytest -n the first worker trains it and the others wait for the file."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above the workers' own
    path = shared / "digits-checkpoint.pth"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            train_digits_checkpoint(path)
    return path


def train_digits_checkpoint(path) -> None:
    """A small supernet trained briefly on digits, saved to `path`.

    Trained with a plain loop (every width, cross-entropy, cosine learning rate, no random crops: they slow a run
    this short), then BN recalibrated per width, so the tests of evaluation, export and search do not depend on the
    stage-I trainer.
    """
    from dsnet.checkpoint import save_checkpoint
    from dsnet.data import DataOptions, build_dataset, build_loader, calibration_batches

    torch.manual_seed(0)
    random.seed(0)  # timm's random crops draw from Python's generator: the same checkpoint on every run
    model = dsnet.create_supernet(**DIGITS_MODEL).to(memory_format=torch.channels_last)  # as train.py trains
    train = build_dataset(DataOptions(**{**DIGITS_DATA, "crop_scale_min": 1.0}), train=True)
    loader = build_loader(train, batch_size=64, train=True, seed=0)
    epochs = 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9, nesterov=True, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for _epoch in range(epochs):
        for images, targets in loader:
            optimizer.zero_grad()
            for i in range(len(model.widths)):
                torch.nn.functional.cross_entropy(model(images, i), targets).backward()
            optimizer.step()
            schedule.step()
    batches = calibration_batches(DataOptions(**DIGITS_DATA), num_batches=8, batch_size=64)
    for i in range(len(model.widths)):
        dsnet.recalibrate_bn(model, i, batches)
    config = {"stage": "supernet", **DIGITS_DATA, **DIGITS_MODEL, "batch_size": 64}
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": None,
                           "config": config, "epoch": epochs})


def fvcore_conv_linear_madds(dense: torch.nn.Module, size: int) -> int:
    """Convolution and linear multiply-accumulates of one image, counted by fvcore (an external counter)."""
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counter = FlopCountAnalysis(dense, torch.randn(1, 3, size, size))
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        by_op = counter.by_operator()
    return by_op["conv"] + by_op.get("linear", 0) + by_op.get("addmm", 0)


def run_command(main, argv, capsys) -> tuple[int, str, str]:
    """Run a command's `main` in-process as its entry point does (`dsnet.cli.run_main`): (exit status, stdout,
    stderr). The command-line tests that start a real process are kept to one per command: starting Python with torch
    costs seconds."""
    from dsnet.cli import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@torch.no_grad()
def spread_routes(gated, images: torch.Tensor):
    """A copy of `gated` whose slimming head sends about equal shares of `images` to every route: logit r is
    r·t − (q_1 + … + q_r) for t a projection of the squeezed features and q_k its quantiles over `images`."""
    gated = copy.deepcopy(gated)
    head = gated.gate.slimming
    routes = head.out_features
    head.weight.copy_(torch.arange(routes, dtype=torch.float32)[:, None] * torch.randn(head.in_features))
    head.bias.zero_()
    t = gated(images, return_info=True)[1].route_logits[:, 1]
    thresholds = torch.quantile(t, torch.arange(1, routes) / routes)
    head.bias.copy_(-torch.cat([torch.zeros(1), torch.cumsum(thresholds, 0)]))
    return gated


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module of small models: on a shared two-core machine two threads oversubscribe badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_without_dsnet(script: str, cwd) -> subprocess.CompletedProcess:
    """Run the Python `script` in `cwd`, in a process that cannot import dsnet: -S skips site-packages' .pth files
    (dsnet's editable install is one), and torch's directory is added back. The script fails if dsnet is found."""
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    prelude = (f"import importlib.util, sys\nsys.path.append({site_packages!r})\n"
               "assert importlib.util.find_spec('dsnet') is None, 'dsnet is importable'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)
