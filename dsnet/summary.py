"""`python -m dsnet.summary`: channels, parameters and MAdds of every width choice of a supernet."""
from __future__ import annotations

import json

from .archs import create_model
from .cli import POSITIVE_INT, ArgumentParser, run_main
from .madds import count_madds, count_params

KNOWN_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashion-mnist": 10}


def model_config_from_recipe(path: str) -> dict:
    """The supernet a training recipe describes (classes from the recipe, else from its dataset, else 1000)."""
    from .config import defaults, load_recipe, model_config

    config = {**defaults(), **load_recipe(path)}
    classes = config["num_classes"] or KNOWN_CLASSES.get(config["data"], 1000)
    return model_config(config, classes)


def summary_rows(model, img_size: int) -> list[dict]:
    rows = []
    firsts = set(model.first_blocks())  # a stage's first block writes the stage's channels
    for width, plan in zip(model.widths, model.choice_plans):
        rows.append({
            "width": width,
            "stem": plan["stem"],
            "stages": [plan.channels[spec.out_group] for spec in model.block_specs if spec.name in firsts],
            "head": plan.channels[model.head_group],
            "params": count_params(model, plan),
            "madds": count_madds(model, plan, img_size),
        })
    return rows


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m dsnet.summary", description=__doc__)
    parser.add_argument("-c", "--config", help="training recipe (configs/*.yaml) whose supernet to describe "
                        "(default: the ImageNet-layout supernet with 1000 classes)")
    parser.add_argument("--img-size", type=POSITIVE_INT,
                        help="input resolution for MAdds (default: the config's img_size)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = create_model(model_config_from_recipe(args.config) if args.config else None)
    img_size = model.config.img_size if args.img_size is None else args.img_size
    rows = summary_rows(model, img_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'width':>6} {'stem':>5} {'stage channels':<36} {'head':>5} {'params':>10} {'MAdds':>10}")
    for r in rows:
        stages = "/".join(str(c) for c in r["stages"])
        print(f"{r['width']:>6.2f} {r['stem']:>5} {stages:<36} {r['head']:>5} {r['params'] / 1e6:>9.3f}M "
              f"{r['madds'] / 1e6:>9.1f}M")
    print(f"({model.config.num_classes} classes, {img_size}×{img_size} input)")
    return 0


if __name__ == "__main__":
    run_main(main)
