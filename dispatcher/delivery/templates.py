"""Stored templates under TEMPLATES_DIR: ``email/<name>/{subject.txt,body.html,body.txt}``."""

from __future__ import annotations

import re
from pathlib import Path

from dispatcher.delivery.rendering import MessageTemplate
from dispatcher.errors import InvalidInput

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def load_template(templates_dir: str, name: str) -> MessageTemplate:
    """The stored template ``name``; an unknown or malformed name is :class:`InvalidInput`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput("template", f"{name[:80]!r} is not a template name")
    folder = Path(templates_dir) / "email" / name
    subject, html = folder / "subject.txt", folder / "body.html"
    if not subject.is_file() or not html.is_file():
        raise InvalidInput("template", f"no stored template named {name!r}")
    text = folder / "body.txt"
    return MessageTemplate(
        subject=subject.read_text(encoding="utf-8").strip(),
        html=html.read_text(encoding="utf-8"),
        text=text.read_text(encoding="utf-8") if text.is_file() else None,
    )
