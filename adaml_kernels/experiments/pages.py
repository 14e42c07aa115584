"""What the generated pages (results.md, precision.md, telemetry_results.md) share: the notice
that heads each, and writing a page with its figure."""

from __future__ import annotations

import os
from collections.abc import Callable


def generated_notice(command: str, figures: str = "figure") -> list[str]:
    """The lines that say the page is generated and by which command."""
    return ["_This page is generated; do not edit it by hand._ Regenerate it "
            f"({figures} included) with\n",
            f"```\n{command}\n```\n"]


def write_page(docs: str, page_name: str, figure_name: str, plot: Callable[[str], object],
               render: Callable[[str], str]) -> list[str]:
    """DOCS/figure_name drawn by plot(path), then DOCS/page_name from render(figure_name)."""
    os.makedirs(docs, exist_ok=True)
    figure = os.path.join(docs, figure_name)
    plot(figure)
    page = os.path.join(docs, page_name)
    with open(page, "w") as f:
        f.write(render(figure_name))
    return [page, figure]
