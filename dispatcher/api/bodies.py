"""Request bodies more than one router takes: the strict base and an email's message."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictBody(BaseModel):
    """A request body that refuses fields it does not know (422 naming the field)."""

    model_config = ConfigDict(extra="forbid")


class MessageIn(StrictBody):
    subject: str = Field(description="Jinja2 template of the subject line.")
    html: str = Field(description="Jinja2 template of the HTML body (autoescaped).")
    text: str | None = Field(default=None, description="Plain-text body; derived when absent.")
