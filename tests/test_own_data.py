"""Your data in: image folders, .npz files and arrays from Python; fp16 / bf16 precision; config
ergonomics (--print-config, config show / diff); `python -m cifarlab` (issue: your data and tools)."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cifarlab
from cifarlab import runs
from cifarlab.config import load_config
from cifarlab.data import local
from cifarlab.data.local import content_checksum, read_image_folder, read_npz
from cifarlab.data.sources import load_dataset
from cifarlab.errors import DataError
from cifarlab.evaluation import autocast_dtype
from helpers import invoke

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
QUICK = {"model": {"preset": "cnn3"}, "analysis": {"report": False}}


def real_images(cifar10_head, n=200):
    """The first n real CIFAR-10 test images (uint8 N, 3, 32, 32) and labels."""
    with open(cifar10_head / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    return batch["data"][:n].reshape(-1, 3, 32, 32), np.array(batch["labels"][:n])


def write_tree(root, images, labels, suffix=".png"):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}{suffix}")


def test_a_train_and_test_folder_tree_reads_back_the_pixels(cifar10_head, tmp_path):
    images, labels = real_images(cifar10_head, 300)
    write_tree(tmp_path / "data" / "train", images[:200], labels[:200])
    write_tree(tmp_path / "data" / "test", images[200:], labels[200:])
    ds = load_dataset("folder", str(tmp_path / "data"))
    present = sorted({CLASSES[i] for i in labels})
    assert ds.classes == present and ds.image_shape == (3, 32, 32)
    assert len(ds.y_train) == 200 and len(ds.y_test) == 100
    # files are read per class folder in name order: compare image by image through the labels
    order = sorted(range(200), key=lambda i: (CLASSES[labels[i]], i))
    np.testing.assert_array_equal(ds.x_train, images[order])  # PNG is lossless
    assert [ds.classes[y] for y in ds.y_train] == [CLASSES[labels[i]] for i in order]


def test_one_tree_is_split_seeded_and_stratified_and_the_cache_is_used(cifar10_head, tmp_path, monkeypatch):
    images, labels = real_images(cifar10_head, 250)
    write_tree(tmp_path / "data", images, labels)
    first = read_image_folder(tmp_path / "data", test_size=0.2, seed=3)
    assert len(first.y_test) == 50 and len(first.y_train) == 200
    assert abs(np.bincount(first.y_test, minlength=10) / 50 - np.bincount(first.y_train, minlength=10) / 200).max() < 0.05
    assert len(list((tmp_path / "data").glob(".cifarlab-images-*.npy"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again although the files did not change")

    monkeypatch.setattr(local, "decode", no_decoding)
    again = read_image_folder(tmp_path / "data", test_size=0.2, seed=3)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    np.testing.assert_array_equal(again.y_test, first.y_test)
    monkeypatch.undo()
    changed = next((tmp_path / "data" / CLASSES[labels[0]]).iterdir())
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)  # a file changes: the cache is rebuilt
    monkeypatch.setattr(local, "decode", no_decoding)
    with pytest.raises(AssertionError, match="decoded again"):
        read_image_folder(tmp_path / "data", test_size=0.2, seed=3)


def test_mixed_sizes_are_resized_to_the_most_common_and_gray_stays_gray(cifar10_head, tmp_path):
    images, labels = real_images(cifar10_head, 30)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "gray" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image.transpose(1, 2, 0)).convert("L")
        (picture if i % 3 else picture.resize((50, 40))).save(folder / f"{i}.png")
    ds = read_image_folder(tmp_path / "gray", test_size=0.3)
    assert ds.image_shape == (1, 32, 32)
    assert read_image_folder(tmp_path / "gray", image_size=[24, 20], test_size=0.3).image_shape == (1, 24, 20)


def test_a_broken_file_in_a_folder_is_named(cifar10_head, tmp_path):
    images, labels = real_images(cifar10_head, 20)
    write_tree(tmp_path / "data", images, labels)
    broken = tmp_path / "data" / CLASSES[labels[0]] / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_dataset("folder", str(tmp_path / "data"))


def test_training_on_a_folder_from_the_command_line(cifar10_head, tmp_path):
    images, labels = real_images(cifar10_head, 300)
    write_tree(tmp_path / "data", images, labels)
    result = invoke("train", "data.dataset=folder", f"data.root={tmp_path / 'data'}", "train.epochs=1",
                    "model.preset=cnn3", "analysis.report=false", f"train.out_dir={tmp_path / 'runs'}", "-q")
    assert result.returncode == 0, result.stderr
    run = next((tmp_path / "runs").iterdir())
    summary = runs.read_summary(run)
    assert summary["dataset"] == "folder" and summary["sizes"]["test"] == 60
    env = json.loads((run / "env.json").read_text())
    assert env["data_origin"] == str(tmp_path / "data") and len(env["data_sha256"]) == 64
    assert cifarlab.load_run(run).evaluate()["acc"] == pytest.approx(summary["test_acc"])


def test_npz_in_either_layout_and_without_pickles(cifar10_head, tmp_path):
    images, labels = real_images(cifar10_head, 120)
    np.savez(tmp_path / "nchw.npz", x_train=images[:100], y_train=labels[:100], x_test=images[100:],
             y_test=labels[100:], classes=np.array(CLASSES))
    np.savez(tmp_path / "nhwc.npz", x_train=images[:100].transpose(0, 2, 3, 1), y_train=labels[:100],
             x_test=images[100:].transpose(0, 2, 3, 1), y_test=labels[100:])
    a, b = read_npz(tmp_path / "nchw.npz"), read_npz(tmp_path / "nhwc.npz")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.classes == CLASSES and b.classes == [str(i) for i in range(int(labels.max()) + 1)]
    np.savez(tmp_path / "objects.npz", x_train=np.array([object()] * 3, dtype=object), y_train=labels[:3],
             x_test=images[:1], y_test=labels[:1])
    with pytest.raises(DataError, match="objects.npz: not a readable .npz"):
        read_npz(tmp_path / "objects.npz")
    np.savez(tmp_path / "bad.npz", x_train=images[:10], y_train=labels[:10] + 10, x_test=images[:5], y_test=labels[:5],
             classes=np.array(CLASSES))
    with pytest.raises(DataError, match="y_train: label"):
        read_npz(tmp_path / "bad.npz")


def test_arrays_from_python_train_resume_and_evaluate(cifar10_head, tmp_path):
    images, labels = real_images(cifar10_head, 400)
    data = (images[:300].transpose(0, 2, 3, 1), labels[:300], images[300:], labels[300:], CLASSES)
    config = {**QUICK, "train": {"epochs": 1, "out_dir": str(tmp_path)}}
    run = cifarlab.fit(config, data=data, progress=False)
    assert run.config.data.dataset == "npz" and run.summary["sizes"] == {"train": 270, "val": 30, "test": 100}
    stored = read_npz(run.config.data.root)
    np.testing.assert_array_equal(stored.x_test, images[300:])
    env = json.loads((run / "env.json").read_text())
    assert env["data_sha256"] == content_checksum(stored)
    resumed = cifarlab.resume(run, {"train.epochs": 2}, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.evaluate()["acc"] == pytest.approx(resumed.summary["test_acc"])
    with pytest.raises(DataError, match="x_train: images must be uint8"):
        cifarlab.fit(config, data=(images[:10].astype(np.float32), labels[:10], images[:5], labels[:5]))


def test_precision_choices(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "float32") is None
    assert autocast_dtype(cpu, "fp16") == torch.float16 and autocast_dtype(cpu, "bf16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a T4 or V100
    assert autocast_dtype(cuda, "auto") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100 or H100
    assert autocast_dtype(cuda, "auto") == torch.bfloat16


@pytest.mark.slow
def test_fp16_training_scales_the_loss_and_resumes_exactly(cifar10_head, tmp_path):
    # 180 training images (3 steps an epoch) on one small conv layer: float16 convolutions are ~50x slower than
    # float32 on CPUs without float16 units; the scaler still skips overflowing steps and scales back in epoch 1
    overrides = [f"data.root={cifar10_head}", "data.train_limit=200", "data.test_limit=100",
                 "model.layers=[{conv: {filters: 16, kernel: 3, padding: same}}, relu, {maxpool: 2}, flatten, {dense: 10}]",
                 "train.precision=fp16", "analysis.report=false", "train.log_every=2"]
    straight = cifarlab.fit(None, overrides=[*overrides, "train.epochs=2", f"train.out_dir={tmp_path / 'a'}"],
                            progress=False)
    state = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
    assert 0.1 < straight.summary["train_acc"] <= 1 and straight.summary["status"] == "completed"
    half = cifarlab.fit(None, overrides=[*overrides, "train.epochs=1", f"train.out_dir={tmp_path / 'b'}"],
                        progress=False)
    resumed = cifarlab.resume(half, {"train.epochs": 2}, progress=False)

    def without_time(run):
        return [{k: v for k, v in r.items() if k != "time"} for r in runs.read_jsonl(run / "metrics.jsonl")]

    assert without_time(straight) == without_time(resumed)


def test_print_config_and_config_show_and_diff(cifar10_head, tmp_path):
    printed = invoke("train", "model.preset=cnn3", "train.epochs=3", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert load_config(yaml.safe_load(printed.stdout)) == load_config(None, ["model.preset=cnn3", "train.epochs=3"])
    config = {**QUICK, "data": {"root": str(cifar10_head), "train_limit": 200, "test_limit": 50},
              "train": {"epochs": 1, "out_dir": str(tmp_path)}}
    a = cifarlab.fit(config, progress=False)
    b = cifarlab.fit(config, overrides={"optim.lr": 0.01, "seed": 1}, progress=False)
    shown = invoke("config", "show", a.path)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout) == a.config.to_dict()
    diff = invoke("config", "diff", a.path, b.path)
    assert diff.returncode == 0 and "2 setting(s) differ" in diff.stdout
    assert "optim.lr" in diff.stdout and "seed" in diff.stdout and "train.epochs" not in diff.stdout


def test_python_dash_m_cifarlab_is_the_command():
    # `python -m cifarlab` in a process of its own (cifarlab/__main__.py); the console script: test_cli.py
    result = subprocess.run([sys.executable, "-m", "cifarlab", "--help"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Train and study small CNNs" in result.stdout
