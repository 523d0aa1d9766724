"""The spec's JSON Schema, for editors (yaml-language-server) and for `lcc schema`."""

from __future__ import annotations

from typing import Any

from lcc.spec.models import Spec


def json_schema() -> dict[str, Any]:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lcc spec (v1)"
    return schema
