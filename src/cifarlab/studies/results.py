"""What a study's runs measured, ready for a write-up: one row per variant and grid point (mean and
std over repeats), with every setting any run sets and the report's own numbers beside ours, as
results.csv (everything), results.md and results.tex (the settings that differ, the report's
columns and the difference); figures of training and validation accuracy and loss and a bar chart
of test accuracy (PNG and PDF) in plots/; report.html with all of it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Callable, Optional

from .. import runs
from ..files import atomic_write
from ..models.build import load_preset
from ..settings import flat_settings
from .spec import REFERENCE_FIELDS, Reference, RunSpec, Study, slug, value_text

# of summary.json, averaged over a row's repeats; tested_epoch: the epoch whose accuracies the row shows
COLUMNS = ["train_acc", "val_acc", "test_acc", "best_epoch", "tested_epoch", "epochs_run", "train_time_s",
           "train_img_per_s"]
ACCURACIES = ("train_acc", "val_acc", "test_acc")
FIXED = {"label", "variant", "runs", "completed", "status", "stop_reason", "params", "ids", "reduced", *COLUMNS}
FORMATS = {"csv": "results.csv", "markdown": "results.md", "latex": "results.tex"}


def collect(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per variant and grid point: its label, every setting any run of the study sets (the
    value this row's runs used), status, each metric's mean (and std over repeats), the report's
    numbers (`ref_*`, accuracies in %) and the differences (`diff_*`, measured minus report, in
    points), and why the row ran at a smaller scale than the report (`reduced`)."""
    groups: dict[str, list[RunSpec]] = {}
    for run in study.runs:
        groups.setdefault(run.label, []).append(run)
    keys = list(dict.fromkeys(key for run in study.runs for key in run.values))
    rows = []
    for label, members in groups.items():
        summaries = []
        for run in members:
            path = out / run.id / runs.SUMMARY
            summaries.append(json.loads(path.read_text()) if path.is_file() else {"status": "missing"})
        done = [s for s in summaries if s.get("status") == "completed"]
        failed = [s for s in summaries if s.get("status") != "completed"]
        used = settings_used(members[0])
        row: dict[str, Any] = {"label": label, "variant": members[0].variant,
                               **{k: value_text(used.get(k, "-")) for k in keys},
                               "runs": len(members), "completed": len(done),
                               "status": "completed" if not failed else "; ".join(
                                   f"{s.get('status')}: {s.get('stop_reason', 'no summary')}" for s in failed)}
        for key in COLUMNS:
            values = [s[key] for s in done if s.get(key) is not None]
            row[key] = mean(values) if values else None
            if len(members) > 1:
                row[f"{key}_std"] = stdev(values) if len(values) > 1 else None
        row["stop_reason"] = "; ".join(sorted({s["stop_reason"].split(":")[0] for s in done})) if done else ""
        row["params"] = done[0]["params"]["trainable"] + done[0]["params"]["non_trainable"] if done else None
        row["reduced"] = reduced_scale(study.reference, members[0], done)
        row.update(reference_columns(study.reference, label, members[0].variant, row))
        row["ids"] = [r.id for r in members]
        rows.append(row)
    return rows


def settings_used(run: RunSpec) -> dict[str, Any]:
    """Every setting of a run's config by its dotted key, with the preset's own parameter values
    (model.batchnorm, model.kernels, ...) where the run left them at the preset's default."""
    used = {k: v for k, v in flat_settings(run.config.to_dict()).items() if not k.startswith("model.args.")}
    used["model.args"] = run.config.model.args  # your factory's arguments: one column, as the study sets them
    preset = run.config.model.preset
    if preset:
        for name, value in load_preset(preset).get("params", {}).items():
            used.setdefault(f"model.{name}", value)
    return used


def reference_columns(reference: Reference, label: str, variant: str, row: dict[str, Any]) -> dict[str, Any]:
    """ref_<field> of the report's row for `label` (else for its variant), and diff_<accuracy> in points."""
    numbers = reference.rows.get(label) or reference.rows.get(variant) or {}
    found: dict[str, Any] = {f"ref_{k}": numbers[k] for k in REFERENCE_FIELDS if k in numbers}
    for key in ACCURACIES:
        if key in numbers and row.get(key) is not None:
            found[f"diff_{key}"] = 100 * row[key] - numbers[key]
    return found


def reduced_scale(reference: Reference, run: RunSpec, done: list[dict[str, Any]]) -> str:
    """Why a row is not a reproduction at the report's scale ("" when it is, or no scale is known)."""
    scale, why = reference.scale, []
    images = max((s["sizes"]["train"] for s in done if "sizes" in s), default=None)
    if "train_images" in scale and images is not None and images < scale["train_images"]:
        why.append(f"{images} training images (report: {scale['train_images']})")
    if "epochs" in scale and run.config.train.epochs < scale["epochs"]:
        why.append(f"at most {run.config.train.epochs} epochs (report: {scale['epochs']})")
    return "; ".join(why)


def setting_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Every settings column of the rows (axis keys, variants' `set` keys, a search's parameters)."""
    return list(dict.fromkeys(k for row in rows for k in row if k not in FIXED and not k.startswith(("ref_", "diff_"))
                              and not k.endswith("_std")))


def differing_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The settings whose values differ between rows: the ones a table should show."""
    return [k for k in setting_keys(rows) if len({str(row.get(k, "-")) for row in rows}) > 1]


def reference_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The accuracies the report gives for at least one row."""
    return [k for k in ACCURACIES if any(f"ref_{k}" in row for row in rows)]


def pct(row: dict[str, Any], key: str, latex: bool = False) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    std = row.get(f"{key}_std")
    plus = r" $\pm$ " if latex else " ± "
    return f"{100 * value:.2f}" + (f"{plus}{100 * std:.2f}" if std is not None else "")


def num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"


def two(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.2f}"


TEXT_COLUMNS = ("variant", "stop", "status")


def text_columns(header: list[str], rows: list[dict[str, Any]]) -> list[bool]:
    """Which columns of `table`'s header hold text (left-aligned, sorted as text): the row's name, its
    settings, the stop reason and the status; the others hold numbers."""
    settings = set(differing_keys(rows))
    return [h in TEXT_COLUMNS or h in settings for h in header]


def table(rows: list[dict[str, Any]], latex: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the write-up table: the row, the settings that differ, the measured
    accuracies with the report's and the difference beside each, epochs, time, size, status."""
    settings, refs = differing_keys(rows), reference_keys(rows)
    header = ["variant", *settings]
    for key in ACCURACIES:
        name = key.split("_")[0]
        header += [f"{name} %"] + ([f"{name} % (report)", f"Δ {name}"] if key in refs else [])
    extra = [k for k in ("best_epoch", "time_s") if any(f"ref_{k}" in row for row in rows)]
    header += ["tested epoch", *(["epoch (report)"] if "best_epoch" in extra else []), "epochs", "stop", "time (s)",
               *(["time (s) (report)"] if "time_s" in extra else []), "img/s", "params", "status"]
    cells = []
    for row in rows:
        line = [row["variant"] + (" †" if row.get("reduced") else ""), *(str(row.get(k, "-")) for k in settings)]
        for key in ACCURACIES:
            line.append(pct(row, key, latex))
            if key in refs:
                line += [two(row.get(f"ref_{key}")), signed(row.get(f"diff_{key}"))]
        tested = row.get("tested_epoch") if row.get("tested_epoch") is not None else row.get("best_epoch")
        line += [num(tested), *([num(row.get("ref_best_epoch"))] if "best_epoch" in extra else []),
                 num(row.get("epochs_run")), row.get("stop_reason", ""), num(row.get("train_time_s")),
                 *([num(row.get("ref_time_s"))] if "time_s" in extra else []), num(row.get("train_img_per_s")),
                 f"{row['params']:,}" if row.get("params") else "-", row["status"]]
        cells.append(line)
    return header, cells


def notes(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """The sentences under a table: repeats, the report's source and scale, which rows ran reduced."""
    lines = []
    repeats = max((r["runs"] for r in rows), default=1)
    if repeats > 1:
        lines.append(f"Mean ± standard deviation over {repeats} seeds.")
    reference = study.reference
    if reference.rows:
        lines.append(f"Report columns: {reference.source or 'the report'}; Δ = measured minus report, in points.")
    if reference.notes:
        lines.append(reference.notes.strip())
    reasons: dict[str, list[str]] = {}
    for row in rows:
        if row.get("reduced"):
            reasons.setdefault(row["reduced"], []).append(row.get("label", row["variant"]))
    for reason, labels in reasons.items():
        which = "every row" if len(labels) == len(rows) and len(rows) > 1 else ", ".join(labels)
        lines.append(f"† {which}: reduced scale ({reason}): a quick pass, not a reproduction.")
    return lines


def results_markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    header, cells = table(rows)
    lines = [f"# {study.name}", "", study.description.strip(), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in cells]
    return "\n".join(lines + [""] + notes(study, rows)) + "\n"


def latex_text(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                          ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(char, escaped)
    return text.replace("Δ", r"$\Delta$").replace("†", r"$^\dagger$").replace("±", r"$\pm$")


def results_latex(study: Study, rows: list[dict[str, Any]]) -> str:
    """A booktabs table (\\usepackage{booktabs}) with its caption and notes."""
    header, cells = table(rows, latex=True)
    spec = "".join("l" if text else "r" for text in text_columns(header, rows))
    text = lambda c: c if "$" in c else latex_text(c)  # noqa: E731 - cells with math are ours already
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_text(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(text(c) for c in line) + r" \\" for line in cells]
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{latex_text(' '.join([study.name + ': ' + study.description.strip(), *notes(study, rows)]))}}}",
              rf"\label{{tab:{slug(study.name)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict[str, Any]]) -> str:
    """Every column of every row (the keys any row has), floats to 6 significant digits."""
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "ids"))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k != "ids"})
    return text.getvalue()


WRITERS: dict[str, Callable[[Study, list[dict[str, Any]]], str]] = {
    "csv": lambda study, rows: results_csv(rows), "markdown": results_markdown, "latex": results_latex}


def write_results(study: Study, out: Path, rows: list[dict[str, Any]], formats: tuple[str, ...] = tuple(FORMATS)) -> list[Path]:
    """results.csv, results.md and results.tex (or those of `formats`) in the study folder."""
    return [atomic_write(out / FORMATS[f], WRITERS[f](study, rows)) for f in formats]


def curve_series(study: Study, out: Path) -> list[tuple[str, str, Any, list[dict]]]:
    """(legend label, colour key, dash key, epoch records) per run: colour by variant and line style by
    axis point when both vary, else colour by whichever varies."""
    variants = len({r.variant for r in study.runs}) > 1
    points = len({json.dumps(r.point, sort_keys=True, default=str) for r in study.runs}) > 1
    series = []
    for run in study.runs:
        point = ", ".join(f"{k}={value_text(v)}" for k, v in run.point.items())
        colour = run.variant if variants else point
        dash = point if variants and points else None
        series.append((run.label if variants or not points else point, colour, dash, runs.epoch_records(out / run.id)))
    return [s for s in series if s[3]]


def study_figures(study: Study, out: Path, rows: Optional[list[dict[str, Any]]] = None) -> list[Path]:
    """plots/curves.png (training and validation accuracy and loss of every run) and plots/test_acc.png
    (test accuracy per row, std over repeats as error bars, the report's value marked), each also as PDF."""
    from ..analysis.plots import bar_chart, study_curves

    figures = []
    series = curve_series(study, out)
    if series:
        figures.append(study_curves(series, out / "plots" / "curves.png", f"{study.name}: accuracy and loss per epoch"))
    scored = [r for r in rows or collect(study, out) if r.get("test_acc") is not None]
    if scored:
        figures.append(bar_chart([r["label"] for r in scored], [100 * r["test_acc"] for r in scored],
                                 [None if r.get("test_acc_std") is None else 100 * r["test_acc_std"] for r in scored],
                                 [r.get("ref_test_acc") for r in scored], out / "plots" / "test_acc.png",
                                 f"{study.name}: test accuracy", "test accuracy (%)"))
    return figures


def write_report(study: Study, out: Path, rows: list[dict[str, Any]], figures: list[Path],
                 counts: Optional[str] = None) -> Path:
    from ..analysis.report import inline, render_html

    header, cells = table(rows)
    columns = [{"title": h, "text": text} for h, text in zip(header, text_columns(header, rows))]
    body = [{"cells": [{"sort": c, "shown": c} for c in line], "ok": row["status"] == "completed"}
            for line, row in zip(cells, rows)]
    reference = study.reference
    return render_html(
        "study.html", out / "report.html", study=study, columns=columns, table=body,
        counts=counts or f"{len(rows)} rows, {len(study.runs)} runs", notes=notes(study, rows),
        scale=", ".join(f"{k.replace('_', ' ')} {v}" for k, v in reference.scale.items()),
        figures=[{"title": p.stem.replace("_", " "), "data": inline(p)} for p in figures])


def summarize_study(study: Study, out: Path) -> list[dict[str, Any]]:
    """results.csv, results.md, results.tex, plots/ and report.html from whatever runs exist."""
    rows = collect(study, out)
    write_results(study, out, rows)
    write_report(study, out, rows, study_figures(study, out, rows))
    return rows
