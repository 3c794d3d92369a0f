"""pbt.data on small image trees generated in tmp_path: formats, errors, decoding, sampling."""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pbt.config import ConfigError
from pbt.data import (
    ImageDataset,
    ResampleSampler,
    build_dataset,
    build_transforms,
    default_num_workers,
    load_image,
    materialise_digits,
)


def _pattern(width: int = 12, height: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def _save(path: Path, mode: str = "RGB", fmt: str | None = None, seed: int = 0,
          size: tuple[int, int] = (12, 8), **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(_pattern(*size, seed=seed))
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "I;16":
        grey = np.asarray(image.convert("L")).astype(np.uint16) * 257
        image = Image.fromarray(grey)
        assert image.mode == "I;16"
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, fmt, **kwargs)
    return path


def _tree(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, count in counts.items():
        for i in range(count):
            _save(root / name / f"{i}{ext}", seed=i)
    return root


# -- formats -------------------------------------------------------------------------------
def test_image_folder_ignores_hidden_and_non_images(tmp_path):
    root = _tree(tmp_path / "data", {"cat": 2, "ant": 3})
    (root / "cat" / "notes.txt").write_text("not an image")
    _save(root / "cat" / ".hidden.png")
    _save(root / ".cache" / "x.png")  # hidden class folder
    _save(root / "ant" / ".thumbs" / "y.png")  # hidden sub-folder inside a class
    _save(root / "ant" / "sub" / "z.jpg")  # nested images belong to the class
    ds = build_dataset(root)
    assert ds.classes == ["ant", "cat"]
    assert Counter(ds.targets) == {0: 4, 1: 2}
    assert all(".hidden" not in p and ".cache" not in p and ".thumbs" not in p
               for p, _ in ds.samples)
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 12)
    assert label == ds.samples[0][1]


def test_list_file_follows_class_name_txt_order(tmp_path):
    _tree(tmp_path / "train", {"zebra": 2, "apple": 1, "mango": 2})
    (tmp_path / "class_name.txt").write_text("zebra\napple\nmango\n")
    (tmp_path / "train.txt").write_text(
        "# a comment\n\ntrain/apple/0.png\ntrain/zebra/0.png\n  train/zebra/1.png  \n"
        "train/mango/0.png\ntrain/mango/1.png\n")
    ds = build_dataset(tmp_path / "train.txt")
    assert ds.classes == ["zebra", "apple", "mango"]  # not alphabetical
    assert ds.targets == [1, 0, 0, 2, 2]
    assert ds.samples[0][0] == str(tmp_path / "train/apple/0.png")


def test_list_file_without_class_names_is_sorted(tmp_path):
    _tree(tmp_path / "d", {"b": 1, "a": 1})
    (tmp_path / "l.txt").write_text("d/b/0.png\nd/a/0.png\n")
    ds = build_dataset(tmp_path / "l.txt")
    assert ds.classes == ["a", "b"] and ds.targets == [1, 0]


def test_list_file_path_label_lines(tmp_path):
    _tree(tmp_path / "img", {"x": 3})
    (tmp_path / "class_name.txt").write_text("dog\ncat\nbird\n")
    (tmp_path / "l.txt").write_text("img/x/0.png 2\nimg/x/1.png cat\nimg/x/2.png\t0\n")
    ds = build_dataset(tmp_path / "l.txt")
    assert ds.classes == ["dog", "cat", "bird"]
    assert ds.targets == [2, 1, 0]


def test_list_file_integer_labels_only(tmp_path):
    _tree(tmp_path / "flat", {"all": 3})
    (tmp_path / "l.txt").write_text("flat/all/0.png 2\nflat/all/1.png 0\nflat/all/2.png 1\n")
    ds = build_dataset(tmp_path / "l.txt")
    assert ds.classes == ["0", "1", "2"] and ds.targets == [2, 0, 1]
    # label 1 without images: a training list is refused, a test list may lack a class
    (tmp_path / "gap.txt").write_text("flat/all/0.png 2\nflat/all/1.png 0\n")
    with pytest.raises(ConfigError, match="label.s. 1 have no images"):
        build_dataset(tmp_path / "gap.txt")
    test = build_dataset(tmp_path / "gap.txt", class_names=ds.classes)
    assert test.targets == [2, 0]


def test_mixed_sources_match_classes_by_name(tmp_path):
    _tree(tmp_path / "f", {"b": 1, "c": 1})
    _tree(tmp_path / "g", {"a": 1, "c": 1})
    (tmp_path / "g" / "list.txt").write_text("a/0.png\nc/0.png\n")
    ds = build_dataset([tmp_path / "f", str(tmp_path / "g" / "list.txt")])
    assert ds.classes == ["b", "c", "a"]
    assert [ds.classes[t] for t in ds.targets] == ["b", "c", "a", "c"]


def test_test_set_follows_training_classes(tmp_path):
    train = build_dataset(_tree(tmp_path / "train", {"a": 1, "b": 1, "c": 1}))
    test = build_dataset(_tree(tmp_path / "test", {"c": 1, "a": 1}), class_names=train.classes)
    assert test.classes == ["a", "b", "c"]
    assert [test.classes[t] for t in test.targets] == ["a", "c"]

    _tree(tmp_path / "test", {"zzz": 1})
    with pytest.raises(ConfigError) as err:
        build_dataset(tmp_path / "test", class_names=train.classes)
    assert "'zzz'" in str(err.value) and str(tmp_path / "test") in str(err.value)


# -- bad input -----------------------------------------------------------------------------
def test_missing_and_wrong_sources(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_dataset(tmp_path / "nope", key="train_data")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"data\.csv.*neither a folder nor"):
        build_dataset(tmp_path / "data.csv")
    with pytest.raises(ConfigError, match="no data source"):
        build_dataset([])


def test_empty_dataset_and_empty_class_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        build_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)

    root = _tree(tmp_path / "data", {"a": 1})
    (root / "b").mkdir()
    (root / "b" / "readme.md").write_text("no images here")
    with pytest.raises(ConfigError) as err:
        build_dataset(root)
    assert str(root / "b") in str(err.value)

    (tmp_path / "only_comments.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="lists no images"):
        build_dataset(tmp_path / "only_comments.txt")


@pytest.mark.parametrize("line, needle", [
    ("img/a/9.png", "does not exist"),
    ("img/a/0.png 5", "out of range"),
    ("img/a/0.png -1", "out of range"),
    ("img/a/0.png wolf", "'wolf'"),
])
def test_list_file_errors_name_file_and_line(tmp_path, line, needle):
    _tree(tmp_path / "img", {"a": 1, "b": 1})
    (tmp_path / "class_name.txt").write_text("a\nb\n")
    (tmp_path / "l.txt").write_text(f"# header\nimg/a/0.png\n\n{line}\n")
    with pytest.raises(ConfigError) as err:
        build_dataset(tmp_path / "l.txt")
    assert f"{tmp_path / 'l.txt'}:4" in str(err.value) and needle in str(err.value)


def test_unlisted_folder_class_in_list_file(tmp_path):
    _tree(tmp_path / "img", {"a": 1, "other": 1})
    (tmp_path / "class_name.txt").write_text("a\n")
    (tmp_path / "l.txt").write_text("img/a/0.png\nimg/other/0.png\n")
    with pytest.raises(ConfigError, match=r"l\.txt:2: class 'other'"):
        build_dataset(tmp_path / "l.txt")


def _bad_tree(root: Path) -> dict[str, Path]:
    _tree(root, {"a": 2, "b": 2}, ext=".jpg")
    good = (root / "a" / "0.jpg").read_bytes()
    bad = {"truncated": root / "a" / "trunc.jpg", "text": root / "b" / "text.jpg",
           "empty": root / "b" / "empty.jpg"}
    bad["truncated"].write_bytes(good[: len(good) // 2])
    bad["text"].write_text("this is not a jpeg\n")
    bad["empty"].write_bytes(b"")
    return bad


def test_bad_images_are_all_named(tmp_path):
    bad = _bad_tree(tmp_path / "data")
    with pytest.raises(ConfigError) as err:
        build_dataset(tmp_path / "data")
    message = str(err.value)
    assert "3 bad image" in message
    for path in bad.values():
        assert str(path) in message
    assert "empty file" in message and "truncated" in message and "not an image" in message


def test_bad_images_skipped_with_one_warning(tmp_path):
    _bad_tree(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(tmp_path / "data", skip_bad_images=True)
    messages = [str(w.message) for w in caught if "bad image" in str(w.message)]
    assert len(messages) == 1 and "skipped 3 " in messages[0]
    assert len(ds) == 4 and all(ds[i][0].shape == (3, 8, 12) for i in range(len(ds)))


def test_unchecked_bad_image_fails_when_loaded(tmp_path):
    bad = _bad_tree(tmp_path / "data")
    ds = build_dataset(tmp_path / "data", check_images=False)
    index = [p for p, _ in ds.samples].index(str(bad["text"]))
    with pytest.raises(ConfigError, match="text.jpg"):
        ds[index]


def _caught(call):
    """``call()``'s result and the warnings it gave, each one shown ("always")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, caught


def test_symlinked_folders_are_followed_into_no_folder_twice(tmp_path):
    root = _tree(tmp_path / "data", {"a": 3, "b": 3})
    _tree(tmp_path / "elsewhere", {"more": 2})
    os.symlink(".", root / "a" / "loop")  # a/loop -> a: a loop
    os.symlink("../a", root / "b" / "to_a")  # another class's folder
    os.symlink(tmp_path / "elsewhere" / "more", root / "b" / "extra")  # a plain folder link
    os.symlink(tmp_path / "elsewhere" / "more", root / "b" / "extra_again")  # a second link
    os.symlink("../a/0.png", root / "b" / "link.png")  # a link to an image file works
    ds, caught = _caught(lambda: build_dataset(root))
    assert Counter(ds.classes[t] for t in ds.targets) == {"a": 3, "b": 3 + 2 + 1}
    assert len(set(p for p, _ in ds.samples)) == len(ds) == 9
    notes = [str(w.message) for w in caught if "symlinked folder" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    assert "3 symlinked folder(s) not followed" in notes[0] and str(root) in notes[0]
    assert str(root / "a" / "loop") in notes[0]


def test_class_folders_that_are_one_folder_are_refused(tmp_path):
    root = _tree(tmp_path / "data", {"a": 2})
    os.symlink("a", root / "b")
    with pytest.raises(ConfigError, match="class folders 'a' and 'b' are the same folder"):
        build_dataset(root)


def test_list_and_class_name_files_with_a_byte_order_mark(tmp_path):
    _tree(tmp_path / "train", {"cat": 1, "dog": 2})
    # as Windows Notepad saves UTF-8: a BOM before the first path and the first class
    (tmp_path / "class_name.txt").write_text("dog\ncat\n", encoding="utf-8-sig")
    (tmp_path / "train.txt").write_text("train/cat/0.png\ntrain/dog/0.png\ntrain/dog/1.png 0\n",
                                        encoding="utf-8-sig")
    assert (tmp_path / "train.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    ds = build_dataset(tmp_path / "train.txt")
    assert ds.classes == ["dog", "cat"] and ds.targets == [1, 0, 0]
    assert ds.samples[0][0] == str(tmp_path / "train" / "cat" / "0.png")


def test_repeated_list_lines_are_kept_with_one_warning(tmp_path):
    _tree(tmp_path / "img", {"cat": 2, "dog": 1})
    (tmp_path / "l.txt").write_text("img/cat/0.png\nimg/dog/0.png\nimg/cat/1.png\n"
                                    "img/dog/0.png\nimg/cat/0.png cat\nimg/./dog/0.png\n")
    ds, caught = _caught(lambda: build_dataset(tmp_path / "l.txt"))
    assert len(ds) == 6  # kept: a repeated line draws that image more often
    notes = [str(w.message) for w in caught if "repeat" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    assert str(tmp_path / "l.txt") in notes[0] and "3 line(s)" in notes[0]
    assert "line 4" in notes[0] and "dog/0.png" in notes[0] and "first on line 2" in notes[0]
    # no repeats, no warning
    (tmp_path / "ok.txt").write_text("img/cat/0.png\nimg/cat/1.png\n")
    _, caught = _caught(lambda: build_dataset(tmp_path / "ok.txt"))
    assert not [w for w in caught if "repeat" in str(w.message)]


@pytest.mark.parametrize("cache_images", [False, True], ids=["scanned", "cached"])
def test_an_image_over_pils_bomb_limit_gives_one_pbt_warning_naming_it(
        tmp_path, monkeypatch, cache_images):
    root = _tree(tmp_path / "data", {"a": 2, "b": 2})
    big_png = _save(root / "a" / "big.png", size=(40, 30))  # the fast decoder's format
    big_bmp = _save(root / "b" / "big.bmp", size=(40, 30))  # PIL decodes it in __getitem__
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 px: PIL warns, decodes
    ds, caught = _caught(lambda: build_dataset(root, cache_images=cache_images))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and str(big_png) in notes[0], notes
    assert "2 image(s)" in notes[0] and "40 x 30" in notes[0] and "1,000 pixels" in notes[0]
    # the loaders decode them again each epoch: named once already, PIL stays quiet
    _, caught = _caught(lambda: [ds[i] for i in range(len(ds))])
    assert not caught, [str(w.message) for w in caught]
    # over twice the limit PIL refuses them: bad images, named, whichever decoder reads them
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ConfigError) as err:
        build_dataset(root, cache_images=cache_images)
    assert "2 bad image(s)" in str(err.value), str(err.value)
    for path in (big_png, big_bmp):
        assert f"{path}: DecompressionBombError" in str(err.value), str(err.value)


def test_an_unscanned_oversized_image_is_named_when_loaded(tmp_path, monkeypatch):
    root = _tree(tmp_path / "data", {"a": 1})
    big = _save(root / "a" / "big.bmp", size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = build_dataset(root, check_images=False)
    _, caught = _caught(lambda: [ds[i] for i in range(len(ds)) for _ in range(3)])
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and str(big) in notes[0] and "decoded anyway" in notes[0], notes


# -- decoding ------------------------------------------------------------------------------
def _pil_reference(path: Path) -> torch.Tensor:
    from PIL import ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode == "I;16":
            image = Image.fromarray((np.asarray(image).astype(np.uint32) // 257).astype(np.uint8))
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("mode, ext", [
    ("L", ".png"), ("L", ".jpg"), ("LA", ".png"), ("P", ".png"), ("RGBA", ".png"),
    ("CMYK", ".jpg"), ("I;16", ".png"), ("1", ".png"), ("RGB", ".bmp"), ("P", ".gif"),
    ("RGB", ".webp"), ("RGB", ".tiff"),
])
def test_modes_become_rgb(tmp_path, mode, ext):
    path = _save(tmp_path / f"img{ext}", mode=mode)
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 12)
    reference = _pil_reference(path)
    # lossless formats match PIL exactly; JPEG decoders may round a little differently
    tolerance = 2 if ext == ".jpg" else 0
    assert (image.int() - reference.int()).abs().max() <= tolerance


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_honoured(tmp_path, fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path / f"rot.{fmt.lower()}", fmt=fmt, size=(12, 8), exif=exif)
    image = load_image(path)
    assert image.shape == (3, 12, 8)  # width and height swapped
    tolerance = 2 if fmt == "JPEG" else 0
    assert (image.int() - _pil_reference(path).int()).abs().max() <= tolerance


@pytest.fixture
def decoders_used(monkeypatch) -> list[str]:
    """Records which of pbt's decoders ran (the real ones, only counted)."""
    import pbt.data

    used: list[str] = []
    fast, pil = pbt.data._fast_decoder(), pbt.data._decode_pil
    assert fast is not None  # torchvision.io at least is installed

    def counted(name, decode):
        def wrapper(data):
            used.append(name)
            return decode(data)
        return wrapper

    monkeypatch.setattr(pbt.data, "_fast_decoder", lambda: counted("fast", fast))
    monkeypatch.setattr(pbt.data, "_decode_pil", counted("pil", pil))
    return used


def test_png_and_jpeg_take_the_fast_decoder(tmp_path, decoders_used):
    for name in ("a.png", "a.jpg"):
        path = _save(tmp_path / name)
        image = load_image(path)
        tolerance = 2 if name.endswith(".jpg") else 0
        assert (image.int() - _pil_reference(path).int()).abs().max() <= tolerance
    assert decoders_used == ["fast", "fast"]


def test_bytes_without_png_or_jpeg_magic_go_to_pil(tmp_path, decoders_used):
    """A WebP saved as .png (its bytes have no PNG magic): PIL decodes it, exactly."""
    path = _save(tmp_path / "photo.png", fmt="WEBP", lossless=True)
    assert not path.read_bytes().startswith(b"\x89PNG")
    assert torch.equal(load_image(path), _pil_reference(path))
    assert decoders_used == ["pil"]


def test_a_png_that_lost_its_magic_is_an_error_naming_it(tmp_path, decoders_used):
    path = _save(tmp_path / "broken.png")
    data = bytearray(path.read_bytes())
    data[1:4] = b"XYZ"  # \x89PNG -> \x89XYZ: neither decoder can know what it is
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="broken.png"):
        load_image(path)
    assert decoders_used == ["pil"]  # the fast decoder was never offered it


# -- transforms and loader -----------------------------------------------------------------
def test_transforms_shapes_and_normalisation():
    image = torch.full((3, 20, 30), 255, dtype=torch.uint8)
    for train in (True, False):
        out = build_transforms([48, 32], [0.5, 0.25, 0.0], [0.5, 0.25, 1.0], train)(image)
        assert out.shape == (3, 32, 48) and out.dtype == torch.float32
        expected = torch.tensor([1.0, 3.0, 1.0]).view(3, 1, 1)
        assert torch.allclose(out, expected.expand_as(out), atol=1e-5)
    with pytest.raises(ConfigError, match="input_size"):
        build_transforms([32], [0.5] * 3, [0.5] * 3, True)
    with pytest.raises(ConfigError, match="rgb_mean"):
        build_transforms([32, 32], [127.5] * 3, [0.5] * 3, True)
    with pytest.raises(ConfigError, match="rgb_std"):
        build_transforms([32, 32], [0.5] * 3, [0.0] * 3, True)


def test_dataloader_batches(tmp_path):
    ds = build_dataset(_tree(tmp_path / "d", {"a": 3, "b": 3}),
                       transform=build_transforms([16, 16], [0.5] * 3, [0.5] * 3, True))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, sampler=ResampleSampler(ds.targets, "mean", seed=0))
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64


def test_default_num_workers_never_oversubscribes():
    cpus = len(os.sched_getaffinity(0))
    for processes in (1, 2, 3, 64):
        workers = default_num_workers(processes)
        assert isinstance(workers, int) and 0 <= workers <= 8
        if processes <= cpus:  # each process: its loop plus its workers fit its share
            assert processes * (workers + 1) <= cpus
    if cpus >= 2:
        assert default_num_workers(1) >= 1


# -- resampling ----------------------------------------------------------------------------
TARGETS = [0] * 400 + [1] * 100 + [2] * 25 + [3] * 4 + [4] * 1


@pytest.mark.parametrize("mode, weight", [
    ("mean", lambda n: 1.0), ("sqrt", math.sqrt), ("log", lambda n: math.log(1 + n)),
])
def test_resample_histogram_matches_mode(mode, weight):
    sampler = ResampleSampler(TARGETS, mode, seed=3)
    sampler.set_epoch(1)
    draw = list(sampler)
    assert len(draw) == len(TARGETS) == len(sampler)
    sizes = Counter(TARGETS)
    norm = sum(weight(n) for n in sizes.values())
    drawn = Counter(TARGETS[i] for i in draw)
    for label, n in sizes.items():
        assert abs(drawn[label] - len(TARGETS) * weight(n) / norm) <= 1, (label, drawn)
    # an oversampled class is drawn whole before anything repeats
    assert set(draw) >= {i for i, t in enumerate(TARGETS) if t in (2, 3, 4)}


def test_resample_draws_depend_on_seed_and_epoch_only():
    def draw(seed: int, epoch: int) -> list[int]:
        sampler = ResampleSampler(TARGETS, "sqrt", seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draw(0, 2) == draw(0, 2)
    assert draw(0, 2) != draw(0, 3)
    assert draw(0, 2) != draw(1, 2)


def test_none_mode_is_a_shuffle():
    sampler = ResampleSampler(TARGETS, "none", seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == list(range(len(TARGETS))) and list(sampler) != first


@pytest.mark.parametrize("mode", ["none", "log"])
def test_replicas_split_one_draw(mode):
    targets = TARGETS[:-1]  # 529 samples: not divisible by 2
    ranks = [ResampleSampler(targets, mode, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shares = [list(sampler) for sampler in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == 265
    whole = ranks[0].epoch_draw()
    assert whole == ranks[1].epoch_draw() and len(whole) == 530
    # disjoint positions of the same draw, together exactly the draw
    assert shares[0] == whole[0::2] and shares[1] == whole[1::2]
    assert sorted(shares[0] + shares[1]) == sorted(whole)
    if mode == "none":  # every sample once, one padding duplicate
        assert set(whole) == set(range(len(targets)))


def test_resample_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="resample.*'balanced'"):
        ResampleSampler(TARGETS, "balanced", seed=0)


# -- digits --------------------------------------------------------------------------------
def _files(tree: Path) -> list[str]:
    return sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.png"))


def test_materialise_digits(tmp_path):
    train, test = materialise_digits(tmp_path / "a", seed=0)
    assert train == tmp_path / "a" / "train" and test == tmp_path / "a" / "test"
    train_files, test_files = _files(train), _files(test)
    assert len(train_files) + len(test_files) == 1797
    assert abs(len(test_files) - 0.2 * 1797) <= 1
    assert sorted(p.name for p in train.iterdir()) == [str(d) for d in range(10)]
    per_class = Counter(f.split("/")[0] for f in test_files)
    assert min(per_class.values()) >= 34 and max(per_class.values()) <= 38  # stratified

    with Image.open(train / train_files[0]) as image:
        assert image.size == (8, 8)
    pixels = np.concatenate([np.asarray(Image.open(train / f)).ravel() for f in train_files[:50]])
    assert pixels.max() == 255 and pixels.min() == 0

    stamp = (train / train_files[0]).stat().st_mtime_ns
    assert materialise_digits(tmp_path / "a", seed=0) == (train, test)  # idempotent
    assert (train / train_files[0]).stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]

    train_b, test_b = materialise_digits(tmp_path / "b", seed=0)
    assert _files(train_b) == train_files and _files(test_b) == test_files
    ds = build_dataset(train)
    assert len(ds) == len(train_files) and ds.classes == [str(d) for d in range(10)]


def test_materialise_digits_recovers_and_refuses_foreign_trees(tmp_path):
    import shutil

    train, test = materialise_digits(tmp_path / "d", seed=1)
    test_files = _files(test)
    shutil.rmtree(test)  # as if a run died between the two renames
    assert materialise_digits(tmp_path / "d", seed=1) == (train, test)
    assert _files(test) == test_files

    with pytest.raises(ConfigError, match="not the digits train split"):
        materialise_digits(tmp_path / "d", seed=2)  # another seed, another split


# One training process per GPU each calls materialise_digits on the same folder at once.
# Each child imports first, says so, then waits for the start file: the writes overlap.
DIGITS_WRITER = """
import sys, time
from pathlib import Path
from pbt.data import materialise_digits
root, ready, go = (Path(a) for a in sys.argv[1:4])
ready.touch()
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
before = (root / "train").exists()
train, test = materialise_digits(root, seed=0)
print(before, train, test)
"""


def _tree_bytes(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*")
            if p.is_file()}


@pytest.mark.slow  # three interpreters importing torch: ~10 s, more on a busy CPU
def test_materialise_digits_from_three_processes_at_once(tmp_path):
    import subprocess
    import sys
    import time

    root = tmp_path / "c"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    readies = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", DIGITS_WRITER, str(root), str(ready),
                               str(tmp_path / "go")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for ready in readies]
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in readies) and time.monotonic() < deadline:
            assert all(proc.poll() is None for proc in procs), "a writer died on import"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.split()[1:] == [str(root / "train"), str(root / "test")], out
    # at least two really raced: they started before any tree was in place
    assert [out.split()[0] for out, _ in outputs].count("False") >= 2, outputs

    # one whole tree, byte for byte what a lone writer makes, and no staging folder left
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    reference = materialise_digits(tmp_path / "alone", seed=0)
    for split, alone in zip(("train", "test"), reference):
        written = _tree_bytes(root / split)
        assert written.keys() == _tree_bytes(alone).keys()
        assert written == _tree_bytes(alone), f"{split}: files differ from a lone writer's"
    assert sum(len(_files(root / s)) for s in ("train", "test")) == 1797
    assert isinstance(build_dataset(root / "test"), ImageDataset)
