import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from cifarlab.demo import choose_demo_data
from helpers import CONSOLE_SCRIPT, invoke


def test_summary_prints_report_000_shapes_and_counts():
    result = invoke("summary", "cnn3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, shape in [("conv1", "32x32x32"), ("pool3", "4x4x128"), ("flatten", "2048"), ("fc1", "512"),
                        ("fc2", "10")]:
        assert any(line.startswith(f"{name} (") and f" {shape} " in line for line in lines), (name, shape)
    assert "Trainable params: 1,147,914" in result.stdout
    assert "Non-trainable params: 448" in result.stdout


def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    result = invoke("train", "train.epochz=3", f"train.out_dir={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config: train.epochz: unknown key, did you mean train.epochs? (allowed: epochs, batch_size, "
        "eval_batch_size, log_every, out_dir, device, channels_last, compile, threads, devices, label_smoothing, tta, "
        "precision, evaluate, test_weights, max_time_s, early_stopping, divergence, target, lookahead, loggers, histogram_every, "
        "mlflow_uri, wandb_mode)"]
    assert not out.exists()
    missing = invoke("train", "data.dataset=cifar10", f"data.root={tmp_path / 'nope'}", f"train.out_dir={out}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"data.root={tmp_path / 'nope'}: no such file or directory" in missing.stderr
    assert not out.exists()


@pytest.mark.slow
def test_train_with_the_console_script_then_eval(tmp_path):
    # the `cifarlab` script that pip installs, in a process of its own, as a user types it (no report.html:
    # the report of a trained run is checked in test_analysis.py, and `make demo` / .ci/wheel-check write one)
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT}: the venv lacks the console script (pip install -e .)"
    result = subprocess.run([str(CONSOLE_SCRIPT), "train", "data.dataset=synthetic", "data.train_limit=600",
                             "train.epochs=2", "model.preset=lab-m1-bn", "analysis.report=false",
                             f"train.out_dir={tmp_path}", "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (run,) = tmp_path.iterdir()
    assert f"run directory: {run}" in result.stdout
    assert "epoch 2  loss" in result.stderr
    for name in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "checkpoints/best.pt",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    evaluated = invoke("eval", run)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"test accuracy {100 * summary['test_acc']:.2f}%" in evaluated.stdout
    assert "class9" in evaluated.stdout
    assert invoke("eval", tmp_path / "nothing").returncode == 2


def test_diverging_training_exits_1(tmp_path):
    result = invoke("train", "data.dataset=synthetic", "data.train_limit=256", "model.preset=lab-m2",
                    "optim.name=sgd", "optim.lr=1e6", f"train.out_dir={tmp_path}", "-q")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: diverged: training loss became nan in epoch 1"


def test_data_show_writes_a_png_grid(cifar10_head, tmp_path):
    png = tmp_path / "grid.png"
    result = invoke("data", "show", "cifar10", "--root", cifar10_head, "-o", png, "-n", "16")
    assert result.returncode == 0, result.stderr
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    info = invoke("data", "info", "cifar10", "--root", cifar10_head)
    assert "train 5170, test 1017" in info.stdout
    stats = invoke("data", "stats", "cifar10", "--root", cifar10_head)
    assert "mean: 0.4938, 0.4849, 0.4484" in stats.stdout


def test_demo_data_choice(cifar10_head):
    overrides, why = choose_demo_data(str(cifar10_head), try_download=False)
    assert overrides == ["data.dataset=cifar10", f"data.root={cifar10_head}"] and "CIFAR-10 found" in why
    overrides, why = choose_demo_data(None, try_download=False)
    expected = "fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "synthetic"
    assert overrides == [f"data.dataset={expected}"]
    assert "because cifar10: not found" in why


def test_the_run_summary_table_has_one_header_line_in_80_columns(small_run, tmp_path, monkeypatch):
    import io

    import cifarlab
    from rich.console import Console

    from cifarlab import cli
    from conftest import copy_run

    run = copy_run(small_run, tmp_path)  # with a long run's wider figures: 100 epochs, 1234.5 s, 12345 img/s
    summary = json.loads((run / "summary.json").read_text())
    summary.update(epochs_run=100, tested_epoch=100, train_time_s=1234.5, train_img_per_s=12345.0)
    (run / "summary.json").write_text(json.dumps(summary))
    printed = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=printed, width=80))
    cli.print_summary(cifarlab.Run(run))
    lines = printed.getvalue().splitlines()
    assert max(len(line) for line in lines[:-1]) <= 80  # the run directory line is as long as its path
    (header,) = [line for line in lines if line.startswith("┃")]  # one line: the header did not wrap
    assert header.split() == ["┃", "epochs", "┃", "train", "┃", "val", "┃", "test", "┃", "time", "┃", "img/s", "┃",
                              "params", "┃"]
    assert "weights: epoch 100) and training time" in printed.getvalue()  # the title names the tested epoch
