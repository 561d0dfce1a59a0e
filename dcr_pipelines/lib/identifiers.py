"""Identifier normalisation in Python, for a party that tokenises at home (`dcr psi prepare`).

The operator normalises in SQL (dbt_project/macros/identity/); a party that
keeps its identifiers at home must produce the same normalised value on its
own machine, or its people would not match. Both follow docs/identifiers.md,
and tests run the same table of cases through both (tests/unit/test_identifiers.py
here, tests/integration/test_secure_views.py through the SQL macros).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any

from . import casemap

_EMAIL = re.compile(r"^[^@ \t\n\r\v\f]+@[^@ \t\n\r\v\f]+\.[^@ \t\n\r\v\f]+$")  # POSIX [:space:], ASCII
_PHONE_CHARS = re.compile(r"^[+]?[0-9 ().-]+$")
_E164 = re.compile(r"^[+][1-9][0-9]{7,14}$")
_EMAIL_TRIM = " \t\n\r"
TOKEN_PATTERN = r"^[0-9a-f]{64}$"  # noqa: S105 (a token format, not a password)


def _lower(text: str) -> str:
    """The fixed case table (``casemap``), as the SQL applies it with translate(): never the locale's lower()."""
    return casemap.lower(text)


def _upper(text: str) -> str:
    return casemap.upper(text)


def normalise(raw: str | None, kind: str, options: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(normalised value, None) or (None, reason), exactly as the SQL macros decide."""
    if raw is None or raw.strip(_EMAIL_TRIM) == "":
        return None, "missing"
    if kind == "email":
        e = _lower(raw.strip(_EMAIL_TRIM))
        if not _EMAIL.match(e):
            return None, "invalid_email"
        local, domain = e.split("@", 1)
        if options.get("drop_plus_tag"):
            local = local.split("+", 1)[0]
        if options.get("gmail_drop_dots") and domain in ("gmail.com", "googlemail.com"):
            local = local.replace(".", "")
        return f"{local}@{domain}", None
    if kind == "phone":
        text = raw.strip(" ")
        digits = re.sub(r"[^0-9]", "", text)
        if text.startswith("+"):
            e164 = "+" + digits
        elif digits.startswith("00"):
            e164 = "+" + digits[2:]
        else:
            e164 = f"+{options.get('country_code', '1')}" + re.sub(r"^0", "", digits)
        if _PHONE_CHARS.match(text) and _E164.match(e164):
            return e164, None
        trimmed = raw.strip(_EMAIL_TRIM)
        if not _PHONE_CHARS.match(trimmed):
            return None, "invalid_characters"
        if not 7 <= len(re.sub(r"[^0-9]", "", trimmed)) <= 15:
            return None, "invalid_length"
        return None, "invalid_phone"
    text = raw.strip(" ")
    if text == "":
        return None, "missing"
    case = options.get("case")
    return (_lower(text) if case == "lower" else _upper(text) if case == "upper" else text), None


def token(key: bytes, normalised: str) -> str:
    """The party's staging token: hex(HMAC-SHA256(key, normalised identifier)), as the SQL computes it."""
    return hmac.new(key, normalised.encode("utf-8"), hashlib.sha256).hexdigest()
