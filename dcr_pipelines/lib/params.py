"""Validate query parameters against their declared types and bounds, before any SQL is rendered."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from .policy import ApprovedQuery
from .policy.models import Parameter, ParameterType

_TEXT_RE = re.compile(r"^[\w .,:/@+-]{0,200}$", re.UNICODE)


class ParameterError(ValueError):
    """A parameter value the query's spec does not allow."""


def _parse(name: str, spec: Parameter, raw: Any) -> Any:
    text = str(raw).strip()
    try:
        if spec.type == ParameterType.DATE:
            return dt.date.fromisoformat(text)
        if spec.type == ParameterType.INTEGER:
            if not re.fullmatch(r"[+-]?\d{1,18}", text):
                raise ValueError
            return int(text)
        if spec.type == ParameterType.NUMERIC:
            value = Decimal(text)
            if not value.is_finite():
                raise ValueError
            return value
        if spec.type == ParameterType.BOOLEAN:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
    except (ValueError, InvalidOperation):
        raise ParameterError(f"parameter {name}: {raw!r} is not a valid {spec.type.value}") from None
    if not _TEXT_RE.fullmatch(text):
        raise ParameterError(f"parameter {name}: text may hold letters, digits, spaces and . , : / @ + - only")
    return text


def validate_params(query: ApprovedQuery, supplied: Mapping[str, Any]) -> dict[str, str]:
    """Typed, bounded parameter values as canonical strings; defaults fill what is not supplied.

    Raises ``ParameterError`` naming the parameter and the rule it breaks.
    """
    declared = query.spec.parameters
    unknown = sorted(set(supplied) - set(declared))
    if unknown:
        raise ParameterError(f"query {query.name} has no parameter {unknown[0]!r} (parameters: {', '.join(declared) or 'none'})")
    out: dict[str, str] = {}
    for name, spec in declared.items():
        raw = supplied.get(name, spec.default)
        if raw is None:
            raise ParameterError(f"parameter {name} of query {query.name} is required")
        value = _parse(name, spec, raw)
        if spec.allowed is not None and value not in {_parse(name, spec, a) for a in spec.allowed}:
            raise ParameterError(f"parameter {name}: {raw!r} is not one of the allowed values {list(spec.allowed)}")
        if spec.min is not None and value < _parse(name, spec, spec.min):
            raise ParameterError(f"parameter {name}: {raw!r} is below the minimum {spec.min}")
        if spec.max is not None and value > _parse(name, spec, spec.max):
            raise ParameterError(f"parameter {name}: {raw!r} is above the maximum {spec.max}")
        out[name] = value.isoformat() if isinstance(value, dt.date) else str(value).lower() if isinstance(value, bool) else str(value)
    return out
