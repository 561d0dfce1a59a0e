"""The budget ledger on a real PostgreSQL: refusal with the numbers, and no overspending under concurrency."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from dcr_pipelines.lib.policy.models import Budget
from dcr_pipelines.store import ledger


def _release(url: str, schema: str, budget: Budget, cost: float, key: str | None = None) -> ledger.StoredRelease:
    with psycopg.connect(url, autocommit=True) as conn:
        return ledger.charge_release(
            conn, schema, collaboration="budgettest", query_name="q", budget=budget,
            key=key or uuid.uuid4().hex, params={}, input_versions={}, cost=cost,
            draw=lambda: [{"metric": "m", "value": 1.0}], store_rows=lambda *_: None,
        )


@pytest.fixture()
def schema(runtime) -> str:  # type: ignore[no-untyped-def]
    name = f"budget_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(runtime.warehouse.url(), autocommit=True) as conn:
        ledger.ensure_tables(conn, name)
    return name


def test_a_release_the_budget_cannot_cover_is_refused_with_cost_and_remaining(runtime, schema: str) -> None:  # type: ignore[no-untyped-def]
    budget = Budget(consumer="ad_network", epsilon=2.5, period_days=30)
    url = runtime.warehouse.url()
    _release(url, schema, budget, 1.0)
    _release(url, schema, budget, 1.0)
    with pytest.raises(ledger.BudgetExhausted) as info:
        _release(url, schema, budget, 1.0)
    message = str(info.value)
    assert "cost epsilon 1" in message and "remaining 0.5 of 2.5" in message and "refreshes at" in message
    with psycopg.connect(url) as conn:
        assert conn.execute(f"select count(*), sum(epsilon) from {schema}.budget_ledger").fetchone() == (2, 2.0)
        assert conn.execute(f"select count(*) from {schema}.releases").fetchone()[0] == 2


def test_an_identical_release_is_returned_without_a_charge(runtime, schema: str) -> None:  # type: ignore[no-untyped-def]
    budget = Budget(consumer="ad_network", epsilon=1.5)
    url = runtime.warehouse.url()
    first = _release(url, schema, budget, 1.0, key="same")
    for _ in range(20):  # averaging attack: the same question never draws fresh noise
        again = _release(url, schema, budget, 1.0, key="same")
        assert again.cached and again.release_id == first.release_id and again.rows == first.rows
    assert again.budget.spent == 1.0


def test_twenty_concurrent_releases_against_a_budget_for_five(runtime, schema: str) -> None:  # type: ignore[no-untyped-def]
    budget = Budget(consumer="ad_network", epsilon=5.0)
    url = runtime.warehouse.url()
    outcomes: list[str] = []
    barrier = threading.Barrier(20)

    def attempt() -> None:
        barrier.wait()
        try:
            _release(url, schema, budget, 1.0)
            outcomes.append("ok")
        except ledger.BudgetExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 5 and outcomes.count("refused") == 15
    with psycopg.connect(url) as conn:
        assert conn.execute(f"select sum(epsilon) from {schema}.budget_ledger").fetchone()[0] == 5.0


def test_a_failure_after_noise_is_drawn_stores_nothing_but_is_charged_with_a_generic_message(runtime, schema: str, caplog) -> None:  # type: ignore[no-untyped-def]
    budget = Budget(consumer="ad_network", epsilon=5.0)
    url = runtime.warehouse.url()

    def broken_store(conn, release_id, rows):  # type: ignore[no-untyped-def]
        raise OverflowError("value 1e308 of cell (north, spring_sale) overflowed")

    with psycopg.connect(url, autocommit=True) as conn, pytest.raises(ledger.ReleaseFailed) as info:
        ledger.charge_release(conn, schema, collaboration="budgettest", query_name="q", budget=budget, key="k", params={},
                       input_versions={}, cost=1.0, draw=lambda: [{"v": 1}], store_rows=broken_store)
    message = str(info.value)
    assert "charged epsilon 1" in message and "reference" in message
    assert "north" not in message and "1e308" not in message, "details go to the operator's log only"
    assert "overflowed" in caplog.text
    with psycopg.connect(url) as conn:
        assert conn.execute(f"select count(*), sum(epsilon) from {schema}.budget_ledger").fetchone() == (1, 1.0)
        assert conn.execute(f"select count(*) from {schema}.releases").fetchone()[0] == 0


def test_a_delta_cost_needs_a_delta_budget(runtime, schema: str) -> None:  # type: ignore[no-untyped-def]
    url = runtime.warehouse.url()
    with pytest.raises(ledger.BudgetExhausted, match="cost delta 1e-06, remaining delta 0"), psycopg.connect(url, autocommit=True) as conn:
        ledger.charge_release(conn, schema, collaboration="budgettest", query_name="q", budget=Budget(consumer="c", epsilon=5.0),
                       key="d", params={}, input_versions={}, cost=1.0, delta=1e-6, draw=list, store_rows=lambda *_: None)
