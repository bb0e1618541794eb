"""report.html of a run (its figures inlined: opens from disk, offline) and a comparison page of
several runs. This module renders HTML only; the figures come from analysis/figures.py."""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import yaml

from .. import runs
from ..evaluation import Evaluation
from ..files import atomic_write
from ..hooks import Callback, TrainerView
from ..models.summary import summarize
from .embed import feature_files
from .figures import FIGURES
from .metrics import per_class_accuracy

log = logging.getLogger(__name__)  # cifarlab.analysis.*: the analysis phase's progress lines


def inline(path: Path) -> str:
    """A PNG as base64 for a data: URL, so the HTML needs no other file."""
    return base64.b64encode(Path(path).read_bytes()).decode()


def render_html(template: str, path: Path, **context: Any) -> Path:
    """Render a template from analysis/templates to `path` (atomically)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("cifarlab", "analysis/templates"),
                             autoescape=jinja2.select_autoescape(["html"]))
    return atomic_write(Path(path), env.get_template(template).render(**context))


def report_options(view: runs.LoadedRun) -> dict[str, Optional[dict[str, Any]]]:
    """Which registered figures the report draws, with what options (None: left out)."""
    analysis = view.config.analysis
    chosen: dict[str, Optional[dict[str, Any]]] = {name: {} for name, figure in FIGURES.items() if figure.report}
    if "featuremaps" in chosen:
        chosen["featuremaps"] = {"layers": analysis.featuremaps} if analysis.featuremaps else None
    if "tsne" in chosen and not (feature_files(view.path) and analysis.tsne.embed):
        chosen["tsne"] = None
    return chosen


def timed(name: str, timings: dict[str, float], work: Any) -> Any:
    """`work()`, its seconds kept in `timings[name]` and logged as a progress line."""
    started = time.perf_counter()
    result = work()
    timings[name] = round(time.perf_counter() - started, 3)
    log.info("%s: %.1f s", name, timings[name])
    return result


def build_run_report(run: Union[Path, runs.LoadedRun], output: Optional[Path] = None,
                     known: Optional[dict[str, Evaluation]] = None,
                     timings: Optional[dict[str, float]] = None) -> Path:
    """Draw a run's figures and write report.html, logging a line as each figure (each t-SNE embedding)
    is done. `known`: splits already scored with the tested weights (training passes its test score, so
    the test split is not scored again); `timings`: filled with the seconds of each step as it ends
    ("figure NAME", "t-SNE LAYER epoch N", "report.html")."""
    timings = {} if timings is None else timings
    view = run if isinstance(run, runs.LoadedRun) else runs.LoadedRun(run, known=known)
    chosen = {name: options for name, options in report_options(view).items() if options is not None}
    embeddings = sum(len(epochs) for epochs in feature_files(view.path).values()) if "tsne" in chosen else 0
    log.info("analysis: %d figures%s and report.html", len(chosen),
             f", {embeddings} t-SNE embeddings" if embeddings else "")
    drawn = {name: timed(f"figure {name}", timings, lambda name=name, options=options: FIGURES[name].draw(view, **options))
             for name, options in chosen.items()}
    found = view.predictions("test")
    classes = view.summary["classes"]
    per_class = per_class_accuracy(found["predicted"], found["labels"], len(classes))
    counts = np.bincount(found["labels"], minlength=len(classes))
    tsne_rows = json.loads((view.path / "features" / "tsne.json").read_text()) if "tsne" in drawn else []
    timings.update({f"t-SNE {r['layer']} epoch {r['epoch']}": r["seconds"] for r in tsne_rows if "seconds" in r})
    sections = {"featuremaps": "featuremaps_", "filters": "filters_"}
    return timed("report.html", timings, lambda: render_html(
        "run.html", output or view.path / "report.html", run=view.path.name, summary=view.summary,
        config_text=yaml.safe_dump(view.config.to_dict(), sort_keys=False),
        figures=[{"title": FIGURES[name].title, "data": inline(paths[0])} for name, paths in drawn.items()
                 if name not in (*sections, "tsne")],
        per_class=[{"name": name, "acc": acc, "count": int(n)} for name, acc, n in zip(classes, per_class, counts)],
        layers=summarize(view.model, view.input_shape),
        **{name: [{"title": p.stem.replace(prefix, ""), "data": inline(p)} for p in drawn.get(name, [])]
           for name, prefix in sections.items()},
        tsne_rows=tsne_rows,
        tsne_panels=[{"title": p.stem.removeprefix("tsne_"), "data": inline(p)} for p in drawn.get("tsne", [])
                     if "_epoch" not in p.stem],
        env=json.loads((view.path / runs.ENV).read_text())))


class ReportCallback(Callback):
    """A training callback: report.html (and the t-SNE embeddings) when the run ends, from the test score
    training computed. A failing figure never costs the trained run: the trainer records the analysis
    as failed in summary.json (the run stays completed), logs it, and `cifarlab report RUN` finishes it."""

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        # the report reads the tested weights (summary.json's test_weights), which training just scored
        timings: dict[str, float] = {}
        started = time.perf_counter()
        try:
            path = build_run_report(trainer.run_dir, known={"test": trainer.test_result}, timings=timings)
            log.info("analysis done in %.1f s: %s", time.perf_counter() - started, path)
        finally:  # the steps done so far, also when a figure failed or a signal stopped the phase
            summary.setdefault("analysis", {})["steps"] = timings


def build_comparison(run_dirs: list[Path], output: Path) -> Path:
    """One page comparing runs: a sortable table of their summaries and overlaid curves."""
    from . import plots  # matplotlib: imported where a figure is drawn, not by every `cifarlab train`

    rows, series_acc, series_loss = [], [], []
    for run_dir in run_dirs:
        run_dir = runs.resolve_run(run_dir)
        s = runs.read_summary(run_dir)
        config = runs.read_run_config(run_dir)
        rows.append({"run": run_dir.name, "model": config.model.name(), "optim": config.optim.name,
                     "augment": config.augment.preset, **{k: s.get(k) for k in (
                         "train_acc", "val_acc", "test_acc", "best_epoch", "tested_epoch", "epochs_run", "train_time_s",
                         "train_img_per_s")}, "stop": s.get("stop_reason", ""), "status": s.get("status", "")})
        epochs = [r for r in runs.epoch_records(run_dir) if "val_acc" in r]
        series_acc.append((run_dir.name, [r["epoch"] for r in epochs], [100 * r["val_acc"] for r in epochs]))
        series_loss.append((run_dir.name, [r["epoch"] for r in epochs], [r["val_loss"] for r in epochs]))
    output = Path(output)
    folder = output.with_suffix("")
    figures = [plots.overlay_curves(series_acc, folder.with_name(folder.name + "_val_acc.png"),
                                    "validation accuracy"),
               plots.overlay_curves(series_loss, folder.with_name(folder.name + "_val_loss.png"), "validation loss",
                                    ylabel="validation loss")]
    rendered = render_html("compare.html", output, rows=rows,
                           figures=[{"title": p.stem, "data": inline(p)} for p in figures])
    for p in figures:
        p.unlink()
    return rendered
