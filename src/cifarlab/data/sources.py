"""Dataset readers: CIFAR-10 (python and binary layouts), CIFAR-100, MNIST / Fashion-MNIST (IDX),
a seeded synthetic set; and finding a dataset on disk (data.root, the cache, system folders). The cache
folder, archives and downloads are in downloads.py.

Every reader returns a `Dataset` of uint8 (N, C, H, W) images with int64 labels and class names.
The datasets are the DATASETS registry near the end of this file: a new one is one entry there (the
config takes its allowed data.dataset names from it).
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import DataError
from .dataset import Dataset, check_dataset, checked_labels  # noqa: F401 - re-exported: readers return these
from .downloads import ARCHIVES, cache_dir, download, extract_archive, first_line

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]


# ---------------------------------------------------------------- pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR pickles contain: numpy array reconstruction and
    builtins. Anything else (os.system, eval, ...) is refused before it can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # latin1 turns Python 2 str keys into str and keeps array bytes intact.
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a dataset pickle we trust ({first_line(e)})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise DataError(f"{path}: corrupt pickle ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _pickled_images(path: Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: missing 'data' or '{label_key}' (keys: {', '.join(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 array of pixels, got {type(data).__name__} "
                        f"{getattr(data, 'dtype', '')}".rstrip())
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072): rows of 32x32x3 pixels")
    labels = checked_labels(path, batch[label_key], len(data), classes)
    return data.reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------- CIFAR


def read_cifar10_python(folder: Path) -> Dataset:
    folder = Path(folder)
    meta = folder / "batches.meta"
    classes = list(read_pickle(meta).get("label_names", CIFAR10_CLASSES)) if meta.exists() else list(CIFAR10_CLASSES)
    parts = [_pickled_images(folder / f"data_batch_{i}", "labels", len(classes)) for i in range(1, 6)]
    x_test, y_test = _pickled_images(folder / "test_batch", "labels", len(classes))
    return Dataset("cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                   x_test, y_test, classes, str(folder))


def _read_cifar10_records(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    record = 1 + 3072
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR-10 records")
    raw = raw.reshape(-1, record)
    return raw[:, 1:].reshape(-1, 3, 32, 32).copy(), checked_labels(path, raw[:, 0], len(raw), classes)


def read_cifar10_binary(folder: Path) -> Dataset:
    folder = Path(folder)
    meta = folder / "batches.meta.txt"
    classes = [c for c in meta.read_text(errors="replace").split() if c] if meta.exists() else list(CIFAR10_CLASSES)
    parts = [_read_cifar10_records(folder / f"data_batch_{i}.bin", len(classes)) for i in range(1, 6)]
    x_test, y_test = _read_cifar10_records(folder / "test_batch.bin", len(classes))
    return Dataset("cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                   x_test, y_test, classes, str(folder))


def read_cifar100_python(folder: Path, labels: str = "fine") -> Dataset:
    folder = Path(folder)
    key = f"{labels}_labels"
    meta = read_pickle(folder / "meta")
    if f"{labels}_label_names" not in meta:
        raise DataError(f"{folder / 'meta'}: no '{labels}_label_names'")
    classes = list(meta[f"{labels}_label_names"])
    x_train, y_train = _pickled_images(folder / "train", key, len(classes))
    x_test, y_test = _pickled_images(folder / "test", key, len(classes))
    return Dataset("cifar100", x_train, y_train, x_test, y_test, classes, str(folder))


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (raw or .gz) as a uint8 array of its stated shape."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder}: no {stem} or {stem}.gz")


def read_mnist_folder(folder: Path, name: str = "fashion-mnist") -> Dataset:
    folder = Path(folder)
    arrays = {}
    classes = FASHION_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        label_file = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images.ndim != 3:
            raise DataError(f"{folder}: {prefix} images have shape {images.shape}, expected (N, H, W)")
        labels = checked_labels(label_file, read_idx(label_file), len(images), len(classes))
        arrays[split] = (images[:, None, :, :].copy(), labels)
    return Dataset(name, *arrays["train"], *arrays["test"], list(classes), str(folder))


# ---------------------------------------------------------------- synthetic


def synthetic(seed: int = 0, n_train: int = 5000, n_test: int = 1000, shape: tuple[int, int, int] = (3, 32, 32),
              classes: int = 10) -> Dataset:
    """Seeded random images with a weak class signal (a coarse per-class color pattern under
    noise): enough to check shapes and that training runs and learns, no more."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    patterns = rng.uniform(124, 132, size=(classes, c, 4, 4))
    patterns = patterns.repeat(-(-h // 4), axis=2)[:, :, :h].repeat(-(-w // 4), axis=3)[:, :, :, :w]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, classes, size=n)
        images = patterns[labels] + rng.normal(0, 80, size=(n, c, h, w))
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

    return Dataset("synthetic", *draw(n_train), *draw(n_test), [f"class{i}" for i in range(classes)],
                   f"synthetic(seed={seed})")


# ---------------------------------------------------------------- finding


def find_cifar10_folder(root: Path, fmt: str = "auto") -> tuple[Path, str]:
    """(folder, "python" | "binary") for a CIFAR-10 root: the batches folder itself or its parent."""
    layouts = {"python": ("cifar-10-batches-py", "data_batch_1"), "binary": ("cifar-10-batches-bin", "data_batch_1.bin")}
    wanted = ["python", "binary"] if fmt == "auto" else [fmt]
    for layout in wanted:
        sub, marker = layouts[layout]
        for folder in (root, root / sub):
            if (folder / marker).is_file():
                return folder, layout
    names = " or ".join(layouts[w][0] for w in wanted)
    raise DataError(f"{root}: no CIFAR-10 {names} folder (looked for {root}/{layouts[wanted[0]][0]}/)")


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ReadOptions:
    """The data.* settings a reader may use."""

    format: str = "auto"  # CIFAR-10 layout
    labels: str = "fine"  # CIFAR-100 label set
    image_size: Optional[Any] = None  # folder: an int or [H, W]; None: the most common size
    test_size: float = 0.2  # folder: the test fraction of a single tree
    seed: int = 0


def _read_cifar10(folder: Path, o: ReadOptions) -> Dataset:
    batches, layout = find_cifar10_folder(folder, o.format)
    return read_cifar10_python(batches) if layout == "python" else read_cifar10_binary(batches)


def _has_cifar10(folder: Path, fmt: str) -> bool:
    try:
        find_cifar10_folder(folder, fmt)
        return True
    except DataError:
        return False


def _read_cifar100(folder: Path, o: ReadOptions) -> Dataset:
    sub = folder / "cifar-100-python"
    return read_cifar100_python(sub if sub.is_dir() else folder, o.labels)


def _has_cifar100(folder: Path, fmt: str) -> bool:
    return (folder / "train").is_file() or (folder / "cifar-100-python" / "train").is_file()


def _idx_reader(name: str) -> Callable[[Path, ReadOptions], Dataset]:
    """The reader of an MNIST-style folder of IDX files, naming the dataset `name`."""
    return lambda folder, o: read_mnist_folder(folder, name)


def _read_folder(root: Path, o: ReadOptions) -> Dataset:
    from .local import read_image_folder

    return read_image_folder(root, o.image_size, o.test_size, o.seed, cache=cache_dir() / "folders")


def _read_npz(path: Path, o: ReadOptions) -> Dataset:
    from .local import read_npz

    return read_npz(path)


def _has_idx(folder: Path, fmt: str) -> bool:
    return any(folder.glob("train-images-idx3-ubyte*"))


@dataclass(frozen=True)
class DatasetEntry:
    """One data.dataset name: its shape without reading it, and where and how it is read (a dataset
    on disk has `read` and `has_data`; one that needs no folder has `generate`)."""

    shape: Optional[tuple[int, int, int]]  # (C, H, W); None: known once read (your own data)
    classes: Optional[int]  # the class count (CIFAR-100's coarse labels have 20: see `cifarlab summary`)
    read: Optional[Callable[[Path, ReadOptions], Dataset]] = None  # (data.root or a found folder, options) -> Dataset
    has_data: Optional[Callable[[Path, str], bool]] = None  # (existing folder, data.format) -> is the dataset in it
    generate: Optional[Callable[[int], Dataset]] = None  # seed -> Dataset, for a dataset that needs no folder
    cache_folder: str = ""  # the sub-folder of the cache it is looked for in; "": the cache itself
    system_dirs: tuple[Path, ...] = ()  # searched after the cache
    archive: Optional[str] = None  # its key in ARCHIVES, when it can be downloaded
    binary_archive: Optional[str] = None  # the ARCHIVES key for data.format=binary, when that differs
    needs_root: bool = False  # read only from data.root (nothing to search for)
    root_is_file: bool = False  # data.root names a file (not a folder or an archive to extract)
    seeded: bool = False  # the seed changes what is read (a generated set, a folder's test split)

    def archive_key(self, fmt: str) -> Optional[str]:
        return self.binary_archive if fmt == "binary" and self.binary_archive else self.archive


# data.dataset -> entry; the config accepts exactly these names, in this order in its errors.
DATASETS: dict[str, DatasetEntry] = {
    "cifar10": DatasetEntry((3, 32, 32), 10, _read_cifar10, _has_cifar10, archive="cifar10",
                            binary_archive="cifar10-binary"),
    "cifar100": DatasetEntry((3, 32, 32), 100, _read_cifar100, _has_cifar100, cache_folder="cifar-100-python",
                             archive="cifar100"),
    "mnist": DatasetEntry((1, 28, 28), 10, _idx_reader("mnist"), _has_idx, cache_folder="mnist"),
    # Debian's dataset-fashion-mnist package puts the IDX files in /usr/share/datasets.
    "fashion-mnist": DatasetEntry((1, 28, 28), 10, _idx_reader("fashion-mnist"), _has_idx, cache_folder="fashion-mnist",
                                  system_dirs=(Path("/usr/share/datasets/fashion-mnist"),)),
    "synthetic": DatasetEntry((3, 32, 32), 10, generate=synthetic, seeded=True),
    # your own data (data/local.py): only from data.root; shape and classes are known once read
    "folder": DatasetEntry(None, None, _read_folder, needs_root=True, seeded=True),
    "npz": DatasetEntry(None, None, _read_npz, needs_root=True, root_is_file=True),
}

# (C, H, W) and class count of each dataset, known without reading it (for `cifarlab summary`).
SHAPES = {name: (entry.shape, entry.classes) for name, entry in DATASETS.items() if entry.shape is not None}


def known_shape(data) -> Optional[tuple[tuple[int, int, int], int]]:
    """(input shape, class count) of a data section (a DataConfig) before anything is read (CIFAR-100's
    coarse labels: 20 classes); None where only reading the data tells (your own data)."""
    if data.dataset not in SHAPES:
        return None
    shape, classes = SHAPES[data.dataset]
    return shape, 20 if data.dataset == "cifar100" and data.labels == "coarse" else classes


def dataset_entry(dataset: str) -> DatasetEntry:
    if dataset not in DATASETS:
        raise DataError(f"{dataset}: unknown dataset (known: {', '.join(DATASETS)})")
    return DATASETS[dataset]


def _search_dirs(entry: DatasetEntry) -> list[Path]:
    return [cache_dir() / entry.cache_folder, *entry.system_dirs]


def load_dataset(dataset: str, root: Optional[str] = None, fmt: str = "auto", labels: str = "fine",
                 allow_download: bool = False, seed: int = 0, options: Optional[ReadOptions] = None) -> Dataset:
    """Read a dataset from `root` (a folder or a .tar.gz), else from the cache and system folders,
    else (with allow_download) from the official archive; every result passes `check_dataset`."""
    options = options or ReadOptions(fmt, labels, seed=seed)
    return check_dataset(_load_dataset(dataset, root, options, allow_download))


def _load_dataset(dataset: str, root: Optional[str], o: ReadOptions, allow_download: bool) -> Dataset:
    entry = dataset_entry(dataset)
    if entry.generate is not None:
        return entry.generate(o.seed)
    if root:
        path = Path(root).expanduser()
        if not path.exists():
            raise DataError(f"data.root={root}: no such file or directory")
        if path.is_file() and not entry.root_is_file:
            path = extract_archive(path)
        return entry.read(path, o)
    if entry.needs_root:
        raise DataError(f"{dataset}: reads only data.root (your own data: set data.root=PATH)")
    for folder in _search_dirs(entry):
        if folder.is_dir() and entry.has_data(folder, o.format):
            return entry.read(folder, o)
    key = entry.archive_key(o.format)
    if allow_download and key in ARCHIVES:
        return entry.read(download(key).parent, o)
    where = ", ".join(str(d) for d in _search_dirs(entry))
    hint = " or data.download=true" if key in ARCHIVES else ""
    raise DataError(f"{dataset}: not found in {where}; set data.root=FOLDER or .tar.gz{hint}")


# datasets read by a warm run starter (studies/warm.py) before it forks runs: a run forked from it finds
# its dataset here, in memory it shares with the starter, instead of reading it again
KEPT: dict[tuple, Dataset] = {}
KEPT_AT_MOST = 2


def dataset_key(data_config, seed: int = 0) -> tuple:
    """What decides the dataset `dataset_from_config` reads (its limits aside): the same key, the same arrays."""
    entry = dataset_entry(data_config.dataset)
    root = os.path.abspath(os.path.expanduser(data_config.root)) if data_config.root else str(cache_dir())
    return (data_config.dataset, root, data_config.format, data_config.labels, repr(data_config.image_size),
            data_config.test_size, data_config.download, seed if entry.seeded else None)


def keep_dataset(data_config, seed: int = 0) -> None:
    """Read the dataset of `data_config` into KEPT (the oldest of KEPT_AT_MOST others let go)."""
    key = dataset_key(data_config, seed)
    if key not in KEPT:
        while len(KEPT) >= KEPT_AT_MOST:
            KEPT.pop(next(iter(KEPT)))
        KEPT[key] = _read_dataset(data_config, seed)


def _read_dataset(data_config, seed: int) -> Dataset:
    options = ReadOptions(data_config.format, data_config.labels, data_config.image_size, data_config.test_size, seed)
    return load_dataset(data_config.dataset, data_config.root, allow_download=data_config.download, options=options)


def dataset_from_config(data_config, seed: int = 0) -> Dataset:
    ds = KEPT.get(dataset_key(data_config, seed)) if KEPT else None
    ds = ds if ds is not None else _read_dataset(data_config, seed)
    return ds.head(data_config.train_limit, data_config.test_limit)

