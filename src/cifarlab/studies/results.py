"""What a study's runs measured: one row per variant (mean and std over repeats) in results.csv and
results.md, overlaid curves in plots/, and report.html with both.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Optional

from .. import runs
from ..files import atomic_write
from .spec import RunSpec, Study, slug, value_text

COLUMNS = ["train_acc", "val_acc", "test_acc", "best_epoch", "epochs_run", "train_time_s", "train_img_per_s"]


def collect(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per variant (grid point): settings, status, and each metric's mean (and std over repeats)."""
    groups: dict[tuple, list[RunSpec]] = {}
    for run in study.runs:
        groups.setdefault((run.variant, json.dumps(run.values, sort_keys=True)), []).append(run)
    rows = []
    for (variant, _), members in groups.items():
        summaries = []
        for run in members:
            path = out / run.id / runs.SUMMARY
            summaries.append(json.loads(path.read_text()) if path.is_file() else {"status": "missing"})
        done = [s for s in summaries if s.get("status") == "completed"]
        failed = [s for s in summaries if s.get("status") != "completed"]
        row: dict[str, Any] = {"variant": variant, **{k: value_text(v) for k, v in members[0].values.items()},
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
        row["ids"] = [r.id for r in members]
        rows.append(row)
    return rows


def write_results(study: Study, out: Path, rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[0] if k != "ids"] if rows else []

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k != "ids"})

    atomic_write(out / "results.csv", write_csv)
    atomic_write(out / "results.md", results_markdown(study, rows))


def setting_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The columns of `collect` rows that hold a variant's settings (axis keys and `set` keys)."""
    fixed = {"variant", "runs", "completed", "status", "stop_reason", "params", "ids", *COLUMNS}
    return [k for k in rows[0] if k not in fixed and not k.endswith("_std")] if rows else []


def _pct(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    std = row.get(f"{key}_std")
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def results_markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    settings = setting_keys(rows)
    header = ["variant", *settings, "train %", "val %", "test %", "best epoch", "epochs", "stop", "time (s)",
              "img/s", "params", "status"]
    lines = [f"# {study.name}", "", study.description.strip(), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], *(str(row[k]) for k in settings), _pct(row, "train_acc"), _pct(row, "val_acc"),
                 _pct(row, "test_acc"), _num(row.get("best_epoch")), _num(row.get("epochs_run")),
                 row["stop_reason"], _num(row.get("train_time_s")), _num(row.get("train_img_per_s")),
                 f"{row['params']:,}" if row.get("params") else "-", row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    repeats = max((r["runs"] for r in rows), default=1)
    if repeats > 1:
        lines += ["", f"Mean ± standard deviation over {repeats} seeds."]
    return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"


def curve(records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if metric in r]
    return [r["epoch"] for r in rows], [100 * r[metric] for r in rows]


def study_figures(study: Study, out: Path) -> list[Path]:
    """Overlaid validation curves: one figure per axis (lines colored by that axis' value), and one
    of the named variants when there are several. When some runs have no validation split (an
    ablation that trains on every image), all runs are drawn by their training accuracy instead."""
    from ..analysis.plots import overlay_curves

    records = {run.id: runs.epoch_records(out / run.id) for run in study.runs}
    no_val = any(r and not any("val_acc" in e for e in r) for r in records.values())
    metric, words = ("train_acc", "training accuracy") if no_val else ("val_acc", "validation accuracy")
    figures = []
    groupings = [(axis, lambda r, a=axis: f"{a}={value_text(r.values[a])}") for axis in study.axes]
    if len({r.variant for r in study.runs}) > 1:
        groupings.insert(0, ("variant", lambda r: r.variant))
    for axis, label_of in groupings:
        series = [(label_of(run), *curve(records[run.id], metric)) for run in study.runs]
        series = [s for s in series if s[1]]
        if series:
            figures.append(overlay_curves(series, out / "plots" / f"{metric}_by_{slug(axis)}.png",
                                          f"{study.name}: {words} by {axis}", ylabel=f"{words} (%)"))
    return figures


def write_report(study: Study, out: Path, rows: list[dict[str, Any]], figures: list[Path],
                 counts: Optional[str] = None) -> Path:
    from ..analysis.report import inline, render_html

    settings = setting_keys(rows)
    columns = ([{"title": "variant", "text": True}] + [{"title": s, "text": True} for s in settings] +
               [{"title": t, "text": False} for t in ("train %", "val %", "test %", "best epoch", "epochs",
                                                      "time (s)", "img/s", "params")] +
               [{"title": "stop", "text": True}, {"title": "status", "text": True}])
    table = []
    for row in rows:
        numbers = [(row.get(k), _pct(row, k)) for k in ("train_acc", "val_acc", "test_acc")]
        numbers += [(row.get(k), _num(row.get(k))) for k in ("best_epoch", "epochs_run", "train_time_s",
                                                              "train_img_per_s")]
        numbers.append((row.get("params"), f"{row['params']:,}" if row.get("params") else "-"))
        cells = [{"sort": row["variant"], "shown": row["variant"]}]
        cells += [{"sort": str(row[s]), "shown": str(row[s])} for s in settings]
        cells += [{"sort": "" if v is None else v, "shown": shown} for v, shown in numbers]
        cells += [{"sort": row["stop_reason"], "shown": row["stop_reason"]}, {"sort": row["status"], "shown": row["status"]}]
        table.append({"cells": cells, "ok": row["status"] == "completed"})
    reference = study.reference
    return render_html(
        "study.html", out / "report.html", study=study, columns=columns, table=table,
        counts=counts or f"{len(rows)} variants, {len(study.runs)} runs",
        reference=json.dumps(reference, indent=2) if isinstance(reference, (dict, list)) else reference,
        figures=[{"title": p.stem.replace("_", " "), "data": inline(p)} for p in figures])


def summarize_study(study: Study, out: Path) -> list[dict[str, Any]]:
    """results.csv, results.md, plots/ and report.html from whatever runs exist."""
    rows = collect(study, out)
    write_results(study, out, rows)
    write_report(study, out, rows, study_figures(study, out))
    return rows
