"""A PNG chart of latency distributions, drawn with Pillow (no plotting library needed): one row per
series on a shared logarithmic millisecond axis; a box from p25 to p75, whiskers from p1 to p99,
a tick at the median and a dot at the maximum. Series known only by percentiles get markers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tests.bench.figures import percentile

WIDTH = 1200
ROW = 34
LEFT = 330
RIGHT = 200
TOP = 60
PALETTE = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00"]


@dataclass(frozen=True)
class Series:
    """One distribution: its samples in ms, or (without samples) known percentiles like {"p50": 3.1}."""

    label: str
    samples_ms: Sequence[float] = ()
    percentiles: dict[str, float] = field(default_factory=dict)
    group: str = ""

    def quantiles(self) -> dict[str, float]:
        if self.samples_ms:
            values = [max(s, 1e-3) for s in self.samples_ms]
            names = {"p1": 0.01, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p99": 0.99}
            found = {name: percentile(values, q) for name, q in names.items()}
            return {**found, "max": max(values)}
        return {k: max(v, 1e-3) for k, v in self.percentiles.items() if v}


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 100 else f"{value:.3g} ms"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_chart(
    series: Sequence[Series], path: Path, title: str = "Latency distributions (ms, log scale)"
) -> None:
    """Writes the chart of `series` (those with no figures are skipped) to `path`."""
    rows = [(s, s.quantiles()) for s in series]
    rows = [(s, q) for s, q in rows if q]
    height = TOP + ROW * max(1, len(rows)) + 60
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    draw.text((LEFT, 15), title, fill="black", font=_font(18))
    values = [v for _, q in rows for v in q.values()]
    low = 10 ** math.floor(math.log10(min(values, default=1.0)))
    high = 10 ** math.ceil(math.log10(max(values, default=10.0)))
    if high <= low:
        high = low * 10
    span = math.log10(high) - math.log10(low)

    def x(ms: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * (math.log10(max(ms, low)) - math.log10(low)) / span

    bottom = TOP + ROW * len(rows)
    decade = low
    while decade <= high * 1.0001:
        for k in range(1, 10):
            tick = decade * k
            if tick > high * 1.0001:
                break
            colour = "#bbbbbb" if k == 1 else "#eeeeee"
            draw.line([(x(tick), TOP - 5), (x(tick), bottom)], fill=colour)
        label = f"{decade:g}"
        draw.text((x(decade) - 4 * len(label), bottom + 6), label, fill="black", font=small)
        decade *= 10
    groups: dict[str, str] = {}
    for i, (item, q) in enumerate(rows):
        colour = groups.setdefault(item.group or item.label, PALETTE[len(groups) % len(PALETTE)])
        middle = TOP + ROW * i + ROW // 2
        draw.text((10, middle - 8), item.label[:44], fill="black", font=font)
        if "p1" in q and "p99" in q:
            draw.line([(x(q["p1"]), middle), (x(q["p99"]), middle)], fill=colour, width=2)
        if "p25" in q and "p75" in q:
            draw.rectangle([(x(q["p25"]), middle - 9), (x(q["p75"]), middle + 9)], outline=colour, width=2)
        if "p50" in q:
            draw.line([(x(q["p50"]), middle - 11), (x(q["p50"]), middle + 11)], fill=colour, width=3)
        for name in ("p99", "max"):
            if name in q:
                r = 4 if name == "max" else 3
                draw.ellipse([(x(q[name]) - r, middle - r), (x(q[name]) + r, middle + r)], fill=colour)
        text = "  ".join(f"{k} {_ms(q[k])}" for k in ("p50", "p99") if k in q)
        draw.text((WIDTH - RIGHT + 15, middle - 7), text, fill="#555555", font=small)
    draw.text(
        (LEFT, bottom + 26),
        "box p25-p75, bar = median, whiskers p1-p99, dots = p99 and max",
        fill="#555555",
        font=small,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
