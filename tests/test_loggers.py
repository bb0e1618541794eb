"""train.loggers: each logger trains a tiny real run and what it wrote is read back with the logger's
own reader (csv, TensorBoard's EventAccumulator, the MLflow client, W&B's offline run file) and
compared with metrics.jsonl. Nothing reaches the network: every socket connection to a host other
than this machine fails the test."""

import csv
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import cifarlab
from cifarlab import runs
from cifarlab.errors import ConfigError, Interrupted
from cifarlab.train.loggers import LOGGERS, Logger, scalar_metrics
from cifarlab.hooks import HOOKS
from helpers import wait_for

METRIC_KEYS = ["lr", "test_acc", "test_loss", "train_acc", "train_loss", "val_acc", "val_loss"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test reaches the network: W&B offline and silent, MLflow telemetry off, its file store allowed,
    and a connection to any host but this one is an error."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                       "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def fit(head: Path, out: Path, loggers: list[str], epochs: int = 2, callbacks=(), **train) -> cifarlab.Run:
    return cifarlab.fit({"data": {"root": str(head), "train_limit": 300, "test_limit": 64}, "model": {"preset": "cnn3"},
                         "analysis": {"report": False},
                         "train": {"epochs": epochs, "out_dir": str(out), "loggers": loggers, "evaluate": ["val", "test"],
                                   **train}}, callbacks=callbacks, progress=False)


def epochs_of(run: cifarlab.Run) -> list[dict]:
    return [r for r in runs.read_jsonl(run.path / runs.METRICS) if r["kind"] == "epoch"]


def only_run(out: Path) -> cifarlab.Run:
    (path,) = [p for p in out.iterdir() if p.is_dir()]
    return cifarlab.load_run(path)


class InterruptAt(cifarlab.Callback):
    """SIGINT to this process after optimizer step `step` (the trainer saves last.pt and raises Interrupted)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, batch, logs):
        if trainer.step == self.step:
            signal.raise_signal(signal.SIGINT)


class FailIn(cifarlab.Callback):
    """An error in epoch `epoch`: the run fails (status failed) after its loggers saw the epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            raise RuntimeError("boom")


# ---------------------------------------------------------------- registry and config


def test_every_logger_follows_the_callback_protocol_and_is_a_config_choice():
    config = cifarlab.load_config(None, {"train.loggers": list(LOGGERS)})
    for name, build in LOGGERS.items():
        try:
            logger = build(config.train.model_dump())
        except ConfigError as e:  # an optional package that is not installed here
            assert 'pip install "cifarlab[loggers]"' in str(e) and name in str(e)
            continue
        assert isinstance(logger, Logger)
        assert all(callable(getattr(logger, hook)) for hook in HOOKS + ("state_dict", "load_state_dict"))
    assert cifarlab.load_config(None, {"train.loggers": "csv"}).train.loggers == ["csv"]
    assert cifarlab.load_config().train.loggers == []
    with pytest.raises(ConfigError) as bad:
        cifarlab.load_config(None, {"train.loggers": ["csv", "tensorbored"]})
    assert str(bad.value) == ("config: train.loggers: Input should be 'csv', 'tensorboard', 'mlflow' or 'wandb' "
                              "(got 'tensorbored')")
    with pytest.raises(ConfigError, match="train.loggers: names a logger twice"):
        cifarlab.load_config(None, {"train.loggers": ["csv", "csv"]})


def test_loggers_run_right_after_the_metrics_log():
    config = cifarlab.load_config(None, {"train.loggers": ["csv"]})
    names = [type(cb).__name__ for cb in cifarlab.default_callbacks(config, progress=False)]
    assert names[:3] == ["MetricsLog", "CSVLogger", "LogProgress"]


@pytest.mark.parametrize("logger, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow"),
                                            ("wandb", "wandb")])
def test_a_missing_package_is_a_config_error_before_the_run_starts(monkeypatch, tmp_path, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    out = tmp_path / "runs"
    with pytest.raises(ConfigError) as missing:
        fit(tmp_path / "no-data", out, ["csv", logger])
    assert str(missing.value).startswith(f"train.loggers: {logger} needs the ")
    assert str(missing.value).endswith('install it with: pip install "cifarlab[loggers]"')
    assert not out.exists()


# ---------------------------------------------------------------- csv


def read_csv(run: cifarlab.Run) -> list[dict]:
    with open(run.path / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_csv_rows_and_columns_equal_the_metrics_log(cifar10_head, tmp_path):
    run = fit(cifar10_head, tmp_path, ["csv"])
    rows, history = read_csv(run), epochs_of(run)
    assert (run.path / "history.csv").read_text().splitlines()[0] == ",".join(["epoch"] + METRIC_KEYS)
    assert len(rows) == len(history) == 2
    for row, record in zip(rows, history):
        assert int(row.pop("epoch")) == record["epoch"]
        assert {k: float(v) for k, v in row.items()} == scalar_metrics(record)  # repr round trip: exact


def test_csv_after_a_resume_has_each_epoch_once(cifar10_head, tmp_path):
    run = fit(cifar10_head, tmp_path, ["csv"])
    with open(run.path / "history.csv", "a") as f:  # a row the checkpoint never knew (killed after the csv write)
        f.write("3,0.001,0.5,0.5,0.5,0.5,0.5,0.5\n")
    run = cifarlab.resume(run, {"train.epochs": 3}, progress=False)
    rows, history = read_csv(run), epochs_of(run)
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in history] == [1, 2, 3]
    for row, record in zip(rows, history):
        assert {k: float(v) for k, v in row.items() if k != "epoch"} == scalar_metrics(record)


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_histograms_graph_and_hparams(cifar10_head, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    run = fit(cifar10_head, tmp_path, ["tensorboard"], histogram_every=1, log_every=2)
    history = epochs_of(run)
    everything = {ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0}
    events = ea.EventAccumulator(str(run.path / "tensorboard"), size_guidance=everything).Reload()
    tags = events.Tags()
    for key in METRIC_KEYS:  # float32 in the event file
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
            [(r["epoch"], float(np.float32(r[key]))) for r in history], key
    assert {"time/epoch_s", "time/img_per_s"} <= set(tags["scalars"])
    parameters = [name for name, _ in run.model().named_parameters()]
    assert parameters and set(parameters) <= set(tags["histograms"])
    for name in parameters:
        assert [e.step for e in events.Histograms(name)] == [1, 2], name
    assert tags["graph"]
    plain = fit(cifar10_head, tmp_path / "plain", [], log_every=2)  # the graph trace changed nothing in training
    assert [{k: v for k, v in r.items() if k != "time"} for r in epochs_of(plain)] == \
        [{k: v for k, v in r.items() if k != "time"} for r in history]

    steps = ea.EventAccumulator(str(run.path / "tensorboard" / "steps"), size_guidance=everything).Reload()
    step_lines = [r for r in runs.read_jsonl(run.path / runs.METRICS) if r["kind"] == "step"]
    assert step_lines
    assert [(e.step, e.value) for e in steps.Scalars("running_loss")] == \
        [(r["step"], float(np.float32(r["loss"]))) for r in step_lines]

    hparams = ea.EventAccumulator(str(run.path / "tensorboard" / "hparams"), size_guidance=everything).Reload()
    assert hparams.Scalars("final/test_acc")[0].value == float(np.float32(run.summary["test_acc"]))
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = hparams.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.epochs"].number_value == 2 and start.hparams["model.preset"].string_value == "cnn3"


# ---------------------------------------------------------------- MLflow


def mlflow_run(run: cifarlab.Run):
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.tracking.MlflowClient((run.path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("cnn3-cifar10")
    (found,) = client.search_runs([experiment.experiment_id])
    return client, found


def test_mlflow_metrics_params_and_status_through_its_client(cifar10_head, tmp_path):
    pytest.importorskip("mlflow")
    run = fit(cifar10_head, tmp_path, ["mlflow"])
    client, found = mlflow_run(run)
    assert found.info.status == "FINISHED" and found.info.run_name == run.path.name
    history = epochs_of(run)
    for key in METRIC_KEYS:
        assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)] == \
            [(r["epoch"], r[key]) for r in history], key
    assert found.data.params["train.epochs"] == "2" and found.data.params["model.preset"] == "cnn3"
    assert found.data.metrics["final/test_acc"] == run.summary["test_acc"]

    run = cifarlab.resume(run, {"train.epochs": 3}, progress=False)  # the same MLflow run continues
    client, again = mlflow_run(run)
    assert again.info.run_id == found.info.run_id and again.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "val_loss")] == \
        [(r["epoch"], r["val_loss"]) for r in epochs_of(run)]
    assert again.data.params["train.epochs"] == "2" and again.data.tags["resumed.train.epochs"] == "3"


def test_mlflow_status_killed_on_interrupt_and_failed_on_error(cifar10_head, tmp_path):
    pytest.importorskip("mlflow")
    with pytest.raises(Interrupted):
        fit(cifar10_head, tmp_path / "a", ["mlflow"], callbacks=[InterruptAt(3)])
    client, found = mlflow_run(only_run(tmp_path / "a"))
    assert found.info.status == "KILLED"

    with pytest.raises(RuntimeError, match="boom"):  # on_exception closes the run before the error leaves fit
        fit(cifar10_head, tmp_path / "b", ["mlflow"], callbacks=[FailIn(1)])
    client, found = mlflow_run(only_run(tmp_path / "b"))
    assert found.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train_loss")] == [1]


# ---------------------------------------------------------------- W&B


def wandb_records(path: Path):
    """The records of a W&B offline run file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    records (4-byte checksum, 2-byte length, 1-byte type: full / first / middle / last) in 32 KiB blocks,
    each a wandb_internal Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def finished_records(path: Path) -> Optional[list]:
    """The records of a W&B run file that holds the run's exit record; None before (a record may be half written)."""
    from google.protobuf.message import DecodeError

    try:
        records = list(wandb_records(path))
    except DecodeError:
        return None
    return records if any(r.WhichOneof("record_type") == "exit" for r in records) else None


def test_wandb_offline_run_holds_the_history(cifar10_head, tmp_path):
    pytest.importorskip("wandb")
    run = fit(cifar10_head, tmp_path, ["wandb"])
    (folder,) = (run.path / "wandb").glob("offline-run-*")
    (file,) = folder.glob("run-*.wandb")
    # the file is written by W&B's own service process: read it once that process has written the run's exit
    records = wait_for(lambda: finished_records(file), "W&B's exit record in its run file", timeout=60)
    kinds = [r.WhichOneof("record_type") for r in records]
    logged = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
              for r in records if r.WhichOneof("record_type") == "history"]
    assert [{k: row[k] for k in METRIC_KEYS} for row in logged] == [{k: r[k] for k in METRIC_KEYS} for r in epochs_of(run)]
    assert [row["epoch"] for row in logged] == [1, 2]
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.project == "cnn3-cifar10" and start.display_name == run.path.name
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["train.epochs"] == 2 and config["model.preset"] == "cnn3"
    summary = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update if item.key}
    assert summary["final/test_acc"] == run.summary["test_acc"]
    (done,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert done.exit_code == 0 and "exit" in kinds
