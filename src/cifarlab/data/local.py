"""Your own data: a folder of images per class, a .npz of arrays, or arrays handed over from Python.
Each becomes the same `Dataset` (uint8 (N, C, H, W) + int64 labels + class names) as the built-in
readers, and goes through the same checks.

    root/train/<class>/*.png, root/test/<class>/*.png    a train and a test tree
    root/<class>/*.jpg                                   one tree: data.test_size of it is the test split

Decoding a folder is slow (Pillow, one file at a time), so the decoded arrays are cached beside the
data (or in the cache folder when the data's folder is read-only), keyed by every file's name, size
and modification time and the image size: the second run starts in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import DataError
from ..files import atomic_write, save_array
from .dataset import Dataset, check_dataset, checked_labels, integer_labels
from .images import decode_image
from .splits import split_indices

log = logging.getLogger(__name__)
decode = decode_image  # one decoder for predict and for folders (a name tests can replace)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CACHE_VERSION = 1


def class_files(tree: Path) -> dict[str, list[Path]]:
    """{class: sorted image files} of a folder-per-class tree (hidden files and folders skipped)."""
    found = {}
    for folder in sorted(p for p in tree.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(tree).parts))
        if files:
            found[folder.name] = files
    return found


def image_info(path: Path) -> tuple[tuple[int, int], str]:
    """((height, width), Pillow mode) from the file's header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return (image.height, image.width), image.mode
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({' '.join(str(e).split())})") from None


def tree_key(files: Sequence[Path], root: Path, size: tuple[int, int], channels: int) -> str:
    """A digest of the files' names, sizes and modification times and the decoding settings."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size} {channels}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def decoded_arrays(files: list[Path], root: Path, size: tuple[int, int], channels: int,
                   cache_folders: Sequence[Path]) -> np.ndarray:
    """The images of `files` decoded, from a cache file when one matches, else decoded and cached."""
    name = f".cifarlab-images-{tree_key(files, root, size, channels)}.npy"
    for folder in cache_folders:
        if (folder / name).is_file():
            try:
                # mapped, not read: a damaged header that declares more than the file holds is a ValueError
                cached = np.load(folder / name, mmap_mode="r", allow_pickle=False)
                if cached.shape == (len(files), channels, *size) and cached.dtype == np.uint8:
                    return np.array(cached)
            except (OSError, ValueError):
                pass  # a damaged cache file is decoded again and replaced
    images = np.stack([decode(p, size, channels) for p in files]) if files else np.zeros((0, channels, *size), np.uint8)
    for folder in cache_folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / name, lambda tmp: save_array(tmp, images))
            break
        except Exception as e:  # noqa: BLE001 - a read-only data folder: try the next place, the cache
            log.info("not caching decoded images in %s (%s)", folder, e)
    return images


def read_image_folder(root: Path, image_size: Optional[Union[int, Sequence[int]]] = None, test_size: float = 0.2,
                      seed: int = 0, cache: Optional[Path] = None) -> Dataset:
    """A folder-per-class tree (root/train + root/test, or one tree split seeded and stratified by
    `test_size`) as a Dataset. With train/ and test/, a class with images in one and none in the other is
    refused (it would train without images, or be tested on none). Images are resized to `image_size`
    (an int for square, or [H, W]; default: the most common size among the files, or 32 x 32 when none
    is most common) and made RGB unless every file is grayscale."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root}: not a folder of class folders")
    split_trees = (root / "train").is_dir() and (root / "test").is_dir()
    trees = {"train": class_files(root / "train"), "test": class_files(root / "test")} if split_trees \
        else {"all": class_files(root)}
    classes = sorted({name for tree in trees.values() for name in tree})
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s) with images; need at least 2 "
                        "(root/<class>/*.png, or root/train/<class>/ and root/test/<class>/)")
    for name in classes if split_trees else []:  # a class must not be trained without images, or tested without any
        empty, full = ("train", "test") if name not in trees["train"] else ("test", "train")
        if name not in trees[empty]:
            raise DataError(f"{root / empty / name}: no images, but {root / full / name} has {len(trees[full][name])}; "
                            "every class needs images in both train/ and test/ (add some, or remove the class from both)")
    index = {name: i for i, name in enumerate(classes)}
    listed = {part: [(p, index[name]) for name, files in tree.items() for p in files] for part, tree in trees.items()}
    every = [p for items in listed.values() for p, _ in items]
    infos = [image_info(p) for p in every]
    size = image_shape_of(image_size, [size for size, _ in infos])
    channels = 1 if all(mode in ("1", "L", "I;16", "I", "F", "LA") for _, mode in infos) else 3
    cache_folders = [root, *([cache] if cache else [])]
    arrays = {part: (decoded_arrays([p for p, _ in items], root, size, channels, cache_folders),
                     np.array([label for _, label in items], dtype=np.int64)) for part, items in listed.items()}
    if split_trees:
        (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    else:
        x, y = arrays["all"]
        if not 0 < test_size < 1:
            raise DataError(f"data.test_size={test_size}: one tree of images needs a test fraction in (0, 1)")
        train_idx, test_idx = split_indices(y, test_size, seed, stratify=True)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    return Dataset("folder", x_train, y_train, x_test, y_test, classes, str(root))


def image_shape_of(image_size: Optional[Union[int, Sequence[int]]], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    if image_size is not None:
        return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    counts = Counter(sizes).most_common(2)
    if counts and (len(counts) == 1 or counts[0][1] > counts[1][1]):
        return counts[0][0]
    return (32, 32)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: Path) -> Dataset:
    """A .npz with x_train, y_train, x_test, y_test (uint8 images NHWC or NCHW; NHW for gray) and
    optionally `classes` (their names). Nothing in it is unpickled, and every array's header is checked
    against the bytes the file holds for it before it is read (`npz_array`)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            missing = [k for k in NPZ_KEYS if k not in members]
            if missing:
                raise DataError(f"{path}: no {missing[0]!r} (a cifarlab .npz holds {', '.join(NPZ_KEYS)}[, classes])")
            arrays = {k: npz_array(archive, members[k], path) for k in (*NPZ_KEYS, "classes") if k in members}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # not a zip, truncated, damaged
        raise DataError(f"{path}: not a readable .npz ({' '.join(str(e).split())})") from None
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    return arrays_dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], classes,
                          name="npz", origin=str(path))


DEFLATE_MAX_RATIO = 1032  # the most that DEFLATE can expand its input


def npz_array(archive: zipfile.ZipFile, name: str, path: Path) -> np.ndarray:
    """One array of a .npz, read only once its .npy header (shape, dtype) matches the bytes the member
    holds and the member's size is one its compressed bytes can expand to: a header that declares
    hundreds of GiB in a small file is refused before anything is allocated. Object arrays are refused."""
    info = archive.getinfo(name)
    if info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise ValueError(f"{name} says it expands to {info.file_size:,} bytes from {info.compress_size:,}")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{name}: .npy format version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        if dtype.hasobject:
            raise ValueError(f"{name} holds Python objects (pickled); a cifarlab .npz holds numbers and text")
        declared, held = int(np.prod(shape, dtype=object)) * dtype.itemsize, info.file_size - member.tell()
        if declared != held:
            raise DataError(f"{path}: {name} declares {shape} {dtype} ({declared:,} bytes) but the file holds "
                            f"{held:,} bytes for it")
        member.seek(0)
        return np.lib.format.read_array(member, allow_pickle=False)


def as_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 images as (N, C, H, W): NHWC and NCHW with 1 or 3 channels, or (N, H, W) gray."""
    try:
        images = np.asarray(images)
    except (TypeError, ValueError) as e:  # a ragged list
        raise DataError(f"{where}: not an array of images ({' '.join(str(e).split())})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 pixels (0-255), got {images.dtype}")
    if images.ndim == 3:
        return images[:, None].copy()
    if images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return np.ascontiguousarray(images)
    raise DataError(f"{where}: images of shape {images.shape}: expected (N, H, W, C) or (N, C, H, W) with C 1 or 3")


def arrays_dataset(x_train, y_train, x_test, y_test, classes: Optional[Sequence[str]] = None,
                   name: str = "arrays", origin: str = "arrays from Python") -> Dataset:
    """A Dataset of arrays (see `as_nchw`); class names default to the label values "0", "1", ..."""
    x_train, x_test = as_nchw(x_train, f"{origin}: x_train"), as_nchw(x_test, f"{origin}: x_test")
    y_train, y_test = integer_labels(f"{origin}: y_train", y_train), integer_labels(f"{origin}: y_test", y_test)
    if classes is None:
        top = max(int(y_train.max()) if y_train.size else 0, int(y_test.max()) if y_test.size else 0)
        classes = [str(i) for i in range(top + 1)]
    y_train = checked_labels(f"{origin}: y_train", y_train, len(x_train), len(classes))
    y_test = checked_labels(f"{origin}: y_test", y_test, len(x_test), len(classes))
    return check_dataset(Dataset(name, x_train, y_train, x_test, y_test, list(classes), origin))


def content_checksum(ds) -> str:
    """sha256 of a dataset's pixels and labels, train then test (for env.json)."""
    digest = hashlib.sha256()
    for array in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_npz(ds, path: Path) -> Path:
    """A dataset as a .npz that `read_npz` reads back (NCHW uint8, int64 labels, class names)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                     classes=np.array(ds.classes, dtype=str))

    return atomic_write(path, write)
