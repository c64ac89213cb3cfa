"""The OpenAPI document's enumerations: the answers' status, provider, kind and reason fields
are plain strings in the views, and are listed here with the values the models allow."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from dispatcher.models import (
    AlertKind,
    CampaignStatus,
    Provider,
    SendStatus,
    SuppressionReason,
    TimelineKind,
)
from dispatcher.reasons import Reason

#: Schema -> field -> the enumeration its values come from.
ENUMS: dict[str, dict[str, type[enum.Enum]]] = {
    "SendAccepted": {"status": SendStatus},
    "BatchResult": {"status": SendStatus},
    "SendView": {"status": SendStatus, "reason": Reason},
    "CampaignView": {"status": CampaignStatus, "provider": Provider},
    "EventView": {"status": SendStatus, "kind": TimelineKind, "reason": Reason},
    "SuppressionView": {"reason": SuppressionReason},
    "AlertView": {"kind": AlertKind},
}


def _with_enum(prop: dict[str, Any], values: list[str]) -> None:
    """Put ``values`` on a property that is a string or a nullable string."""
    if prop.get("type") == "string":
        prop["enum"] = values
    for option in prop.get("anyOf", ()):
        if option.get("type") == "string":
            option["enum"] = values


def document(app: FastAPI, bodies: Sequence[type[BaseModel]] = ()) -> None:
    """Make ``app`` publish its OpenAPI document with the enumerations of :data:`ENUMS`, and
    the schemas of ``bodies``: request bodies a route reads itself (its ``openapi_extra``
    refers to them), which FastAPI does not list."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in bodies:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, nested in schema.pop("$defs", {}).items():
                    schemas.setdefault(name, nested)
                schemas.setdefault(model.__name__, schema)
            for name, fields in ENUMS.items():
                props = schemas.get(name, {}).get("properties", {})
                for field, values in fields.items():
                    if field in props:
                        _with_enum(props[field], [str(v.value) for v in values])
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
