import random

import pytest
import torch

import dsnet


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
            if isinstance(module, dsnet.slim.SlimBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
