"""`spendstream gateway` as operators run it: a uvicorn process (here with two workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.kafka


def test_cli_gateway_with_two_workers_accepts_events_and_stops_on_sigterm(make_settings, unique_name, tmp_path):
    settings = make_settings(with_clickhouse=False)
    admin = "cli-admin-key-0123456789abcdef"
    env = {
        **os.environ,
        "SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka_bootstrap,
        "SPENDSTREAM_KAFKA__PROFILE": settings.kafka.profile,
        "SPENDSTREAM_CLICKHOUSE__URL": settings.clickhouse_url,
        "SPENDSTREAM_BOOTSTRAP_ADMIN_KEY": admin,
        "SPENDSTREAM_BOOTSTRAP_TENANT": unique_name("cli"),
        "SPENDSTREAM_GATEWAY__PORT": str(settings.gateway.port),
        "SPENDSTREAM_GATEWAY__WORKERS": "2",
        "SPENDSTREAM_LOG_LEVEL": "WARNING",
    }
    url = f"http://127.0.0.1:{settings.gateway.port}"
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spendstream.cli", "gateway"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        event = {"project": "p", "model": "openai/gpt-4o", "input_tokens": 1, "output_tokens": 1}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as client:
            answers = [client.post("/v1/events", json=event).status_code for _ in range(20)]
        assert answers == [202] * 20, log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
