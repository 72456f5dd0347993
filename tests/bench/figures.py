"""Small helpers the benchmark scripts share: percentiles, latency summaries, ratios, JSON output."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `samples` by nearest rank; 0 for none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_summary(samples_ms: Sequence[float]) -> dict[str, Any]:
    """n, p50, p90, p99 and max of latencies in milliseconds (and the samples, for charts)."""
    return {
        "n": len(samples_ms),
        "p50_ms": round(percentile(samples_ms, 0.5), 3),
        "p90_ms": round(percentile(samples_ms, 0.9), 3),
        "p99_ms": round(percentile(samples_ms, 0.99), 3),
        "max_ms": round(max(samples_ms, default=0.0), 3),
        "samples_ms": [round(s, 3) for s in samples_ms],
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, rounded; None when either is missing or the denominator is 0."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 4)


def json_argument(parser: argparse.ArgumentParser) -> None:
    """The `--json OUT` option every benchmark script takes."""
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON here")


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
