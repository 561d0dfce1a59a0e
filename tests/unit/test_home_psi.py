"""A party that keeps its identifiers at home: its normalisation, its messages, and the match they give."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dcr_pipelines.lib import home_psi, psi
from dcr_pipelines.lib.identifiers import normalise, token
from dcr_pipelines.lib.matching import PartyInput, match
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.settings import PROJECT_ROOT

from ..identifier_cases import CASES

PAIRING = b"pairing-key-for-tests"
HOME_HMAC = b"home-party-hmac-key-0123456789ab"


@pytest.mark.parametrize(("kind", "options", "raw", "normalised", "reason"), CASES)
def test_python_normalisation_follows_the_documented_spec(kind, options, raw, normalised, reason) -> None:  # type: ignore[no-untyped-def]
    """The same table the SQL macros are tested with (tests/integration/test_secure_views.py)."""
    assert normalise(raw, kind, options) == (normalised, reason)


def test_python_tokens_equal_the_hmac_the_sql_computes() -> None:
    import hmac

    assert token(b"k", "ana@x.org") == hmac.new(b"k", b"ana@x.org", hashlib.sha256).hexdigest()


def _operator_party(name: str, identifiers: list[str]) -> PartyInput:
    distinct = sorted(set(identifiers))
    return PartyInput(name, [hashlib.sha256(f"{name}:{i}".encode()).hexdigest() for i in distinct], distinct)


def _at_home(collab: str, party: str, identifiers: list[str], client: PartyInput, tmp: Path) -> tuple[home_psi.HomeMatch, bytes]:
    """Both halves, through files, as `dcr psi prepare` / the operator / `dcr psi respond` run them."""
    b = psi.new_key()
    people = {token(HOME_HMAC, i): i for i in set(identifiers)}
    tokens = sorted(people)
    setup_path = home_psi.write_message(tmp / "setup.dcrpsi", home_psi.Message("setup", collab, party, psi.blind(b, [people[t] for t in tokens]) if tokens else [], tokens))
    request_path = home_psi.write_message(tmp / "request.dcrpsi", home_psi.client_request(collab, party, client.identifiers, PAIRING))
    keys = home_psi.HomeKeys(HOME_HMAC, b)
    response_path = home_psi.respond(keys, request_path, collab, party, tmp)
    rid = home_psi.request_id(collab, party, client.identifiers)
    setup = home_psi.read_message(setup_path, "setup", collab, party)
    response = home_psi.read_message(response_path, "response", collab, party, request_id=rid)
    return home_psi.complete(setup, response, PAIRING, len(client.identifiers)), request_path.read_bytes() + setup_path.read_bytes()


def _pairs(result, inputs: dict[str, dict[str, str]]) -> set[str]:  # type: ignore[no-untyped-def]
    """The person behind each row; every token in a row must be the same person's."""
    people = set()
    for row in result.rows:
        who = {inputs[party][tok] for party, tok in zip(result.parties, row[1:], strict=False)}
        assert len(who) == 1, "a row links tokens of different people"
        people |= who
    return people


def test_a_home_party_matches_exactly_the_plain_intersection(tmp_path: Path) -> None:
    shared = [f"shared{i}@example.com" for i in range(60)] + ["zoë@example.com", "李@example.cn"]
    client_ids = shared + [f"c{i}@example.com" for i in range(90)] + shared[:10]  # duplicates collapse
    home_ids = shared + [f"h{i}@example.org" for i in range(70)] + ["h0@example.org"]
    client = _operator_party("retailer", client_ids)
    home, _ = _at_home("c", "ad_network", home_ids, client, tmp_path)
    result = match([client], "retailer", home=[home])
    lookup = {"retailer": dict(zip(client.tokens, client.identifiers, strict=False)), "ad_network": {token(HOME_HMAC, i): i for i in home_ids}}
    assert _pairs(result, lookup) == set(client_ids) & set(home_ids)
    assert result.matched == len(set(shared))
    assert result.parties == ("retailer", "ad_network")
    assert result.input_counts == {"retailer": len(set(client_ids)), "ad_network": len(set(home_ids))}


@pytest.mark.parametrize("buckets", [1, 2, 7])
def test_three_parties_one_at_home_intersect_across_all_for_any_bucket_count(tmp_path: Path, buckets: int) -> None:
    everyone = [f"all{i}@x.org" for i in range(40)]
    a = everyone + [f"ab{i}@x.org" for i in range(30)] + [f"a{i}@x.org" for i in range(50)]
    b = everyone + [f"ab{i}@x.org" for i in range(30)] + [f"bh{i}@x.org" for i in range(20)]
    h = everyone + [f"bh{i}@x.org" for i in range(20)] + [f"h{i}@x.org" for i in range(25)]
    client, server = _operator_party("a", a), _operator_party("b", b)
    home, _ = _at_home("c", "h", h, client, tmp_path)
    result = match([client, server], "a", buckets=buckets, home=[home])
    lookup = {p.party: dict(zip(p.tokens, p.identifiers, strict=False)) for p in (client, server)} | {"h": {token(HOME_HMAC, i): i for i in h}}
    assert _pairs(result, lookup) == set(everyone)


def test_an_empty_home_set_and_a_single_element(tmp_path: Path) -> None:
    client = _operator_party("a", ["x@example.com", "y@example.com"])
    empty, _ = _at_home("c", "h", [], client, tmp_path / "empty")
    assert match([client], "a", home=[empty]).matched == 0
    single, _ = _at_home("c", "h", ["y@example.com"], client, tmp_path / "one")
    assert match([client], "a", home=[single]).matched == 1


def test_padding_with_a_home_party_uses_its_real_tokens_and_forges_the_rest(tmp_path: Path) -> None:
    client = _operator_party("a", [f"p{i}@x.org" for i in range(30)])
    home, _ = _at_home("c", "h", [f"p{i}@x.org" for i in range(10)] + [f"q{i}@x.org" for i in range(15)], client, tmp_path)
    result = match([client], "a", home=[home], padding=True)
    assert result.matched == 10
    assert len(result.rows) == 10 + 20 + 15  # every unmatched identity gets one fake row
    home_tokens = set(home.tokens)
    assert {row[2] for row in result.rows} >= home_tokens


def test_messages_carry_no_identifier_and_no_key(tmp_path: Path) -> None:
    ids = [f"secret-person-{i}@example.com" for i in range(50)]
    client = _operator_party("a", ids)
    _, files = _at_home("c", "h", ids[:20], client, tmp_path)
    assert b"secret-person" not in files and b"example.com" not in files
    assert HOME_HMAC not in files and HOME_HMAC.hex().encode() not in files


def test_the_operator_key_differs_per_request_and_is_a_valid_key() -> None:
    k1 = home_psi.operator_key(PAIRING, "c", "h", "1" * 64)
    k2 = home_psi.operator_key(PAIRING, "c", "h", "2" * 64)
    assert k1 != k2 and psi.blind(k1, ["x"]) != psi.blind(k2, ["x"])


def _message(tmp_path: Path) -> tuple[Path, home_psi.Message]:
    client = _operator_party("a", ["x@example.com", "y@example.com"])
    request = home_psi.client_request("c", "h", client.identifiers, PAIRING)
    return home_psi.write_message(tmp_path / "h-request.dcrpsi", request), request


def test_a_tampered_or_truncated_message_is_refused_with_its_file_name(tmp_path: Path) -> None:
    path, _ = _message(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(home_psi.MessageError, match=r"h-request\.dcrpsi: the body does not match its checksum"):
        home_psi.read_message(path, "request", "c", "h")
    path.write_bytes(bytes(data[:-5]))
    with pytest.raises(home_psi.MessageError, match="h-request.dcrpsi"):
        home_psi.read_message(path, "request", "c", "h")
    path.write_text("email\nana@x.org\n")
    with pytest.raises(home_psi.MessageError, match="not a dcr PSI message"):
        home_psi.read_message(path, "request", "c", "h")


def test_a_message_for_another_party_kind_or_request_is_refused(tmp_path: Path) -> None:
    path, request = _message(tmp_path)
    with pytest.raises(home_psi.MessageError, match="header party is 'h', expected 'other'"):
        home_psi.read_message(path, "request", "c", "other")
    with pytest.raises(home_psi.MessageError, match="header kind is 'request', expected 'response'"):
        home_psi.read_message(path, "response", "c", "h")
    with pytest.raises(home_psi.MessageError, match="answer the new request"):
        home_psi.read_message(path, "request", "c", "h", request_id="f" * 64)
    assert home_psi.read_message(path, "request", "c", "h", request_id=request.request_id).elements == request.elements


def test_key_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "party.key"
    keys = home_psi.generate_keys(path)
    assert os.stat(path).st_mode & 0o077 == 0
    assert home_psi.load_keys(path) == keys
    assert "<redacted>" in repr(keys)
    with pytest.raises(FileExistsError):
        home_psi.generate_keys(path)
    (tmp_path / "bad.key").write_text("{}")
    with pytest.raises(home_psi.MessageError, match="bad.key: not a key file"):
        home_psi.load_keys(tmp_path / "bad.key")


def _tolerant_policy(tmp_path: Path) -> Path:
    """demo_home with 1% invalid ad network identifiers tolerated."""
    folder = tmp_path / "policies" / "demo_home"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo_home", folder)
    path = folder / "collaboration.yaml"
    old = "user_email: {type: text, identifier: email, nullable: false, join: true}"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, old[:-1] + ", max_invalid_fraction: 0.01}"))
    return folder


def test_prepare_tokenises_the_files_drops_bad_identifiers_and_writes_the_setup(tmp_path: Path) -> None:
    loaded = load_collaboration(_tolerant_policy(tmp_path))
    source = tmp_path / "impressions.csv"
    pd.DataFrame({
        "user_email": [" Ana@X.org", "ana@x.org", "bo@y.org", "not-an-email"] + [f"p{i}@z.org" for i in range(196)],
        "campaign_id": ["spring_sale"] * 200,
        "impression_time": ["2026-02-01 10:00:00"] * 200,
    }).to_csv(source, index=False)
    keys = home_psi.HomeKeys(HOME_HMAC, psi.new_key())
    prepared, setup = home_psi.prepare(loaded, "ad_network", keys, {"impressions": source}, tmp_path / "out")
    (item,) = prepared
    assert (item.rows_in, item.rows_out, item.rejected) == (200, 199, {"invalid_email": 1})
    written = pd.read_csv(item.output, dtype=str)
    assert written["user_email"].tolist()[:3] == [token(HOME_HMAC, "ana@x.org")] * 2 + [token(HOME_HMAC, "bo@y.org")]
    assert "ana@x.org" not in item.output.read_text().lower()
    message = home_psi.read_message(setup, "setup", "demo_home", "ad_network")
    assert len(message.tokens) == 198 and set(message.tokens) == set(written["user_email"])


def test_prepare_refuses_a_file_with_too_many_bad_identifiers_and_writes_nothing(tmp_path: Path) -> None:
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo_home")
    source = tmp_path / "impressions.csv"
    pd.DataFrame({"user_email": ["bad", "ana@x.org"], "campaign_id": ["a", "b"], "impression_time": ["2026-01-01"] * 2}).to_csv(source, index=False)
    with pytest.raises(home_psi.MessageError, match=r"impressions\.csv: 1 of 2 rows have an invalid user_email"):
        home_psi.prepare(loaded, "ad_network", home_psi.HomeKeys(HOME_HMAC, psi.new_key()), {"impressions": source}, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(home_psi.MessageError, match="ad_network owns no dataset 'purchases'"):
        home_psi.prepare(loaded, "ad_network", home_psi.HomeKeys(HOME_HMAC, psi.new_key()), {"purchases": source}, tmp_path / "out")
