import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab import runs
from cifarlab.analysis.embed import separation, tsne
from cifarlab.analysis.figures import FIGURES
from cifarlab.analysis.metrics import confusion_matrix, top_k_accuracy
from cifarlab.api import evaluate_run, predict_files
from cifarlab.evaluation import evaluate
from cifarlab.runs import LoadedRun
from conftest import copy_run
from helpers import invoke

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_confusion_matrix_and_top_k_are_exact():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2, 1])
    assert confusion_matrix(predicted, labels, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 1, 1]]
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    assert top_k_accuracy(scores, np.array([0, 2, 0]), 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, np.array([0, 2, 0]), 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, np.array([0, 2, 0]), 3) == 1.0


def test_tsne_scores_separate_clusters_and_not_noise():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 8, size=(10, 128))
    labels = rng.integers(0, 10, size=800)
    features = centers[labels] + rng.normal(0, 1, size=(800, 128))
    embedding = tsne(features, seed=0)
    assert embedding.shape == (800, 2)
    clustered = separation(embedding, labels)
    shuffled = separation(embedding, rng.permutation(labels))
    assert clustered["knn_acc"] > 0.95 and clustered["silhouette"] > 0.5
    assert shuffled["knn_acc"] < 0.2 and abs(shuffled["silhouette"]) < 0.1


# trained_run (conftest.py): cnn3-avg, 4 epochs on the CIFAR-10 head, flatten and fc1 of 300 test images captured


def test_training_captures_features_and_writes_the_report(trained_run):
    features = trained_run / "features"
    # the default epochs of a 4-epoch run: before the first step, the middle and the last, not every one
    assert sorted(p.name for p in features.glob("*-epoch*[0-9].npy")) == [
        "fc1-epoch000.npy", "fc1-epoch002.npy", "fc1-epoch004.npy",
        "flatten-epoch000.npy", "flatten-epoch002.npy", "flatten-epoch004.npy"]
    flat = np.load(features / "flatten-epoch004.npy")
    assert flat.shape == (300, 2048) and flat.dtype == np.float16
    assert np.load(features / "labels.npy").shape == (300,)
    scores = json.loads((features / "tsne.json").read_text())
    assert {(r["layer"], r["epoch"]) for r in scores} == {(layer, e) for layer in ("flatten", "fc1") for e in (0, 2, 4)}
    assert all(0 <= r["knn_acc"] <= 1 and -1 <= r["silhouette"] <= 1 for r in scores)
    html = (trained_run / "report.html").read_text()
    assert "k-NN accuracy" in html and html.count("data:image/png;base64,") >= 8
    # self-contained and offline: every src/href is inline data (base64 text can contain "http" by chance)
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', html)


def test_eval_reports_confusion_and_top_k(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)  # eval writes eval_test.json
    report = evaluate_run(run, "test", top_k=3)
    matrix = np.array(report["confusion"])
    assert matrix.sum() == report["images"] == 1017
    assert np.trace(matrix) / matrix.sum() == pytest.approx(report["acc"])
    assert report["top3_acc"] >= report["acc"]
    assert report["acc"] == pytest.approx(runs.read_summary(run)["test_acc"])


def test_predict_matches_eval_for_the_same_image(trained_run, tmp_path):
    run = LoadedRun(trained_run)
    images, labels = run.split("test")
    result = evaluate(run.model, run.loader("test"), run.config.train.precision)  # as eval and predict score
    paths = []
    for index in (0, 1, 2):
        path = tmp_path / f"test{index}.png"
        Image.fromarray(images[index].transpose(1, 2, 0)).save(path)
        paths.append(path)
    big = tmp_path / "big.jpg"  # any size is resized; gray would be converted
    Image.fromarray(images[0].transpose(1, 2, 0)).resize((97, 61)).save(big)
    found = predict_files(trained_run, [*paths, big], top_k=3, output=tmp_path / "predict.png")
    probabilities = found["probabilities"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    expected = torch.softmax(result["logits"][:3], dim=1).numpy()
    np.testing.assert_allclose(probabilities[:3], expected, atol=1e-5)
    assert probabilities[:3].argmax(1).tolist() == result["predictions"][:3].tolist()
    with Image.open(tmp_path / "predict.png") as figure:
        assert figure.width > 500 and figure.height > 500


def test_predict_refuses_a_file_that_is_not_an_image(trained_run, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = invoke("predict", trained_run, bad)
    assert result.returncode == 2
    assert f"{bad}: not a readable image" in result.stderr


VIZ_CASES = [
    (["viz", "curves"], "curves.png", (1000, 400)),
    (["viz", "samples", "-n", "16"], "samples_train.png", (800, 300)),
    (["viz", "confusion"], "confusion_test.png", (500, 450)),
    (["viz", "mistakes", "-n", "6"], "mistakes_test.png", (600, 400)),
    (["viz", "featuremaps", "--layers", "2"], "featuremaps_01_conv1.png", (700, 400)),
    (["viz", "filters"], "filters_conv1.png", (600, 300)),
    (["viz", "tsne"], "tsne_fc1.png", (1200, 400)),
    (["viz", "augment"], "augment.png", (800, 500)),
]


def test_every_figures_entry_has_a_viz_case():
    assert set(FIGURES) <= {command[1] for command, _, _ in VIZ_CASES}


@pytest.mark.parametrize("command, png, min_size", VIZ_CASES)
def test_every_figure_command_writes_a_png(trained_run, tmp_path, command, png, min_size):
    run = copy_run(trained_run, tmp_path)
    path = run / "plots" / png
    path.unlink(missing_ok=True)
    result = invoke(*command, run)
    assert result.returncode == 0, result.stderr
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        assert np.asarray(image.convert("L")).std() > 5  # not blank


def test_report_comparison_of_two_runs(trained_run, tmp_path):
    result = invoke("report", trained_run, trained_run, "-o", tmp_path / "c.html")
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "c.html").read_text()
    assert html.count(trained_run.name) >= 2 and html.count("data:image/png;base64,") == 2


@pytest.mark.skipif(not shutil.which("chromium") and not __import__("os").path.exists(CHROMIUM),
                    reason="Debian's chromium is not installed")
def test_report_renders_in_a_browser(trained_run):
    from playwright.sync_api import sync_playwright

    failed = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.on("pageerror", lambda error: failed.append(str(error)))
        page.goto((trained_run / "report.html").as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        header = page.locator("table.sortable th").nth(2)
        header.click()  # sorting runs without errors
        browser.close()
    assert len(images) >= 8
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert failed == []


def test_pca_keeps_the_distances_of_an_exact_projection(trained_run):
    # 300 real flatten features of 2048 dimensions: the Gram route (N < D) and the covariance route (N > D)
    from cifarlab.analysis.embed import pca

    flat = np.load(trained_run / "features" / "flatten-epoch004.npy").astype(np.float64)
    centered = flat - flat.mean(axis=0)
    for x in (centered, centered[:, :200]):
        exact = centered_svd = np.linalg.svd(x, full_matrices=False)
        projected = centered_svd[0][:, :50] * exact[1][:50]
        reduced = pca(x.astype(np.float32), 50)
        assert reduced.shape == (300, 50)
        distances = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
        np.testing.assert_allclose(distances(reduced), distances(projected), rtol=1e-3, atol=1e-3 * distances(projected).max())


def test_tsne_is_sized_to_its_input():
    from cifarlab.analysis.embed import tsne_plan

    assert tsne_plan(1000, 16) == {"method": "bh", "threads": 1}  # FFT's fixed cost dominates below 10,000 points
    assert tsne_plan(9999, 2) == {"method": "bh", "threads": 1}
    assert tsne_plan(40000, 16) == {"method": "fft", "threads": 8}
    assert tsne_plan(40000, 2) == {"method": "fft", "threads": 2}


def test_embeddings_at_once_equal_one_at_a_time_and_an_interruption_stops_them(tmp_path, monkeypatch):
    import threading

    from cifarlab.analysis.embed import concurrent_tsne

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # two cores' worth: two 400-point embeddings at once
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 64)) * 4
    jobs = []
    for index in range(3):
        features = (np.repeat(centers, 100, axis=0) + rng.normal(size=(400, 64))).astype(np.float32)
        np.save(tmp_path / f"f{index}.npy", features)
        jobs.append((index, tmp_path / f"f{index}.npy"))
    before = threading.active_count()
    done = list(concurrent_tsne(jobs, 400, seed=3))
    assert [index for index, _, _ in done] == [0, 1, 2]  # in the jobs' order, whichever finished first
    for index, embedding, seconds in done:
        assert np.array_equal(embedding, tsne(np.load(jobs[index][1]), seed=3)) and isinstance(seconds, float)
    assert threading.active_count() == before

    class Interrupted(Exception):
        pass

    def interrupted_after(found: list) -> None:  # a signal's exception in the caller, as SIGTERM raises it
        for item in concurrent_tsne(jobs, 400, seed=3):
            found.append(item)
            raise Interrupted

    found: list = []
    with pytest.raises(Interrupted):
        interrupted_after(found)
    assert len(found) == 1 and threading.active_count() == before  # the embedding under way stopped and joined
    stop = threading.Event()
    stop.set()
    unfinished = tsne(np.load(jobs[0][1]), seed=3, stop=stop)  # stopped within 25 iterations: not the result
    assert unfinished.shape == (400, 2) and not np.array_equal(unfinished, done[0][1])


def test_cores_follow_omp_num_threads_then_the_affinity_mask(monkeypatch):
    import os
    import subprocess
    import sys

    from cifarlab import processes

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert processes.cores() == 3 and processes.cores_per(2) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert processes.cores() == len(os.sched_getaffinity(0))
    one = sorted(os.sched_getaffinity(0))[:1]  # a process bound to one core (taskset, a Slurm job's binding)
    code = "from cifarlab import processes; print(processes.cores())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, one))
    assert out.stdout.strip() == "1"


def test_the_analysis_phase_is_timed_step_by_step(trained_run):
    summary = runs.read_summary(trained_run)
    analysis = summary["analysis"]
    assert analysis["status"] == "done"
    steps = analysis["steps"]
    assert {"figure curves", "figure featuremaps", "figure filters", "figure tsne", "report.html"} <= set(steps)
    rows = json.loads((trained_run / "features" / "tsne.json").read_text())
    assert len(rows) == 6 and {f"t-SNE {r['layer']} epoch {r['epoch']}" for r in rows} <= set(steps)
    assert all(isinstance(seconds, float) for seconds in steps.values())  # each step's time is recorded
    # wall_time_s is the whole command, analysis included: the phase is recorded beside the training time
    assert isinstance(analysis["seconds"], float) and {"wall_time_s", "train_time_s"} <= set(summary)
    assert {(r["method"], r["cached"]) for r in rows} == {("bh", False)} and all(isinstance(r["seconds"], float) for r in rows)


def test_report_prints_a_line_per_embedding_and_figure(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    for cached in (run / "features").glob("*.tsne.npy"):
        cached.unlink()
    result = invoke("report", run)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("Warning", "warn"))]
    assert "analysis: 6 figures, 6 t-SNE embeddings and report.html" in lines
    embedded = [line for line in lines if line.startswith("t-SNE ")]
    assert [line.split(":")[0] for line in embedded] == [f"t-SNE {i}/6" for i in range(1, 7)]
    first = json.loads((run / "features" / "tsne.json").read_text())[0]
    assert embedded[0].startswith(f"t-SNE 1/6: fc1 epoch {first['epoch']}, 300 points: ")
    assert any(line.startswith("figure featuremaps: ") for line in lines)
    assert any(line.startswith("report.html: ") for line in lines)
    again = invoke("report", run)  # the embeddings are cached now
    assert all("(cached)" in line for line in again.stderr.splitlines() if line.startswith("t-SNE "))
