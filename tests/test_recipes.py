"""The default recipe is written once: `configs/digits.yaml` spells out the defaults the bare `python train.py` runs."""
from pathlib import Path

from dsnet.config import defaults, load_recipe, model_config

REPO = Path(__file__).resolve().parent.parent


def test_the_digits_recipe_is_the_default_config():
    recipe = load_recipe(str(REPO / "configs" / "digits.yaml"))
    config = defaults()
    config["widths"] = model_config(config, 10)["widths"]  # the widths default to the arch's
    differing = {key: (value, config[key]) for key, value in recipe.items() if config[key] != value}
    assert not differing
