"""A study as the deliverable of a write-up: every setting kept, the report's numbers beside ours,
tables (md, csv, LaTeX) and figures (PNG and PDF), and a plan that is checked before any run."""

import csv
from pathlib import Path

import pytest

import cifarlab
import cifarlab.experiments
from cifarlab.analysis.plots import line_styles, value_axis
from cifarlab.errors import ConfigError
from cifarlab.studies.results import latex_text
from cifarlab.studies.spec import PlanError, check_plan, load_study
from helpers import invoke

REPO = Path(__file__).resolve().parent.parent

DISJOINT = """
name: disjoint
base:
  data: {{root: {root}, train_limit: 400, test_limit: 200}}
  model: {{preset: lab-m1}}
  train: {{epochs: 1, log_every: 5}}
  analysis: {{report: false}}
axes:
  train.batch_size: [32, 64]
variants:
  - {{name: sgd-momentum, set: {{optim.name: sgd, optim.momentum: 0.9}}}}
  - {{name: l2, set: {{optim.l2: 0.001}}}}
  - {{name: plain, set: {{}}}}
reference:
  source: "made up for the test"
  scale: {{train_images: 45000, epochs: 30}}
  rows:
    l2: {{test_acc: 50.0, train_acc: 60.5}}
    "plain, train.batch_size=64": {{test_acc: 40.0}}
"""


def table_of(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_variants_that_set_disjoint_keys_keep_every_setting(cifar10_head, tmp_path, monkeypatch):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(DISJOINT.format(root=cifar10_head))
    lines = []
    result = cifarlab.run_study(study_file, out=tmp_path / "out", on_run=lambda i, what: lines.append(i))
    assert set(result.outcome.values()) == {"completed"} and sorted(lines) == sorted(result.outcome)
    rows = table_of(tmp_path / "out" / "results.csv")
    assert len(rows) == 6
    # a column for every key any variant or axis sets, with the value each run used
    used = {(r["variant"], r["train.batch_size"]): (r["optim.name"], r["optim.momentum"], r["optim.l2"]) for r in rows}
    assert used[("sgd-momentum", "32")] == ("sgd", "0.9", "0.0")
    assert used[("l2", "64")] == ("adam", "0.0", "0.001")
    assert used[("plain", "32")] == ("adam", "0.0", "0.0")
    # the report's numbers by variant, or by the exact row; the difference in points; reduced scale
    by_label = {r["label"]: r for r in rows}
    for label in ("l2, train.batch_size=32", "l2, train.batch_size=64"):
        assert float(by_label[label]["ref_test_acc"]) == 50.0
        assert float(by_label[label]["diff_test_acc"]) == pytest.approx(100 * float(by_label[label]["test_acc"]) - 50,
                                                                         abs=1e-3)
    assert float(by_label["plain, train.batch_size=64"]["ref_test_acc"]) == 40.0
    assert by_label["plain, train.batch_size=32"]["ref_test_acc"] == ""
    assert all("360 training images (report: 45000)" in r["reduced"] for r in rows)
    markdown = (tmp_path / "out" / "results.md").read_text()
    header = markdown.splitlines()[4]
    assert "test % (report)" in header and "Δ test" in header and "train % (report)" in header
    assert "val % (report)" not in header
    assert "optim.l2" in header and "train.batch_size" in header and "data.root" not in header
    assert "† every row: reduced scale (360 training images (report: 45000); at most 1 epochs (report: 30))" in markdown
    latex = (tmp_path / "out" / "results.tex").read_text()
    assert r"\toprule" in latex and r"\midrule" in latex and r"$\Delta$ test" in latex and "optim.l2" in latex
    assert latex.count(r" \\") == len(rows) + 1
    for figure in ("curves", "test_acc"):
        for suffix in (".png", ".pdf"):
            assert (tmp_path / "out" / "plots" / f"{figure}{suffix}").stat().st_size > 5000
    assert (tmp_path / "out" / "plots" / "curves.pdf").read_bytes().startswith(b"%PDF")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "made up for the test" in html and "test % (report)" in html and "45000" in html

    # the tables again, from the folder alone
    (tmp_path / "out" / "results.tex").unlink()
    again = invoke("study", "export", study_file, "--out", tmp_path / "out", "--format", "latex")
    assert again.returncode == 0 and (tmp_path / "out" / "results.tex").read_text() == latex

    # a summary that fails loses nothing: one line that says how to write the tables again, no run redone
    def broken(study, out):
        raise KeyError("data.root")

    monkeypatch.setattr(cifarlab.experiments, "summarize_study", broken)
    with pytest.raises(cifarlab.CifarlabError) as failed:
        cifarlab.run_study(study_file, out=tmp_path / "out", on_run=lambda i, what: lines.append(what))
    assert f"every run finished, but the tables failed (KeyError: 'data.root'); write them again, without training, " \
           f"with: cifarlab study export {study_file} --out {tmp_path / 'out'}" in str(failed.value)
    assert lines[-6:] == ["skipped (completed before)"] * 6


def test_a_run_that_cannot_run_stops_the_study_before_any_folder(cifar10_head, tmp_path):
    study_file = tmp_path / "study.yaml"
    bad_variants = ("  - {name: plain, set: {}}\n  - {name: too-few, set: {data.train_limit: 50, data.val_size: 60}}\n"
                    "  - {name: no-layer, set: {analysis.tsne.layers: [conv9]}}")
    study_file.write_text(DISJOINT.format(root=cifar10_head).replace("  - {name: plain, set: {}}", bad_variants))
    result = invoke("sweep", study_file, "--out", tmp_path / "out")
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 4  # two batch sizes each
    assert errors[0] == ("error: too-few_train.batch_size-32_seed0: data.val_size=60.0 leaves no training images "
                         "out of 50")
    assert errors[2].startswith("error: no-layer_train.batch_size-32_seed0: analysis.tsne.layers: layer 'conv9' "
                                "is not in the model")
    assert not (tmp_path / "out").exists()
    dry = invoke("sweep", study_file, "--out", tmp_path / "out", "--dry-run")
    assert dry.returncode == 2 and dry.stderr == result.stderr and "disjoint: 10 runs into" in dry.stdout
    # --skip leaves the bad variants out; --only keeps one; an unknown name is an error
    assert invoke("sweep", study_file, "--dry-run", "--skip", "too-few,no-layer", "--out", tmp_path / "o").returncode == 0
    only = load_study(study_file, only=["l2"])
    assert {r.variant for r in only.runs} == {"l2"}
    check_plan(only)
    with pytest.raises(PlanError) as bad:
        check_plan(load_study(study_file, only=["too-few"]))
    assert len(bad.value.problems) == 2
    with pytest.raises(ConfigError, match="--only nope: no such variant"):
        load_study(study_file, only=["nope"])


def test_reference_blocks_are_checked_and_every_shipped_study_has_one():
    for path in sorted((REPO / "configs" / "studies").glob("*.yaml")):
        study = load_study(path, ["data.dataset=synthetic"])
        assert study.reference.source, path
        assert set(study.reference.rows) <= {r.variant for r in study.runs} | {r.label for r in study.runs}, path
    report = load_study(REPO / "configs" / "studies" / "report-001.yaml", ["data.dataset=synthetic"])
    assert report.reference.rows["final"] == {"train_acc": 89.60, "val_acc": 83.37, "test_acc": 83.00,
                                              "best_epoch": 28, "time_s": 630}


@pytest.mark.parametrize("block, message", [
    ("reference: {rows: {nope: {test_acc: 1}}}", "reference.rows.nope: no such variant"),
    ("reference: {rows: {a: {test_acc: high}}}", "reference.rows.a.test_acc: 'high'"),
    ("reference: {rows: {a: {accuracy: 1}}}", "reference.rows.a.accuracy"),
    ("reference: {scale: {images: 10}}", "reference.scale takes train_images, epochs"),
    ("reference: {table: 1}", "reference is {source, scale, rows, notes}"),
])
def test_a_bad_reference_names_its_key(tmp_path, block, message):
    path = tmp_path / "study.yaml"
    path.write_text("base: {data: {dataset: synthetic}}\nvariants:\n  - {name: a, set: {}}\n" + block + "\n")
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")):
        load_study(path)


def test_a_study_file_given_to_train_names_the_command_that_runs_it():
    result = invoke("train", "-c", REPO / "configs" / "studies" / "report-000.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("a study file, not a run's config: run it with `cifarlab sweep "
                                          f"{REPO / 'configs' / 'studies' / 'report-000.yaml'}`")
    tune = invoke("train", "-c", REPO / "configs" / "tune" / "cnn3.yaml")
    assert "run it with `cifarlab tune" in tune.stderr


def test_line_styles_stay_apart_for_many_rows_and_crossings():
    many = line_styles([f"v{i}" for i in range(24)], [None] * 24)
    assert len(set(many)) == 24
    crossed = line_styles(["a", "a", "a", "b", "b", "b"], ["m1", "m2", "m3", "m1", "m2", "m3"])
    assert len(set(crossed)) == 6 and crossed[0][0] == crossed[1][0] and crossed[0][1] != crossed[1][1]
    assert crossed[0][1] == crossed[3][1] and crossed[0][0] != crossed[3][0]


def test_latex_cells_are_escaped():
    assert latex_text("bn+no_dropout 50% & #1 {x} Δ †") == (r"bn+no\_dropout 50\% \& \#1 \{x\} $\Delta$ $^\dagger$")


def test_bar_chart_axis_zooms_on_close_bars_and_starts_at_zero_otherwise():
    # configs/studies/fmnist-fast-ablation.yaml's means and stds: on a 0-100 axis all six bars looked the same
    means, stds = [94.17, 93.67, 94.32, 94.02, 94.01, 93.96], [0.10, 0.15, 0.21, 0.16, 0.10, 0.08]
    bottom, top, decimals = value_axis(means, stds, [94.17, None, None, None, None, None])
    assert bottom == 93.0 and 94.53 < top < 94.9 and decimals == 2  # 94.02 and 94.01 are told apart
    # rows that differ by more than a quarter of the highest (an optimizer that fails beside ones that learn) keep 0
    assert value_axis([55.0, 28.0, 61.0], [1.0, 2.0, 0.5], [None] * 3) == (0.0, 61.5, 1)
    assert value_axis([10.2, 10.1], [0, 0], [None, 12.0])[0] == 9.0  # the report's mark stays in view
