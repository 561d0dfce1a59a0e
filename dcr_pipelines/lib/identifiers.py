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

import phonenumbers

from . import casemap

_EMAIL = re.compile(r"^[^@ \t\n\r\v\f]+@[^@ \t\n\r\v\f]+\.[^@ \t\n\r\v\f]+$")  # POSIX [:space:], ASCII
_PHONE_CHARS = re.compile(r"^[+]?[0-9 ().-]+$")
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
        return phone(raw, str(options.get("region") or "US"))
    text = raw.strip(" ")
    if text == "":
        return None, "missing"
    case = options.get("case")
    return (_lower(text) if case == "lower" else _upper(text) if case == "upper" else text), None


PHONE_REASONS = ("invalid_characters", "invalid_length", "invalid_country_code", "invalid_phone")


def phone(raw: str, region: str) -> tuple[str | None, str | None]:
    """A phone number in E.164 by the rules of its numbering plan (the `phonenumbers` library, Google's libphonenumber
    data): with a leading + or the plan's international prefix it carries its country code; a leading 00 is read as +
    (the international prefix of most of the world, and of many exports); otherwise ``region``'s plan applies (its
    trunk prefix dropped: 0 in GB/DE/FR, 1 in the US). Accepted when the length is possible for that plan; letters
    and other characters than digits, spaces and + ( ) . - are refused (no vanity numbers, no extensions)."""
    text = raw.strip(_EMAIL_TRIM)
    if not _PHONE_CHARS.match(text):
        return None, "invalid_characters"
    digits = re.sub(r"[^0-9]", "", text)
    if not 4 <= len(digits) <= 17:
        return None, "invalid_length"
    if not text.startswith("+") and digits.startswith("00"):
        text = "+" + digits[2:]
    try:
        number = phonenumbers.parse(text, region.upper())
    except phonenumbers.NumberParseException as exc:
        if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
            return None, "invalid_country_code"
        return None, "invalid_length" if exc.error_type != phonenumbers.NumberParseException.NOT_A_NUMBER else "invalid_phone"
    if not phonenumbers.is_possible_number(number):
        return None, "invalid_length"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


def token(key: bytes, normalised: str) -> str:
    """The party's staging token: hex(HMAC-SHA256(key, normalised identifier)), as the SQL computes it."""
    return hmac.new(key, normalised.encode("utf-8"), hashlib.sha256).hexdigest()
