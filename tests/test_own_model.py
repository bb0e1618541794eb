"""Your own nn.Module: report 003's ONModelDrop1 (examples/own_model.py) trained through
`cifarlab train model.module=...` and through `cifarlab.fit(model=...)`; every command that takes a
run rebuilds it in a new process; resume is bit-exact; t-SNE, summaries and studies address its
modules by name; the checks a preset gets (output shape, imports) are one-line errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cifarlab
from cifarlab import runs
from cifarlab.errors import ConfigError
from helpers import assert_error, invoke

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "own_model.py"
MODULE = f"{EXAMPLE}:ONModelDrop1"


def small(root, out, **extra) -> list[str]:
    settings = {"data.root": root, "data.train_limit": 320, "data.test_limit": 96, "data.val_size": 64,
                "train.batch_size": 64, "augment.preset": "crop-flip", "optim.name": "sgd", "optim.lr": 0.01,
                "optim.momentum": 0.9, "train.out_dir": out, "analysis.report": "false", **extra}
    return [f"{key}={value}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def cli_runs(cifar10_head, tmp_path_factory):
    """ONModelDrop1 from its file through `cifarlab train`: two epochs in one go, and one epoch that
    a new process then resumes to two."""
    out = tmp_path_factory.mktemp("own")
    made = {}
    for name, epochs in (("whole", 2), ("half", 1)):
        result = invoke("train", "--quiet", f"model.module={MODULE}", "model.args={p: 0.5}", f"name={name}",
                        f"train.epochs={epochs}", *small(cifar10_head, out))
        assert result.returncode == 0, result.stderr[-2000:]
        made[name] = next(out.glob(f"{name}-*"))
    return made


def test_cli_trains_the_module_and_records_it(cli_runs):
    run = cli_runs["whole"]
    config = runs.read_run_config(run)
    assert config.model.module == MODULE and config.model.args == {"p": 0.5} and config.model.preset is None
    summary = runs.read_summary(run)
    assert summary["status"] == "completed" and summary["model"] == "ONModelDrop1"
    assert summary["params"]["trainable"] == 534_378  # the report's layers (fc1 256 -> 512)
    checkpoint = runs.load_checkpoint(run / "checkpoints" / "best.pt")
    assert checkpoint["config"]["model"]["module"] == MODULE and "conv5.weight" in checkpoint["model"]


@pytest.mark.slow
def test_every_command_rebuilds_the_module_in_a_new_process(cli_runs, cifar10_head, tmp_path):
    run, half = cli_runs["whole"], cli_runs["half"]
    image = tmp_path / "frog.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    # one new process (the class was never imported there) runs every command that reads a run
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from cifarlab.cli import app
        assert not any("own_model" in name for name in sys.modules)
        for args in (["eval", {str(run)!r}], ["predict", {str(run)!r}, {str(image)!r}],
                     ["viz", "featuremaps", {str(run)!r}], ["report", {str(run)!r}],
                     ["export", {str(run)!r}, "--format", "onnx"],
                     ["train", "--quiet", "--resume", {str(half)!r}, "train.epochs=2"]):
            result = CliRunner().invoke(app, args)
            print(args[0], result.exit_code, result.output[-300:].replace("\\n", " | "))
            assert result.exit_code == 0, (args, result.output, result.exception)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evaluation = json.loads((run / "eval_test.json").read_text())
    assert evaluation["images"] == 96 and evaluation["acc"] == pytest.approx(runs.read_summary(run)["test_acc"])
    assert (run / "report.html").is_file() and list((run / "plots").glob("featuremaps*.png"))
    # the ONNX graph gives the probabilities Run.predict gives (this process imports the class anew)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = cifarlab.load_run(run).as_batch(np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), np.uint8))
    expected = cifarlab.load_run(run).predict(images)
    got = session.run(None, {session.get_inputs()[0].name: images.transpose(0, 2, 3, 1)})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # resumed from epoch 1 in that process: bit-exact with the run that trained both epochs at once
    whole = runs.load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    resumed = runs.load_checkpoint(half / "checkpoints" / "last.pt")["model"]
    assert runs.read_summary(half)["epochs_run"] == 2
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_fit_takes_a_module_and_everything_works_in_the_same_process(cifar10_head, tmp_path):
    class Net(nn.Module):  # defined in a function: cannot be imported again, so recorded as model.given
        def __init__(self, num_classes):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4))
            self.head = nn.Linear(8 * 8 * 8, num_classes)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

    settings = dict(s.split("=", 1) for s in small(cifar10_head, tmp_path / "runs"))
    settings.update({"train.epochs": 2, "analysis.tsne.layers": ["features.2", "head"], "analysis.tsne.samples": 64,
                     "analysis.tsne.epochs": [2], "name": "net"})
    net = Net(10)
    run = cifarlab.fit(overrides=settings, model=net, progress=False)
    assert run.config.model.given.endswith("Net") and run.config.model.module is None
    # t-SNE capture of a named submodule: the ReLU inside `features` (8 x 32 x 32 per image)
    features = np.load(run / "features" / "features.2-epoch002.npy")
    assert features.shape == (64, 8 * 32 * 32) and np.load(run / "features" / "head-epoch002.npy").shape == (64, 10)
    # the run's Python object knows the model: predict, evaluate, figures, report, export, resume
    assert run.predict(np.zeros((3, 32, 32, 3), np.uint8)).shape == (3, 10)
    assert run.evaluate()["acc"] == pytest.approx(run.summary["test_acc"])
    assert run.figure("featuremaps") and run.report().is_file()
    assert cifarlab.export_run(run, "onnx").is_file()
    # the trained instance keeps its own (final) weights; the run's model is a copy with best.pt's
    assert run.model() is not net
    # elsewhere the run needs the model again, and says so in one line
    with pytest.raises(ConfigError, match=r"passed in Python \(an instance of .*Net\).*load_run\(run, model=\.\.\.\)"):
        cifarlab.load_run(run.path).model()
    again = cifarlab.load_run(run.path, model=Net(10))
    assert again.evaluate()["acc"] == pytest.approx(run.summary["test_acc"])
    resumed = cifarlab.resume(again, {"train.epochs": 3}, progress=False)
    assert resumed.summary["epochs_run"] == 3 and resumed.summary["status"] == "completed"


def test_a_factory_is_called_with_input_shape_and_classes(cifar10_head, tmp_path):
    seen = []

    def make(input_shape, classes):
        seen.append((input_shape, classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), classes))

    overrides = dict(s.split("=", 1) for s in small(cifar10_head, tmp_path / "runs"))
    run = cifarlab.fit(overrides={**overrides, "train.epochs": 1, "name": "lin"}, model=make, progress=False)
    assert seen[-1] == ((3, 32, 32), 10) and run.summary["status"] == "completed"
    assert "make" in run.config.model.given  # a local function: recorded, not importable


def test_module_errors_are_one_line_before_any_folder(cifar10_head, tmp_path):
    (tmp_path / "nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        def five(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
        def broken():
            return nn.Sequential(nn.Flatten(), nn.Linear(7, 10))
        raise_on = None
    """))
    out = tmp_path / "runs"
    base = ["train", f"train.out_dir={out}", f"data.root={cifar10_head}", "data.train_limit=64"]
    cases = [(f"model.module={tmp_path / 'nets.py'}:five", "outputs (2, 5)", "must output (2, 10)"),
             (f"model.module={tmp_path / 'nets.py'}:broken", "a forward pass of images (3, 32, 32) failed", "RuntimeError"),
             (f"model.module={tmp_path / 'nets.py'}:nope", "has no 'nope'"),
             (f"model.module={tmp_path / 'missing.py'}:Net", "missing.py: file not found"),
             ("model.module=no_such_package_xyz:Net", "no module named 'no_such_package_xyz'"),
             ("model.module=not a reference", "use 'package.module:Factory'"),
             (f"model.module={tmp_path / 'nets.py'}:raise_on", "raise_on is a NoneType"),
             ("model.args={p: 1}", "model.args", "give model.module too"),
             (f"model.module={tmp_path / 'nets.py'}:five", "model.preset=cnn4", "give one of model.preset")]
    for override, *fragments in cases:
        extra = [f for f in fragments if "=" in f and not f.startswith("outputs")]
        result = invoke(*base, override, *extra)
        assert_error(result, 2, *[f for f in fragments if f not in extra])
    assert not out.exists() or not any(out.iterdir())


def test_summary_of_an_own_module_follows_keras(capsys):
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        table = cifarlab.summary(MODULE)
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    lines = str(table).splitlines()
    assert lines[0] == "ONModelDrop1 for cifar10 (3x32x32, 10 classes)"
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
            ("conv1", "pool1", "conv5", "fc1", "out1", "activation", "drop2")}
    assert rows["conv1"][2] == "30x30x32" and rows["pool1"][2] == "14x14x32" and rows["conv5"][2] == "3x3x256"
    assert rows["activation"][2] == "multiple"  # one ReLU module called after every layer, as Keras says
    assert rows["fc1"][-1] == "131,584" and "Total params: 534,378" in lines
    assert repr(table) == str(table)  # a notebook cell shows the table, not a quoted string
    result = invoke("summary", MODULE)
    assert result.returncode == 0 and "multiple" in result.stdout


@pytest.mark.slow
def test_a_study_compares_an_own_module_with_a_preset(cifar10_head, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(textwrap.dedent(f"""
        name: mine
        reference: {{source: "none"}}
        base:
          model: {{preset: cnn3, dropout: 0.1}}
          data: {{root: {cifar10_head}, train_limit: 256, test_limit: 64, val_size: 64}}
          train: {{epochs: 1, out_dir: {tmp_path / 'runs'}}}
          analysis: {{report: false}}
        variants:
          - {{name: mine, set: {{model.module: "{MODULE}", model.args: {{p: 0.2}}}}}}
          - {{name: preset, set: {{}}}}
    """))
    result = invoke("sweep", study, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "out" / "results.csv").read_text().splitlines()
    header = table[0].split(",")
    assert "model.module" in header and len(table) == 3
    rows = [dict(zip(header, line.split(","))) for line in table[1:]]
    assert {r["variant"] for r in rows} == {"mine", "preset"}
    assert all(r["status"] == "completed" for r in rows)


def test_what_a_script_passes_is_recorded_only_when_importing_it_runs_nothing(tmp_path):
    from cifarlab.models.own import import_file, reference_of

    (tmp_path / "blocks.py").write_text("from torch import nn\ndef block():\n    return nn.Linear(3 * 32 * 32, 10)\n")
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from torch import nn\nfrom blocks import block\n\nclass Net(nn.Module):\n"
                       "    def __init__(self):\n        super().__init__()\n        self.fc = block()\n"
                       "    def forward(self, x):\n        return self.fc(x.flatten(1))\n\n"
                       "if __name__ == '__main__':\n    print('training')\n")
    unguarded = tmp_path / "unguarded.py"
    unguarded.write_text(guarded.read_text().replace("if __name__ == '__main__':\n    print('training')\n",
                                                     "print('training at import')\n"))
    # a sibling module imports as under `python guarded.py`
    net = import_file(guarded).Net
    assert reference_of(net) == f"{guarded.resolve()}:Net"
    assert reference_of(import_file(unguarded).Net) is None  # importing it again would train again: model.given


def test_a_study_switches_between_an_own_module_and_presets(tmp_path):
    from cifarlab.studies.spec import config_with

    base = {"model": {"module": MODULE, "args": {"p": 0.2}}}
    assert config_with(base, {"model.preset": "cnn4"}, None, "study").model.preset == "cnn4"
    with_preset = {"model": {"preset": "cnn3", "dropout": 0.3}}
    mine = config_with(with_preset, {"model.module": MODULE, "model.args": {"p": 0.5}}, None, "study").model
    assert mine.module == MODULE and mine.args == {"p": 0.5} and mine.preset is None
    assert config_with(with_preset, {"model.preset": "cnn3-fast"}, None, "study").model.params() == {"dropout": 0.3}


def test_own_models_on_coarse_cifar100_have_20_classes():
    from cifarlab.data.sources import known_shape

    config = cifarlab.load_config(None, ["data.dataset=cifar100", "data.labels=coarse"])
    assert known_shape(config.data) == ((3, 32, 32), 20)
    assert known_shape(cifarlab.load_config(None, ["data.dataset=folder", "data.root=x"]).data) is None
