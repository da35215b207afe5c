"""Bar charts as server-rendered SVG: geometry here, markup in ``templates/console/bar_chart.html``.

Each chart carries its title, a description, axis labels and its data as table rows, so the
page reads without the picture (screen readers, a text browser) and needs no JavaScript.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

WIDTH = 720
HEIGHT = 220
SMALL_WIDTH = 360
SMALL_HEIGHT = 140
# Room for the y-axis labels on the left and the x-axis labels below.
LEFT = 64
TOP = 12
RIGHT = 8
BOTTOM = 40
Y_TICKS = 4


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value_text: str


@dataclass(frozen=True)
class Tick:
    position: float
    text: str


@dataclass(frozen=True)
class BarChart:
    slug: str
    title: str
    description: str
    x_label: str
    y_label: str
    width: int
    height: int
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]

    @property
    def left(self) -> int:
        return LEFT

    @property
    def top(self) -> int:
        return TOP

    @property
    def right(self) -> int:
        return self.width - RIGHT

    @property
    def bottom(self) -> int:
        return self.height - BOTTOM

    @property
    def middle_x(self) -> float:
        return (LEFT + self.right) / 2

    @property
    def middle_y(self) -> float:
        return (TOP + self.bottom) / 2


def bar_chart(
    slug: str,
    title: str,
    *,
    description: str,
    x_label: str,
    y_label: str,
    points: Sequence[tuple[str, int]],
    format_value: Callable[[int], str] = str,
    x_tick_labels: dict[int, str] | None = None,
    small: bool = False,
) -> BarChart:
    """Bars for ``points`` (label, value); ``x_tick_labels`` names bars by index on the x axis
    (every bar when None)."""
    width, height = (SMALL_WIDTH, SMALL_HEIGHT) if small else (WIDTH, HEIGHT)
    plot_width, plot_height = width - LEFT - RIGHT, height - TOP - BOTTOM
    top_value = max((value for _, value in points), default=0) or 1
    slot = plot_width / max(len(points), 1)
    gap = min(2.0, slot * 0.2)
    bars = []
    for index, (label, value) in enumerate(points):
        bar_height = plot_height * value / top_value
        bars.append(
            Bar(
                x=round(LEFT + index * slot + gap / 2, 2),
                y=round(TOP + plot_height - bar_height, 2),
                width=round(slot - gap, 2),
                height=round(bar_height, 2),
                label=label,
                value_text=format_value(value),
            )
        )
    labels = x_tick_labels if x_tick_labels is not None else {i: label for i, (label, _) in enumerate(points)}
    x_ticks = [Tick(round(LEFT + (index + 0.5) * slot, 2), text) for index, text in sorted(labels.items())]
    y_ticks = [
        Tick(
            round(TOP + plot_height * (1 - step / Y_TICKS), 2),
            format_value(round(top_value * step / Y_TICKS)),
        )
        for step in range(Y_TICKS + 1)
    ]
    return BarChart(slug, title, description, x_label, y_label, width, height, bars, y_ticks, x_ticks)
