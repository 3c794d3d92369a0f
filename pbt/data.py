"""Data: the reproducible data order every trainer uses (samplers, per-sample seeding, the
DataLoader helper), and the classification recipe's image datasets, list files,
resampling and bad-image handling.

Sources are ImageFolder trees (one sub-folder per class) and/or PBT list files (``.txt``,
one image path per line, optionally followed by a label). Images decode straight to uint8
CHW RGB tensors (TorchCodec, else torchvision.io, for JPEG/PNG; PIL for everything else)
and are augmented with ``torchvision.transforms.v2`` on tensors.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pbt.config import ConfigError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm", ".pbm")
RESAMPLE_MODES = ("none", "mean", "sqrt", "log")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAX_LISTED = 20  # errors named one by one in a message; the rest are counted


def _join_errors(header: str, errors: list[str]) -> str:
    lines = errors[:_MAX_LISTED]
    if len(errors) > _MAX_LISTED:
        lines.append(f"... and {len(errors) - _MAX_LISTED} more")
    return header + "\n  " + "\n  ".join(lines)


# -- decoding ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _fast_decoder() -> Callable[[bytes], torch.Tensor] | None:
    """TorchCodec's decoder, else torchvision.io's (deprecated since 0.29), else None.

    Both honour EXIF orientation for JPEG and PNG and convert any mode to RGB uint8.
    """
    try:
        from torchcodec.decoders import decode_image
    except Exception:  # not installed, or its native library fails to load
        pass
    else:
        return lambda data: decode_image(data, mode="RGB")
    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode_image
    except Exception:
        return None

    def decode(data: bytes) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                    mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if image.dtype == torch.uint16:  # 16-bit PNG
            image = (image.to(torch.int32) // 257).to(torch.uint8)
        return image

    return decode


def _pil_to_rgb(image: Any) -> Any:
    """Any PIL mode to RGB; 16/32-bit grey is scaled (PIL's own convert would clip it)."""
    from PIL import Image

    if image.mode.startswith("I"):
        array = np.asarray(image).astype(np.int64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array // 257
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_pil(data: bytes) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image = _pil_to_rgb(ImageOps.exif_transpose(image))
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def decode_image_bytes(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes to a uint8 CHW RGB tensor, EXIF orientation applied.

    JPEG and PNG take the fast native decoder; other formats, and anything it rejects,
    go through PIL (which then raises if the data really is bad).
    """
    if data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC):
        decoder = _fast_decoder()
        if decoder is not None:
            try:
                image = decoder(data)
            except Exception:
                image = None
            if image is not None and image.ndim == 3 and image.shape[0] == 3:
                return image
    return _decode_pil(data)


# PIL warns (DecompressionBombWarning) about an image of more than Image.MAX_IMAGE_PIXELS
# pixels and refuses one of more than twice that. Its warning names no file and repeats in
# every loader worker, so where pbt decodes it mutes that warning for the process and names
# such images itself (a per-call catch_warnings would reset every module's "warn once"
# registry at each image, and is not thread-safe).
def _mute_pil_bomb_warning() -> None:
    """Ignore PIL's DecompressionBombWarning in this process (called in the main thread,
    before a thread pool starts; again after a test or a user reset the filters)."""
    from PIL import Image

    entry = ("ignore", None, Image.DecompressionBombWarning, None, 0)
    if entry not in warnings.filters:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)


_NAMED_OVERSIZED: set[str] = set()  # load_image names each such file once per process


def _pixel_problem(width: int, height: int) -> tuple[str | None, bool]:
    """(why an image this size is refused, as PIL refuses it, or None; whether it is over
    PIL's decompression-bomb limit), the same whichever decoder read it."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if not limit:
        return None, False
    pixels = width * height
    if pixels > 2 * limit:
        return (f"DecompressionBombError: Image size ({pixels} pixels) exceeds limit of "
                f"{2 * limit} pixels, could be decompression bomb DOS attack."), True
    return None, pixels > limit


def _oversized_note(what: str, width: int, height: int) -> str:
    from PIL import Image

    return (f"{what} ({width} x {height} = {width * height:,} pixels) over PIL's "
            f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS): decoded anyway; raise the limit if they are "
            "genuine, else remove them")


def load_image(path: str | Path, report_oversized: bool = True) -> torch.Tensor:
    """Read and decode one image file; a bad file is a ConfigError naming it and why. An
    image over PIL's decompression-bomb limit is decoded with a warning naming it (none
    with ``report_oversized`` false: the dataset's scan named it already)."""
    _mute_pil_bomb_warning()
    try:
        image = decode_image_bytes(Path(path).read_bytes())
    except Exception as err:
        raise ConfigError(f"cannot load image {str(path)!r}: {_reason(err)}") from None
    problem, oversized = _pixel_problem(image.shape[-1], image.shape[-2])
    if problem:
        raise ConfigError(f"cannot load image {str(path)!r}: {problem}")
    if oversized and report_oversized and str(path) not in _NAMED_OVERSIZED:
        _NAMED_OVERSIZED.add(str(path))
        warnings.warn(_oversized_note(f"image {str(path)!r}", image.shape[-1],
                                      image.shape[-2]), stacklevel=2)
    return image


def _reason(err: BaseException) -> str:
    """A one-line why for an error message (the path is named by the caller)."""
    from PIL import UnidentifiedImageError

    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, UnidentifiedImageError):  # its text names a BytesIO, not the file
        return "not an image in a known format"
    if "truncated" in text.lower():
        return f"truncated file ({text})"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


Size = tuple[int, int]  # (width, height) of an image over PIL's decompression-bomb limit


def _check(path: str | Path) -> tuple[str | None, Size | None]:
    """:func:`check_image`'s answer, and the size of an image over PIL's limit."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if not data:
            return "empty file", None
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None, size if _pixel_problem(*size)[1] else None
    except Exception as err:
        return _reason(err), None


def check_image(path: str | Path) -> str | None:
    """Return why ``path`` is not a usable image, or None when it decodes.

    Reads the header, then decodes every byte of the compressed stream (truncation shows
    up only there); JPEGs decode at 1/8 scale, which reads the same stream much faster.
    """
    _mute_pil_bomb_warning()
    return _check(path)[0]


def scan_images(paths: Sequence[str | Path], num_threads: int | None = None,
                oversized: dict[str, Size] | None = None) -> dict[str, str]:
    """Check many images in a thread pool (PIL decodes without the GIL); return bad ones.

    The result maps each unusable path to the reason it failed; ``oversized`` (when
    given) receives the (width, height) of each image over PIL's decompression-bomb limit.
    """
    _mute_pil_bomb_warning()
    results = _in_threads(_check, paths, num_threads)
    if oversized is not None:
        oversized.update({str(path): size for path, (_, size) in zip(paths, results) if size})
    return {str(path): reason for path, (reason, _) in zip(paths, results) if reason}


def _in_threads(function: Callable[[Any], Any], paths: Sequence[str | Path],
                num_threads: int | None) -> list:
    """``function`` over ``paths`` in a thread pool (PIL decodes without the GIL)."""
    if not paths:
        return []
    threads = num_threads or min(16, max(1, (os.cpu_count() or 1) * 2))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(function, paths, chunksize=64))


def _decode_checked(path: str | Path) -> tuple[torch.Tensor | str, Size | None]:
    """The decoded image ``load_image`` would return, or why the file is not usable (as
    :func:`check_image` words it: PIL, the fallback decoder, reports truncation); and the
    size of an image over PIL's decompression-bomb limit."""
    try:
        data = Path(path).read_bytes()
        if not data:
            return "empty file", None
        image = decode_image_bytes(data)
    except Exception as err:
        return _reason(err), None
    width, height = image.shape[-1], image.shape[-2]
    problem, oversized = _pixel_problem(width, height)
    if problem:
        return problem, None
    return image, (width, height) if oversized else None


def decode_images(paths: Sequence[str | Path], num_threads: int | None = None,
                  oversized: dict[str, Size] | None = None,
                  ) -> tuple[list[torch.Tensor | None], dict[str, str]]:
    """Decode many images in a thread pool, as :func:`load_image` does each one.

    Returns the uint8 CHW tensors (None for a bad file) and, like :func:`scan_images`,
    each unusable path with the reason (and fills ``oversized`` as it does); this is the
    scan and the decode in one pass.
    """
    _mute_pil_bomb_warning()
    results = _in_threads(_decode_checked, paths, num_threads)
    images = [result if torch.is_tensor(result) else None for result, _ in results]
    bad = {str(path): result for path, (result, _) in zip(paths, results)
           if isinstance(result, str)}
    if oversized is not None:
        oversized.update({str(path): size for path, (_, size) in zip(paths, results) if size})
    return images, bad


def estimate_decoded_bytes(paths: Sequence[str | Path], limit: int | None = None) -> int:
    """Bytes the images take decoded to uint8 RGB (3 x width x height), from the file
    headers alone (nothing is decoded). Stops once the sum passes ``limit``; a file PIL
    cannot identify counts as nothing (the scan reports it)."""
    from PIL import Image

    total = 0
    _mute_pil_bomb_warning()  # the scan names such images
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Exception:
            continue
        total += 3 * width * height
        if limit is not None and total > limit:
            break
    return total


# -- decoded-image cache -------------------------------------------------------------------
# cache_images null (auto) caches a dataset whose decoded images fit in this many bytes per
# training process on the machine; digits take 0.3 MB, CIFAR-10's 50,000 images 154 MB.
CACHE_AUTO_MAX_BYTES = 256 * 10**6


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm (where torch's shared CPU tensors live on Linux), or None."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


class ImageCache:
    """Decoded uint8 CHW images in one flat tensor in shared memory, with each image's
    offset and shape: DataLoader workers (fork or spawn) map the same memory, none holds a
    copy. ``image(i)`` returns a copy of image ``i`` (a transform may work in place).

    ``shared=False`` keeps the tensor in ordinary memory (forked workers still read the
    parent's pages without copying them; a spawned worker's pickling moves it to shared
    memory then)."""

    def __init__(self, images: Sequence[torch.Tensor], shared: bool = True) -> None:
        if any(image.dim() != 3 or image.dtype != torch.uint8 for image in images):
            raise ValueError("ImageCache holds uint8 (C, H, W) images")
        shapes = np.array([tuple(image.shape) for image in images],
                          dtype=np.int64).reshape(len(images), 3)
        offsets = np.zeros(len(images) + 1, dtype=np.int64)
        np.cumsum(shapes.prod(axis=1), out=offsets[1:])
        data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
        if shared:
            data.share_memory_()
        for image, start, end in zip(images, offsets[:-1].tolist(), offsets[1:].tolist()):
            data[start:end] = image.reshape(-1)
        self.data = data
        # one numpy array, not per-image Python objects: forked workers touch no refcounts
        self.index = np.concatenate([offsets[:-1, None], shapes], axis=1)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as a new uint8 (C, H, W) tensor, equal to decoding its file."""
        start, channels, height, width = self.index[i].tolist()
        return self.data[start:start + channels * height * width].view(
            channels, height, width).clone()


# -- sources -------------------------------------------------------------------------------
def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _folder_key(path: str) -> tuple[int, int]:
    info = os.stat(path)  # follows a symlink: the folder it leads to
    return info.st_dev, info.st_ino


def _walk_images(top: str, read: set[tuple[int, int]],
                 not_followed: list[tuple[str, str]]) -> list[str]:
    """Image files under ``top``, as ``os.walk(followlinks=True)`` lists them (top-down,
    sorted, hidden names skipped), but every folder once: a sub-folder already read
    (``read``, by device and inode) is a symlink loop or a second link to it, and is
    recorded in ``not_followed`` as (link, where it leads) instead of read again."""
    found: list[str] = []
    pending = [top]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as err:
            raise ConfigError(f"cannot read folder {folder!r}: {_reason(err)}") from None
        subfolders = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            if entry.is_dir():  # follows symlinks, as os.walk(followlinks=True) did
                key = _folder_key(entry.path)
                if key in read:
                    not_followed.append((entry.path, os.path.realpath(entry.path)))
                    continue
                read.add(key)
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                found.append(entry.path)  # a broken link too: the scan names it
        pending.extend(reversed(subfolders))
    return found


def _folder_source(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Classes and (path, class name) samples of an ImageFolder tree. Symlinks are
    followed, but into no folder twice (one warning names what was not followed)."""
    class_dirs = sorted((entry for entry in os.scandir(root)
                         if entry.is_dir() and not _is_hidden(entry.name)),
                        key=lambda entry: entry.name)
    if not class_dirs:
        raise ConfigError(
            f"data source {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
    # the root and every class folder count as read: a link back to one is a loop or
    # would give another class's images this class's label
    read = {_folder_key(str(root))}
    first_class: dict[tuple[int, int], str] = {}
    for entry in class_dirs:
        key = _folder_key(entry.path)
        if first_class.setdefault(key, entry.name) != entry.name:
            raise ConfigError(f"data source {str(root)!r}: class folders "
                              f"{first_class[key]!r} and {entry.name!r} are the same folder "
                              "(a symlink): its images would carry two labels")
        read.add(key)
    not_followed: list[tuple[str, str]] = []
    classes, samples = [], []
    for entry in class_dirs:
        found = _walk_images(entry.path, read, not_followed)
        if not found:
            raise ConfigError(
                f"class folder {entry.path!r} holds no images "
                f"(extensions: {', '.join(IMG_EXTENSIONS)})")
        classes.append(entry.name)
        samples.extend((path, entry.name) for path in found)
    if not_followed:
        link, target = not_followed[0]
        warnings.warn(f"data source {str(root)!r}: {len(not_followed)} symlinked folder(s) not "
                      f"followed, as they lead to a folder read already (a loop, a second "
                      f"link, or another class's folder), e.g. {link!r} -> {target!r}",
                      stacklevel=3)
    return classes, samples


def _read_class_names(path: Path) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    # utf-8-sig: Windows editors start a file with a byte-order mark, which is no class name
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if name in seen:
            raise ConfigError(
                f"{path}:{number}: class {name!r} is listed twice (first on line {seen[name]})")
        seen[name] = number
        names.append(name)
    if not names:
        raise ConfigError(f"{path}: class name file lists no classes")
    return names


def _warn_duplicates(list_file: Path, entries: list[tuple[int, str, str | int]]) -> None:
    """One warning when lines repeat an image: kept (a repeated line draws that image more
    often, a way to oversample), but a copy-paste slip is worth knowing about."""
    first_line: dict[str, int] = {}
    repeats = []
    for number, path, _ in entries:
        key = os.path.normpath(path)
        if key in first_line:
            repeats.append((number, path, first_line[key]))
        else:
            first_line[key] = number
    if repeats:
        number, path, first = repeats[0]
        warnings.warn(f"list file {str(list_file)!r}: {len(repeats)} line(s) repeat an image "
                      f"listed before, the first {path!r} on line {number} (first on line "
                      f"{first}); repeats are kept, so those images are drawn more often",
                      stacklevel=4)


def _list_source(list_file: Path, training: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Classes and (path, class name) samples of a PBT list file.

    A line is ``path`` (class = parent folder name) or ``path label`` (label = index into
    the class order, or a class name). Class order: ``class_name.txt`` next to the list
    file, else sorted names. With integer labels only, a training list must use every
    label 0..N-1 (a test list may lack some classes).
    """
    base = list_file.parent
    names_file = base / "class_name.txt"
    declared = _read_class_names(names_file) if names_file.is_file() else None
    entries: list[tuple[int, str, str | int]] = []  # line, path, class name or index
    errors: list[str] = []
    try:
        text = list_file.read_text(encoding="utf-8-sig")  # a BOM is not part of the path
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read list file {str(list_file)!r}: {_reason(err)}") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_file}:{number}"
        label: str | int | None = None
        # a whole line that is an existing file is a path with spaces, not "path label"
        if not (base / line).is_file() and len(parts := line.rsplit(None, 1)) == 2:
            line, token = parts
            label = int(token) if token.lstrip("-").isdigit() else token
        path = base / line
        if not path.is_file():
            errors.append(f"{where}: image {str(path)!r} does not exist")
            continue
        if label is None:
            label = path.parent.name
        entries.append((number, str(path), label))
    if errors:
        raise ConfigError(_join_errors(f"list file {str(list_file)!r} has bad lines:", errors))
    if not entries:
        raise ConfigError(f"list file {str(list_file)!r} lists no images")

    if declared is not None:
        classes = declared
    else:
        classes = sorted({label for _, _, label in entries if isinstance(label, str)})
        if not classes:  # only integer labels and no class_name.txt: the labels name classes
            labels = {int(label) for _, _, label in entries}
            top = max(labels)
            gaps = sorted(set(range(top + 1)) - labels)
            if gaps and training:
                line = next(n for n, _, label in entries if label == top)
                raise ConfigError(
                    f"list file {str(list_file)!r}: labels must be 0..N-1 with images for "
                    f"each, but label(s) {', '.join(map(str, gaps[:20]))} have no images "
                    f"while {list_file}:{line} uses label {top}; fix the labels, or name the "
                    f"classes in {str(names_file)!r}")
            classes = [str(i) for i in range(top + 1)]
    known = set(classes)
    samples = []
    for number, path, label in entries:
        where = f"{list_file}:{number}"
        if isinstance(label, int):
            if not 0 <= label < len(classes):
                errors.append(f"{where}: label {label} is out of range 0..{len(classes) - 1}"
                              f" ({len(classes)} classes)")
                continue
            label = classes[label]
        elif label not in known:
            origin = f"in {names_file}" if declared is not None else "among the classes"
            errors.append(f"{where}: class {label!r} is not {origin}")
            continue
        samples.append((path, label))
    if errors:
        raise ConfigError(_join_errors(f"list file {str(list_file)!r} has bad lines:", errors))
    _warn_duplicates(list_file, entries)
    return classes, samples


# -- dataset -------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Images with integer labels; ``classes[label]`` is the class name.

    Items are ``(transform(uint8 CHW RGB tensor), label)``. With ``cache`` (an
    :class:`ImageCache` holding ``samples``' images in their order) the image comes from
    memory instead of its file: the same tensor, so the same item under the same seed.
    ``cache_note`` says whether the images are cached and why (for the log).
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable[[torch.Tensor], Any] | None = None,
                 cache: ImageCache | None = None) -> None:
        if cache is not None and len(cache) != len(samples):
            raise ValueError(f"the cache holds {len(cache)} images for {len(samples)} samples")
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.class_to_idx = {name: index for index, name in enumerate(classes)}
        self.transform = transform
        self.cache = cache
        self.cache_note = "not cached"
        self.report_oversized = True  # false once build_dataset's scan has named them

    def __len__(self) -> int:
        return len(self.samples)

    def relabel(self, classes: list[str]) -> None:
        """Re-number the labels for another class order (a checkpoint's), by name."""
        new_index = {name: index for index, name in enumerate(classes)}
        missing = [name for name in self.classes if name not in new_index]
        if missing:
            raise ConfigError(f"relabel: classes {missing!r} are not in {classes!r}")
        self.samples = [(path, new_index[self.classes[label]]) for path, label in self.samples]
        self.targets = [label for _, label in self.samples]
        self.classes, self.class_to_idx = list(classes), new_index

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = (load_image(path, self.report_oversized) if self.cache is None
                 else self.cache.image(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images, {len(self.classes)} classes)"


def build_dataset(sources: str | Path | Sequence[str | Path],
                  transform: Callable[[torch.Tensor], Any] | None = None,
                  class_names: list[str] | None = None, skip_bad_images: bool = False,
                  check_images: bool = True, key: str = "data",
                  cache_images: bool | None = False,
                  cache_limit: int = CACHE_AUTO_MAX_BYTES) -> ImageDataset:
    """An ImageDataset from ImageFolder dirs and/or PBT list files, concatenated.

    Classes are matched by name across sources; their order is ``class_names`` when given
    (the training set's, for a test set: an unknown class is an error), else the order in
    which sources introduce them. ``check_images`` decodes every image first and stops on
    bad ones, naming each; ``skip_bad_images`` drops them with one warning instead (it
    implies the scan). ``key`` (e.g. ``"train_data"``) is the config key named in errors.

    ``cache_images`` true keeps every image decoded in shared memory (an
    :class:`ImageCache`); that decode is the scan, so it implies ``check_images``. None
    (auto) caches when the file headers say the decoded images take at most
    ``cache_limit`` bytes. The dataset's ``cache_note`` says which, and why.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not isinstance(sources, Sequence) or not sources:
        raise ConfigError(f"{key}: no data source given (got {sources!r})")
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise ConfigError(f"{key}: class_names has duplicates: {class_names!r}")

    classes: list[str] = list(class_names) if class_names is not None else []
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for source in sources:
        if not isinstance(source, (str, Path)) or not str(source):
            raise ConfigError(f"{key}: data source {source!r} is not a path")
        path = Path(source).expanduser()
        if path.is_dir():
            source_classes, source_samples = _folder_source(path)
        elif path.is_file() and path.suffix.lower() == ".txt":
            source_classes, source_samples = _list_source(path, training=class_names is None)
        elif path.exists():
            raise ConfigError(
                f"{key}: data source {str(path)!r} is neither a folder nor a .txt list file")
        else:
            raise ConfigError(f"{key}: data source {str(path)!r} does not exist")
        used = {name for _, name in source_samples}
        for name in source_classes:
            if name not in index:
                if class_names is not None:
                    if name not in used:
                        continue  # declared by class_name.txt but has no images here
                    raise ConfigError(
                        f"{key}: class {name!r} from data source {str(path)!r} is not one "
                        f"of the training classes ({', '.join(class_names)})")
                index[name] = len(classes)
                classes.append(name)
        samples.extend((file, index[name]) for file, name in source_samples)

    files = [file for file, _ in samples]
    if cache_images is None:
        estimate = estimate_decoded_bytes(files, cache_limit)
        cache_images = estimate <= cache_limit
        limit = f"{cache_limit / 1e6:.0f} MB"
        why = (f"cache_images auto: {_megabytes(estimate)} decoded, at most {limit}"
               if cache_images else f"cache_images auto: over {limit} decoded")
    else:
        why = f"cache_images {str(bool(cache_images)).lower()}"
    images: list[torch.Tensor | None] | None = None
    bad: dict[str, str] = {}
    oversized: dict[str, tuple[int, int]] = {}
    scanned = bool(cache_images or check_images or skip_bad_images)
    if cache_images:
        images, bad = decode_images(files, oversized=oversized)
    elif scanned:
        bad = scan_images(files, oversized=oversized)
    if oversized:
        first, (width, height) = next(iter(oversized.items()))
        warnings.warn(_oversized_note(f"{key}: {len(oversized)} image(s), e.g. {first!r}",
                                      width, height), stacklevel=2)
    if bad and not skip_bad_images:
        raise ConfigError(_join_errors(
            f"{key}: {len(bad)} bad image(s) (set skip_bad_images to drop them):",
            [f"{file}: {reason}" for file, reason in bad.items()]))
    if bad:
        warnings.warn(f"{key}: skipped {len(bad)} bad image(s) out of {len(samples)}, "
                      f"e.g. {next(iter(bad))}", stacklevel=2)
        samples = [(file, label) for file, label in samples if file not in bad]
        if not samples:
            raise ConfigError(f"{key}: every image in {list(map(str, sources))} is bad")
    if images is None:
        dataset = ImageDataset(samples, classes, transform)
        dataset.cache_note = f"not cached ({why})"
        dataset.report_oversized = not scanned
        return dataset
    kept = [image for image in images if image is not None]
    size = sum(image.numel() for image in kept)
    # A tmpfs /dev/shm smaller than the cache (Docker's default is 64 MB) would fail while
    # the cache is written (SIGBUS); leave room for the loader's shared batches too.
    shm_free = _shm_free_bytes()
    shared = shm_free is None or shm_free >= 2 * size
    cache = ImageCache(kept, shared=shared)
    dataset = ImageDataset(samples, classes, transform, cache=cache)
    where = ("in shared memory" if shared else
             f"in process memory (/dev/shm has {_megabytes(shm_free or 0)} free)")
    dataset.cache_note = (f"cached {len(cache)} decoded images ({_megabytes(cache.nbytes)}) "
                          f"{where} ({why})")
    return dataset


# -- transforms ----------------------------------------------------------------------------
AUGMENT_POLICIES = ("randaugment", "trivialaugment", "autoaugment")


def build_transforms(input_size: Sequence[int], rgb_mean: Sequence[float],
                     rgb_std: Sequence[float], train: bool,
                     crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True,
                     policy: str | None = None, color_jitter: float = 0.0,
                     erasing: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """transforms.v2 pipeline on uint8 CHW tensors to a normalised float tensor.

    ``input_size`` is [W, H] (PBT's order). Train: RandomResizedCrop (``crop_scale``), a
    horizontal flip, colour jitter (brightness, contrast, saturation ``color_jitter``), an
    augmentation ``policy`` (RandAugment 2 ops at magnitude 9, TrivialAugmentWide or
    AutoAugment's ImageNet policy), then after normalising random erasing with probability
    ``erasing``. Test: resize to 1/0.875 of the size, then centre crop. Mean and std are on
    the 0..1 scale. Geometry runs on uint8 (cheaper) before the float conversion. Every
    random choice draws from torch's RNG, which pbt's loaders seed per sample.
    """
    from torchvision.transforms import v2

    if (len(input_size) != 2 or not all(isinstance(v, int) and v > 0 for v in input_size)):
        raise ConfigError(f"input_size: {list(input_size)!r} is not [W, H] positive integers")
    for name, values in (("rgb_mean", rgb_mean), ("rgb_std", rgb_std)):
        if len(values) != 3 or not all(0 <= float(v) <= 1 for v in values):
            raise ConfigError(
                f"{name}: {list(values)!r} must be 3 numbers on the 0..1 scale (e.g. 0.5)")
    if min(float(v) for v in rgb_std) <= 0:
        raise ConfigError(f"rgb_std: {list(rgb_std)!r} must be > 0")
    width, height = input_size
    tail = [v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([float(v) for v in rgb_mean], [float(v) for v in rgb_std])]
    if train:
        head = [v2.RandomResizedCrop((height, width), scale=crop_scale, antialias=True)]
        if hflip:
            head.append(v2.RandomHorizontalFlip())
        if color_jitter > 0:
            head.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
        if policy is not None:
            policies = {"randaugment": lambda: v2.RandAugment(num_ops=2, magnitude=9),
                        "trivialaugment": v2.TrivialAugmentWide,
                        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)}
            if policy not in policies:
                raise ConfigError(f"augmentation policy {policy!r} is not one of "
                                  f"{', '.join(AUGMENT_POLICIES)}")
            head.append(policies[policy]())
        if erasing > 0:  # on the normalised image: erased pixels take the mean colour
            tail.append(v2.RandomErasing(p=erasing, value=0))
    else:
        head = [v2.Resize((round(height / 0.875), round(width / 0.875)), antialias=True),
                v2.CenterCrop((height, width))]
    return v2.Compose(head + tail)


class BatchMixer:
    """Mixup and CutMix on training batches ``(inputs, labels, ...)`` on the device: the
    labels become class probabilities mixed in the same proportion as the inputs (mixup
    blends any float inputs; CutMix pastes a box between (N, C, H, W) images).

    Each batch draws from its own generator seeded by (seed, epoch, batch, process), so a
    resumed or re-run training mixes identically. With both alphas set, each mixed batch
    uses one of the two at random (timm's way). ``mix_prob`` of the batches are mixed;
    none from epoch ``stop_epoch`` on (the last ``mix_off_epochs``).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, seed: int = 0, process_index: int = 0,
                 stop_epoch: int | None = None) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("BatchMixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.mix_prob = num_classes, mix_prob
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.seed, self.process_index, self.stop_epoch = seed, process_index, stop_epoch

    @classmethod
    def from_config(cls, trainer: Any) -> BatchMixer:
        cfg = trainer.cfg
        num_classes = getattr(trainer, "num_classes", None) or cfg.get("num_classes")
        if not num_classes:
            raise ConfigError("keys 'mixup_alpha' / 'cutmix_alpha' need a classifier: the "
                              "trainer names no num_classes")
        if cfg.loss_type == "FocalLoss":
            raise ConfigError("keys 'mixup_alpha' / 'cutmix_alpha' need a loss that takes "
                              "class probabilities: loss_type CrossEntropyLoss or "
                              "LabelSmoothing, not FocalLoss")
        return cls(int(num_classes), cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob,
                   cfg.seed, trainer.accelerator.process_index,
                   stop_epoch=cfg.num_epochs - cfg.mix_off_epochs)

    def __call__(self, batch: Any, epoch: int, batch_index: int) -> Any:
        if self.stop_epoch is not None and epoch >= self.stop_epoch:
            return batch
        images, labels = batch[0], batch[1]
        if not images.is_floating_point() or labels.ndim != 1 or labels.is_floating_point():
            raise TypeError("mixup / CutMix need batches of float inputs (N, ...) and N integer "
                            f"labels, got {tuple(images.shape)} {images.dtype} and "
                            f"{tuple(labels.shape)} {labels.dtype}")
        rng = np.random.default_rng([self.seed, epoch, batch_index, self.process_index])
        if rng.random() >= self.mix_prob:
            return batch
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
        if cutmix and images.ndim != 4:
            raise TypeError(f"CutMix needs (N, C, H, W) images, got {tuple(images.shape)}")
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        share = float(rng.beta(alpha, alpha))  # of the original image in the mix
        order = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
        if cutmix:  # a box of area ~ (1 - share) pasted from the partner image
            height, width = images.shape[-2:]
            cut = np.sqrt(1.0 - share)
            centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
            top, bottom = np.clip([centre_y - int(height * cut) // 2,
                                   centre_y + int(height * cut) // 2], 0, height)
            left, right = np.clip([centre_x - int(width * cut) // 2,
                                   centre_x + int(width * cut) // 2], 0, width)
            images = images.clone()
            images[..., top:bottom, left:right] = images[order][..., top:bottom, left:right]
            share = 1.0 - (bottom - top) * (right - left) / (height * width)
        else:
            images = images * share + images[order] * (1.0 - share)
        one_hot = torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
        targets = one_hot * share + one_hot[order] * (1.0 - share)
        return type(batch)([images, targets, *batch[2:]])


# -- resampling ----------------------------------------------------------------------------
def _class_quotas(counts: dict[int, int], mode: str, total: int) -> dict[int, int]:
    """Per-class draw counts ∝ 1, sqrt(n) or log(1 + n), summing exactly to ``total``.

    log(1 + n) rather than log n, so a class of one image is still drawn.
    """
    weight = {"mean": lambda n: 1.0, "sqrt": math.sqrt, "log": math.log1p}[mode]
    weights = {label: weight(n) for label, n in counts.items()}
    norm = sum(weights.values())
    exact = {label: total * w / norm for label, w in weights.items()}
    quotas = {label: math.floor(value) for label, value in exact.items()}
    # largest remainders get the leftover draws; ties broken by label for determinism
    leftover = total - sum(quotas.values())
    for label in sorted(exact, key=lambda k: (quotas[k] - exact[k], k))[:leftover]:
        quotas[label] += 1
    return quotas


class ResampleSampler(Sampler[int]):
    """PBT's class resampling (``none | mean | sqrt | log``), redrawn every epoch.

    Each epoch draws about ``len(targets)`` indices with per-class counts ∝ 1, √n or
    log(1+n) of the class size n (``none``: a plain shuffle). A class is drawn whole as
    often as its quota allows, the rest without replacement, so no image is skipped when
    a class is oversampled. The draw depends only on ``seed`` and ``set_epoch``; rank r of
    ``num_replicas`` takes every num_replicas-th index, an equal-length disjoint share
    (the ``none`` draw is padded by wrapping, as DistributedSampler does). Under
    Accelerate keep ``num_replicas=1``: ``accelerator.prepare`` shards the batches.
    """

    def __init__(self, targets: Sequence[int], mode: str = "none", seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if mode not in RESAMPLE_MODES:
            raise ConfigError(
                f"resample: unknown mode {mode!r}; valid ones are {', '.join(RESAMPLE_MODES)}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.ndim != 1 or len(self.targets) == 0:
            raise ConfigError("resample: the dataset has no labelled samples")
        self.mode, self.seed, self.epoch = mode, int(seed), 0
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(len(self.targets) / num_replicas)
        self.total_size = self.num_samples * num_replicas
        labels, counts = np.unique(self.targets, return_counts=True)
        self.class_indices = {int(label): np.flatnonzero(self.targets == label)
                              for label in labels}
        self.quotas = (None if mode == "none" else
                       _class_quotas(dict(zip(labels.tolist(), counts.tolist())), mode,
                                     self.total_size))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next iteration yields."""
        self.epoch = epoch

    def epoch_draw(self, epoch: int | None = None) -> list[int]:
        """The whole epoch's draw, before it is split between replicas."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed % 2**63, epoch % 2**63])
        if self.quotas is None:
            order = rng.permutation(len(self.targets))
            return np.resize(order, self.total_size).tolist()  # wraps to pad
        parts = []
        for label, quota in self.quotas.items():
            members = self.class_indices[label]
            whole, rest = divmod(quota, len(members))
            parts.extend([members] * whole)
            parts.append(rng.choice(members, size=rest, replace=False))
        return rng.permutation(np.concatenate(parts)).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_draw()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


def default_num_workers(num_processes: int = 1) -> int:
    """DataLoader workers per process: this machine's usable CPUs shared among the
    ``num_processes`` training processes on it, minus one each for the training loop, at
    most 8."""
    return max(0, min(8, _usable_cpus() // max(num_processes, 1) - 1))


def free_cpu_workers(num_processes: int = 1) -> int:
    """Loader workers per process that leave torch's compute threads their CPUs, for
    training on the CPU: this machine's usable CPUs per process minus
    ``torch.get_num_threads()``, at most :func:`default_num_workers`. With cached images a
    worker only moves the augmentation to another process; on a CPU the model's threads
    already use, it slows the step (measured: bench/time_to_accuracy.py)."""
    free = _usable_cpus() // max(num_processes, 1) - torch.get_num_threads()
    return max(0, min(default_num_workers(num_processes), free))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- reproducible data order (every trainer) -----------------------------------------------
class ShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: the same order on every process and after
    a resume (PBT's sampler reshuffled nothing between epochs)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` so each sample's augmentation is seeded by what it is, not
    by which worker or process loads it; forwards ``set_epoch`` to the wrapped sampler."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)


class SeededDataset(Dataset):
    """Loads ``(epoch, index)`` keys with torch's RNG seeded from (seed, epoch, index), so
    random augmentation is identical with 0 or N workers, 1 or N processes, and on resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # classes, targets, samples of the dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        epoch, index = key
        # Only the CPU generator: torch.manual_seed would also queue CUDA seeding (slow), and
        # the caller's RNG state (dropout in the main process) is put back afterwards.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


def _seed_worker(worker_id: int) -> None:
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloader(dataset: Dataset, batch_size: int, num_workers: int | None, seed: int,
                     shuffle: bool, sampler: Sampler[int] | None = None,
                     drop_last: bool = False, processes_here: int = 1) -> DataLoader:
    """A DataLoader whose order and augmentation depend only on ``seed`` and the epoch.

    ``batch_size`` is per process. ``num_workers`` None: :func:`default_num_workers` for
    ``processes_here`` training processes on this machine. Sharding across processes is
    done later by ``accelerator.prepare`` (by global rank).
    """
    if sampler is None:
        sampler = ShuffleSampler(len(dataset), seed, shuffle)  # type: ignore[arg-type]
    workers = default_num_workers(processes_here) if num_workers is None else num_workers
    return DataLoader(
        SeededDataset(dataset, seed),
        batch_size=batch_size,
        sampler=EpochSampler(sampler),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
    )


# -- the embedded dataset ------------------------------------------------------------------
def stop_workers(*loaders: Any) -> None:
    """End the persistent worker processes of ``loaders`` now. Left to the garbage
    collector, a loader in a reference cycle can find its queues already closed and wait
    5 s per worker (20 s for a trainer's two loaders of 2 workers each)."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # torch's DataLoader keeps it there
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def _digits_plan(seed: int, test_fraction: float) -> tuple[Any, dict[str, list[tuple[int, str]]]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed,
                                   stratify=digits.target)
    plan = {split: [(int(i), f"{digits.target[i]}/{i:04d}.png") for i in sorted(chosen)]
            for split, chosen in (("train", train), ("test", test))}
    return digits, plan


def _tree_files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def materialise_digits(root: str | Path, seed: int = 0,
                       test_fraction: float = 0.2) -> tuple[Path, Path]:
    """Write scikit-learn's digits (1,797 8x8 images, classes "0".."9") as PNG trees.

    Returns ``(root/train, root/test)``, a stratified split drawn from ``seed``. Each tree
    is written in a temporary folder and renamed into place, so concurrent callers (one per
    process) and interrupted runs never leave a half-written tree; complete trees are kept.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction: {test_fraction!r} must be between 0 and 1")
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    digits, plan = _digits_plan(seed, test_fraction)
    expected = {split: {name for _, name in files} for split, files in plan.items()}

    def complete(split: str) -> bool:
        tree = root / split
        if not tree.exists():
            return False
        if _tree_files(tree) != expected[split]:
            raise ConfigError(
                f"digits: {str(tree)!r} exists but is not the digits {split} split for "
                f"seed={seed}, test_fraction={test_fraction}; remove it or choose another root")
        return True

    missing = [split for split in plan if not complete(split)]
    if not missing:
        return root / "train", root / "test"
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    try:
        for split in missing:
            for index, name in plan[split]:
                target = staging / split / name
                target.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).save(target)  # 2-D uint8: mode L
            try:
                os.rename(staging / split, root / split)
            except OSError:
                # another process renamed its copy first; it must be the same split
                if not complete(split):
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / "train", root / "test"
