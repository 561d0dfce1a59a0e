"""`--format` is for rows: the modes of a listing command that print a plan or a verdict refuse it (one `error:` line,
exit 2, before anything runs), and the format's name is case-insensitive like every other choice."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from dcr_pipelines.cli._output import _Format

TEXT_ONLY = {
    "release --dry-run": ["release", "demo", "tier_reach", "--dry-run", "--format", "json"],
    "query run --dry-run": ["query", "run", "demo", "--member", "ad_network", "--dry-run", "--format", "csv", "select 1"],
    "audit --verify": ["audit", "demo", "--verify", "--format", "json"],
    "audit --head": ["audit", "demo", "--head", "--format", "csv"],
}


@pytest.mark.parametrize("name", list(TEXT_ONLY))
def test_a_mode_that_prints_text_refuses_a_format(name: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", *TEXT_ONLY[name]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stderr  # refused before the database is reached
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --") and "prints text, not rows: drop --format" in lines[0], done.stderr


def test_format_names_are_case_insensitive_and_jsonl_is_accepted() -> None:
    choice = _Format()
    assert [choice.convert(v, None, None) for v in ("JSON", "Csv", "table", "JSONL")] == ["json", "csv", "table", "jsonl"]
    with pytest.raises(click.BadParameter, match="'xml' is not one of 'table', 'json', 'csv'"):
        choice.convert("xml", None, None)
