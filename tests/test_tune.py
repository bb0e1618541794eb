"""Hyperparameter search on Optuna: two worker processes on one SQLite file, a real PostgreSQL
server started from Debian's package on 127.0.0.1, pruning, the results and best.yaml."""

import csv
from pathlib import Path

import pytest

import cifarlab
from cifarlab import runs
from cifarlab.errors import ConfigError
from cifarlab.studies.spec import load_study
from cifarlab.studies.tune import check_search, tune_settings
from helpers import assert_error, free_port, invoke

optuna = pytest.importorskip("optuna")

SEARCH = """
name: search
base:
  data: {{root: {root}, train_limit: 600, test_limit: 200}}
  model: {{preset: lab-m1}}
  optim: {{name: adam}}
  train: {{epochs: {epochs}, log_every: 5}}
  analysis: {{report: false}}
search:
  optim.lr: {{float: [3.0e-4, 3.0e-3], log: true}}
  train.batch_size: {{choice: [32, 64]}}
tune: {tune}
"""


def write_search(folder: Path, root: Path, epochs: int = 1, tune: str = "{sampler: random}") -> Path:
    path = folder / "search.yaml"
    path.write_text(SEARCH.format(root=root, epochs=epochs, tune=tune))
    return path


def rows(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def check_trials(out: Path, storage: str, count: int) -> list:
    # a surplus trial (two workers asked for the last place at the same moment) is closed at once, never trained
    trials = [t for t in optuna.load_study(study_name="search", storage=storage).trials if not t.user_attrs.get("surplus")]
    assert len(trials) == count
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:  # each trial is an ordinary completed run with the sampled settings
        config = runs.read_run_config(out / f"trial-{t.number:04d}")
        assert runs.read_summary(out / f"trial-{t.number:04d}")["val_acc"] == t.value
        assert config.optim.lr == t.params["optim.lr"] and config.train.batch_size == t.params["train.batch_size"]
    assert len(rows(out)) == count
    return trials


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(cifar10_head, tmp_path):
    out = tmp_path / "out"
    result = invoke("tune", write_search(tmp_path, cifar10_head), "--trials", "4", "--workers", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    trials = check_trials(out, f"sqlite:///{out / 'optuna.db'}", 4)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both processes ran trials
    best = max(trials, key=lambda t: t.value)
    assert f"best: trial {best.number}, {best.value:.4f}" in result.stdout
    config = cifarlab.load_config(out / "best.yaml")
    assert config.optim.lr == best.params["optim.lr"] and config.data.train_limit == 600 and config.train.threads is None
    html = (out / "report.html").read_text()
    assert "4 trials" in html and html.count("data:image/png;base64,") == 2  # history and importances


def test_pruning_stops_a_bad_trial_early(cifar10_head, tmp_path):
    # two good trials first, then one that cannot learn (lr 1e-9): the median rule stops it after epoch 1
    tune = ("{sampler: random, pruner: median, startup_trials: 2, warmup_epochs: 0, trials: 3, enqueue: ["
            "{optim.lr: 0.002, train.batch_size: 32}, {optim.lr: 0.003, train.batch_size: 32}, "
            "{optim.lr: 1.0e-9, train.batch_size: 32}]}")
    path = write_search(tmp_path, cifar10_head, epochs=3, tune=tune)
    text = path.read_text().replace("[3.0e-4, 3.0e-3]", "[1.0e-9, 3.0e-3]")
    path.write_text(text)
    result = cifarlab.tune(path, out=tmp_path / "out")
    assert result.counts == {"complete": 2, "pruned": 1}
    bad = runs.read_summary(tmp_path / "out" / "trial-0002")
    assert bad["epochs_run"] == 1 and bad["stop_reason"] == "pruned by optuna at epoch 1"
    good = runs.read_summary(tmp_path / "out" / "trial-0000")
    assert good["epochs_run"] == 3
    table = {r["variant"]: r for r in rows(tmp_path / "out")}
    assert table["trial 2"]["status"] == "pruned at epoch 1" and table["trial 0"]["status"] == "completed"
    assert result.best_trial in (0, 1) and result.best_params["optim.lr"] in (0.002, 0.003)


def test_search_mistakes_name_the_key(cifar10_head, tmp_path):
    path = write_search(tmp_path, cifar10_head)
    for old, new, message in [
        ("optim.lr: {float:", "optim.lrr: {float:", "lrr"),
        ("{choice: [32, 64]}", "{choices: [32, 64]}", "search.train.batch_size must be"),
        ("[3.0e-4, 3.0e-3]", "[3.0e-3, 3.0e-4]", "low < high"),
        ("{sampler: random}", "{metric: test_acc}", "the test split never chooses"),
        ("{sampler: random}", "{sampler: grid}", "tune.sampler is 'grid'"),
        ("{sampler: random}", "{heartbeat: 0}", "tune.heartbeat must be an integer >= 1, got 0"),
    ]:
        path.write_text(SEARCH.format(root=cifar10_head, epochs=1, tune="{sampler: random}").replace(old, new))
        study = load_study(path)
        with pytest.raises(ConfigError, match=message):
            tune_settings(study)
            check_search(study)
        result = invoke("tune", path, "--out", tmp_path / "x")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "x" / "trial-0000").exists()


@pytest.mark.slow
def test_two_workers_share_a_study_on_postgresql(postgres, cifar10_head, tmp_path):
    out = tmp_path / "out"
    result = invoke("tune", write_search(tmp_path, cifar10_head), "--trials", "3", "--workers", "2",
                    "--storage", postgres, "--out", out)
    assert result.returncode == 0, result.stderr
    assert not (out / "optuna.db").exists()  # nothing went to SQLite
    trials = check_trials(out, postgres, 3)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    # a third client joins the same search later and adds trials to it
    more = invoke("tune", tmp_path / "search.yaml", "--trials", "4", "--storage", postgres, "--out", out)
    assert more.returncode == 0, more.stderr
    check_trials(out, postgres, 4)


def test_an_unreachable_storage_is_one_line(cifar10_head, tmp_path):
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    result = invoke("tune", write_search(tmp_path, cifar10_head), "--storage", url, "--out", tmp_path / "out")
    assert result.returncode == 2 and "cannot open the Optuna storage" in result.stderr and url in result.stderr


@pytest.mark.slow
def test_trial_workers_as_tasks_of_a_local_dask_cluster(cifar10_head, tmp_path):
    out = tmp_path / "out"
    result = invoke("tune", write_search(tmp_path, cifar10_head), "--executor", "dask", "--workers", "2",
                    "--trials", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    trials = check_trials(out, f"sqlite:///{out / 'optuna.db'}", 3)
    # trained by the worker processes Dask placed (one may take every trial when the other starts late), none here
    assert {t.user_attrs["worker"] for t in trials} <= {1, 2}
    for index in (1, 2):
        assert f"--worker-index {index}" in (out / "logs" / f"worker-{index}.log").read_text()


def test_search_workers_on_other_machines_need_a_storage_server(cifar10_head, tmp_path):
    path, out = write_search(tmp_path, cifar10_head), tmp_path / "out"
    for args, fragment in [(["--executor", "slurm"], "--executor slurm: trial workers on other machines share the "
                            "search through a database server; give --storage postgresql://"),
                           (["--address", "tcp://127.0.0.1:1"], "--executor dask: trial workers on other machines"),
                           (["--executor", "slurm", "--storage", f"sqlite:///{tmp_path / 'x.db'}"], "not sqlite:///"),
                           (["--executor", "ray"], "unknown executor 'ray' (choose from: local, dask, slurm)"),
                           (["--executor", "local", "--address", "tcp://127.0.0.1:1"], "need --executor dask")]:
        assert_error(invoke("tune", path, *args, "--out", out), 2, fragment)
        assert not out.exists()
