"""A running `dcr ui` shows a new policy folder without "Reload definitions": its code location is reloaded when the
policies change (cli/_ui_reload.py), and the new collaboration's assets are in the webserver's GraphQL API."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from dcr_pipelines.lib.settings import PROJECT_ROOT

from .test_ui_stop import DCR, _free_port

pytestmark = pytest.mark.slow


def _collaborations(port: int) -> set[str]:
    """The first part of every asset key the webserver serves: the collaborations the UI shows."""
    try:
        answer = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": "{ assetNodes { assetKey { path } } }"}, timeout=30)
        return {node["assetKey"]["path"][0] for node in answer.json()["data"]["assetNodes"]}
    except (requests.RequestException, KeyError, TypeError, ValueError):
        return set()


def test_a_new_policy_folder_appears_in_the_running_ui(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCR_", "DAGSTER_", "DBT_", "PG"))}
    policies = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", policies / "demo")
    env.update({"DCR_HOME": str(tmp_path / "home"), "DCR_LANDING": str(tmp_path / "landing"), "DCR_POLICIES": str(policies)})
    port = _free_port()
    ui = subprocess.Popen([*DCR, "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "demo" not in _collaborations(port):
            assert ui.poll() is None, "dcr ui ended before the UI was up"
            time.sleep(2)
        assert _collaborations(port) == {"demo"}, "the UI did not serve the demo in 5 minutes"
        made = subprocess.run([*DCR, "policy", "new", "late_arrival", "--parties", "shop,media"], env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        started = time.monotonic()
        while time.monotonic() - started < 120 and "late_arrival" not in _collaborations(port):
            time.sleep(2)
        assert _collaborations(port) == {"demo", "late_arrival"}, "the new collaboration did not appear without a manual reload"
        # and a removed folder goes away the same way
        shutil.rmtree(policies / "late_arrival")
        started = time.monotonic()
        while time.monotonic() - started < 120 and "late_arrival" in _collaborations(port):
            time.sleep(2)
        assert _collaborations(port) == {"demo"}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
