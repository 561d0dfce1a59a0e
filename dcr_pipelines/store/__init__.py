"""The store: every table the product keeps, and the only code that reads or writes them for the Dagster layer and the CLI.

``migrations`` owns the fixed tables (versioned SQL files, ``dcr db migrate``);
the other modules are typed functions over them, one module per concern.
"""

from typing import Any

import psycopg

Connection = psycopg.Connection[Any]


def open_connection(url: str) -> Connection:
    """An autocommit connection to the warehouse (store functions open their own transactions)."""
    return psycopg.connect(url, autocommit=True)
