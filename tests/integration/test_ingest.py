"""Uploads are checked against their contract through Dagster; a bad one is refused by name and loses nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.defs.resources import WarehouseResource
from dcr_pipelines.lib import naming
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.runner import ingest_run_config, materialize
from dcr_pipelines.services import ingest

from .conftest import COLLAB, make_collaboration

pytestmark = pytest.mark.slow
HEADER = "customer_email,purchase_value,purchase_date,store_region\n"


def _upload(ctx: dict[str, Any], collab: str, party: str, dataset: str, name: str, content: bytes) -> tuple[Any, Path]:
    folder = ctx["settings"].landing / collab / party / dataset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    outcome = materialize(
        ctx["defs"], [naming.raw_key(collab, dataset)], instance=dg.DagsterInstance.get(),
        run_config=ingest_run_config(collab, dataset, str(path)),
    )
    return outcome, path


def _state(url: str, collab: str, party: str, dataset: str) -> tuple[Any, ...]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f'select count(*), md5(string_agg(t::text, \'|\' order by t::text)) from "{naming.raw_schema(collab, party)}"."{dataset}" t').fetchone()
        current = conn.execute(
            "select version from dcr_meta.dataset_versions where collaboration = %s and dataset = %s and is_current", (collab, dataset)
        ).fetchall()
    return rows, current


def _quarantined(ctx: dict[str, Any], collab: str, party: str, dataset: str, name: str) -> dict[str, Any]:
    folder = ctx["settings"].landing / "_quarantine" / collab / party / dataset
    reports = sorted(folder.glob(f"*__{name}.report.json"))
    assert reports, f"no quarantine report for {name}"
    assert reports[-1].with_name(reports[-1].name.removesuffix(".report.json")).is_file()
    return json.loads(reports[-1].read_text())


BAD_CSV = [
    ("missing_column.csv", b"customer_email,purchase_value,purchase_date\na@example.com,1,2026-01-02\n", "missing column(s) store_region", None),
    ("unknown_column.csv", HEADER.strip().encode() + b",ssn\na@example.com,1,2026-01-02,north,1\n", "unknown column(s) ssn", None),
    ("wrong_type.csv", (HEADER + "a@example.com,1,2026-01-02,north\nb@example.com,lots,2026-01-02,north\n").encode(), "row 2: column purchase_value is not a valid numeric", None),
    ("ragged.csv", (HEADER + "a@example.com,1,2026-01-02,north\nb@example.com,1,2026-01-02\n").encode(), "row 2", None),
    ("not_utf8.csv", HEADER.encode() + b"a@example.com,1,2026-01-02,north\n\xff\xfeb@example.com,1,2026-01-02,north\n", "line 3 is not valid utf-8 text", None),
    ("empty.csv", b"", "the file is empty", None),
    ("header_only.csv", HEADER.encode(), "a header but no data rows", None),
    ("blank_identifier.csv", (HEADER + "a@example.com,1,2026-01-02,north\n  ,1,2026-01-02,north\n").encode(), "not_blank on customer_email: 1 row(s) broke it (rows 2)", "not_blank"),
    ("null_identifier.csv", (HEADER + "a@example.com,1,2026-01-02,north\n,1,2026-01-02,north\n").encode(), "expect_column_values_to_not_be_null on customer_email: 1 row(s) broke it (rows 2)", "expect_column_values_to_not_be_null"),
    ("duplicates.csv", (HEADER + "a@example.com,1,2026-01-02,north\n" * 3 + "b@example.com,2,2026-01-03,south\n").encode(), "max_duplicate_fraction", "max_duplicate_fraction"),
    ("out_of_range.csv", (HEADER + "a@example.com,1,2026-01-02,north\nb@example.com,200000,2026-01-02,north\n").encode(), "expect_column_values_to_be_between on purchase_value: 1 row(s) broke it (rows 2)", "expect_column_values_to_be_between"),
    ("bad_region.csv", (HEADER + "a@example.com,1,2026-01-02,middle\n").encode(), "expect_column_values_to_be_in_set on store_region: 1 row(s) broke it (rows 1)", "expect_column_values_to_be_in_set"),
    ("bad_emails.csv", (HEADER + "a@example.com,1,2026-01-02,north\nnot-an-email,1,2026-01-02,north\n").encode(), "email_format on customer_email: 1 row(s) broke it (rows 2)", "email_format"),
]


@pytest.mark.parametrize(("name", "content", "message", "rule"), BAD_CSV, ids=[b[0] for b in BAD_CSV])
def test_a_bad_csv_is_refused_by_rule_and_row_and_nothing_changes(e2e: dict[str, Any], name: str, content: bytes, message: str, rule: str | None) -> None:
    before = _state(e2e["url"], COLLAB, "retailer", "purchases")
    outcome, path = _upload(e2e, COLLAB, "retailer", "purchases", name, content)
    assert not outcome.success
    assert message in (outcome.failure or ""), outcome.failure
    assert "example.com" not in (outcome.failure or ""), "reports never repeat identifier values"
    assert _state(e2e["url"], COLLAB, "retailer", "purchases") == before
    assert not path.exists(), "the rejected file left the landing folder"
    report = _quarantined(e2e, COLLAB, "retailer", "purchases", name)
    assert "example.com" not in json.dumps(report)
    if rule is not None:
        failed = [r for r in report["rules"] if not r["success"]]
        assert any(r["rule"] == rule for r in failed), failed


def test_a_path_escaping_the_landing_folder_is_refused_and_a_link_is_quarantined_unfollowed(e2e: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text(HEADER + "a@example.com,1,2026-01-02,north\n")
    before = outside.read_bytes()
    folder = e2e["settings"].landing / COLLAB / "retailer" / "purchases"
    folder.mkdir(parents=True, exist_ok=True)
    for path in (folder / ".." / ".." / ".." / ".." / outside.name, outside, folder / ".." / "purchases" / ".." / outside.name):
        outcome = materialize(e2e["defs"], [naming.raw_key(COLLAB, "purchases")], instance=dg.DagsterInstance.get(),
                              run_config=ingest_run_config(COLLAB, "purchases", str(path)))
        assert not outcome.success and "outside the landing folder" in (outcome.failure or "")
    link = folder / "link.csv"
    link.symlink_to(outside)
    outcome = materialize(e2e["defs"], [naming.raw_key(COLLAB, "purchases")], instance=dg.DagsterInstance.get(),
                          run_config=ingest_run_config(COLLAB, "purchases", str(link)))
    assert not outcome.success and "a symbolic link" in (outcome.failure or ""), outcome.failure
    assert not link.is_symlink(), "the link left the landing folder"
    quarantined = list((e2e["settings"].landing / "_quarantine" / COLLAB / "retailer" / "purchases").glob("*__link.csv"))
    assert quarantined and quarantined[0].is_symlink(), "the link itself was moved, not its target"
    assert outside.read_bytes() == before


# --- other formats, ignore mode, versions: a collaboration of their own --------------------


@pytest.fixture(scope="module")
def formats(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("formats_policies")
    folder = make_collaboration(root, "formats", groups=3)
    collab = folder / "collaboration.yaml"
    text = collab.read_text().replace("format: {type: csv}", "format: {type: parquet}", 1).replace("format: {type: csv}", "format: {type: jsonl}\n    unknown_columns: ignore", 1)
    collab.write_text(text)
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    defs = build_definitions(settings)
    assert materialize(defs, [naming.grants_key("formats")], instance=dg.DagsterInstance.get()).success
    return {"defs": defs, "settings": settings, "url": runtime.warehouse.url()}


def _parquet_bytes(tmp: Path, rows: int = 3) -> bytes:
    table = pa.table({
        "customer_email": [f"p{i}@example.com" for i in range(rows)],
        "purchase_value": [10.5 + i for i in range(rows)],
        "purchase_date": ["2026-02-01"] * rows,
        "store_region": ["north"] * rows,
    })
    path = tmp / "p.parquet"
    pq.write_table(table, path)
    return path.read_bytes()


def test_parquet_uploads_load_and_a_truncated_one_is_refused(formats: dict[str, Any], tmp_path: Path) -> None:
    data = _parquet_bytes(tmp_path, rows=5)
    ok, _ = _upload(formats, "formats", "retailer", "purchases", "good.parquet", data)
    assert ok.success, ok.failure
    assert ok.metadata["formats/raw/raw_purchases"]["row_count"] == 5
    before = _state(formats["url"], "formats", "retailer", "purchases")
    bad, _ = _upload(formats, "formats", "retailer", "purchases", "truncated.parquet", data[: len(data) // 2])
    assert not bad.success and "not a valid Parquet file" in (bad.failure or "")
    assert _state(formats["url"], "formats", "retailer", "purchases") == before


def test_json_lines_load_extra_columns_are_ignored_when_the_dataset_says_so_and_a_bad_line_is_refused(formats: dict[str, Any]) -> None:
    lines = [json.dumps({"user_email": f"u{i}@example.com", "campaign_id": "spring_sale", "impression_time": "2026-02-01T10:00:00", "extra": i}) for i in range(4)]
    ok, _ = _upload(formats, "formats", "ad_network", "impressions", "good.jsonl", ("\n".join(lines) + "\n").encode())
    assert ok.success, ok.failure
    before = _state(formats["url"], "formats", "ad_network", "impressions")
    broken = lines[:2] + ['{"user_email": "x@example.com", "campaign_id": '] + lines[2:]
    bad, _ = _upload(formats, "formats", "ad_network", "impressions", "bad.jsonl", ("\n".join(broken) + "\n").encode())
    assert not bad.success and "line 3 is not JSON" in (bad.failure or "")
    assert _state(formats["url"], "formats", "ad_network", "impressions") == before


def test_a_new_version_replaces_the_old_and_earlier_versions_stay_listed(formats: dict[str, Any], tmp_path: Path) -> None:
    first, _ = _upload(formats, "formats", "retailer", "purchases", "v_a.parquet", _parquet_bytes(tmp_path, rows=7))
    second, _ = _upload(formats, "formats", "retailer", "purchases", "v_b.parquet", _parquet_bytes(tmp_path, rows=9))
    assert first.success and second.success
    with psycopg.connect(formats["url"]) as conn:
        listed = ingest.versions(conn, "formats", "retailer", "purchases")
        rows = conn.execute(f'select count(*) from "{naming.raw_schema("formats", "retailer")}".purchases').fetchone()[0]
    assert rows == 9
    assert [v["row_count"] for v in listed[:2]] == [9, 7]
    assert listed[0]["is_current"] and not listed[1]["is_current"]
    assert len({v["checksum"] for v in listed}) == len(listed)


def test_the_upload_check_and_profile_show_in_dagster(formats: dict[str, Any], tmp_path: Path) -> None:
    outcome, _ = _upload(formats, "formats", "retailer", "purchases", "profiled.parquet", _parquet_bytes(tmp_path, rows=11))
    assert outcome.success
    meta = outcome.metadata["formats/raw/raw_purchases"]
    assert meta["null_fractions"] == {"customer_email": 0.0, "purchase_value": 0.0, "purchase_date": 0.0, "store_region": 0.0}
    assert meta["duplicate_rows"] == 0
    evaluations = [
        e.dagster_event.event_specific_data
        for e in dg.DagsterInstance.get().all_logs(outcome.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert {ev.check_name for ev in evaluations} == {"upload_contract", "uploads_accepted"} and all(ev.passed for ev in evaluations)
    rules = next(ev for ev in evaluations if ev.check_name == "upload_contract").metadata["rules"].value
    assert {r["rule"] for r in rules} >= {"expect_table_row_count_to_be_between", "email_format", "expect_column_values_to_be_in_set"}


def test_the_landing_sensor_launches_an_ingest_for_each_new_file_only(formats: dict[str, Any], tmp_path: Path) -> None:
    landing = formats["settings"].landing
    sensor = next(s for s in formats["defs"].sensors if s.name == "formats__landing_files")
    folder = landing / "formats" / "retailer" / "purchases"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*"):
        stale.unlink()
    undeclared = landing / "formats" / "retailer" / "returns"
    undeclared.mkdir(parents=True, exist_ok=True)
    (undeclared / "x.csv").write_text("a\n1\n")
    (folder / "sensed.parquet").write_bytes(_parquet_bytes(tmp_path, rows=4))
    (folder / ".partial.parquet").write_bytes(b"incomplete")
    instance = dg.DagsterInstance.get()
    resources = {"warehouse": WarehouseResource(url=formats["url"])}
    with dg.build_sensor_context(instance=instance, definitions=formats["defs"], resources=resources) as context:
        result = sensor(context)
    runs = result.run_requests
    assert len(runs) == 1 and runs[0].asset_selection == [dg.AssetKey(naming.raw_key("formats", "purchases"))]
    assert not (folder / "sensed.parquet").exists(), "the sensor claimed the file into the queue"
    assert (folder / ".partial.parquet").exists(), "a file still being written (hidden name) is left alone"
    with dg.build_sensor_context(instance=instance, definitions=formats["defs"], resources=resources) as context:
        again = sensor(context)
    assert [r.run_key for r in getattr(again, "run_requests", [])] == [runs[0].run_key], "the waiting upload keeps its run key (launched once)"
    outcome = materialize(formats["defs"], [naming.raw_key("formats", "purchases")], instance=instance, run_config=runs[0].run_config)
    assert outcome.success and outcome.metadata["formats/raw/raw_purchases"]["row_count"] == 4
    (folder / ".partial.parquet").unlink()
