"""One normalisation rule, whoever applies it: the operator's SQL (dbt macros, on whatever server and locale) and a
party matching at home (Python, `dcr psi prepare`) must give the same value for every input, or the same person
would not match. A generated corpus of identifiers (non-ASCII letters, look-alikes, Unicode spaces, case pairs whose
mappings differ between Unicode's full and simple rules, astral characters) goes through both; any difference fails.
Run on the embedded server, and on the external one at 127.0.0.1:5432 when it is there (another version, another
locale).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest
from dbt.cli.main import dbtRunner

from dcr_pipelines.lib.identifiers import normalise
from dcr_pipelines.lib.settings import PROJECT_ROOT

TRICKY = (
    "AZaz09@.+-_'() \t\n\r\v\f"
    "\u00a0\u2003\u3000\u200b\u0085"  # Unicode spaces (and a zero-width one)
    "\u0130\u0131Ii\u00df\u1e9e\u03a3\u03c3\u03c2\u2126\u212a\u212b\u01c5\u01c8\u00c4\u00e4\u00d6\u00c9"  # İ ı ß ẞ Σ σ ς Ω K Å ǅ ǈ
    "\u0435\u0410\uff25\uff45\ufb01\u1f80\u2167\u24b6\U0001d400\U0001f600\u0301\u0345\u1e9b\u03d0"  # look-alikes, ﬁ, ᾀ, Ⅷ, Ⓐ, 𝐀
)
KINDS: list[tuple[str, dict[str, Any]]] = [
    ("email", {}),
    ("email", {"drop_plus_tag": True, "gmail_drop_dots": True}),
    ("customer_id", {"case": "lower"}),
    ("customer_id", {"case": "upper"}),
    ("customer_id", {"case": "preserve"}),
]  # (phone numbers: one Python function on both sides, see store/phones.py)


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)

    def part(k: int) -> str:
        return "".join(rng.choice(TRICKY) if rng.random() < 0.4 else rng.choice("abcdefghijKLMNOP.+") for _ in range(k))

    out = []
    for _ in range(n):
        shape = rng.random()
        if shape < 0.6:  # email-shaped
            out.append(f"{part(rng.randint(0, 8))}@{part(rng.randint(0, 6))}.{part(rng.randint(0, 3))}")
        elif shape < 0.8:  # phone-shaped
            out.append("".join(rng.choice("0123456789 +-().\u00a0\u0660\uff11") for _ in range(rng.randint(0, 18))))
        else:
            out.append("".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 12))))
    return out


def _compiled(tmp_path: Path) -> str:
    """The macros of every kind over table ``corpus(i, v)``, compiled by dbt (the hand-written macros alone)."""
    columns = ", ".join(
        f"{{{{ dcr_normalise_identifier('v', '{kind}', {json.dumps(options)}) }}}} as n{k}, "
        f"{{{{ dcr_identifier_problem('v', '{kind}', dcr_normalise_identifier('v', '{kind}', {json.dumps(options)})) }}}} as why{k}"
        for k, (kind, options) in enumerate(KINDS))
    project = tmp_path / "dbt"
    shutil.copytree(PROJECT_ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "models", "golden"))
    result = dbtRunner().invoke(["compile", "--quiet", "--inline", f"select i, {columns} from corpus order by i",
                                 "--project-dir", str(project), "--profiles-dir", str(project)])
    assert result.success, result.exception
    return str(result.result.results[0].node.compiled_code)


def _differences(url: str, compiled: str, values: list[str]) -> list[str]:
    with psycopg.connect(url) as conn:
        conn.execute("create temporary table corpus (i int, v text)")
        with conn.cursor().copy("copy corpus (i, v) from stdin") as copy:
            for i, value in enumerate(values):
                copy.write_row((i, value))
        rows = conn.execute(compiled.replace("%", "%%")).fetchall()
    out = []
    for row in rows:
        value = values[row[0]]
        for k, (kind, options) in enumerate(KINDS):
            sql_says = (row[1 + 2 * k], row[2 + 2 * k])
            python_says = normalise(value, kind, options)
            if sql_says != python_says:
                out.append(f"{kind} {options} {value!r}: SQL {sql_says}, Python {python_says}")
    return out


def test_sql_and_python_normalise_every_generated_identifier_alike(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    values = corpus(3000, seed=32)
    differences = _differences(runtime.warehouse.url(), _compiled(tmp_path), values)
    assert not differences, f"{len(differences)} differences, e.g. " + "; ".join(differences[:8])


def test_the_same_on_another_server_version_and_locale(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.OperationalError:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432 (the external server of the development and CI machines)")
    values = corpus(3000, seed=33)
    differences = _differences(url, _compiled(tmp_path), values)
    assert not differences, f"{len(differences)} differences, e.g. " + "; ".join(differences[:8])
