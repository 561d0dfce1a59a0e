"""Phone numbers as people write them, per country, normalised to what the numbering plan says (libphonenumber's
data, the `phonenumbers` package): several hundred generated numbers per country, each written in the formats
exports carry (national with the trunk prefix, international, E.164, RFC 3966, 00-prefixed, other separators, none),
must all give the library's E.164; what the library finds impossible is refused with a reason."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from dcr_pipelines.lib.identifiers import normalise

REGIONS = ("US", "GB", "DE", "FR", "IN", "BR", "JP")
TYPES = (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE, PhoneNumberType.TOLL_FREE)


def _numbers(region: str, count: int, rng: random.Random) -> list[phonenumbers.PhoneNumber]:
    """Valid numbers of ``region``: its example numbers with their last digits changed, kept when still valid."""
    examples = [n for t in TYPES if (n := phonenumbers.example_number_for_type(region, t)) is not None]
    out: list[phonenumbers.PhoneNumber] = []
    while len(out) < count:
        example = rng.choice(examples)
        national = str(example.national_number)
        changed = national[:-3] + "".join(rng.choice("0123456789") for _ in range(3))
        number = phonenumbers.parse(f"+{example.country_code}{changed}")
        if phonenumbers.is_valid_number(number):
            out.append(number)
    return out


def _written(number: phonenumbers.PhoneNumber, rng: random.Random) -> list[str]:
    national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
    international = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    separators = rng.choice([".", "-", " ", ""])
    return [national, international, e164, phonenumbers.format_number(number, PhoneNumberFormat.RFC3966).removeprefix("tel:"),
            "00" + e164[1:], international.replace(" ", separators), f"  {national}\t", national.replace(" ", "")]


@pytest.mark.parametrize("region", REGIONS)
def test_every_written_form_of_a_real_number_gives_the_librarys_e164(region: str) -> None:
    rng = random.Random(f"phones-{region}")
    checked = 0
    for number in _numbers(region, 300, rng):
        expected = phonenumbers.format_number(number, PhoneNumberFormat.E164)
        for text in _written(number, rng):
            if any(ch.isalpha() for ch in text):
                continue  # (an RFC 3966 extension or a vanity letter: refused by the character rule, by design)
            assert normalise(text, "phone", {"region": region}) == (expected, None), (region, text)
            checked += 1
    assert checked >= 300 * 7


@pytest.mark.parametrize("region", REGIONS)
def test_what_the_plan_cannot_hold_is_refused_with_a_reason(region: str) -> None:
    rng = random.Random(f"bad-{region}")
    for _ in range(200):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([1, 2, 3, 18, 19, 25])))
        value, reason = normalise(digits, "phone", {"region": region})
        assert value is None and reason in ("invalid_length", "invalid_phone", "invalid_country_code"), (digits, value, reason)
    for text in ("call me", "+1 415 555 0100 ext 7", "415-555-0100;x", "☎ 415 555 0100"):
        assert normalise(text, "phone", {"region": region}) == (None, "invalid_characters")
