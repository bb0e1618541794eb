"""Data-parallel training (train.devices=N): two gloo ranks on this machine's loopback, on real
CIFAR-10 images. Equality with a single process needs a model without batch norm and dropout and no
augmentation (those draw per rank); the splits are chosen so that the last global batch (37 of 64)
and the test split (101) cut unevenly between the two ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cifarlab
from cifarlab import runs
from cifarlab.config import load_config
from cifarlab.data.loader import DeviceLoader, shard
from cifarlab.errors import ConfigError
from cifarlab.evaluation import evaluate
from cifarlab.train.checkpoint import check_resumable
from cifarlab.train.distributed import INIT_METHOD_ENV
from cifarlab.train.launch import override_strings
from helpers import cli_command, invoke, wait_for

# 279 images - 50 validation = 229 training images: 3 global batches of 64, then 37 (19 + 18)
SMALL = {"data.train_limit": 279, "data.val_size": 50, "data.test_limit": 101, "model.preset": "cnn3",
         "model.widths": [8, 16, 16], "model.fc": 32, "train.batch_size": 64, "train.threads": 1,
         "analysis.report": False}
# no batch norm, dropout or augmentation: two ranks compute the single process' updates
PLAIN = {**SMALL, "model.batchnorm": False, "model.dropout": 0, "optim.name": "sgd", "optim.lr": 0.05,
         "optim.momentum": 0.9, "optim.l2": 0.001, "train.label_smoothing": 0.1}
# everything that draws random numbers per rank, for the resume
RANDOM = {**SMALL, "augment.preset": "crop-flip", "augment.mixup": 0.2}


def as_args(settings: dict) -> list[str]:
    return [f"{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in settings.items()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=False)["model"]


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "time"} for record in history]


def children(pid: int) -> list[int]:
    try:
        return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the listening TCP sockets of `pids`."""
    inodes, tables = set(), []
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
            tables += [Path(f"/proc/{pid}/net/{name}").read_text() for name in ("tcp", "tcp6")]
        except (FileNotFoundError, ProcessLookupError):
            continue
    found = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found


def train_command(*args: str) -> list[str]:
    return cli_command("train", *args, "-q")


def epochs_logged(out: Path) -> int:
    logs = list(out.glob("*/metrics.jsonl"))
    return sum(json.loads(line)["kind"] == "epoch" for line in logs[0].read_text().splitlines()) if logs else 0


# ---------------------------------------------------------------- without processes


def test_shards_cut_like_array_split_and_the_loader_takes_its_slice_of_each_global_batch():
    for length in range(0, 12):
        for world in (1, 2, 3, 4):
            parts = np.array_split(np.arange(length), world)
            assert [list(range(*shard(length, r, world))) for r in range(world)] == [list(p) for p in parts]
    images = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1).expand(11, 1, 2, 2).contiguous()
    labels = torch.arange(11)

    def batches(rank: int, world: int, batch_size: int = 4):
        loader = DeviceLoader(images, labels, batch_size, [0.0], [1 / 255], shuffle=True,
                              generator=torch.Generator().manual_seed(3), rank=rank, world=world)
        return len(loader), [b.tolist() for _, b in loader]

    steps, whole = batches(0, 1)
    assert steps == 3 and [len(b) for b in whole] == [4, 4, 3]
    for rank in (0, 1):  # two ranks: the same permutation, contiguous halves of each global batch
        assert batches(rank, 2) == (3, [b[slice(*shard(len(b), rank, 2))] for b in whole])
    # a trailing global batch smaller than the number of ranks is dropped (3 images, 4 ranks)
    assert batches(3, 4) == (2, [b[3:] for b in whole[:2]])


def test_devices_is_checked_and_cannot_change_when_resuming(tmp_path):
    with pytest.raises(ConfigError, match="train.devices"):
        load_config(None, ["train.devices=0"])
    two = load_config(None, ["train.devices=2"])
    check_resumable(two.to_dict(), two, tmp_path)
    with pytest.raises(ConfigError, match="train.devices cannot change when resuming"):
        check_resumable(two.to_dict(), load_config(), tmp_path)
    saved = load_config().to_dict()
    del saved["train"]["devices"]  # a run from before train.devices: it had one
    check_resumable(saved, load_config(), tmp_path)
    with pytest.raises(ConfigError, match="it was 1, now 2"):
        check_resumable(saved, two, tmp_path)


def test_user_callbacks_need_one_device(tmp_path):
    with pytest.raises(ConfigError, match="user callbacks need train.devices=1"):
        cifarlab.fit(None, overrides={"train.devices": 2, "train.out_dir": str(tmp_path)},
                     callbacks=[cifarlab.Callback()])
    assert not any(tmp_path.iterdir())


def test_dict_overrides_become_command_line_overrides():
    given = {"optim.lr": 1e-05, "data.root": "a: b #c", "model.widths": [8, 16, 16], "train.threads": None,
             "data.stratify": False}
    assert load_config(None, override_strings(given)) == load_config(None, given)
    assert override_strings(["train.epochs=3"]) == ["train.epochs=3"]


# ---------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_from_the_command_line_train_as_one_process_and_listen_on_loopback_only(cifar10_head, tmp_path):
    settings = {**PLAIN, "data.root": str(cifar10_head), "train.epochs": 2}
    log = (tmp_path / "log").open("w")
    launcher = subprocess.Popen(train_command(*as_args(settings), "train.devices=2", f"train.out_dir={tmp_path / 'two'}"),
                                stdout=log, stderr=subprocess.STDOUT)
    addresses, ranks = set(), set()
    while launcher.poll() is None:  # the gloo sockets exist from the ranks' start to their end
        pids = children(launcher.pid)
        ranks.update(pids)
        addresses |= listening_addresses(pids)
        time.sleep(0.02)
    assert launcher.returncode == 0, (tmp_path / "log").read_text()[-3000:]
    assert len(ranks) == 2 and addresses == {"0100007F"}  # 127.0.0.1, nothing else

    two = cifarlab.load_run(next((tmp_path / "two").iterdir()))
    one = cifarlab.fit(None, overrides={**settings, "train.out_dir": str(tmp_path / "one")}, progress=False)
    summary = two.summary
    assert summary["status"] == "completed" and summary["devices"] == 2 and summary["world_size"] == 2
    assert one.summary["devices"] == 1 and one.summary["world_size"] == 1
    a, b = weights(one.path), weights(two.path)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    for mine, single in zip(two.history, one.history):
        assert mine["train_loss"] == pytest.approx(single["train_loss"], rel=1e-6)
        assert mine["train_acc"] == single["train_acc"] and mine["val_acc"] == single["val_acc"]
    # the test score is that of every test image once: the tested weights scored in one process
    report = two.evaluate("test")
    assert report["images"] == 101 and summary["test_acc"] == report["acc"]
    assert summary["test_loss"] == pytest.approx(report["loss"], rel=1e-5)
    assert not (two.path / ".lock").exists()


@pytest.mark.slow
def test_fit_and_a_resume_of_two_ranks_continue_exactly(cifar10_head, tmp_path):
    settings = {**RANDOM, "data.root": str(cifar10_head), "train.devices": 2, "train.out_dir": str(tmp_path)}
    whole = cifarlab.fit(None, overrides={**settings, "train.epochs": 2}, progress=False)
    half = cifarlab.fit(None, overrides={**settings, "train.epochs": 1}, progress=False)
    states = torch.load(half.path / "checkpoints" / "last.pt", weights_only=False)["ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["augment"], states[1]["augment"])
    with pytest.raises(ConfigError, match="train.devices cannot change"):
        cifarlab.resume(half, {"train.devices": 1, "train.epochs": 2}, progress=False)

    resumed = invoke("train", "--resume", half.path, "train.epochs=2", "-q")  # the launcher here, its ranks processes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(whole.path), weights(half.path)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert without_time(whole.history) == without_time(half.history)
    assert half.summary["test_acc"] == whole.summary["test_acc"]


RECORD_TEST = """
import os, sys, torch, cifarlab, json

class TestScores(cifarlab.Callback):
    def on_fit_end(self, trainer, summary):
        torch.save({"logits": trainer.test_result.logits, "rank": os.environ["RANK"]}, sys.argv[2])

cifarlab.fit(None, overrides=json.loads(sys.argv[1]), callbacks=[TestScores()], progress=False)
"""


@pytest.mark.slow
def test_ranks_started_like_torchrun_run_user_callbacks_on_rank_0_and_score_each_test_image_once(cifar10_head,
                                                                                                   tmp_path):
    # min_delta 1: no epoch improves on the first, whose weights rank 0 puts back (and shares) for the test
    settings = {**PLAIN, "data.root": str(cifar10_head), "train.epochs": 2, "train.early_stopping.min_delta": 1,
                "train.devices": 2, "train.out_dir": str(tmp_path / "runs")}
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo",
           INIT_METHOD_ENV: f"file://{tmp_path / 'store'}"}
    ranks = [subprocess.Popen([sys.executable, "-c", RECORD_TEST, json.dumps(settings), str(tmp_path / "scores.pt")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for rank in ranks:
        _, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-3000:]
    recorded = torch.load(tmp_path / "scores.pt", weights_only=False)
    assert recorded["rank"] == "0"  # only rank 0 runs callbacks
    run = cifarlab.load_run(next((tmp_path / "runs").iterdir()))
    assert run.summary["best_epoch"] == 1 and run.summary["epochs_run"] == 2
    loaded = run.loaded
    single = evaluate(loaded.model, loaded.loader("test"), loaded.config.train.precision, loaded.config.train.tta)
    assert recorded["logits"].shape == (101, 10)  # every test image once, in order
    torch.testing.assert_close(recorded["logits"], single.logits, rtol=1e-4, atol=1e-5)
    assert run.summary["test_acc"] == single.acc


FOREVER = {**PLAIN, "train.epochs": 100000, "train.early_stopping.enabled": False, "train.devices": 2}


def start_forever(cifar10_head, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """A two-rank run that goes on until stopped, once it has logged two epochs; and its ranks' pids."""
    launcher = subprocess.Popen(train_command(*as_args({**FOREVER, "data.root": str(cifar10_head)}),
                                              f"train.out_dir={out}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: epochs_logged(out) >= 2 or launcher.poll() is not None, "2 epochs")
    ranks = children(launcher.pid)
    assert launcher.poll() is None and len(ranks) == 2
    return launcher, ranks


@pytest.mark.slow
def test_a_killed_rank_fails_the_launch_and_leaves_no_process(cifar10_head, tmp_path):
    launcher, ranks = start_forever(cifar10_head, tmp_path)
    os.kill(ranks[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert not any(alive(pid) for pid in ranks)
    run = next(tmp_path.iterdir())
    summary = runs.read_summary(run)  # rank 0 noticed and said so
    assert summary["status"] == "failed" and "another rank ended" in summary["stop_reason"]
    assert "another rank ended" in err and not (run / ".lock").exists()


@pytest.mark.slow
def test_sigint_to_the_launcher_stops_both_ranks_at_an_epoch_end(cifar10_head, tmp_path):
    launcher, ranks = start_forever(cifar10_head, tmp_path)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err[-3000:]
    assert not any(alive(pid) for pid in ranks)
    run = next(tmp_path.iterdir())
    summary = runs.read_summary(run)
    assert summary["status"] == "interrupted" and "at the end of epoch" in summary["stop_reason"]
    assert err.count("resume with") == 1  # said once, by rank 0
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == summary["epochs_run"] and len(checkpoint["ranks"]) == 2
