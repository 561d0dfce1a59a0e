"""Policy mistakes about several identifiers and the parties a query reads: one error each, with file, line and field;
and what a valid policy builds (the sets of parties with a cross-reference, the generated models)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dcr_pipelines.lib import dbt_codegen
from dcr_pipelines.lib.policy import PolicyError, load_collaboration
from dcr_pipelines.lib.settings import PROJECT_ROOT

EXAMPLE = PROJECT_ROOT / "examples" / "three_parties"


@pytest.fixture
def three(tmp_path: Path) -> Path:
    target = tmp_path / "three_parties"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("*.py"))
    return target


def _edit(path: Path, old: str, new: str) -> int:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    return text[: text.index(old)].count("\n") + 1


def _issues(folder: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_collaboration(folder, approvals=False)
    return [str(i) for i in info.value.issues]


def test_the_example_builds_a_cross_reference_for_every_party_and_for_the_bank_and_the_telecom(three: Path) -> None:
    loaded = load_collaboration(three)
    assert loaded.collaboration.identity.kinds == ("email", "phone") and loaded.collaboration.identity.rule == "any_of"
    assert loaded.overlaps() == (("bank", "telecom", "airline"), ("bank", "telecom"))
    assert loaded.query_parties("plan_segments") == ("bank", "telecom")
    assert loaded.query_parties("flyer_segments") == ("bank", "telecom", "airline")
    models = {str(path): text for path, text in dbt_codegen.render(loaded).items()}
    # the airline's flyers have no view of the bank-telecom overlap; the query reads that overlap's views
    assert "analysis/mv_three_parties__flyers__bank__telecom.sql" not in models
    pairs = models["analysis/qry_three_parties__plan_segments.sql"]
    assert "mv_three_parties__accounts__bank__telecom" in pairs and "mv_three_parties__subscribers__bank__telecom" in pairs
    assert '"cross_reference__bank__telecom__links"' in models["analysis/mv_three_parties__accounts__bank__telecom.sql"]
    assert "mv_three_parties__accounts')" in models["analysis/qry_three_parties__flyer_segments.sql"]


@pytest.mark.parametrize(("old", "new", "field", "message"), [
    ("  any_of: [email, phone]", "  kind: email\n  any_of: [email, phone]", "identity", "declare either 'kind'"),
    ("  any_of: [email, phone]", "  any_of: [email]", "identity", "at least two identifier kinds"),
    ("  any_of: [email, phone]", "  any_of: [email, email]", "identity", "an identifier kind twice"),
    ("  any_of: [email, phone]", "  any_of: [email, phone]\n  priority: [phone, email]", "identity", "one match rule"),
    ("  any_of: [email, phone]", "  any_of: [email, fax]", "identity.any_of[1]", "is not one of"),
    ("  client: telecom", "  client: telecom\n  padding: true", "matching.padding", "not supported with several identifiers"),
    ("  client: telecom", "  client: telecom\n  key_epoch: 7d", "matching.key_epoch", "not supported with several identifiers"),
    ("  client: telecom", "  client: telecom\n  home_parties: [airline]", "matching.home_parties", "not supported with several identifiers"),
    ("      msisdn: {type: text, identifier: phone,", "      msisdn: {type: text, identifier: customer_id,", "datasets.subscribers.columns",
     "no column is an identifier of kind 'email' or 'phone'"),
])
def test_an_identity_mistake_names_its_line_and_field(three: Path, old: str, new: str, field: str, message: str) -> None:
    path = three / "collaboration.yaml"
    line = _edit(path, old, new)
    issues = [i for i in _issues(three) if f": {field}: " in i]
    assert any(message in i for i in issues), _issues(three)
    assert any(i.startswith(f"{path}:") for i in issues)
    # the line edited (or the one it added, or its parent key)
    assert field.startswith("datasets") or any(i.startswith(tuple(f"{path}:{n}:" for n in (line - 1, line, line + 1))) for i in issues), (line, issues)


@pytest.mark.parametrize(("new", "field", "message"), [
    ("parties: [bank]", "parties", "at least two parties"),
    ("parties: [bank, telecm]", "parties[1]", "'telecm' is not a party"),
    ("parties: [bank, airline]", "parties", "reads 'subscribers' of 'telecom', which is not in its parties"),
    ("rule: dp   # a query over some of the parties is released with noise", "rule", "is released with noise (rule: dp)"),
])
def test_a_query_parties_mistake_names_its_line(three: Path, new: str, field: str, message: str) -> None:
    path = three / "queries" / "plan_segments.yaml"
    if new.startswith("rule:"):  # an exact rule over some of the parties
        line = _edit(path, new, "rule: threshold\nmin_distinct_units: 10")
        _edit(path, "privacy:\n  epsilon: 1.0\n", "")
        _edit(path, "{domain: [prepaid, contract]}", "{}")
        _edit(path, "{domain: [retail, private]}", "{}")
    else:
        line = _edit(path, "parties: [bank, telecom]", new)
    issues = [i for i in _issues(three) if f": {field}: " in i]
    assert any(message in i for i in issues), _issues(three)
    assert any(i.startswith(f"{path}:{line}:") for i in issues), (line, issues)


def test_parties_that_share_no_identifier_kind_are_refused(three: Path) -> None:
    """The telecom knows phone numbers only, the airline emails only: the two alone can match nobody."""
    _edit(three / "queries" / "plan_segments.yaml", "parties: [bank, telecom]", "parties: [telecom, airline]")
    _edit(three / "queries" / "plan_segments.sql", "inner join accounts on accounts.match_id", "inner join flyers on flyers.match_id")
    _edit(three / "queries" / "plan_segments.sql", "accounts.segment", "flyers.status as segment")
    issues = _issues(three)
    assert any(": parties: " in i and "share(s) no identifier kind" in i for i in issues), issues


def test_a_second_column_of_one_kind_is_refused_with_several_identifiers(three: Path) -> None:
    path = three / "collaboration.yaml"
    _edit(path, "      segment: {type: text, nullable: false, dimension: true, allowed_values: [retail, private]}",
          "      work_email: {type: text, identifier: email, nullable: true}\n      segment: {type: text, nullable: false, dimension: true, allowed_values: [retail, private]}")
    issues = _issues(three)
    assert any("datasets.accounts.columns.work_email" in i and "two email identifier columns (email, work_email)" in i for i in issues), issues


def test_a_query_over_some_parties_refuses_settings_their_matching_lacks(tmp_path: Path) -> None:
    """One identifier, three parties: a subset query needs its own cross-reference, which padding does not have yet."""
    folder = tmp_path / "three_parties"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("*.py"))
    collab = folder / "collaboration.yaml"
    _edit(collab, "  any_of: [email, phone]", "  kind: phone")
    _edit(collab, "      email: {type: text, identifier: email, nullable: false, join: true}", "      email: {type: text, identifier: phone, nullable: false, join: true}")
    _edit(collab, "  client: telecom", "  client: telecom\n  padding: true")
    issues = _issues(folder)
    assert any("plan_segments.yaml" in i and ": parties: " in i and "padding (matching.padding) is not supported" in i for i in issues), issues
