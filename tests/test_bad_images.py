"""A file in an image folder that cannot be decoded: an error naming it, in one line, with or without data-loader
workers, or with skip_bad_images a warning naming it and the next image in its place."""
import io
import traceback

import numpy as np
import pytest
import torch
from conftest import TINY, run_command
from PIL import Image

from dsnet.data import DataOptions, build_dataset, build_loader
from dsnet.errors import UserError
from dsnet.train import main as train_main

GOOD_PER_CLASS = {"train": 6, "val": 2}


def write_image(path, seed: int, fmt: str = "PNG") -> None:
    pixels = np.random.RandomState(seed).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    """DIR/{train,val}/{a,b}/*.png, with a truncated JPEG in train/a and a .png of random bytes in val/b."""
    root = tmp_path / "images"
    for split, count in GOOD_PER_CLASS.items():
        for c, name in enumerate("ab"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                write_image(root / split / name / f"{i}.png", seed=100 * c + i)
    jpeg = io.BytesIO()
    write_image(jpeg, seed=7, fmt="JPEG")
    truncated = root / "train" / "a" / "2-truncated.jpg"  # sorts between 1.png and 2.png
    truncated.write_bytes(jpeg.getvalue()[:200])
    random_bytes = root / "val" / "b" / "0-random.png"
    random_bytes.write_bytes(np.random.RandomState(8).bytes(300))
    return root, str(truncated), str(random_bytes)


def options(root, **kwargs) -> DataOptions:
    return DataOptions(data="imagefolder", data_dir=str(root), img_size=8, crop_pct=1.0, **kwargs)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False])
def test_a_bad_image_is_a_one_line_error_naming_it(folder, workers, train):
    root, truncated, random_bytes = folder
    loader = build_loader(build_dataset(options(root), train=train), batch_size=4, train=train, workers=workers)
    with pytest.raises(UserError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    traceback.clear_frames(info.tb)  # frees the loader's workers now (see dsnet.cli.run_main)
    assert message == (f"cannot read image {truncated!r}: Truncated File Read" if train else
                       f"cannot read image {random_bytes!r}: not an image format PIL recognizes")


def test_a_folder_of_bad_images_only_is_an_error_when_skipping(folder, capsys):
    root, truncated, random_bytes = folder
    for path in (root / "val").glob("*/*.png"):
        path.write_bytes(b"not a png")
    with pytest.raises(UserError, match=f"no image in {str(root / 'val')!r} can be read"):
        build_dataset(options(root, skip_bad_images=True), train=False)[0]
    assert capsys.readouterr().err.count("warning: cannot read image") == 2 * GOOD_PER_CLASS["val"] + 1


@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_replaces_a_bad_image_by_the_next_one(folder, workers, capfd):
    root, truncated, _ = folder
    opts = options(root, skip_bad_images=True)
    dataset = build_dataset(opts, train=True, transform=build_dataset(opts, train=False).transform)
    bad = [path for path, _ in dataset.samples].index(truncated)
    loader = build_loader(dataset, batch_size=4, train=False, workers=workers)
    for _ in range(2):
        batches = list(loader)
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        assert [len(b[0]) for b in batches] == [4, 4, 4, 1]  # all 13 files, the bad one included, in full batches
        assert torch.equal(images[bad], images[bad + 1])
        assert labels.tolist() == dataset.targets[:bad] + dataset.targets[bad + 1:bad + 2] + dataset.targets[bad + 1:]
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    warning = f"warning: cannot read image {truncated!r}: Truncated File Read; the next image replaces it"
    # once per file in each loading process: the main one, or one worker in each epoch
    assert warnings == [warning] * (1 if workers == 0 else 2)


def test_skipping_shuffled_training_batches_stay_full(folder, capfd):
    root, truncated, _ = folder
    loader = build_loader(build_dataset(options(root, skip_bad_images=True), train=True), batch_size=4, train=True,
                          workers=2)
    assert [len(images) for images, _ in loader] == [4, 4, 4]  # 13 images, drop_last
    assert truncated in capfd.readouterr().err


def terminal_lines(err: str) -> list[str]:
    """The lines `err` leaves on a terminal, where the progress bar, drawn and cleared with carriage returns, leaves
    none."""
    return [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]


def train_args(root, tmp_path, *extra) -> list:
    return [*TINY, "--data", "imagefolder", "--data-dir", root, "--batch-size", "4", "--val-batch-size", "4",
            "--epochs", "1", "--output", tmp_path / "out", *extra]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_train_command_stops_in_one_line_naming_the_file(folder, tmp_path, capsys, workers):
    root, truncated, _ = folder
    code, _, err = run_command(train_main, train_args(root, tmp_path, "--workers", workers), capsys)
    assert code == 2
    assert terminal_lines(err) == [f"error: cannot read image {truncated!r}: Truncated File Read"], err


def test_train_command_skips_bad_images_when_asked(folder, tmp_path, capsys):
    root, truncated, random_bytes = folder
    code, _, err = run_command(train_main, train_args(root, tmp_path, "--skip-bad-images"), capsys)
    assert code == 0, err
    # read by training and by BN recalibration, each through a dataset of its own, and still warned about once
    assert err.count(f"warning: cannot read image {truncated!r}: ") == 1
    assert err.count(f"warning: cannot read image {random_bytes!r}: ") == 1
