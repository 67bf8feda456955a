"""The offline loader: every source, the article's normalisation, and refusals."""

import hashlib
import io
import os
import pickle
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    SHAPES,
    pixel_ids,
    synthetic_split,
    write_batches,
    write_grey_tree,
    write_tar,
    write_tree,
)

import data
from ensembling import export, readers
from ensembling.cli import predict


def check_article_arrays(train, test, num_train, num_test):
    (x_train, y_train), (x_test, y_test) = train, test
    assert x_train.shape == (num_train, 32, 32, 3) and x_train.dtype == np.float32
    assert x_test.shape == (num_test, 32, 32, 3) and x_test.dtype == np.float32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert y_train.shape == (num_train, 10) and y_train.dtype == np.float32
    np.testing.assert_array_equal(y_train.sum(axis=1), 1.0)  # one-hot
    assert y_test.shape == (num_test, 1) and np.issubdtype(y_test.dtype, np.integer)


def test_image_tree_folder_labels_follow_sorted_class_names(image_tree):
    train, test = data.load_data(image_tree)
    check_article_arrays(train, test, 80, 20)
    (x_train, y_train), (x_test, y_test) = train, test
    # The class code written into each image matches the label it was given.
    np.testing.assert_array_equal(pixel_ids(x_train)[0], y_train.argmax(axis=1))
    np.testing.assert_array_equal(pixel_ids(x_test)[0], y_test[:, 0])
    # Pixels survive exactly (PNG): x / 255.
    assert x_train[0, 0, 0, 2] == np.float32(7) / np.float32(255)


def test_image_tree_training_split_is_shuffled_deterministically(image_tree):
    first = data.load_data(image_tree, seed=3)[0][1].argmax(axis=1)
    again = data.load_data(image_tree, seed=3)[0][1].argmax(axis=1)
    other = data.load_data(image_tree, seed=4)[0][1].argmax(axis=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # validation_split takes the last 20%: it must not be two classes only.
    assert len(set(first[-16:])) > 2


def test_tar_gz_of_jpeg_tree_matches_the_folder(tmp_path, image_tree):
    jpeg_tree = write_tree(tmp_path / "jpeg", suffix=".jpg")
    archive = write_tar(jpeg_tree, tmp_path / "tree.tar.gz")
    (x_train, y_train), (x_test, y_test) = data.load_data(archive)
    (x_ref, y_ref), (_, y_test_ref) = data.load_data(image_tree)
    np.testing.assert_array_equal(y_train, y_ref)
    np.testing.assert_array_equal(y_test, y_test_ref)
    # JPEG is lossy (noise suffers most) but keeps each image's mean colour.
    means, reference_means = x_train.mean(axis=(1, 2)), x_ref.mean(axis=(1, 2))
    assert np.abs(means - reference_means).max() < 0.02


def test_tar_with_one_top_folder_and_plain_tar(tmp_path, image_tree):
    wrapped = write_tar(image_tree, tmp_path / "wrapped.tar.gz", arcname="cifar10")
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as archive:
        archive.add(image_tree, arcname=".")
    reference = data.load_data(image_tree)[0][1]
    np.testing.assert_array_equal(data.load_data(wrapped)[0][1], reference)
    np.testing.assert_array_equal(data.load_data(plain)[0][1], reference)


def write_zip(source_root, zip_path, arcname="", extra=()):
    """`source_root` zipped as `zip -r` would (folders as entries too), plus `extra`
    entries of (name, bytes)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(source_root).rglob("*")):
            archive.write(path, str(Path(arcname) / path.relative_to(source_root)))
        for name, payload in extra:
            archive.writestr(name, payload)
    return Path(zip_path)


def test_zip_of_a_tree_matches_the_folder(tmp_path, image_tree):
    # Image-folder data sets mostly come zipped (Kaggle, the TensorFlow tutorials),
    # often in one top folder, and from a Mac with __MACOSX/ resource forks beside it.
    reference = data.load_data(image_tree, seed=2)
    fork = b"\x00\x05\x16\x07 not an image"  # AppleDouble: a Mac's resource fork
    mac = [("__MACOSX/train/cat/._0000.png", fork), ("__MACOSX/train/._cat", fork)]
    plain = write_zip(image_tree, tmp_path / "plain.zip", extra=mac)
    mac = [(f"__MACOSX/cifar10/{name.split('/', 1)[1]}", fork) for name, _ in mac]
    wrapped = write_zip(image_tree, tmp_path / "wrapped.zip", arcname="cifar10", extra=mac)
    for archive in (plain, wrapped):
        (x_train, y_train), (x_test, y_test) = data.load_data(archive, seed=2)
        np.testing.assert_array_equal(x_train, reference[0][0])
        np.testing.assert_array_equal(y_train, reference[0][1])
        np.testing.assert_array_equal(x_test, reference[1][0])
        np.testing.assert_array_equal(y_test, reference[1][1])
    # combine's loader reads a zipped tree of other images, with its val/ folder, too.
    grey = write_grey_tree(tmp_path / "grey", splits=("train", "val", "test"))
    zipped = write_zip(grey, tmp_path / "grey.zip", arcname="shapes")
    from_zip = data.load_labelled(zipped, channels=1)
    from_folder = data.load_labelled(grey, channels=1)
    assert from_zip[1] == from_folder[1] and from_zip[2] == from_folder[2] == "val/"
    for got, want in zip(from_zip[0], from_folder[0], strict=True):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_a_tree_nested_in_several_folders_reads_as_the_tree(tmp_path, image_tree):
    # Kaggle's zips often hold the uploader's folder in a folder of the data set's name.
    reference = data.load_data(image_tree, seed=1)
    readme = [("cifar10/README.txt", b"CIFAR-10, as PNG files")]
    deep = write_zip(image_tree, tmp_path / "deep.zip", arcname="cifar10/cifar10", extra=readme)
    nested = tmp_path / "downloads" / "cifar10" / "png"
    shutil.copytree(image_tree, nested)  # a folder, two levels above the tree
    for source in (deep, tmp_path / "downloads"):
        (x_train, y_train), (x_test, y_test) = data.load_data(source, seed=1)
        np.testing.assert_array_equal(x_train, reference[0][0])
        np.testing.assert_array_equal(y_train, reference[0][1])
        np.testing.assert_array_equal(y_test, reference[1][1])
    # A tree of train/ alone is not train/ wrapping a tree: it lacks test/, and says so.
    shutil.rmtree(nested / "test")
    with pytest.raises(data.DataError, match="has no images under test/<class>/"):
        data.load_data(tmp_path / "downloads")


def test_zip_of_the_batches_folder_reads_as_the_folder(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py")
    archive = write_zip(
        tmp_path / "cifar-10-batches-py", tmp_path / "b.zip", arcname="cifar-10-batches-py"
    )
    got, want = data.load_data(archive), data.load_data(tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(got[0][0], want[0][0])
    np.testing.assert_array_equal(got[1][1], want[1][1])
    with zipfile.ZipFile(tmp_path / "five.zip", "w") as five:  # one batch short
        for name in sorted(os.listdir(tmp_path / "cifar-10-batches-py"))[1:]:
            five.write(tmp_path / "cifar-10-batches-py" / name, f"cifar-10-batches-py/{name}")
    with pytest.raises(data.DataError, match="must hold all six CIFAR-10 batches"):
        data.load_data(tmp_path / "five.zip")


def test_a_tar_ending_in_a_zip_file_is_read_as_the_tar(tmp_path, image_tree):
    # A .keras file beside the tree, last in the tar: the tar's end then looks like a
    # zip's to zipfile.is_zipfile, and read as a zip it held no images.
    reference = data.load_data(image_tree)
    with zipfile.ZipFile(tmp_path / "zz.keras", "w") as model:  # as Keras writes one
        model.writestr("config.json", "{}")
        model.writestr("model.weights.h5", bytes(1000))
    with tarfile.open(tmp_path / "tree.tar", "w") as archive:
        archive.add(image_tree, arcname=".")
        archive.add(tmp_path / "zz.keras", arcname="zz.keras")
    assert zipfile.is_zipfile(tmp_path / "tree.tar")
    (x_train, y_train), (x_test, _) = data.load_data(tmp_path / "tree.tar")
    np.testing.assert_array_equal(x_train, reference[0][0])
    np.testing.assert_array_equal(y_train, reference[0][1])
    np.testing.assert_array_equal(x_test, reference[1][0])


def _patch_zip_flags(archive, offset_local, offset_central, value, width=2):
    """Sets a field of every entry's local and central header (the zip format's byte
    offsets), as tools Python's zipfile cannot imitate would have written it."""
    raw = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", offset_local), (b"PK\x01\x02", offset_central)):
        start = raw.find(signature)
        while start != -1:
            raw[start + offset : start + offset + width] = value.to_bytes(width, "little")
            start = raw.find(signature, start + 4)
    archive.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "backslash dotdot", "symlink"])
def test_unsafe_zip_members_are_refused(tmp_path, image_tree, kind):
    bad = write_zip(image_tree, tmp_path / "bad.zip")
    with zipfile.ZipFile(bad, "a") as archive:
        name = {"absolute": "/etc/evil", "dotdot": "../evil", "backslash dotdot": "..\\evil"}
        member = zipfile.ZipInfo(name.get(kind, "train/cat/link.png"))
        if kind == "symlink":  # as `zip -y` stores a link: its mode, its target as data
            member.external_attr = 0o120777 << 16
        archive.writestr(member, b"/etc/passwd")
    with pytest.raises(data.DataError, match="refused"):
        data.load_data(bad)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "neither a folder nor a readable .tar, .tar.gz or .zip archive"),
        ("corrupt", "bad.zip is truncated or corrupt"),
        ("encrypted", "bad.zip is encrypted"),
        ("deflate64", "compressed in a way Python's zipfile cannot read"),
    ],
)
def test_damaged_or_unreadable_zips_give_one_clear_error(tmp_path, image_tree, damage, message):
    bad = write_zip(image_tree, tmp_path / "bad.zip")
    if damage == "truncated":  # the directory at its end is gone
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif damage == "corrupt":  # a compressed byte flipped: its CRC no longer matches
        raw = bytearray(bad.read_bytes())
        raw[200] ^= 0xFF
        bad.write_bytes(bytes(raw))
    elif damage == "encrypted":  # bit 0 of the flags: a password-protected entry
        _patch_zip_flags(bad, 6, 8, 0x1)
    elif damage == "deflate64":  # method 9, which Windows' and 7-Zip's large zips use
        _patch_zip_flags(bad, 8, 10, 9)
    with pytest.raises(data.DataError, match=message) as raised:
        data.load_data(bad)
    assert "\n" not in str(raised.value)


def keras_datasets_npz(path, **changes):
    """An .npz of keras.datasets' four arrays, CIFAR-10's, with `changes` (None drops one)."""
    (x_train, y_train), (x_test, y_test) = synthetic_split(3), synthetic_split(1)
    arrays = {"x_train": x_train, "y_train": y_train[:, None], "x_test": x_test,
              "y_test": y_test[:, None], **changes}  # fmt: skip
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def test_an_npz_of_keras_datasets_arrays_loads_as_they_are(tmp_path):
    # What keras.datasets returns, saved with np.savez; Keras' own mnist.npz is one.
    (x_train, y_train), (x_test, y_test) = synthetic_split(3), synthetic_split(1)
    train, test = data.load_data(keras_datasets_npz(tmp_path / "cifar.npz"))
    check_article_arrays(train, test, 30, 10)
    np.testing.assert_array_equal(train[0], x_train / np.float32(255))
    np.testing.assert_array_equal(train[1].argmax(axis=1), y_train)  # Keras' order kept
    np.testing.assert_array_equal(test[1][:, 0], y_test)
    # MNIST's layout for combine: (N, 28, 28) grey pixels, labels of shape (N,).
    grey = np.random.default_rng(5).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 4
    mnist = tmp_path / "mnist.npz"
    np.savez(mnist, x_train=grey[:30], y_train=labels[:30].astype(np.uint8),
             x_test=grey[30:], y_test=labels[30:].astype(np.uint8))  # fmt: skip
    ((x_val, y_val), (x_test, y_test)), classes, where = data.load_labelled(mnist, channels=1)
    assert classes == ("0", "1", "2", "3") and where == "the last 20% of the training images"
    np.testing.assert_array_equal(x_val[..., 0], grey[24:30] / np.float32(255))
    np.testing.assert_array_equal(y_val.argmax(axis=1), labels[24:30])
    np.testing.assert_array_equal(y_test[:, 0], labels[30:])
    # Models of RGB images get each grey pixel in all three channels, as from a tree.
    rgb = data.load_labelled(mnist, channels=3)[0][1][0]
    assert rgb.shape == (10, 28, 28, 3)
    np.testing.assert_array_equal(rgb[..., 2], x_test[..., 0])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no y_test", "has no y_test; an .npz needs x_train, y_train, x_test and y_test"),
        ("float pixels", "x_train is float32 of shape (30, 32, 32, 3); save uint8 pixels"),
        ("labels short", "y_test must hold one class index (0, 1, ...) per image of x_test"),
        ("other shapes", "x_train's images are (32, 32, 3), x_test's (28, 28, 1)"),
        ("not CIFAR-10", "holds 4 classes of 32x32x3 images; ensemble.py trains on CIFAR-10"),
        ("colour for grey", "holds colour images; the models take grey images (1 channel)"),
        ("corrupt", "is not a readable .npz"),
    ],
)
def test_npz_refusals_are_one_clear_line(tmp_path, damage, message):
    path, channels = tmp_path / "bad.npz", None
    if damage == "no y_test":
        keras_datasets_npz(path, y_test=None)
    elif damage == "float pixels":
        keras_datasets_npz(path, x_train=synthetic_split(3)[0].astype(np.float32) / 255)
    elif damage == "labels short":
        keras_datasets_npz(path, y_test=np.zeros(3, np.int64))
    elif damage == "other shapes":
        keras_datasets_npz(path, x_test=np.zeros((10, 28, 28, 1), np.uint8))
    elif damage == "not CIFAR-10":
        keras_datasets_npz(path, y_train=np.arange(30) % 4, y_test=np.arange(10) % 4)
    elif damage == "colour for grey":
        keras_datasets_npz(path)
        channels = 1
    elif damage == "corrupt":
        path.write_bytes(keras_datasets_npz(tmp_path / "whole.npz").read_bytes()[:5000])
    with pytest.raises(data.DataError, match=re.escape(message)) as raised:
        if channels:
            data.load_labelled(path, channels=channels)
        else:
            data.load_data(path)
    assert "\n" not in str(raised.value)


def test_batches_folder_keeps_the_official_order(tmp_path):
    (train_images, train_labels), (test_images, test_labels) = write_batches(tmp_path / "b")
    (x_train, y_train), (x_test, y_test) = data.load_data(tmp_path / "b")
    check_article_arrays((x_train, y_train), (x_test, y_test), 100, 20)
    np.testing.assert_array_equal(y_train.argmax(axis=1), train_labels)  # not reshuffled
    np.testing.assert_array_equal(np.rint(x_train * 255).astype(np.uint8), train_images)
    np.testing.assert_array_equal(y_test[:, 0], test_labels)
    # A parent folder holding cifar-10-batches-py works too.
    write_batches(tmp_path / "parent" / "cifar-10-batches-py")
    np.testing.assert_array_equal(data.load_data(tmp_path / "parent")[0][1], y_train)


def official_archive(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py")
    return write_tar(
        tmp_path / "cifar-10-batches-py",
        tmp_path / "official.tar.gz",
        arcname="cifar-10-batches-py",
    )


def test_official_archive_read_when_the_hash_matches(tmp_path, monkeypatch):
    archive = official_archive(tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "OFFICIAL_ARCHIVE_SHA256", digest)
    train, test = data.load_data(archive)
    check_article_arrays(train, test, 100, 20)


def test_official_archive_with_wrong_hash_is_refused(tmp_path):
    archive = official_archive(tmp_path)
    with pytest.raises(data.DataError, match="sha256"):
        data.load_data(archive)


def test_limit_keeps_a_deterministic_subset_and_decodes_only_it(image_tree, monkeypatch):
    full = data.load_data(image_tree, seed=5)
    decoded = []
    real_decode = readers.decode_image
    monkeypatch.setattr(
        readers, "decode_image", lambda b, w, *spec: decoded.append(w) or real_decode(b, w, *spec)
    )
    (x_train, y_train), (x_test, y_test) = data.load_data(image_tree, limit=12, seed=5)
    assert x_train.shape[0] == 12 and x_test.shape[0] == 12
    assert len(decoded) == 24
    # The subset is a prefix of the full shuffled order, and repeats exactly.
    np.testing.assert_array_equal(x_train, full[0][0][:12])
    np.testing.assert_array_equal(data.load_data(image_tree, limit=12, seed=5)[1][1], y_test)
    assert len(set(y_test[:, 0])) > 1  # test subset is drawn across classes


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_batches(tmp_path / "b")
    (tmp_path / "b" / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(data.DataError, match="not allowed"):
        data.load_data(tmp_path / "b")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_unsafe_tar_members_are_refused(tmp_path, image_tree, kind):
    with tarfile.open(tmp_path / "bad.tar", "w") as bad:
        bad.add(image_tree, arcname=".")
        member = tarfile.TarInfo({"absolute": "/etc/evil", "dotdot": "../evil"}.get(kind, "link"))
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
            bad.addfile(member)
        else:
            member.size = 1
            bad.addfile(member, io.BytesIO(b"x"))
    with pytest.raises(data.DataError, match="refused"):
        data.load_data(tmp_path / "bad.tar")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("truncated", "truncated or corrupt|neither a folder"),
        ("extra_class", "only in one of them"),
        ("missing_class", "only in one of them: cat"),
        ("missing_everywhere", "expected 10 class folders, found 9"),
        ("wrong_size", "must be 32x32 RGB"),
        ("cmyk", "is 32x32 CMYK; CIFAR-10 images must be 32x32 RGB"),
        ("16-bit grey", "is 32x32 I;16; CIFAR-10 images must be 32x32 RGB"),
        ("transparent", "0000.png has transparent pixels; CIFAR-10 images must be opaque"),
        ("not_image", r"not an image \(PNG, JPEG, BMP, GIF or WebP\); remove it"),
        ("garbage_png", "not a readable image"),
    ],
)
def test_bad_sources_give_one_clear_error(tmp_path, image_tree, damage, message):
    from PIL import Image

    target = image_tree
    if damage == "missing":
        target = tmp_path / "nowhere"
    elif damage == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif damage == "truncated":
        whole = write_tar(image_tree, tmp_path / "whole.tar.gz").read_bytes()
        target = tmp_path / "cut.tar.gz"
        target.write_bytes(whole[: len(whole) // 2])
    elif damage == "extra_class":
        (image_tree / "train" / "unicorn").mkdir()
        Image.fromarray(synthetic_split(1)[0][0]).save(image_tree / "train" / "unicorn" / "0.png")
    elif damage == "missing_class":
        shutil.rmtree(image_tree / "test" / "cat")
    elif damage == "missing_everywhere":
        shutil.rmtree(image_tree / "test" / "cat")
        shutil.rmtree(image_tree / "train" / "cat")
    elif damage == "wrong_size":
        Image.new("RGB", (28, 28)).save(image_tree / "test" / "cat" / "0000.png")
    elif damage == "cmyk":  # converting CMYK to RGB would change the pixels
        Image.new("CMYK", (32, 32)).save(image_tree / "test" / "cat" / "0000.jpg")
    elif damage == "16-bit grey":
        Image.new("I;16", (32, 32)).save(image_tree / "test" / "cat" / "0000.png")
    elif damage == "transparent":
        Image.new("RGBA", (32, 32), (9, 9, 9, 128)).save(image_tree / "test" / "cat" / "0000.png")
    elif damage == "not_image":
        (image_tree / "train" / "dog" / "notes.txt").write_text("hello")
    elif damage == "garbage_png":
        (image_tree / "train" / "dog" / "0000.png").write_bytes(b"not a png at all")
    with pytest.raises(data.DataError, match=message) as raised:
        data.load_data(target)
    assert "\n" not in str(raised.value)


def test_grey_palette_and_opaque_alpha_images_load_as_their_exact_rgb(image_tree):
    """What a PNG optimiser (oxipng, optipng) makes of CIFAR-10 images, losslessly.

    An image without colour is stored grey, one of few colours as a palette; some
    tools add an opaque alpha channel. Each holds exactly one RGB image, which is what
    the loader must return.
    """
    from PIL import Image

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    as_palette = Image.fromarray(indices, "P")
    as_palette.putpalette(palette.tobytes())
    bits = rng.random((32, 32)) < 0.5
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    # Test images keep the tree's order (class, then file): position i is NNNN = i.
    cases = {
        "cat/0006.png": (Image.fromarray(grey, "L"), np.stack([grey] * 3, axis=-1)),
        "cat/0007.png": (as_palette, palette[indices]),
        "dog/0010.png": (Image.fromarray(bits), np.where(bits, 255, 0)[..., None].repeat(3, -1)),
        "dog/0011.png": (
            Image.fromarray(np.dstack([colour, np.full((32, 32), 255, np.uint8)]), "RGBA"),
            colour,
        ),
    }
    for name, (image, _) in cases.items():
        image.save(image_tree / "test" / name)
        with Image.open(image_tree / "test" / name) as saved:
            assert saved.mode != "RGB"  # the case is what it claims to be
    _, (x_test, _) = data.load_data(image_tree)
    for name, (_, expected) in cases.items():
        position = int(name.split("/")[1][:4])
        np.testing.assert_array_equal(data._pixels(x_test[position]), expected, err_msg=name)


def test_bmp_gif_and_webp_images_load_as_their_pixels_in_trees_and_predict(image_tree):
    """Keras' image_dataset_from_directory reads BMP and GIF besides PNG and JPEG (an
    animated GIF as its first frame), and the web serves WebP: a tree of them loads
    each image's exact pixels, as predict reads them."""
    from PIL import Image

    rng = np.random.default_rng(6)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    few = rng.integers(0, 2, (32, 32, 3), dtype=np.uint8) * 255  # 8 colours: a GIF's palette
    other = 255 - few
    cases = {  # test images keep the tree's order (class, then file): position i is NNNN = i
        "cat/0006.bmp": colour,
        "cat/0007.gif": few,
        "dog/0010.webp": colour,
        "dog/0011.GIF": few,  # animated: its first frame, as Keras reads it
    }
    for name, pixels in cases.items():
        (image_tree / "test" / name).with_name(name.split("/")[1][:4] + ".png").unlink()
        image = Image.fromarray(pixels)
        target = image_tree / "test" / name
        if name.endswith(".webp"):
            image.save(target, lossless=True)
        elif name.endswith(".GIF"):
            image.save(target, format="GIF", save_all=True, append_images=[Image.fromarray(other)])
            with Image.open(target) as saved:
                assert saved.n_frames == 2  # the case is what it claims to be
        else:
            image.save(target)
    _, (x_test, _) = data.load_data(image_tree)
    assert x_test.shape[0] == 20
    for name, expected in cases.items():
        position = int(name.split("/")[1][:4])
        np.testing.assert_array_equal(data._pixels(x_test[position]), expected, err_msg=name)
        read = predict.read_pixels(image_tree / "test" / name)
        np.testing.assert_array_equal(read, expected, err_msg=name)
    # A folder given to predict stands for these files too, by name.
    found = predict.image_files(image_tree / "test" / "dog")
    assert [p.name for p in found][:2] == ["0010.webp", "0011.GIF"]


def test_jpeg_trees_decode_as_tensorflows_accurate_transform_not_its_default(tmp_path):
    """The README's JPEG note: Pillow's pixels equal TensorFlow's INTEGER_ACCURATE
    decoding; its default, which image_dataset_from_directory uses, differs."""
    tf = pytest.importorskip("tensorflow", reason="the comparison is with TensorFlow's decoder")
    from PIL import Image

    rng = np.random.default_rng(8)
    tree = write_tree(tmp_path / "tree", train_per_class=1, test_per_class=1, suffix=".jpg")
    smooth = np.clip(rng.normal(128, 60, (32, 32, 3)).cumsum(axis=1) / 8, 0, 255)
    Image.fromarray(smooth.astype(np.uint8)).save(tree / "test" / "cat" / "0003.jpg", quality=90)
    _, (x_test, _) = data.load_data(tree)
    differs = 0
    for position, path in enumerate(sorted((tree / "test").glob("*/*.jpg"))):
        encoded = path.read_bytes()
        accurate = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
        np.testing.assert_array_equal(data._pixels(x_test[position]), accurate.numpy())
        differs += not np.array_equal(accurate.numpy(), tf.io.decode_jpeg(encoded, 3).numpy())
    assert differs > 0


def test_hidden_files_and_windows_thumbnail_caches_are_ignored(image_tree):
    (image_tree / "train" / "dog" / ".DS_Store").write_bytes(b"\0\1")
    (image_tree / "train" / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (image_tree / "test" / "cat" / "desktop.ini").write_text("[.ShellClassInfo]")
    assert data.load_data(image_tree)[0][0].shape[0] == 80


def test_class_folders_linked_in_are_read_and_a_link_loop_is_not_followed(tmp_path, image_tree):
    # Splits made with links rather than copies: train/cat -> ../../all/cat.
    reference = data.load_data(image_tree, seed=4)
    linked = tmp_path / "linked"
    shutil.copytree(image_tree, linked)
    for split in ("train", "test"):
        for folder in sorted((linked / split).iterdir()):
            kept = tmp_path / "all" / split / folder.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(kept)
            folder.symlink_to(kept, target_is_directory=True)
    (linked / "train" / "cat" / "loop").symlink_to(linked, target_is_directory=True)
    assert not [name for name in readers.folder_files(linked) if "loop" in name]
    (x_train, y_train), (x_test, _) = data.load_data(linked, seed=4)
    np.testing.assert_array_equal(x_train, reference[0][0])
    np.testing.assert_array_equal(y_train, reference[0][1])
    np.testing.assert_array_equal(x_test, reference[1][0])


def test_decoded_arrays_come_back_bit_for_bit(tmp_path, image_tree):
    # --parallel's member processes read the parent's arrays instead of decoding.
    arrays = data.load_data(image_tree, limit=30, seed=3)
    data.save_decoded(tmp_path / "d.npz", arrays, "key")
    again = data.load_decoded(tmp_path / "d.npz", "key")
    for a, b in zip(sum(arrays, ()), sum(again, ()), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert data.load_decoded(tmp_path / "d.npz", "another selection") is None
    # Every pixel value survives the float32 round trip, not only those in the tree.
    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert np.array_equal(data._pixels(every.astype(np.float32) / np.float32(255)), every)


def test_combine_reads_any_class_folder_tree_of_one_image_size(tmp_path, monkeypatch):
    """`load_labelled`: the classes and image size of the tree, grey or RGB, read exactly;
    of the training images, only the last fifth, which combine's fitted rules learn on."""
    tree = write_grey_tree(tmp_path / "shapes", per_class=4, size=(12, 10))
    archive = write_tar(tree, tmp_path / "shapes.tar.gz")
    decoded = []
    real_decode = readers.decode_image
    monkeypatch.setattr(
        readers, "decode_image", lambda b, w, *spec: decoded.append(w) or real_decode(b, w, *spec)
    )
    for source in (tree, archive):
        decoded.clear()
        ((x_val, y_val), (x_test, y_test)), classes, held_out = data.load_labelled(
            source, channels=1
        )
        assert classes == tuple(sorted(SHAPES))
        assert held_out == "the last 20% of the training images"
        assert x_val.shape == (3, 12, 10, 1) and x_test.shape == (12, 12, 10, 1)
        assert y_val.shape == (3, 3) and y_test.shape == (12, 1)
        assert len(decoded) == 3 + 12  # not the 9 training images before them
        labels = np.rint(x_test[:, 0, 0, 0] * 255).astype(int) // 100
        np.testing.assert_array_equal(labels, y_test[:, 0])
        np.testing.assert_array_equal(np.rint(x_val[:, 0, 0, 0] * 255) // 100, y_val.argmax(1))
    # The last images of the shuffled training set, as Keras' validation_split takes them.
    (every, _), _ = data.load_labelled(tree, channels=1, validation_split=0.999)[0]
    assert len(every) == 12
    (x_quarter, _), _ = data.load_labelled(tree, channels=1, validation_split=0.25)[0]
    np.testing.assert_array_equal(x_quarter, every[9:])
    # An RGB model reads the same grey images as three equal channels.
    (_, _), (rgb, _) = data.load_labelled(tree, channels=3)[0]
    assert rgb.shape == (12, 12, 10, 3)
    np.testing.assert_array_equal(rgb, np.repeat(x_test, 3, axis=3))
    # Training stays the article's: CIFAR-10's ten classes, and the error says where
    # other images go.
    with pytest.raises(data.DataError, match="expected 10 class folders, found 3") as error:
        data.load_data(tree)
    assert str(error.value).endswith("with num_classes (models.py) and ensemble them with "
                                     "python ensemble.py combine")  # fmt: skip


@pytest.mark.parametrize("folder", readers.HELD_OUT_FOLDERS)
def test_a_trees_own_validation_folder_is_what_the_fitted_rules_learn_on(tmp_path, folder):
    tree = write_grey_tree(tmp_path / "tree", per_class=2, splits=("train", "test", folder))
    ((x_val, y_val), (x_test, _)), _, held_out = data.load_labelled(tree, channels=1)
    assert held_out == f"{folder}/" and len(x_val) == 6 and len(x_test) == 6
    assert set(np.rint(x_val[:, 0, 2, 0] * 255).astype(int)) == {20}  # all from val/
    np.testing.assert_array_equal(np.rint(x_val[:, 0, 0, 0] * 255) // 100, y_val.argmax(1))
    assert len(data.load_labelled(tree, limit=4, channels=1)[0][0][0]) == 4
    # With its own validation images, a tree needs no train/: nothing of it is read.
    shutil.rmtree(tree / "train")
    without_train = data.load_labelled(tree, channels=1)
    assert without_train[2] == f"{folder}/"
    np.testing.assert_array_equal(without_train[0][0][0], x_val)
    np.testing.assert_array_equal(without_train[0][1][0], x_test)
    with pytest.raises(data.DataError, match="has no images under train/<class>/"):
        data.load_data(tree)  # training needs it, of course
    # Training ignores such a folder, as before.
    cifar = write_tree(tmp_path / "cifar", train_per_class=2, test_per_class=1)
    shutil.copytree(cifar / "test", cifar / folder)
    (x_train, _), (x_test, _) = data.load_data(cifar)
    assert len(x_train) == 20 and len(x_test) == 10


@pytest.mark.parametrize(
    "damage, message",
    [
        ("other size", "test/square/0001.png is 9x12, TREE:train/circle/0000.png is 10x12: "),
        ("colour", "0001.png is a colour image; the models take grey images (1 channel)"),
        ("one class", "found one class folder (circle); a classifier's images come in two"),
        ("cifar batches", "is CIFAR-10, RGB images; the models take 1-channel ones"),
        ("four channels", "the models take 4-channel images; combine reads grey or RGB ones"),
        ("two val folders", "has val/ and validation/; keep one folder of validation images"),
        ("val lacks a class", "val/ must hold the same class folders as train/ and test/"),
        ("val and a split", "holds its own validation images in val/; drop --validation-split"),
        ("validation, no test", "has validation/ but no test/ to score on; rename "),
        ("no train, no val", "has no images under train/<class>/"),
    ],
)
def test_any_tree_refusals_are_one_clear_line(tmp_path, damage, message):
    from PIL import Image

    tree = write_grey_tree(tmp_path / "tree")
    channels = 4 if damage == "four channels" else 1
    if damage == "other size":
        Image.new("L", (9, 12)).save(tree / "test" / "square" / "0001.png")
    elif damage == "colour":
        Image.new("RGB", (10, 12), (200, 10, 10)).save(tree / "test" / "square" / "0001.png")
    elif damage == "one class":
        for split in ("train", "test"):
            for name in ("square", "triangle"):
                shutil.rmtree(tree / split / name)
    elif damage == "cifar batches":
        tree = tmp_path / "batches"
        write_batches(tree)
    elif damage in ("two val folders", "val lacks a class", "val and a split"):
        shutil.copytree(tree / "test", tree / "val")
    elif damage == "validation, no test":  # cats_and_dogs_filtered.zip's layout
        shutil.move(tree / "test", tree / "validation")
    elif damage == "no train, no val":  # combine learns on train/ then
        shutil.rmtree(tree / "train")
    if damage == "two val folders":
        shutil.copytree(tree / "test", tree / "validation")
    elif damage == "val lacks a class":
        shutil.rmtree(tree / "val" / "circle")
    split = 0.2 if damage == "val and a split" else None
    with pytest.raises(data.DataError) as error:
        data.load_labelled(tree, channels=channels, validation_split=split)
    assert message.replace("TREE", str(tree)) in str(error.value)


def test_without_pillow_image_files_ask_for_it_in_one_line(tmp_path, monkeypatch):
    # Keras and its backends install without Pillow; only image files need it.
    tree = write_tree(tmp_path / "tree", train_per_class=2, test_per_class=1)
    image = next(tree.glob("test/*/*.png"))
    monkeypatch.setitem(sys.modules, "PIL", None)  # "from PIL import Image" now fails
    wanted = "reading image files needs Pillow, which is not installed: pip install pillow"
    with pytest.raises(data.DataError, match=wanted):
        data.load_data(tree)
    with pytest.raises(export.ExportError, match=wanted):
        predict.read_pixels(image)
