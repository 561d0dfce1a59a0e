"""The documented identifier normalisation (docs/identifiers.md) as a table, run through SQL and through Python
(phone numbers through Python only: SQL joins what Python computed at ingest, see store/phones.py)."""

CASES = [
    # (kind, options, raw, normalised or None, reason when None)
    ("email", {}, "  Ana.B@Example.COM ", "ana.b@example.com", None),
    ("email", {}, "ana+news@gmail.com", "ana+news@gmail.com", None),
    ("email", {"drop_plus_tag": True}, "ana+news@x.org", "ana@x.org", None),
    ("email", {"gmail_drop_dots": True}, "a.n.a@gmail.com", "ana@gmail.com", None),
    ("email", {"gmail_drop_dots": True}, "a.n.a@example.com", "a.n.a@example.com", None),
    ("email", {}, "no-at-sign.example.com", None, "invalid_email"),
    ("email", {}, "two@@example.com", None, "invalid_email"),
    ("email", {}, "   ", None, "missing"),
    ("email", {}, None, None, "missing"),
    ("phone", {"region": "US"}, "(415) 555-0100", "+14155550100", None),
    ("phone", {"region": "GB"}, "020 7946 0018", "+442079460018", None),
    ("phone", {"region": "US"}, "+49 30 901820", "+4930901820", None),
    ("phone", {"region": "US"}, "0049 30 901820", "+4930901820", None),
    ("phone", {"region": "US"}, "call me", None, "invalid_characters"),
    ("phone", {"region": "US"}, "12345", None, "invalid_length"),
    ("customer_id", {"case": "upper"}, " ab-123 ", "AB-123", None),
    ("customer_id", {"case": "preserve"}, "Ab-123", "Ab-123", None),
    ("customer_id", {"case": "preserve"}, "  ", None, "missing"),
    ("email", {}, "\tZoe@Example.org\n", "zoe@example.org", None),
    ("email", {}, "zoë@exämple.de", "zoë@exämple.de", None),
    ("email", {}, "ZOË@Exämple.DE", "zoë@exämple.de", None),
    ("email", {"drop_plus_tag": True, "gmail_drop_dots": True}, "A.N.A+x@GoogleMail.com", "ana@googlemail.com", None),
    ("email", {}, "a b@example.com", None, "invalid_email"),
    ("phone", {"region": "US"}, " 415.555.0100 ", "+14155550100", None),
    ("phone", {"region": "US"}, "+1 (415) 555-01000000000", None, "invalid_length"),
    # The US trunk prefix is 1, not 0: a national number written with it keeps one country code (was +117283435471).
    ("phone", {"region": "US"}, "1-728-343-5471", "+17283435471", None),
    ("phone", {"region": "US"}, "011 49 30 901820", "+4930901820", None),  # the US international prefix
    ("phone", {"region": "DE"}, "030 901820", "+4930901820", None),  # the German trunk 0
    ("phone", {"region": "US"}, "+999 1234 5678", None, "invalid_country_code"),
    # Case mapping is per character (PostgreSQL's lower()/upper()), not Python's context-sensitive full mapping.
    ("email", {}, "ΣΟΦΙΑΣ@Example.gr", "σοφιασ@example.gr", None),
    ("email", {}, "İLKER@Example.com.tr", "ilker@example.com.tr", None),
    ("customer_id", {"case": "upper"}, "straße-7", "STRAßE-7", None),
    ("customer_id", {"case": "lower"}, "ΟΔΟΣ-9", "οδοσ-9", None),
]
