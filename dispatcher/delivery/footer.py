"""The compliance footer of campaign and SmartPlan mail: a visible unsubscribe link and the
agent's postal address (CAN-SPAM, CASL), appended to both parts from the operator's templates
(``FOOTER_DIR``, else ``TEMPLATES_DIR/email``: ``_footer.html`` and ``_footer.txt``).

The templates are ours (trusted): a plain Jinja2 environment, HTML autoescaped, strict about
names. They see ``unsubscribe_url`` (the one-click link, the same signed token as the
``List-Unsubscribe`` header), ``postal_address`` (None when the agent has none) and
``sender_name``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    select_autoescape,
)

from dispatcher.delivery.rendering import Rendered
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings

_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


@lru_cache(maxsize=8)
def _templates(folder: str) -> tuple[Template, Template]:
    """The footer's HTML and text templates, compiled once per process."""
    env = Environment(
        loader=FileSystemLoader(str(Path(folder))),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template("_footer.html"), env.get_template("_footer.txt")


def check(settings: Settings) -> None:
    """Render the footer once with sample values, at start: an operator's template that does
    not compile or names a value it is not given stops the process (:class:`ConfigError`)
    instead of failing every campaign message."""
    try:
        Footer(settings, postal_address="1 Main St", sender_name="Agent").add(
            Rendered("", "", ""), "https://example.org/u/token"
        )
    except (TemplateError, OSError) as exc:
        variable = "FOOTER_DIR" if settings.footer_dir else "TEMPLATES_DIR"
        raise ConfigError(
            variable, f"the footer in {settings.footer_folder} cannot be rendered: {exc}"
        ) from None


class Footer:
    """One sender's footer (a campaign's, a SmartPlan step's): the parts every copy shares are
    fixed here, the unsubscribe link per copy in :meth:`add`."""

    def __init__(self, settings: Settings, *, postal_address: str | None, sender_name: str) -> None:
        self._html, self._text = _templates(settings.footer_folder)
        self._context = {"postal_address": postal_address, "sender_name": sender_name}

    def add(self, rendered: Rendered, unsubscribe_url: str) -> Rendered:
        """``rendered`` with the footer at the end of its text and of its HTML body."""
        context = {**self._context, "unsubscribe_url": unsubscribe_url}
        html_footer = self._html.render(context)
        text_footer = self._text.render(context)
        return replace(
            rendered,
            html=_into_html(rendered.html, html_footer),
            text=rendered.text.rstrip("\n") + "\n\n" + text_footer,
        )


def _into_html(html: str, footer: str) -> str:
    """The footer before the document's last ``</body>``, else at its end."""
    ends = list(_BODY_END.finditer(html))
    if not ends:
        return html + "\n" + footer
    at = ends[-1].start()
    return html[:at] + footer + html[at:]
