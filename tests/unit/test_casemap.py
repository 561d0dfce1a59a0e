"""The case table identifiers use (lib/casemap.py): the SQL macro is rendered from it, and it says what the docs say."""

from __future__ import annotations

from dcr_pipelines.lib import casemap


def test_the_sql_macro_is_the_table_rendered() -> None:
    assert casemap.MACRO.read_text(encoding="utf-8") == casemap.render_macro(), "run `python -m dcr_pipelines.lib.casemap`"


def test_one_character_in_one_out_and_no_locale_rule() -> None:
    assert casemap.lower("ZOË@EXÄMPLE.DE") == "zoë@exämple.de"
    assert casemap.lower("İLKER") == "ilker"  # Unicode's simple mapping (full: i + combining dot)
    assert casemap.lower("ΣΟΦΙΑΣ") == "σοφιασ"  # no final-sigma rule
    assert casemap.lower("I") == "i"  # never a Turkish locale's dotless ı
    assert casemap.upper("straße") == "STRAßE" and casemap.upper("ﬁ") == "ﬁ"  # several characters: left as is
    for text in ("ÀB", "aΩ", "Kelvin \u212a", "\U00010400x"):  # the ASCII fast path and the table agree wherever both apply
        assert len(casemap.lower(text)) == len(text) and len(casemap.upper(text)) == len(text)
    source, target = casemap.pairs("lower")
    assert len(source) == len(target) > 1000 and len(set(source)) == len(source)
    ascii_pairs = {a: b for a, b in zip(source, target, strict=True) if a.isascii()}
    assert ascii_pairs == {chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}
