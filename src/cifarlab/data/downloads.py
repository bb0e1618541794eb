"""The data cache and downloads: the cache folder ($CIFARLAB_DATA, default ~/.cache/cifarlab), the
official archives with their md5, extracting a .tar.gz into the cache, and fetching and unpacking an archive."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DataError


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    folder: str  # the folder the archive unpacks to


# The official archives and their md5 (www.cs.toronto.edu/~kriz/cifar.html).
ARCHIVES = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar10-binary": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                              "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CIFARLAB_DATA") or Path.home() / ".cache" / "cifarlab")


def extract_archive(archive: Path, into: Optional[Path] = None) -> Path:
    """Unpack a .tar.gz once into the cache (atomically) and return the folder holding its contents."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: file not found")
    stat = archive.stat()
    key = hashlib.md5(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = (into or cache_dir() / "extracted") / f"{archive.name.split('.')[0]}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, target)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot extract ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch(url: str, md5: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` unless a file with that md5 is already there. On a checksum
    mismatch or a network error nothing is left at `dest`."""
    import pooch
    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = pooch.retrieve(url, known_hash=f"md5:{md5}", fname=dest.name, path=dest.parent,
                              progressbar=False, downloader=pooch.HTTPDownloader(timeout=timeout))
    except ValueError as e:
        dest.unlink(missing_ok=True)
        raise DataError(f"{url}: checksum mismatch, expected md5 {md5}; nothing was cached ({first_line(e)})") from None
    except (requests.RequestException, OSError) as e:
        dest.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed ({first_line(e)})") from None
    return Path(path)


def first_line(error: Exception) -> str:
    """An exception's message as one line (a library's message may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def download(name: str, url: Optional[str] = None, timeout: float = 30.0) -> Path:
    """Download and unpack an official archive into the cache; the unpacked folder."""
    if name not in ARCHIVES:
        raise DataError(f"{name}: nothing to download (downloadable: {', '.join(ARCHIVES)})")
    archive = ARCHIVES[name]
    folder = cache_dir() / archive.folder
    if folder.is_dir():
        return folder
    source = url or archive.url
    path = fetch(source, archive.md5, cache_dir() / "downloads" / source.rsplit("/", 1)[-1], timeout)
    unpacked = extract_archive(path)
    os.replace(unpacked / archive.folder, folder)
    shutil.rmtree(unpacked, ignore_errors=True)
    return folder
