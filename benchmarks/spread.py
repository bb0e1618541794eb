"""The spread of a benchmark's repeated measurements: this machine drifts by 15 % and more between
runs, so every rate is reported as min / median / max over repeats."""

from __future__ import annotations

import statistics


def spread(values: list[float], digits: int = 1) -> dict:
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}
