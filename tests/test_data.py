import hashlib
import http.server
import os
import pickle
import tarfile
import threading
from functools import partial

import numpy as np
import pytest

from cifarlab.data import sources
from cifarlab.data.downloads import download, extract_archive, fetch
from cifarlab.data.sources import (DataError, load_dataset, read_cifar10_binary,
                                   read_cifar10_python, read_idx, read_pickle)
from cifarlab.data.splits import channel_stats, split_indices
from helpers import write_idx

# From shared/data/cifar10-head/README.md: images per class (airplane..truck) of each batch.
HEAD_COUNTS = {
    "data_batch_1": [107, 123, 109, 106, 106, 95, 121, 110, 109, 116],
    "data_batch_2": [105, 101, 83, 99, 110, 96, 98, 118, 118, 89],
    "data_batch_3": [104, 108, 92, 120, 103, 92, 107, 94, 105, 92],
    "data_batch_4": [101, 105, 117, 89, 112, 105, 87, 97, 99, 105],
    "data_batch_5": [104, 97, 96, 91, 109, 96, 102, 105, 106, 111],
    "test_batch": [105, 93, 100, 104, 92, 87, 114, 102, 110, 110],
}


def test_both_cifar10_layouts_read_to_identical_arrays(cifar10_head):
    py = read_cifar10_python(cifar10_head / "cifar-10-batches-py")
    binary = read_cifar10_binary(cifar10_head / "cifar-10-batches-bin")
    assert py.x_train.shape == (5170, 3, 32, 32) and py.x_train.dtype == np.uint8
    assert py.x_test.shape == (1017, 3, 32, 32)
    assert py.y_train.dtype == np.int64
    np.testing.assert_array_equal(py.x_train, binary.x_train)
    np.testing.assert_array_equal(py.y_train, binary.y_train)
    np.testing.assert_array_equal(py.x_test, binary.x_test)
    np.testing.assert_array_equal(py.y_test, binary.y_test)
    assert py.classes == binary.classes == sources.CIFAR10_CLASSES


def test_cifar10_labels_and_class_counts_match_the_readme(cifar10_head):
    ds = read_cifar10_python(cifar10_head / "cifar-10-batches-py")
    start = 0
    for batch in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]:
        n = sum(HEAD_COUNTS[batch])
        assert np.bincount(ds.y_train[start:start + n], minlength=10).tolist() == HEAD_COUNTS[batch]
        start += n
    assert start == len(ds.y_train)
    assert np.bincount(ds.y_test, minlength=10).tolist() == HEAD_COUNTS["test_batch"]


def test_pixel_order_is_red_green_blue_planes(cifar10_head):
    raw = np.fromfile(cifar10_head / "cifar-10-batches-bin" / "data_batch_1.bin", dtype=np.uint8)[:3073]
    ds = read_cifar10_binary(cifar10_head / "cifar-10-batches-bin")
    assert ds.y_train[0] == raw[0]
    np.testing.assert_array_equal(ds.x_train[0, 0].ravel(), raw[1:1025])  # red plane, row-major
    np.testing.assert_array_equal(ds.x_train[0, 2, 31], raw[1 + 2048 + 31 * 32: 1 + 2048 + 32 * 32])


def test_root_can_be_the_parent_folder_or_a_tar_gz(cifar10_head, tmp_path):
    parent = load_dataset("cifar10", str(cifar10_head), fmt="binary")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar10_head / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar = load_dataset("cifar10", str(archive))
    np.testing.assert_array_equal(parent.x_train, from_tar.x_train)
    assert extract_archive(archive) == extract_archive(archive)  # unpacked once, then reused


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_a_malicious_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Boom(), "labels": [1]}, protocol=2))
    with pytest.raises(DataError, match="refused to load (posix|os).system"):
        read_pickle(path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 cifar-10-batches-py or cifar-10-batches-bin folder"):
        load_dataset("cifar10", str(tmp_path))
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "data_batch_1.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="100 bytes is not a whole number of 3073-byte"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="not found in .*data.download=true"):
        load_dataset("cifar10")


def test_idx_reader_raw_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "a-idx3-ubyte", images)
    write_idx(tmp_path / "a-idx3-ubyte.gz", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(tmp_path / "bad")


def test_mnist_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=n))
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.classes == [str(d) for d in range(10)]


def test_fashion_mnist_is_found_where_debian_puts_it(fashion_mnist):
    ds = load_dataset("fashion-mnist")
    assert ds.origin == str(fashion_mnist)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = np.repeat(np.arange(10), [100, 200, 50, 50, 100, 100, 100, 100, 100, 100])
    train, val = split_indices(labels, 0.1, seed=3)
    again_train, again_val = split_indices(labels, 0.1, seed=3)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val)
    assert np.bincount(labels[val], minlength=10).tolist() == [10, 20, 5, 5, 10, 10, 10, 10, 10, 10]
    other = split_indices(labels, 0.1, seed=4)[1]
    assert not np.array_equal(val, other)
    assert len(split_indices(labels, 250, seed=0, stratify=False)[1]) == 250


def test_channel_stats_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, size=(300, 3, 8, 8)).astype(np.uint8)
    mean, std = channel_stats(images, chunk=64)
    as_float = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 2, 3)), rtol=1e-8)


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server over tmp_path/www; yields (folder, base_url)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_checks_md5_and_caches(cifar10_head, file_server, tmp_path):
    www, base = file_server
    archive = www / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar10_head / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "downloads" / archive.name
    assert fetch(f"{base}/{archive.name}", md5, dest) == dest
    assert hashlib.md5(dest.read_bytes()).hexdigest() == md5
    ds = load_dataset("cifar10", str(dest))
    assert ds.x_train.shape == (5170, 3, 32, 32)


def test_checksum_mismatch_is_an_error_and_caches_nothing(cifar10_head, file_server, tmp_path):
    www, base = file_server
    (www / "cifar-10-python.tar.gz").write_bytes(b"not the official archive")
    with pytest.raises(DataError, match="checksum mismatch, expected md5 c58f30108f718f92721af3b95e74349a"):
        download("cifar10", url=f"{base}/cifar-10-python.tar.gz")
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file()]
    with pytest.raises(DataError, match="download failed"):
        fetch(f"{base}/missing.tar.gz", "0" * 32, cache / "downloads" / "missing.tar.gz")
    assert not [p for p in cache.rglob("*") if p.is_file()]
