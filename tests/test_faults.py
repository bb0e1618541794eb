"""A corpus of hostile and damaged inputs, faults during a run and concurrent writers (issue:
reliability). Each case runs the real command line and checks the exit code, the one-line message,
that no traceback was printed, and what is on disk afterwards: in this process (helpers.invoke), or
in a process of its own where the process is the point (a file size limit, signals, SIGKILL, a lock
held by another process). Damaged inputs are made at test time from the real data."""

import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifarlab import runs
from cifarlab.data.sources import read_idx
from conftest import copy_run
from helpers import assert_error, cli_command, invoke, run_cli, wait_for, write_idx

# a resumed run that goes on until the test stops it
FOREVER = ["train.epochs=100000", "train.early_stopping.enabled=false", "-q"]
SMALL = ["data.train_limit=300", "data.test_limit=100", "model.preset=cnn3", "train.log_every=2",
         "analysis.report=false"]


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


@pytest.fixture
def cifar_copy(cifar10_head, tmp_path):
    """A writable copy of the real CIFAR-10 head (python layout) to damage."""
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar10_head / "cifar-10-batches-py", folder)
    return folder


def rewrite_batch(path: Path, change) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    change(batch)
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def train_refused(folder: Path, out: Path, code: int, *fragments, extra=()):
    result = invoke("train", f"data.root={folder}", f"train.out_dir={out}", *SMALL, *extra)
    assert_error(result, code, *fragments)
    assert not out.exists() or not any(out.iterdir())  # no run folder was made


# ---------------------------------------------------------------- data files


def test_cifar_label_out_of_range_names_the_file(cifar_copy, tmp_path):
    rewrite_batch(cifar_copy / "data_batch_3", lambda b: b["labels"].__setitem__(7, 10))
    train_refused(cifar_copy, tmp_path / "runs", 2, "data_batch_3", "label 10 of image 7", "outside 0-9")


def test_cifar_labels_not_matching_the_images(cifar_copy, tmp_path):
    rewrite_batch(cifar_copy / "data_batch_2", lambda b: b["labels"].pop())
    train_refused(cifar_copy, tmp_path / "runs", 2, "data_batch_2", "images but")


def test_cifar_rows_of_the_wrong_length(cifar_copy, tmp_path):
    rewrite_batch(cifar_copy / "test_batch", lambda b: b.__setitem__("data", b["data"][:, :3000].copy()))
    train_refused(cifar_copy, tmp_path / "runs", 2, "test_batch", "(N, 3072)")


def test_cifar_labels_that_are_not_integers(cifar_copy, tmp_path):
    rewrite_batch(cifar_copy / "data_batch_1", lambda b: b.__setitem__("labels", ["cat"] * len(b["labels"])))
    train_refused(cifar_copy, tmp_path / "runs", 2, "data_batch_1", "integers")


def test_a_file_of_the_wrong_kind_in_place_of_a_batch(cifar_copy, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    shutil.copy(tmp_path / "x.png", cifar_copy / "data_batch_4")
    train_refused(cifar_copy, tmp_path / "runs", 2, "data_batch_4")


def test_a_truncated_batch(cifar_copy, tmp_path):
    path = cifar_copy / "data_batch_5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    train_refused(cifar_copy, tmp_path / "runs", 2, "data_batch_5", "pickle")


def test_a_pickle_that_would_run_code_is_refused_not_run(cifar_copy, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (cifar_copy / "data_batch_1").write_bytes(pickle.dumps(Exploit()))
    train_refused(cifar_copy, tmp_path / "runs", 2, "data_batch_1", "refused to load")
    assert not marker.exists()


def binary_copy(cifar10_head, tmp_path) -> Path:
    folder = tmp_path / "cifar-10-batches-bin"
    shutil.copytree(cifar10_head / "cifar-10-batches-bin", folder)
    return folder


def test_binary_record_with_a_bad_label_byte(cifar10_head, tmp_path):
    folder = binary_copy(cifar10_head, tmp_path)
    raw = bytearray((folder / "data_batch_2.bin").read_bytes())
    raw[3073 * 5] = 200  # the label byte of record 5
    (folder / "data_batch_2.bin").write_bytes(bytes(raw))
    train_refused(folder, tmp_path / "runs", 2, "data_batch_2.bin", "label 200 of image 5")


def test_binary_file_that_is_not_whole_records(cifar10_head, tmp_path):
    folder = binary_copy(cifar10_head, tmp_path)
    with open(folder / "test_batch.bin", "ab") as f:
        f.write(b"\0" * 100)
    train_refused(folder, tmp_path / "runs", 2, "test_batch.bin", "not a whole number")


@pytest.fixture
def small_fashion(fashion_mnist, tmp_path):
    """A Fashion-MNIST folder of the first 300 / 100 real images, to damage."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for prefix, n in (("train", 300), ("t10k", 100)):
        for kind in ("images-idx3", "labels-idx1"):
            source = next(fashion_mnist.glob(f"{prefix}-{kind}-ubyte*"))
            write_idx(folder / f"{prefix}-{kind}-ubyte", read_idx(source)[:n])
    return folder


def fashion_refused(folder, tmp_path, *fragments):
    train_refused(folder, tmp_path / "runs", 2, *fragments, extra=["data.dataset=fashion-mnist"])


def test_idx_with_a_bad_magic_number(small_fashion, tmp_path):
    path = small_fashion / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x89PNG" + path.read_bytes()[4:])
    fashion_refused(small_fashion, tmp_path, "t10k-images-idx3-ubyte", "bad magic number")


def test_idx_header_promising_more_than_the_file_holds(small_fashion, tmp_path):
    path = small_fashion / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack(">I", 60000)
    path.write_bytes(bytes(raw))
    fashion_refused(small_fashion, tmp_path, "train-images-idx3-ubyte", "header says")


def test_idx_label_out_of_range(small_fashion, tmp_path):
    path = small_fashion / "train-labels-idx1-ubyte"
    labels = read_idx(path).copy()
    labels[42] = 12
    write_idx(path, labels)
    fashion_refused(small_fashion, tmp_path, "train-labels-idx1-ubyte", "label 12 of image 42")


# ---------------------------------------------------------------- configs


def test_a_run_name_that_is_a_path(cifar10_head, tmp_path):
    out = tmp_path / "deep" / "runs"
    result = invoke("train", f"data.root={cifar10_head}", f"train.out_dir={out}", "name=../../escaped", *SMALL)
    assert_error(result, 2, "name", "plain name", "../../escaped")
    assert not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("text, fragment", [
    ("seed: !!python/object/apply:os.system ['touch {marker}']\n", "constructor"),
    ("a: " + "[" * 50000 + "]" * 50000 + "\n", "nested more than 64 levels"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")), "expands to more than"),
    ("\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff\xfe", "not"),
], ids=["python-tag", "deep-nesting", "alias-bomb", "binary-file"])
def test_hostile_yaml_is_refused(tmp_path, text, fragment):
    marker = tmp_path / "pwned"
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("{marker}", str(marker)), errors="surrogateescape")
    result = invoke("train", "-c", path, f"train.out_dir={tmp_path / 'runs'}")
    assert_error(result, 2, str(path), fragment)
    assert not marker.exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def finished_run(small_run):
    """conftest.small_run: cnn3 trained 2 epochs (train.log_every=2, Adam at lr 0.001) on 300 images."""
    return small_run


def test_eval_of_a_checkpoint_from_another_architecture(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    state["model"]["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(state, run / "checkpoints" / "best.pt")
    last = assert_error(invoke("eval", run), 2, "best.pt", "conv1.weight", "(16, 3, 3, 3) in the checkpoint",
                        "(32, 3, 3, 3) in the model")
    assert "does not fit" in last


def test_eval_of_a_truncated_checkpoint(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:5000])
    assert_error(invoke("eval", run), 2, "best.pt", "not a cifarlab checkpoint")


@pytest.mark.parametrize("override, key", [("model.preset=cnn3-avg", "model.preset"),
                                           ("data.train_limit=200", "data.train_limit"),
                                           ("data.dataset=fashion-mnist", "data.dataset"),
                                           ("optim.name=sgd", "optim.name"),
                                           ("train.batch_size=32", "train.batch_size")])
def test_resume_refuses_overrides_that_cannot_apply(finished_run, tmp_path, override, key):
    run = copy_run(finished_run, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    summary = (run / "summary.json").read_text()
    result = invoke("train", "--resume", run, "train.epochs=3", override)
    assert_error(result, 2, key, "cannot change when resuming")
    assert (run / "metrics.jsonl").read_text() == before and (run / "summary.json").read_text() == summary
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------- images


def test_predict_refuses_a_decompression_bomb(finished_run, tmp_path, cifar10_head):
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(small)
    raw = bytearray(small.read_bytes())
    # IHDR: width and height at bytes 16-24, its CRC over the chunk type and data at 29-33
    raw[16:24] = struct.pack(">II", 30000, 30000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(raw))
    assert bomb.stat().st_size < 1000
    assert_error(invoke("predict", finished_run, bomb), 2, "bomb.png", "too large")


def test_predict_refuses_a_truncated_image(finished_run, tmp_path, cifar10_head):
    images = pickle.load(open(cifar10_head / "cifar-10-batches-py" / "test_batch", "rb"), encoding="latin1")["data"]
    photo = tmp_path / "photo.png"
    Image.fromarray(images[0].reshape(3, 32, 32).transpose(1, 2, 0)).resize((300, 300)).save(photo)
    photo.write_bytes(photo.read_bytes()[:2000])
    assert_error(invoke("predict", finished_run, photo), 2, "photo.png", "not a readable image")


# ---------------------------------------------------------------- faults during a run


def limited_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_that_fails_mid_run_ends_in_one_line_and_keeps_the_last_good_state(cifar10_head, tmp_path):
    # cnn3's checkpoints are ~4.6 MB (best.pt) and ~9 MB (last.pt, with Adam's moments): a 6 MB file
    # size limit lets best.pt through and stops the first last.pt
    out = tmp_path / "runs"
    result = run_cli("train", f"data.root={cifar10_head}", f"train.out_dir={out}", "train.epochs=2", *SMALL, "-q",
                     preexec_fn=limited_file_size(6_000_000))
    last = assert_error(result, 1, "last.pt", "cannot write", "File too large")
    run = next(out.iterdir())
    assert no_temporary_files(run)
    summary = runs.read_summary(run)
    assert summary["status"] == "failed" and "last.pt" in summary["stop_reason"], summary
    assert last.endswith(summary["stop_reason"])
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / ".lock").exists()
    torch.load(run / "checkpoints" / "best.pt", weights_only=True)  # what was written is whole


def test_a_later_failed_write_leaves_the_previous_last_pt_to_resume_from(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    previous = (run / "checkpoints" / "last.pt").read_bytes()
    result = run_cli("train", "--resume", run, "train.epochs=3", "-q", preexec_fn=limited_file_size(6_000_000))
    assert_error(result, 1, "cannot write")
    assert no_temporary_files(run) and (run / "checkpoints" / "last.pt").read_bytes() == previous
    assert runs.read_summary(run)["status"] == "failed"
    resumed = invoke("train", "--resume", run, "train.epochs=3", "-q")
    assert resumed.returncode == 0, resumed.stderr
    epochs = [r["epoch"] for r in runs.read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs == [1, 2, 3] and runs.read_summary(run)["status"] == "completed"


def test_a_metrics_line_that_does_not_fit_is_cut_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200));"
              "from cifarlab.files import append_line\n"
              "for i in range(10): append_line(sys.argv[1], '{\"line\": %d, \"pad\": \"%s\"}' % (i, 'x' * 40))")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert result.returncode == 1 and "WriteError" in result.stderr and "cannot write (File too large)" in result.stderr
    text = path.read_text()
    assert text.endswith("\n") and [r["line"] for r in runs.read_jsonl(path)] == [0, 1, 2]


def test_a_resumed_run_takes_the_new_optimizer_settings(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    result = invoke("train", "--resume", run, "train.epochs=3", "optim.lr=0.0005", "optim.weight_decay=0.001", "-q")
    assert result.returncode == 0, result.stderr
    epochs = [r for r in runs.read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["lr"] for r in epochs] == [0.001, 0.001, 0.0005]
    group = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.001 and group["initial_lr"] == 0.0005


def test_an_output_folder_that_cannot_be_made(cifar10_head, tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder should go")
    result = invoke("train", f"data.root={cifar10_head}", f"train.out_dir={blocker / 'sub'}", *SMALL)
    assert_error(result, 2, "cannot create the run directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder(cifar10_head, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert_error(invoke("train", f"data.root={cifar10_head}", f"train.out_dir={out}", *SMALL), 2,
                     "cannot create the run directory", "Permission denied")
    finally:
        out.chmod(0o755)


# ---------------------------------------------------------------- concurrent writers and signals


def epochs_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["epoch"] for r in runs.read_jsonl(path) if r["kind"] == "epoch"] if path.is_file() else []


def test_two_resumes_of_one_run_one_writes_the_other_exits_2(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    first = subprocess.Popen(cli_command("train", "--resume", run, *FOREVER), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / ".lock").is_file() and (run / ".lock").read_text().strip() == str(first.pid),
                 "the first process to lock the run")
        second = run_cli("train", "--resume", run, *FOREVER)  # a process of its own: a hang would time out
        assert_error(second, 2, f"process {first.pid} is writing this run")
        wait_for(lambda: len(epochs_logged(run)) >= 3, "3 epochs")
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err
    epochs = epochs_logged(run)
    assert epochs == list(range(1, len(epochs) + 1))  # every epoch once, in order
    assert not (run / ".lock").exists() and runs.read_summary(run)["status"] == "interrupted"


def test_a_lock_left_by_a_killed_process_is_taken_over(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    proc = subprocess.Popen(cli_command("train", "--resume", run, *FOREVER),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(epochs_logged(run)) >= 3, "3 epochs")
    finally:
        proc.kill()
        proc.wait()
    assert (run / ".lock").read_text().strip() == str(proc.pid)  # left behind by SIGKILL
    result = invoke("train", "--resume", run, f"train.epochs={len(epochs_logged(run)) + 1}", "-q")
    assert result.returncode == 0, result.stderr
    epochs = epochs_logged(run)
    assert epochs == list(range(1, len(epochs) + 1)) and not (run / ".lock").exists()


def test_sigint_twice_stops_at_once_and_leaves_no_running_status(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    proc = subprocess.Popen(cli_command("train", "--resume", run, *FOREVER),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(epochs_logged(run)) >= 3, "3 epochs")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert no_temporary_files(run) and not (run / ".lock").exists()
    summary = run / "summary.json"
    assert not summary.exists() or runs.read_summary(run)["status"] in ("interrupted", "failed")
    torch.load(run / "checkpoints" / "last.pt", weights_only=True)
