"""Showing the machine and the plan: a terminal table, Markdown, JSON (``"schema": 1``) or SVG.

Rendering is pure: every function takes a :class:`~composer_numa.machine.topology.Topology`
and a :class:`~composer_numa.plan.Plan` and returns text, so it can be tested
from recorded trees and reused by other tools. Nothing here imports torch.
"""

from __future__ import annotations

from composer_numa.errors import ComposerNumaError
from composer_numa.machine.topology import Topology
from composer_numa.plan import Plan
from composer_numa.report.document import SCHEMA, render_json, to_json
from composer_numa.report.facts import node_sockets, warnings_of
from composer_numa.report.text import render_markdown, render_table

__all__ = ["SCHEMA", "FORMATS", "render", "to_json", "render_json", "render_table", "render_markdown",
           "warnings_of", "node_sockets"]

FORMATS = ("table", "json", "markdown", "svg")


def render(topology: Topology, plan: Plan, fmt: str = "table") -> str:
    """Render the report in ``fmt`` (one of :data:`FORMATS`); the text ends with a newline."""
    if fmt == "table":
        return render_table(topology, plan)
    if fmt == "json":
        return render_json(topology, plan)
    if fmt == "markdown":
        return render_markdown(topology, plan)
    if fmt == "svg":
        from composer_numa.report.svg import render_svg  # the largest renderer: loaded when asked for

        return render_svg(topology, plan)
    raise ComposerNumaError(f"unknown report format {fmt!r}; choose from {', '.join(FORMATS)}")
