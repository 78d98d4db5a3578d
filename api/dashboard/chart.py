"""The usage chart, drawn on the server as SVG: GPU-seconds per hour or day, one bar a bucket,
stacked by model, every bucket of the range shown (empty ones too), its axis labelled for the
unit (hours, or days with no hour), each bar named with its figures (a tooltip and the
accessible name). No script draws it, so it is there as soon as the page is, and the Content
Security Policy has nothing to allow."""

from dataclasses import dataclass, field
from datetime import datetime
from math import ceil, floor, log10

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 10, 40  # the plot's margins
PALETTE = ("#0b4f9c", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490")
MOST_LABELS = 8  # x-axis labels at most (every n-th bucket)


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass
class Chart:
    """What the template draws: bars, axes' labels and gridlines, a legend."""

    unit: str
    buckets: int
    total: float
    bars: list[Rect] = field(default_factory=list)
    x_labels: list[Label] = field(default_factory=list)
    y_labels: list[Label] = field(default_factory=list)
    legend: list[tuple[str, str, float]] = field(default_factory=list)  # model, color, total
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right_edge: int = WIDTH - RIGHT
    baseline: int = HEIGHT - BOTTOM


def gpu_seconds(value: float) -> str:
    """A figure of GPU-seconds as the dashboard writes them: thousands separated, 3 decimals."""
    return f"{value:,.3f}"


def _axis(largest: float) -> tuple[float, int, int]:
    """The y axis for values up to `largest`: its top (1, 2 or 5 times a power of ten, at or
    above it), how many steps of gridlines (each a round number), and the decimals they need."""
    power = 10 ** floor(log10(largest)) if largest > 0 else 1.0
    mantissa = next((m for m in (1, 2, 5, 10) if m * power >= largest), 10)
    steps = {1: 5, 2: 4, 5: 5, 10: 5}[mantissa]
    step = mantissa * power / steps
    return mantissa * power, steps, max(0, -floor(log10(step) + 1e-9))


def _bucket_name(start: datetime, unit: str) -> str:
    return start.strftime("%-d %b %Y, %H:00" if unit == "hour" else "%a %-d %b %Y")


def _tick(start: datetime, unit: str, previous: datetime | None) -> str:
    if unit == "day":
        return start.strftime("%-d %b")
    if previous is None or previous.date() != start.date():
        return start.strftime("%-d %b %H:00")
    return start.strftime("%H:00")


def draw(starts: list[datetime], series: dict[str, dict[datetime, float]], unit: str) -> Chart:
    """`starts`: every bucket's start (UTC), in order; `series`: seconds by model, by start."""
    models = sorted(series)
    colors = {model: PALETTE[i % len(PALETTE)] for i, model in enumerate(models)}
    totals = [sum(series[m].get(start, 0.0) for m in models) for start in starts]
    chart = Chart(unit=unit, buckets=len(starts), total=round(sum(totals), 3))
    chart.legend = [
        (model, colors[model], round(sum(series[model].values()), 3)) for model in models
    ]
    top, steps, decimals = _axis(max(totals, default=0.0))
    plot_width, plot_height = chart.right_edge - LEFT, chart.baseline - TOP
    slot = plot_width / max(1, len(starts))
    for step in range(steps + 1):  # gridlines and their figures, 0 to the top
        value = f"{top * step / steps:,.{decimals}f}"
        chart.y_labels.append(Label(LEFT - 6, chart.baseline - plot_height * step / steps, value))
    every = max(1, ceil(len(starts) / MOST_LABELS))
    previous = None
    for i, start in enumerate(starts):
        x = LEFT + slot * i + slot * 0.1
        if i % every == 0:
            tick = _tick(start, unit, previous)
            chart.x_labels.append(Label(LEFT + slot * (i + 0.5), HEIGHT - 22, tick))
            previous = start
        y = chart.baseline
        for model in models:
            seconds = series[model].get(start, 0.0)
            if seconds <= 0:
                continue
            height = plot_height * seconds / top
            y -= height
            title = f"{_bucket_name(start, unit)} · {model}: {gpu_seconds(seconds)} GPU-seconds"
            chart.bars.append(Rect(x, y, slot * 0.8, height, colors[model], title))
    return chart
