"""Reading a job payload: the one place a raw ``job`` becomes a typed schema or a typed error."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import InvalidInputError

M = TypeVar("M", bound=BaseModel)


def first_error(exc: ValidationError) -> str:
    """``loc: message`` of the first problem pydantic found."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))


def parse_job(schema: type[M], raw: Any) -> M:
    """Validate ``raw`` as ``schema``; an :class:`InvalidInputError` naming the first bad field otherwise."""
    if not isinstance(raw, dict):
        raise InvalidInputError("the task takes one keyword argument 'job': a JSON object", field="job")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInputError(f"{loc or 'job'}: {first.get('msg')}", field=loc or None) from None
