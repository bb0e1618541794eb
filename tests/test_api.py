"""The public Python API and the callback protocol (issue: cifarlab as a library)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import cifarlab
from cifarlab import runs
from cifarlab.api import default_callbacks
from cifarlab.config import load_config
from cifarlab.errors import DataError
from cifarlab.train.monitor import Monitor



def small(cifar10_head, out, **extra):
    """A short run's config as a dict of sections, the way a notebook would write it."""
    config = {"data": {"root": str(cifar10_head), "train_limit": 600, "test_limit": 200},
              "model": {"preset": "cnn3"}, "train": {"epochs": 2, "out_dir": str(out), "log_every": 3},
              "analysis": {"report": False}}
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return config


class Recorder(cifarlab.Callback):
    """Records every hook call (and counts epochs in its resumable state)."""

    def __init__(self):
        self.calls = []
        self.epochs = 0

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_step_end(self, trainer, batch, logs):
        self.calls.append("step" if logs is None else "step+logs")

    def on_epoch_end(self, trainer, record):
        self.calls.append(f"epoch{record['epoch']}")
        self.epochs += 1

    def on_train_end(self, trainer):
        self.calls.append("train_end")

    def on_fit_end(self, trainer, summary):
        self.calls.append(f"fit_end:{summary['status']}")

    def on_exception(self, trainer, error):
        status = json.loads((trainer.run_dir / "summary.json").read_text())["status"]
        self.calls.append(f"exception:{type(error).__name__}:{status}")

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state):
        self.epochs = state["epochs"]


class StopAfter:
    """A duck-typed callback (no base class): asks to stop after epoch `n`."""

    def __init__(self, n):
        self.n = n

    def on_epoch_end(self, trainer, record):
        if record["epoch"] >= self.n:
            trainer.stop(f"stopped by the user after epoch {self.n}")


def test_fit_from_a_dict_returns_a_run_that_predicts_and_evaluates(cifar10_head, tmp_path):
    run = cifarlab.fit(small(cifar10_head, tmp_path), overrides={"train.tta": "flip"}, progress=False)
    assert isinstance(run, cifarlab.Run) and run.path.parent == tmp_path
    assert run.summary["status"] == "completed" and [r["epoch"] for r in run.history] == [1, 2]
    assert run.config.train.tta == "flip"
    model = run.model()
    assert not model.training
    images, labels = run.loaded.split("test")
    nchw = run.predict(images[:16])
    assert nchw.shape == (16, 10)
    np.testing.assert_allclose(nchw.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(run.predict(images[:16].transpose(0, 2, 3, 1)), nchw, atol=1e-6)  # NHWC
    np.testing.assert_allclose(run.predict(images[:16].astype(np.float32) / 255), nchw, atol=1e-5)  # floats
    np.testing.assert_allclose(run.predict(torch.from_numpy(images[0])), nchw[:1], atol=1e-6)  # one image
    path = tmp_path / "first.png"
    Image.fromarray(images[0].transpose(1, 2, 0)).save(path)
    np.testing.assert_allclose(run.predict(path), nchw[:1], atol=1e-6)  # a file
    # the probabilities agree with the test accuracy training reported (same weights, normalization, TTA)
    every = run.predict(images)
    assert (every.argmax(1) == labels).mean() == pytest.approx(run.summary["test_acc"])
    assert run.evaluate("test")["acc"] == pytest.approx(run.summary["test_acc"])
    with pytest.raises(DataError, match="this run's model takes"):
        run.predict(np.zeros((2, 28, 28), np.uint8))
    page = run._repr_html_()
    assert f"{100 * run.summary['test_acc']:.2f}%" in page and "data:image/png;base64," in page
    assert cifarlab.load_run(run.path).summary == run.summary


def test_user_callbacks_see_every_hook_and_can_stop_training(cifar10_head, tmp_path):
    recorder = Recorder()
    run = cifarlab.fit(small(cifar10_head, tmp_path, train={"epochs": 5}), callbacks=[recorder, StopAfter(2)],
                       progress=False)
    summary = run.summary
    assert summary["stop_reason"] == "stopped by the user after epoch 2" and summary["epochs_run"] == 2
    steps = -(-540 // 64)  # 600 images, 10% for validation, batch 64
    epoch = (["step"] * 2 + ["step+logs"]) * 3  # train.log_every=3
    assert len(epoch) == steps
    assert recorder.calls == ["fit_start", *epoch, "epoch1", *epoch, "epoch2", "train_end", "fit_end:completed"]
    # last.pt holds the user callback's state after the last epoch
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["callbacks"]["Recorder"] == {"epochs": 2}


class FailInEpoch(cifarlab.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            raise RuntimeError("boom")


def test_a_failing_run_calls_on_exception_after_recording_the_failure(cifar10_head, tmp_path):
    recorder, broken = Recorder(), Recorder()
    broken.on_exception = lambda trainer, error: 1 / 0  # a failing on_exception is logged, never raised over the error
    with pytest.raises(RuntimeError, match="boom"):
        cifarlab.fit(small(cifar10_head, tmp_path / "runs"), callbacks=[broken, FailInEpoch(1), recorder],
                     progress=False)
    assert recorder.calls[-1] == "exception:RuntimeError:failed" and "epoch1" not in recorder.calls
    assert broken.calls[-1] == "epoch1"
    summary = json.loads(next((tmp_path / "runs").iterdir()).joinpath("summary.json").read_text())
    assert summary["status"] == "failed" and summary["stop_reason"] == "RuntimeError: boom"


def test_a_resumed_run_gets_its_callbacks_state_back(cifar10_head, tmp_path):
    first = cifarlab.fit(small(cifar10_head, tmp_path), callbacks=[Recorder()], progress=False)
    again = Recorder()
    resumed = cifarlab.resume(first, {"train.epochs": 3}, callbacks=[again], progress=False)
    assert again.epochs == 3 and again.calls[0] == "fit_start" and "epoch3" in again.calls
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_default_callbacks_run_in_the_documented_order(cifar10_head, tmp_path):
    config = load_config(small(cifar10_head, tmp_path), [
        "analysis.tsne.layers=[fc1]", "train.divergence.enabled=true", "train.target.metric=val_acc",
        "train.max_time_s=60", "analysis.report=true"])
    names = [type(cb).__name__ for cb in default_callbacks(config, [StopAfter(1)], progress=False)]
    assert names == ["MetricsLog", "LogProgress", "NaNGuard", "FeatureCapture", "EarlyStopping", "DivergenceStop",
                     "TargetStop", "TimeLimit", "StopAfter", "BestCheckpoint", "LastCheckpoint", "ReportCallback"]
    quiet = load_config(small(cifar10_head, tmp_path), ["train.early_stopping.enabled=false"])
    assert [type(cb).__name__ for cb in default_callbacks(quiet, progress=False)] == [
        "MetricsLog", "LogProgress", "NaNGuard", "BestCheckpoint", "LastCheckpoint"]


def test_monitor_decides_improvement_for_every_rule():
    acc = Monitor("val_acc", min_delta=0.01)
    assert acc.update(1, {"val_acc": 0.5}) and not acc.update(2, {"val_acc": 0.505})
    assert acc.update(3, {"val_acc": 0.52}) and (acc.best, acc.best_epoch) == (0.52, 3)
    assert not acc.update(4, {"val_acc": math.nan}) and not acc.update(5, {})
    loss = Monitor("val_loss")
    assert loss.update(1, {"val_loss": 1.0}) and not loss.update(2, {"val_loss": 1.1}) and loss.update(3, {"val_loss": 0.9})
    assert loss.reached(0.3, 0.3) and not loss.reached(0.31, 0.3) and acc.reached(0.9, 0.9)
    forced = Monitor("train_loss", mode="max")
    assert forced.update(1, {"train_loss": 1.0}) and forced.update(2, {"train_loss": 2.0})


def test_public_names_are_documented():
    for name in cifarlab.__all__:
        value = getattr(cifarlab, name)
        assert value.__doc__, f"cifarlab.{name} has no docstring"
    assert runs.LoadedRun.__doc__
