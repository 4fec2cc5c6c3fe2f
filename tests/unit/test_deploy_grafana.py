"""Grafana and ClickHouse-user wiring of deploy/ that needs no server: the dashboard JSON, its data
sources, the provisioning paths compose mounts, the metrics it graphs, and the users file's
references. (Its SQL runs in tests/integration/test_grafana_queries.py.)"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
COMPOSE_DIR = DEPLOY / "compose"
USERS_XML = COMPOSE_DIR / "clickhouse" / "users.d" / "spendstream.xml"
#: Python packages whose Prometheus metrics the dashboard may graph
SERVICE_PACKAGES = ("ingest_gateway", "query_api", "stream_processors", "spendstream")


def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in DASHBOARD_DIR.glob("*.json")}


def datasources() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((PROVISIONING / "datasources" / "spendstream.yaml").read_text())
    return {ds["uid"]: ds for ds in config["datasources"]}


def targets(board: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in board["panels"] for target in panel.get("targets", [])]


def test_dashboard_json_is_a_valid_grafana_dashboard() -> None:
    boards = dashboards()
    assert "spendstream.json" in boards
    for name, board in boards.items():
        assert board["uid"] and board["title"] and board["schemaVersion"] >= 36, name
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
            if panel["type"] != "row":
                assert panel["targets"], f"{panel['title']} queries nothing"
                assert panel.get("description"), f"{panel['title']}: say what the panel shows"


def test_every_query_uses_a_provisioned_datasource() -> None:
    provisioned = datasources()
    for board in dashboards().values():
        uses = [t["datasource"] for _, t in targets(board)] + [v["datasource"] for v in board["templating"]["list"]]
        for ref in uses:
            assert ref["uid"] in provisioned, ref
            assert provisioned[ref["uid"]]["type"] == ref["type"], ref


def test_clickhouse_queries_are_bounded_by_the_time_picker() -> None:
    """Otherwise a panel scans the whole retention whatever range the dashboard shows."""
    for board in dashboards().values():
        for panel, target in targets(board):
            if target["datasource"]["type"] == "grafana-clickhouse-datasource":
                assert re.search(r"\$__(timeFilter|fromTime)", target["rawSql"]), panel["title"]
                assert "$__conditionalAll(tenant IN (${tenant:singlequote}), $tenant)" in target["rawSql"], (
                    f"{panel['title']} ignores the tenant picker"
                )


def _base_metric_name(name: str) -> str:
    """prometheus_client adds _total to counters (and accepts it in the name given) and
    _bucket/_sum/_count to histogram series."""
    return re.sub(r"_(total|bucket|sum|count)$", "", name)


def _defined_metric_names() -> set[str]:
    names: set[str] = set()
    for package in SERVICE_PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            names |= {_base_metric_name(n) for n in re.findall(r"[\"'](spendstream_\w+)[\"']", path.read_text())}
    return names


def test_prometheus_panels_graph_metrics_the_services_export() -> None:
    defined = _defined_metric_names()
    scraped_jobs = {
        job["job_name"] for job in yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())["scrape_configs"]
    }
    for board in dashboards().values():
        for panel, target in targets(board):
            if target["datasource"]["type"] != "prometheus":
                continue
            for metric in re.findall(r"\bspendstream_\w+", target["expr"]):
                assert _base_metric_name(metric) in defined, f"{panel['title']}: no service exports {metric}"
            for job in re.findall(r'job=~?"([^"]+)"', target["expr"]):
                assert set(job.split("|")) <= scraped_jobs, f"{panel['title']}: job {job} is not scraped"


def test_compose_mounts_the_provisioning_where_grafana_reads_it() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("."))
    assert (COMPOSE_DIR / "../grafana/provisioning").resolve() == PROVISIONING
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "spendstream.yaml").read_text())["providers"][0]
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent.as_posix() == provider["options"]["path"] and (DASHBOARD_DIR / home.name).exists()


def test_clickhouse_datasource_logs_in_as_a_readonly_user_of_the_users_file() -> None:
    ds = datasources()["spendstream-clickhouse"]
    services = compose()["services"]
    users = ET.parse(USERS_XML).getroot().find("users")
    grafana_user = users.find(ds["jsonData"]["username"])
    assert grafana_user is not None
    profile = ET.parse(USERS_XML).getroot().find(f"profiles/{grafana_user.findtext('profile')}")
    assert profile.findtext("readonly") == "1"
    # the same password variable reaches ClickHouse (from_env) and Grafana (provisioning)
    password_env = grafana_user.find("password").get("from_env")
    assert ds["secureJsonData"]["password"] == f"${password_env}"
    assert password_env in services["grafana"]["environment"]
    assert services["grafana"]["environment"][password_env] == services["clickhouse"]["environment"][password_env]
    assert ds["jsonData"]["host"] == "clickhouse" and ds["jsonData"]["protocol"] == "native"


def test_users_file_references_resolve() -> None:
    root = ET.parse(USERS_XML).getroot()
    profiles = {p.tag for p in root.find("profiles")} | {"default"}
    quotas = {q.tag for q in root.find("quotas")} | {"default"}
    clickhouse_env = compose()["services"]["clickhouse"]["environment"]
    service_env = compose()["x-spendstream"]["environment"]
    for user in root.find("users"):
        assert user.findtext("profile") in profiles, user.tag
        assert user.findtext("quota") in quotas, user.tag
        assert user.find("password").get("from_env") in clickhouse_env, user.tag
    # the services log in as the `spendstream` user with the password ClickHouse was given
    assert root.find(f"users/{service_env['SPENDSTREAM_CLICKHOUSE__USERNAME']}") is not None
    assert service_env["SPENDSTREAM_CLICKHOUSE__PASSWORD"] == clickhouse_env["SPENDSTREAM_CLICKHOUSE_PASSWORD"]
