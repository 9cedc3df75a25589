"""load_image_folder on small folders of PNGs written here: layout, labels, split, resizing, and every error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from llkern.data import ImageFolderData, black_fill, load_image_folder  # noqa: E402

# One colour per class, so the pixels tell which class an image came from. Folder names sort as cat < dog <
# zebra, which is not the order of creation below.
COLOURS = {"zebra": (250, 10, 10), "cat": (10, 200, 30), "dog": (20, 40, 240)}


def shade(colour, i):
    """Image i of a class: its colour, a little darker per image, so images differ but classes stay apart."""
    return tuple(max(c - 3 * i, 0) for c in colour)


def write(path: Path, colour, size=(8, 8), mode="RGB", fmt=None) -> None:
    """A solid ``size = (height, width)`` image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), colour).save(path, format=fmt)


def make_folder(root: Path, per_class=5, size=(8, 8)) -> Path:
    for name, colour in COLOURS.items():
        for i in range(per_class):
            write(root / name / f"img_{i}.png", shade(colour, i), size)
    return root


def colours_of(x, mean, std):
    """Back to 0..255 pixels, one colour per image (the images are solid)."""
    pixels = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return (pixels * 255).round().to(torch.int64)[:, :, 0, 0]


def test_shapes_labels_and_classes(tmp_path):
    data = load_image_folder(make_folder(tmp_path), test_fraction=0.2, seed=0)
    assert isinstance(data, ImageFolderData)
    x, y, x_test, y_test, classes, mean, std = data  # unpacks as a 7-tuple
    assert classes == ("cat", "dog", "zebra")
    assert x.shape == (12, 3, 8, 8) and x_test.shape == (3, 3, 8, 8)
    assert x.dtype == x_test.dtype == torch.float32 and y.dtype == y_test.dtype == torch.int64
    assert x.is_contiguous()
    # Every class gives 1 of its 5 images to the test set.
    assert torch.bincount(y, minlength=3).tolist() == [4, 4, 4] and sorted(y_test.tolist()) == [0, 1, 2]
    # Labels point at the right pixels (and the normalisation is undone by mean and std).
    for images, labels in ((x, y), (x_test, y_test)):
        for colour, label in zip(colours_of(images, mean, std).tolist(), labels.tolist(), strict=True):
            base = COLOURS[classes[label]]
            assert any(tuple(colour) == shade(base, i) for i in range(5)), (colour, classes[label])
    # Each part in class order.
    assert y.tolist() == sorted(y.tolist()) and y_test.tolist() == sorted(y_test.tolist())


def test_normalisation_uses_training_statistics(tmp_path):
    data = load_image_folder(make_folder(tmp_path), seed=1)
    per_channel = data.x_train.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    raw = load_image_folder(tmp_path, seed=1, normalize=False)
    assert raw.mean == (0.0, 0.0, 0.0) and raw.std == (1.0, 1.0, 1.0)
    assert raw.x_train.min() >= 0 and raw.x_train.max() <= 1
    pixels = raw.x_train.transpose(0, 1).flatten(1)
    torch.testing.assert_close(torch.tensor(data.mean), pixels.mean(1))
    torch.testing.assert_close(torch.tensor(data.std), pixels.std(1, correction=0))
    mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    torch.testing.assert_close(data.x_test, (raw.x_test - mean) / std)
    # black_fill of the result is the normalised value of a black pixel.
    torch.testing.assert_close(torch.tensor(black_fill(data.mean, data.std)).view(1, 3, 1, 1),
                               (torch.zeros(1, 3, 1, 1) - mean) / std)


def test_constant_channel_keeps_unit_std(tmp_path):
    for name, colour in (("a", (0, 0, 10)), ("b", (0, 255, 20))):
        for i in range(2):
            write(tmp_path / name / f"{i}.png", colour)
    data = load_image_folder(tmp_path, test_fraction=0.0)
    assert data.std[0] == 1.0 and torch.isfinite(data.x_train).all()


def test_split_sizes_and_stratification(tmp_path):
    # Classes of 10, 4 and 1 images: round half up per class, each class keeps a training image.
    counts = {"a": 10, "b": 4, "c": 1}
    for name, n in counts.items():
        for i in range(n):
            write(tmp_path / name / f"{i:02d}.png", (i * 20, len(name), 0))
    data = load_image_folder(tmp_path, test_fraction=0.3, seed=0)
    # a: round(3.0) = 3; b: round(1.2) = 1; c: round(0.3) = 0 (and at most 0: it has one image).
    assert torch.bincount(data.y_test, minlength=3).tolist() == [3, 1, 0]
    assert torch.bincount(data.y_train, minlength=3).tolist() == [7, 3, 1]
    half = load_image_folder(tmp_path, test_fraction=0.5, seed=0)  # b: 2.0 → 2; a: 5
    assert torch.bincount(half.y_test, minlength=3).tolist() == [5, 2, 0]
    high = load_image_folder(tmp_path, test_fraction=0.99, seed=0)  # capped at n - 1
    assert torch.bincount(high.y_train, minlength=3).tolist() == [1, 1, 1]
    none = load_image_folder(tmp_path, test_fraction=0.0)
    assert none.x_train.shape == (15, 3, 8, 8) and none.x_test.shape == (0, 3, 8, 8)
    assert none.y_test.shape == (0,) and none.y_test.dtype == torch.int64


def test_split_determinism(tmp_path):
    make_folder(tmp_path, per_class=10)

    def test_images(seed):
        data = load_image_folder(tmp_path, seed=seed, test_fraction=0.3, normalize=False)
        return {tuple(c) for c in colours_of(data.x_test, data.mean, data.std).tolist()}

    a, b = load_image_folder(tmp_path, seed=5), load_image_folder(tmp_path, seed=5)
    for u, v in zip(a[:4], b[:4], strict=True):
        assert torch.equal(u, v)
    assert test_images(5) == test_images(5)
    assert len({frozenset(test_images(seed)) for seed in range(6)}) > 1
    # Train and test are disjoint and together hold every image.
    data = load_image_folder(tmp_path, seed=2, test_fraction=0.3, normalize=False)
    train = {tuple(c) for c in colours_of(data.x_train, data.mean, data.std).tolist()}
    test = {tuple(c) for c in colours_of(data.x_test, data.mean, data.std).tolist()}
    assert not train & test and len(train | test) == 30


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_given_split(tmp_path, test_name):
    for name, colour in COLOURS.items():
        for i in range(3):
            write(tmp_path / "train" / name / f"{i}.png", shade(colour, i))
    for name in ("zebra", "cat"):  # the test part may lack a class
        write(tmp_path / test_name / name / "t.jpg", COLOURS[name], fmt="JPEG")
    data = load_image_folder(tmp_path, test_fraction=0.5, seed=3)  # split given: fraction and seed unused
    assert data.classes == ("cat", "dog", "zebra")
    assert data.x_train.shape == (9, 3, 8, 8) and data.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.y_test.tolist() == [0, 2]
    # JPEG is lossy: the solid colours come back within a few levels.
    got = colours_of(data.x_test, data.mean, data.std)
    want = torch.tensor([COLOURS["cat"], COLOURS["zebra"]])
    assert (got - want).abs().max() <= 4


def test_test_folder_preferred_to_val(tmp_path):
    write(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    write(tmp_path / "test" / "a" / "0.png", (4, 5, 6))
    write(tmp_path / "val" / "a" / "0.png", (7, 8, 9))
    write(tmp_path / "val" / "a" / "1.png", (7, 8, 9))
    data = load_image_folder(tmp_path, normalize=False)
    assert len(data.y_test) == 1 and colours_of(data.x_test, data.mean, data.std).tolist() == [[4, 5, 6]]


def test_classes_named_train_and_test(tmp_path):
    # Folders of images called train and test are classes (a vehicle data set), not a given split.
    for name in ("bus", "test", "train"):
        for i in range(2):
            write(tmp_path / name / f"{i}.png", (i, 0, 0))
    data = load_image_folder(tmp_path, test_fraction=0.5)
    assert data.classes == ("bus", "test", "train") and len(data.y_train) == len(data.y_test) == 3


def test_resizing_and_mixed_formats(tmp_path):
    write(tmp_path / "a" / "big.png", (200, 0, 0), size=(16, 12))
    write(tmp_path / "a" / "small.bmp", (200, 0, 0), size=(4, 4))
    write(tmp_path / "b" / "grey.PNG", 90, size=(8, 8), mode="L")  # grayscale → RGB; extension in any case
    write(tmp_path / "b" / "palette.gif", (0, 0, 200), size=(5, 7), fmt="GIF")
    write(tmp_path / "b" / "alpha.webp", (0, 0, 200, 128), size=(9, 9), mode="RGBA", fmt="WEBP")
    (tmp_path / "b" / "notes.txt").write_text("not an image: ignored")
    data = load_image_folder(tmp_path, image_size=(6, 10), test_fraction=0.0, normalize=False)
    assert data.x_train.shape == (5, 3, 6, 10)
    got = colours_of(data.x_train, data.mean, data.std).tolist()
    # Class b in file name order: alpha.webp (alpha dropped; WebP is lossy), grey.PNG, palette.gif.
    assert got[0] == got[1] == [200, 0, 0] and got[3] == [90, 90, 90] and got[4] == [0, 0, 200]
    assert max(abs(g - w) for g, w in zip(got[2], (0, 0, 200), strict=True)) <= 4
    assert data.y_train.tolist() == [0, 0, 1, 1, 1]
    square = load_image_folder(tmp_path, image_size=5, test_fraction=0.0)
    assert square.x_train.shape == (5, 3, 5, 5)
    grey = load_image_folder(tmp_path, image_size=4, test_fraction=0.0, mode="L", normalize=False)
    assert grey.x_train.shape == (5, 1, 4, 4) and len(grey.mean) == 1
    assert round(float(grey.x_train[3, 0, 0, 0]) * 255) == 90


def test_nested_and_hidden_files(tmp_path):
    write(tmp_path / "a" / "sub" / "deep.png", (1, 1, 1))
    write(tmp_path / "a" / "top.png", (2, 2, 2))
    write(tmp_path / "a" / ".hidden.png", (3, 3, 3))
    write(tmp_path / "a" / ".cache" / "x.png", (4, 4, 4))
    write(tmp_path / ".ipynb_checkpoints" / "x.png", (5, 5, 5))
    write(tmp_path / "b" / "0.png", (6, 6, 6))
    (tmp_path / "README.md").write_text("loose files in root are ignored")
    data = load_image_folder(tmp_path, test_fraction=0.0, normalize=False)
    assert data.classes == ("a", "b")
    # Files in order of their path within the class folder: sub/deep.png < top.png.
    assert colours_of(data.x_train, data.mean, data.std)[:, 0].tolist() == [1, 2, 6]
    only_png = load_image_folder(tmp_path, test_fraction=0.0, extensions=["PNG"])
    assert len(only_png.y_train) == 3


def test_linked_folders_followed_once_and_never_back_up(tmp_path):
    # A link inside a class folder back to the root once read every class again under that class (~40 levels
    # deep, into train and test alike); a link to a folder elsewhere is followed, once.
    import os

    write(tmp_path / "data" / "a" / "0.png", (1, 1, 1))
    write(tmp_path / "data" / "b" / "0.png", (2, 2, 2))
    write(tmp_path / "elsewhere" / "x.png", (3, 3, 3))
    os.symlink("..", tmp_path / "data" / "a" / "up")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "b" / "extra")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "b" / "again")
    data = load_image_folder(tmp_path / "data", test_fraction=0.0, normalize=False)
    assert data.y_train.tolist() == [0, 1, 1]
    assert colours_of(data.x_train, data.mean, data.std)[:, 0].tolist() == [1, 2, 3]  # b: 0.png, again/x.png


def test_sixteen_bit_grey_images_keep_their_range(tmp_path):
    # Pillow's convert() clips 16-bit values above 255: every pixel came out 0 or 1.
    values = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0 .. 65535
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(values).save(tmp_path / name / "0.png")
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I;16")
    for mode in ("L", "RGB"):
        data = load_image_folder(tmp_path, test_fraction=0.0, normalize=False, mode=mode)
        expected = torch.from_numpy(values / 65535.0).float()
        assert torch.allclose(data.x_train[0, 0], expected, atol=0.5 / 255 + 1e-6), data.x_train[0, 0]
    # Pillow before 10.1 opened 16-bit PNGs as mode I: the same values through that path
    import PIL.Image as pil

    original = pil.open

    def open_as_i(path, *args, **kwargs):
        image = original(path, *args, **kwargs)
        return image.convert("I") if image.mode.startswith("I;16") else image

    try:
        pil.open = open_as_i
        data = load_image_folder(tmp_path, test_fraction=0.0, normalize=False, mode="L")
    finally:
        pil.open = original
    assert torch.allclose(data.x_train[0, 0], torch.from_numpy(values / 65535.0).float(), atol=0.5 / 255 + 1e-6)
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(tmp_path / "a" / "1.tiff")
    with pytest.raises(ValueError, match=r"1\.tiff: not a readable image .*F pixels"):
        load_image_folder(tmp_path, test_fraction=0.0, extensions=[".png", ".tiff"])


# --- errors -----------------------------------------------------------------------------------------------

def test_errors_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder .*missing does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"image folder .*file.png is not a directory"):
        load_image_folder(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no class folders under .*empty: expected .*CLASS_NAME/IMAGE"):
        load_image_folder(empty)
    loose = tmp_path / "loose"
    write(loose / "cat1.png", (1, 2, 3))
    with pytest.raises(ValueError, match=r"no class folders under .*found 1 image\(s\) directly in it"):
        load_image_folder(loose)


def test_errors_class_without_images(tmp_path):
    make_folder(tmp_path, per_class=2)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty_class holds no images .*; it has no visible files"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class" / "labels.csv").write_text("x")
    with pytest.raises(ValueError, match=r"empty_class holds no images .* 1 other file\(s\), e.g. labels.csv"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match=r"class folder .*cat holds no images \(extensions .jpg\)"):
        load_image_folder(tmp_path, extensions=".jpg")


def test_errors_unreadable_images(tmp_path):
    make_folder(tmp_path, per_class=2)
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"broken.png: not a readable image \(UnidentifiedImageError"):
        load_image_folder(tmp_path, test_fraction=0.0)
    # A truncated file: a valid header, then the data stops half way.
    data = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(data).save(bad)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"broken.png: not a readable image"):
        load_image_folder(tmp_path, test_fraction=0.0)


def test_errors_sizes(tmp_path):
    make_folder(tmp_path, per_class=2)
    write(tmp_path / "dog" / "wide.png", (1, 2, 3), size=(8, 9))
    with pytest.raises(ValueError, match=r"wide.png is 8×9 \(height×width\) but .*img_0.png is 8×8: images of "
                                         r"different sizes need image_size"):
        load_image_folder(tmp_path, test_fraction=0.0)
    assert load_image_folder(tmp_path, image_size=(8, 8), test_fraction=0.0).x_train.shape == (7, 3, 8, 8)
    for bad in (0, (8,), (8, 0), (8.0, 8), "8", True):
        with pytest.raises(ValueError, match="expected image_size to be None, a positive int or a"):
            load_image_folder(tmp_path, image_size=bad)


def test_errors_arguments(tmp_path):
    make_folder(tmp_path, per_class=2)
    for bad in (1.0, -0.1, 2, True):
        with pytest.raises(ValueError, match=r"expected test_fraction in \[0, 1\)"):
            load_image_folder(tmp_path, test_fraction=bad)
    with pytest.raises(TypeError, match="expected seed to be an int, got float"):
        load_image_folder(tmp_path, seed=0.5)
    with pytest.raises(ValueError, match="expected mode 'RGB' or 'L', got 'RGBA'"):
        load_image_folder(tmp_path, mode="RGBA")
    with pytest.raises(ValueError, match="extensions is empty"):
        load_image_folder(tmp_path, extensions=[])
    # 2 images a class at 0.2: round(0.4) = 0 test images in every class.
    with pytest.raises(ValueError, match=r"test_fraction=0.2 leaves no test image \(6 images in 3 classes"):
        load_image_folder(tmp_path, test_fraction=0.2)


def test_errors_given_split(tmp_path):
    write(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    write(tmp_path / "test" / "a" / "0.png", (1, 2, 3))
    write(tmp_path / "test" / "b" / "0.png", (1, 2, 3))
    with pytest.raises(ValueError, match=r"test has class folder\(s\) b that .*train lacks"):
        load_image_folder(tmp_path)
    (tmp_path / "test" / "b" / "0.png").unlink()
    with pytest.raises(ValueError, match=r"class folder .*test/b holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "test" / "b").rmdir()
    write(tmp_path / "extra" / "0.png", (1, 2, 3))
    with pytest.raises(ValueError, match=r"has train/ and test/ \(a given split\) but also folder\(s\) extra"):
        load_image_folder(tmp_path)
    (tmp_path / "extra" / "0.png").unlink()
    (tmp_path / "extra").rmdir()
    write(tmp_path / "test" / "a" / "wide.png", (1, 2, 3), size=(8, 9))
    with pytest.raises(ValueError, match=r"test/a/wide.png is 8×9 .* but .*train/a/0.png is 8×8"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=4).x_test.shape == (2, 3, 4, 4)
