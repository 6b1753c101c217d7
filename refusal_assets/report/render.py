"""The report's templates (package files under ``refusal_assets/report/templates/``) and what they
need from Python: the Jinja2 environments, the table-cell format, and the figures they embed.

Every section is a template pair, ``<section>.html`` and ``<section>.md``, fed one typed input (see
:mod:`refusal_assets.report.sections`); ``report.html`` and ``report.md`` include them in order. A new
section is one ``{% include %}`` in each page template plus one field of
:class:`refusal_assets.report.sections.ReportInputs`.

HTML is autoescaped; its values are escaped as :func:`html.escape` does (``finalize``), so the page
keeps the entities it has always had. The HTML page is one line: its templates strip the whitespace
between tags. In Markdown every block ends with one blank line, as separator.
"""

from __future__ import annotations

import base64
import html
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup


def cell(value: Any) -> str:
    """A table cell: floats with three decimals, anything else as text."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _html_escaped(value: Any) -> Any:
    """Every ``{{ value }}`` of an HTML template, escaped as :func:`html.escape` does (markupsafe would
    write ``&#39;`` where the report always had ``&#x27;``); macro output is already markup."""
    if isinstance(value, Markup) or value is None:
        return value
    return Markup(html.escape(str(value)))


def _environment(**options: Any) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("refusal_assets.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        undefined=jinja2.StrictUndefined,
        **options,
    )
    env.filters["cell"] = cell
    return env


HTML = _environment(finalize=_html_escaped)
MARKDOWN = _environment()


def render_html(template: str, **context: Any) -> str:
    return HTML.get_template(template).render(**context)


def render_markdown(template: str, **context: Any) -> str:
    """A Markdown template's blocks; the separator after the last block is dropped."""
    return MARKDOWN.get_template(template).render(**context).removesuffix("\n")


@dataclass(frozen=True, kw_only=True)
class Figure:
    """A PNG as the report shows it: embedded in the HTML, beside the Markdown in ``figures/``."""

    alt: str
    uri: str = ""
    """``data:`` URI for the HTML."""
    rel: str = ""
    """Path relative to the Markdown file."""
    missing: str = ""
    """The file name, where the figure was not written (the report says so instead)."""


class FigureStore:
    """Copies the figures the report shows into its ``figures/`` folder and embeds them."""

    def __init__(self, folder: Path):
        self.folder = folder

    def figure(self, path: Path, alt: str) -> Figure:
        """A figure written by another asset (copied as ``<its folder>_<name>``); missing ones are named."""
        if not path.is_file():
            return Figure(alt=alt, missing=path.name)
        uri, rel = self.embed(path)
        return Figure(alt=alt, uri=uri, rel=rel)

    def embed(self, path: Path) -> tuple[str, str]:
        """(data URI for HTML, relative path for Markdown) of a PNG, copied beside the Markdown."""
        if path.parent.resolve() == self.folder.resolve():  # made by the report itself
            name = path.name
        else:
            name = f"{path.parent.name}_{path.name}"
            shutil.copyfile(path, self.folder / name)
        return (
            f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}",
            f"figures/{name}",
        )
