"""Scores that mean what the reports meant: which weights the test split scores (Keras' rule), the
regularization a flavor adds to reported losses (checked against Keras 3), the latent space of the
untrained network (epoch 0), and the Keras-facing views of a run."""

import json
import os

import numpy as np
import pytest
import torch

import cifarlab
from cifarlab import runs
from cifarlab.analysis.embed import embed_run
from cifarlab.errors import ConfigError
from cifarlab.train.progress import format_epoch
from helpers import invoke

# cnn3 with SGD at a learning rate that makes the validation accuracy jump about (here it peaks at epoch 2
# of 4: [0.16, 0.31, 0.26, 0.27]), so the best epoch and the last differ
BUMPY = {"data.train_limit": 400, "data.test_limit": 200, "data.val_size": 100, "model.preset": "cnn3",
         "optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.9, "train.epochs": 4, "analysis.report": False}


def fit(root, out, **settings):
    return cifarlab.fit(overrides={"data.root": str(root), "train.out_dir": str(out), **BUMPY, **settings},
                        progress=False)


def score_of(run, name: str) -> float:
    """The test accuracy of a checkpoint's weights, read back independently of the run's choice."""
    return runs.LoadedRun(run.path, checkpoint_name=name).evaluate("test").acc


@pytest.fixture(scope="module")
def no_stopping(cifar10_head, tmp_path_factory):
    return fit(cifar10_head, tmp_path_factory.mktemp("last"), **{"train.early_stopping.enabled": False})


def test_without_early_stopping_the_last_weights_are_tested(no_stopping):
    run = no_stopping
    s, val = run.summary, run.metrics["val_acc"]
    assert s["tested_epoch"] == s["epochs_run"] == 4 and s["test_weights"] == "last"
    assert s["best_epoch"] == 1 + val.index(max(val))  # the best monitored epoch, named beside the tested one
    assert s["val_acc"] == pytest.approx(val[-1])  # the summary's scores are the tested epoch's
    assert s["test_acc"] == pytest.approx(score_of(run, "last.pt"))
    if s["best_epoch"] != 4:  # (on this machine: epoch 2) best.pt holds other weights, with another score
        assert s["test_acc"] != pytest.approx(score_of(run, "best.pt"))
    # eval, predict and the model read the tested weights
    result = invoke("eval", run.path)
    assert result.returncode == 0 and "(last.pt, epoch 4)" in result.stdout
    report = json.loads((run.path / "eval_test.json").read_text())
    assert report["acc"] == pytest.approx(s["test_acc"]) and report["epoch"] == 4
    last = runs.load_checkpoint(run.path / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(t, last[k]) for k, t in run.model().state_dict().items())


def test_early_stopping_that_restores_tests_the_best_weights(cifar10_head, tmp_path):
    run = fit(cifar10_head, tmp_path, **{"train.early_stopping.patience": 10})
    s, val = run.summary, run.metrics["val_acc"]
    assert s["best_epoch"] == s["tested_epoch"] == 1 + val.index(max(val)) and s["test_weights"] == "best"
    assert s["test_acc"] == pytest.approx(score_of(run, "best.pt"))
    assert json.loads(json.dumps(cifarlab.evaluate_run(run)))["checkpoint"] == "best.pt"


@pytest.mark.parametrize("settings, tested", [
    ([], "best"),  # early stopping on, restoring: Keras' EarlyStopping(restore_best_weights=True)
    (["train.early_stopping.restore_best=false"], "last"),
    (["train.early_stopping.enabled=false"], "last"),
    (["train.early_stopping.enabled=false", "train.test_weights=best"], "best"),
    (["train.test_weights=last"], "last"),
])
def test_test_weights_follow_keras_rule_unless_chosen(settings, tested):
    assert cifarlab.load_config(None, settings).train.tested_weights() == tested


def test_test_weights_refuses_other_values():
    with pytest.raises(ConfigError, match="train.test_weights"):
        cifarlab.load_config(None, ["train.test_weights=final"])


def test_keras_views_of_a_run(no_stopping):
    metrics = no_stopping.metrics
    assert metrics["epoch"] == [1, 2, 3, 4]
    assert len(metrics["val_acc"]) == 4 and metrics["val_acc"] == [r["val_acc"] for r in no_stopping.history]
    assert set(metrics) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr"}


def test_the_epoch_line_shows_every_scored_split():
    record = {"epoch": 3, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.2, "val_acc": 0.4,
              "test_loss": 1.3, "test_acc": 0.45, "time": {"img_per_s": 100}}
    assert "val_acc 40.00%  test_loss 1.3000  test_acc 45.00%" in format_epoch(record)


def test_tsne_at_epoch_zero_is_the_untrained_network(cifar10_head, tmp_path):
    run = fit(cifar10_head, tmp_path, **{"train.epochs": 2, "analysis.tsne.layers": ["fc1"], "analysis.tsne.samples": 80,
                                         "analysis.tsne.epochs": [0, 2], "analysis.tsne.split": "test"})
    features = run.path / "features"
    assert sorted(p.name for p in features.glob("fc1-*.npy")) == ["fc1-epoch000.npy", "fc1-epoch002.npy"]
    untrained = np.load(features / "fc1-epoch000.npy")
    # the network before its first step: the seed's initial weights, not epoch 1's
    import copy
    fresh = copy.deepcopy(run.model())
    from cifarlab.models.build import build_model
    torch.manual_seed(run.config.seed)
    fresh.load_state_dict(build_model(run.config.model, (3, 32, 32), 10).state_dict())
    loaded = runs.LoadedRun(run.path)
    images, _ = loaded.split("test")
    pick = np.sort(np.random.default_rng(run.config.seed).permutation(len(images))[:80])
    from cifarlab.analysis.capture import capture
    from cifarlab.data.prepare import eval_loader
    expected = capture(fresh, eval_loader((images[pick], np.zeros(80, np.int64)), loaded.splits, run.config,
                                          loaded.device), ["fc1"])["fc1"]
    np.testing.assert_allclose(untrained.astype(np.float32), expected.astype(np.float32), atol=1e-2)
    assert {(r["layer"], r["epoch"]) for r in embed_run(run.path)} == {("fc1", 0), ("fc1", 2)}  # and its embedding
    assert (features / "fc1-epoch000.tsne.npy").is_file()
    with pytest.raises(ConfigError, match=r"analysis.tsne.epochs: epoch 3 is not in 0..2"):
        cifarlab.load_config(None, ["train.epochs=2", "analysis.tsne.epochs=[0, 3]"])


def test_keras_flavor_losses_include_the_l2_penalty_as_keras_does(cifar10_head, tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    l2 = 0.01
    settings = {"defaults": "keras", "optim.l2": l2, "model.preset": None, "model.layers": ["flatten", {"dense": 10}],
                "optim.name": "adam", "optim.lr": 0.001, "train.epochs": 1, "train.early_stopping.enabled": False}
    run = fit(cifar10_head, tmp_path, **settings)
    torch_flavor = fit(cifar10_head, tmp_path, **{**settings, "defaults": "torch"})
    loaded = runs.LoadedRun(run.path)
    images, labels = loaded.split("val")
    x = loaded.normalize(images).reshape(len(images), -1).cpu().numpy()  # torch's flatten order, as the dense sees it
    weights = run.model().state_dict()
    twin = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(l2))])
    twin.layers[0].set_weights([weights["fc1.weight"].numpy().T, weights["fc1.bias"].numpy()])
    twin.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras_val_loss = twin.evaluate(x, labels, verbose=0, batch_size=len(labels))
    data_loss = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, twin.predict(x, verbose=0)))
    assert keras_val_loss > data_loss + 1e-3  # Keras' evaluate() includes the penalty
    assert run.metrics["val_loss"][-1] == pytest.approx(keras_val_loss, rel=1e-4)  # the epoch's val_loss
    assert loaded.evaluate("val").loss == pytest.approx(keras_val_loss, rel=1e-4)  # cifarlab eval
    # the torch flavor reports the data loss for validation
    plain = runs.LoadedRun(torch_flavor.path)
    assert plain.evaluate("val").loss == pytest.approx(
        torch.nn.functional.cross_entropy(plain.evaluate("val").logits.float(),
                                          torch.as_tensor(plain.split("val")[1])).item(), rel=1e-5)


def test_the_notebook_display_shows_the_analysis_lines(monkeypatch):
    import logging

    from cifarlab.train.progress import NotebookProgress

    shown = NotebookProgress()
    monkeypatch.setattr(shown, "show", lambda: None)  # no IPython display here: the lines are what it would show
    shown.on_fit_end(None, {"stop_reason": "max epochs", "test_acc": 0.5, "tested_epoch": 3, "test_weights": "last"})
    logging.getLogger("cifarlab.analysis.embed").info("t-SNE %d/%d: fc1 epoch 0", 1, 3)
    shown.close()
    logging.getLogger("cifarlab.analysis.embed").info("after the run")
    assert shown.lines == ["max epochs: test accuracy 50.00% (epoch 3's weights: last)", "t-SNE 1/3: fc1 epoch 0"]
    assert not logging.getLogger("cifarlab.analysis").handlers
