import json
import math

import pytest
import torch

from cifarlab import runs
from cifarlab.config import load_config
from cifarlab.errors import ConfigError, TrainingFailed
from cifarlab.train.callbacks import EarlyStopping
from cifarlab.models.build import build_model
from cifarlab.api import evaluate_run, fit
from cifarlab.evaluation import predict_logits
from conftest import copy_run


def without_time(path):
    return [{k: v for k, v in row.items() if k != "time"} for row in runs.read_jsonl(path)]


def test_early_stopping_fires_after_patience_epochs_and_keeps_the_best():
    stopper = EarlyStopping("val_acc", patience=3, min_delta=0.01)
    sequence = [0.30, 0.40, 0.405, 0.408, 0.50, 0.45, 0.45, 0.509, 0.60]
    stopped_at = None
    for epoch, value in enumerate(sequence, start=1):
        stopper.update(epoch, {"val_acc": value})
        if stopper.stop_reason():
            stopped_at = epoch
            break
    # 0.405 and 0.408 do not beat 0.40 by more than 0.01; 0.50 resets; 0.45, 0.45, 0.509 do not beat it.
    assert stopped_at == 8 and stopper.best_epoch == 5 and stopper.best == 0.50
    loss = EarlyStopping("val_loss", patience=1)
    loss.update(1, {"val_loss": 1.0})
    assert loss.update(2, {"val_loss": 0.9}) and not loss.stop_reason()
    assert not loss.update(3, {"val_loss": math.nan}) and "val_loss did not improve" in loss.stop_reason()


def test_cnn3_avg_learns_cifar10_head(trained_run, tmp_path):
    # trained_run (conftest.py): cnn3-avg, train.epochs=4 in bf16 on the whole CIFAR-10 head, otherwise the defaults
    assert runs.read_run_config(trained_run).model.preset == "cnn3-avg"
    run = copy_run(trained_run, tmp_path)  # eval writes eval_test.json
    summary = runs.read_summary(run)
    assert summary["status"] == "completed"
    assert summary["sizes"] == {"train": 4653, "val": 517, "test": 1017}
    assert summary["test_acc"] >= 0.45, summary["test_acc"]
    assert summary["params"] == {"trainable": 1_211_018, "non_trainable": 1_728}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    epochs = [r for r in runs.read_jsonl(run / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    best = max(epochs, key=lambda r: r["val_acc"])
    assert summary["best_epoch"] == best["epoch"] and summary["val_acc"] == best["val_acc"]
    # eval of best.pt reproduces the test accuracy the run reported, per class too
    report = evaluate_run(run, "test")
    assert report["acc"] == pytest.approx(summary["test_acc"])
    assert len(report["per_class_acc"]) == 10
    assert json.loads((run / "eval_test.json").read_text())["acc"] == report["acc"]


@pytest.mark.slow
def test_same_config_twice_gives_identical_metrics(cifar10_head, tmp_path):
    overrides = [f"data.root={cifar10_head}", "data.train_limit=600", "data.test_limit=200", "train.epochs=2",
                 "train.log_every=2", "augment.preset=crop-flip", "model.preset=cnn3", f"train.out_dir={tmp_path}",
                 "analysis.report=false"]
    first = fit(load_config(overrides=overrides))
    second = fit(load_config(overrides=overrides))
    assert first != second
    rows = without_time(first / "metrics.jsonl")
    assert len(rows) > 6 and rows == without_time(second / "metrics.jsonl")
    changed = fit(load_config(overrides=overrides + ["seed=1"]))
    assert without_time(changed / "metrics.jsonl") != rows


@pytest.mark.slow
def test_short_fashion_mnist_run(fashion_mnist, tmp_path):
    # (no report.html: a failing figure would not fail this run; the report is checked in test_analysis.py)
    config = load_config(overrides=["data.dataset=fashion-mnist", "data.train_limit=6000", "data.test_limit=2000",
                                    "train.epochs=2", "model.preset=cnn3-avg", "train.batch_size=128",
                                    "train.precision=bf16", f"train.out_dir={tmp_path}", "analysis.report=false"])
    summary = runs.read_summary(fit(config))
    assert summary["input_shape"] == [1, 28, 28]
    assert summary["test_acc"] >= 0.80, summary["test_acc"]


def test_divergence_stops_the_run_and_says_so(tmp_path):
    config = load_config(overrides=["data.dataset=synthetic", "data.train_limit=512", "model.preset=lab-m2",
                                    "optim.name=sgd", "optim.lr=1e6", "train.epochs=3", f"train.out_dir={tmp_path}"])
    with pytest.raises(TrainingFailed, match="diverged: training loss became nan in epoch 1"):
        fit(config)
    (run,) = tmp_path.iterdir()
    summary = runs.read_summary(run)
    assert summary["status"] == "diverged" and "nan" in summary["stop_reason"]


def test_flip_tta_and_bf16_precision_of_predict_logits():
    torch.manual_seed(0)
    model = build_model(load_config(overrides=["model.preset=cnn3-avg"]).model, (3, 32, 32), 10).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(3))
        assert torch.equal(predict_logits(model, x), plain)  # default: float32, no TTA
        assert torch.equal(predict_logits(model, x, "auto"), plain)  # auto: float32 on CPU
        assert torch.allclose(predict_logits(model, x, tta="flip"), (plain + mirrored) / 2, atol=1e-6)
        assert not torch.allclose(plain, mirrored, atol=1e-3)  # so the average is not the plain logits
        bf16 = predict_logits(model, x, "bf16")
    assert bf16.dtype == torch.float32
    error = (bf16 - plain).abs().max().item()
    assert 0 < error < 0.1 * plain.abs().max().item()  # rounded to bf16, but the same logits


def test_bf16_training_and_flip_tta_run_end_to_end(tmp_path):
    # bf16 convolutions are slow on CPUs without AMX, hence few images
    config = load_config(overrides=["data.dataset=synthetic", "data.train_limit=150", "data.test_limit=50",
                                    "train.epochs=2", f"train.out_dir={tmp_path}", "train.precision=bf16",
                                    "train.tta=flip", "analysis.report=false"])
    run = fit(config)
    summary = runs.read_summary(run)
    assert summary["status"] == "completed" and math.isfinite(summary["train_loss"])
    # eval reads the run's tta and precision and so reproduces the test accuracy of training
    assert evaluate_run(run)["acc"] == summary["test_acc"]


def test_no_validation_split_with_early_stopping_off_tests_the_last_epoch(tmp_path):
    config = load_config(overrides=["data.dataset=synthetic", "data.train_limit=200", "data.test_limit=50",
                                    "data.val_size=0", "train.early_stopping.enabled=false", "train.epochs=2",
                                    f"train.out_dir={tmp_path}", "analysis.report=false"])
    summary = runs.read_summary(fit(config))
    assert summary["sizes"]["val"] == 0 and summary["val_acc"] is None
    assert summary["best_epoch"] == 2 and 0 <= summary["test_acc"] <= 1


def test_compile_auto_compiles_long_gpu_runs_only_and_keeps_graphs_in_the_cifarlab_cache(tmp_path, monkeypatch):
    from cifarlab.train.compiling import COMPILE_AUTO_STEPS, compile_cache, compile_pays
    from cifarlab.train.trainer import Trainer

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read: no GPU needed
    steps = COMPILE_AUTO_STEPS["cuda"]
    assert compile_pays("auto", cuda, steps) and not compile_pays("auto", cuda, steps - 1)
    assert not compile_pays("auto", cpu, 10**9)  # compiled training is slower on our CPU
    assert compile_pays(True, cpu, 1) and not compile_pays(False, cuda, 10**9)
    assert load_config(overrides=["train.compile=auto"]).train.compile == "auto"
    assert load_config(overrides=["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(overrides=["train.compile=sometimes"])
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache() == tmp_path / "cache" / "compile" and compile_cache().is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a user's own choice wins
    assert compile_cache() == tmp_path / "mine"
    overrides = ["data.dataset=synthetic", "data.train_limit=200", "data.val_size=0", "train.batch_size=64",
                 "train.early_stopping.enabled=false", "train.epochs=2"]
    assert not Trainer(load_config(overrides=[*overrides, "train.compile=auto"])).compiling
    assert Trainer(load_config(overrides=[*overrides, "train.compile=true"])).compiling
