"""What can be checked of deploy/ without a Docker engine or a Kubernetes cluster.

- the image: the Dockerfile builds the spendstream wheel from what it copies, the wheel holds
  every package and the schema where the migrator reads it, and the image installs that wheel;
- compose: the file parses, every Spendstream service runs a real `spendstream` command, every
  long-running service has a health check, mounted files exist, ports agree;
- Kubernetes: every manifest validates against the Kubernetes JSON schemas bundled with
  kubernetes-validate (offline), and the objects reference each other consistently;
- configuration: every SPENDSTREAM_* variable set anywhere in deploy/ is a real setting, and the
  sets of values validate as a production (non-embedded) configuration.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from typer.testing import CliRunner

import spendstream
from spendstream.cli import app as cli_app
from spendstream.migrate import SCHEMA_DIR
from spendstream.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
#: oldest Kubernetes minor the manifests support (autoscaling/v2, policy/v1 PDBs) and the newest
#: schema kubernetes-validate ships
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


# ---- helpers ---------------------------------------------------------------------------------


def assert_cli_command(args: list[str]) -> None:
    """``spendstream <args>`` names a real command with real options (parsed, not run)."""
    result = CliRunner().invoke(cli_app, [*args, "--help"])
    assert result.exit_code == 0, f"`spendstream {' '.join(args)}` is not a valid command:\n{result.output}"


def processor_stages() -> set[str]:
    command = typer.main.get_command(cli_app).commands["processors"]
    (stages,) = [p for p in command.params if p.name == "stages"]
    return set(stages.default.split(","))


def assert_known_stages(args: list[str]) -> None:
    if "--stages" in args:
        requested = set(args[args.index("--stages") + 1].split(","))
        assert requested <= processor_stages(), requested - processor_stages()


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def compose_default(value: Any) -> str:
    """A compose value with ``${VAR:-default}`` resolved as on a host where VAR is unset."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


def assert_is_setting(env_name: str) -> None:
    assert env_name.startswith("SPENDSTREAM_"), env_name
    model: Any = Settings
    for part in env_name.removeprefix("SPENDSTREAM_").lower().split("__"):
        assert part in model.model_fields, f"{env_name}: no setting {part!r} in {model.__name__}"
        model = model.model_fields[part].annotation
    assert not hasattr(model, "model_fields"), f"{env_name} names a section, not a setting"


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for name in [n for n in os.environ if n.startswith("SPENDSTREAM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ---- the image -------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def named_stage(name: str) -> list[tuple[str, str]]:
    """The instructions of the build stage ``FROM ... AS <name>``."""
    (stage,) = [stage for stage in dockerfile_stages() if stage[0][1].split()[-1] == name]
    return stage


def context_copies(stage: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(source, absolute destination) of every build-context COPY in a build stage."""
    workdir, copies = "/", []
    for keyword, rest in stage:
        if keyword == "WORKDIR":
            workdir = rest
        elif keyword == "COPY" and not rest.startswith("--from"):
            *sources, dest = rest.split()
            for source in sources:
                target = dest if dest.startswith("/") else f"{workdir}/{dest}"
                if target.endswith("/"):
                    target += Path(source).name
                copies.append((source, os.path.normpath(target)))
    return copies


def test_runtime_image_runs_spendstream_as_non_root() -> None:
    runtime = dict(dockerfile_stages()[-1])
    assert json.loads(runtime["ENTRYPOINT"]) == ["spendstream"]
    user = runtime["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "numeric USER so Kubernetes' runAsNonRoot can verify it"
    k8s_uid = {
        doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        for doc in all_k8s_docs()
        if doc["kind"] in ("Deployment", "Job")
    }
    assert k8s_uid == {int(user)}
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "spendstream" in pyproject["project"]["scripts"]
    assert CliRunner().invoke(cli_app, json.loads(runtime["CMD"])).exit_code == 0


def test_image_installs_a_wheel_holding_every_package_and_the_schema(tmp_path: Path) -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    builder, runtime = named_stage("builder"), named_stage("runtime")
    copies = dict(context_copies(builder))
    # what the wheel is built from: the packages, the schema spendstream/schema links to, metadata
    assert packages | {"clickhouse", "pyproject.toml", "README.md"} <= set(copies)
    assert all(dest.startswith("/src/") for dest in copies.values())
    builder_runs = [rest for keyword, rest in builder if keyword == "RUN"]
    assert any(re.fullmatch(r"pip wheel .*--no-deps --no-index .*--wheel-dir /dist \.", run) for run in builder_runs)
    # the runtime installs that wheel (not editable) and holds no source tree
    assert context_copies(runtime) == []
    runtime_runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert re.search(r"pip install --no-index --no-deps /dist/spendstream-\S*\.whl", runtime_runs)
    assert not re.search(r"\s(-e|--editable)\s", runtime_runs)

    # Rebuild the builder's /src from its COPY lines (links kept, as COPY keeps them) and build the
    # wheel as the builder does, with the locked build backend (from this venv here): the wheel must
    # hold every module of the packages, and the schema files where the migrator reads them.
    src = tmp_path / "src"
    for source, dest in copies.items():
        target = src / Path(dest).relative_to("/src")
        if (REPO_ROOT / source).is_dir():
            shutil.copytree(REPO_ROOT / source, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / source, target)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("spendstream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    modules = {
        path.relative_to(REPO_ROOT).as_posix()
        for package in packages
        for path in (REPO_ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert modules and not modules - names, sorted(modules - names)
    schema = sorted(p.name for p in (REPO_ROOT / "clickhouse" / "schema").glob("*.sql"))
    assert schema
    assert sorted(n.removeprefix("spendstream/schema/") for n in names if n.startswith("spendstream/schema/")) == schema
    # ... which is inside the installed package, wherever that is
    assert Path(str(SCHEMA_DIR)) == Path(spendstream.__file__).parent / "schema"


def test_dockerignore_keeps_what_the_image_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**" in ignore, "allow-list: everything else (.venv, .spendstream, .git) stays out"
    copied = {source.rstrip("/") for stage in dockerfile_stages() for source, _ in context_copies(stage)}
    assert copied <= kept


# ---- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def spendstream_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def test_compose_spendstream_services_build_this_repo(compose: dict[str, Any]) -> None:
    services = spendstream_services(compose)
    assert {"migrate", "gateway", "processors", "query-api"} <= set(services)
    for svc in services.values():
        assert (COMPOSE_FILE.parent / svc["build"]["context"]).resolve() == REPO_ROOT
        assert (REPO_ROOT / svc["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_commands_are_real_spendstream_commands(compose: dict[str, Any]) -> None:
    for name, svc in spendstream_services(compose).items():
        command = svc["command"]
        assert isinstance(command, list), f"{name}: exec form, so the image's ENTRYPOINT runs it"
        assert_cli_command(command)
        assert_known_stages(command)


def test_compose_infrastructure_is_the_real_thing(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka_env = services["kafka"]["environment"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft"
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    mounts = [v.split(":")[1] for v in services["clickhouse"]["volumes"] if v.startswith("./")]
    assert "/etc/clickhouse-server/users.d/spendstream.xml" in mounts
    assert "grafana-clickhouse-datasource" in services["grafana"]["environment"]["GF_INSTALL_PLUGINS"]


def test_compose_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        if name == "migrate":
            assert svc["restart"] == "no", "one-shot job"
            assert "healthcheck" not in svc
        elif name == "collectors":
            # a scheduler without a port: its health is its runs (GET /v1/collectors/status), and
            # nothing depends on it
            assert svc["restart"] == "unless-stopped" and not any(
                "collectors" in s.get("depends_on", {}) for s in services.values()
            )
        else:
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, condition in svc.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if dependency == "migrate" else "service_healthy"
            assert condition["condition"] == expected, (name, dependency)
    for name in ("gateway", "processors", "query-api", "collectors"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name} mounts missing {source}"


def test_compose_settings_are_valid_production_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: compose_default(v) for k, v in compose["x-spendstream"]["environment"].items()}
    for name in env:
        assert_is_setting(name)
    settings = settings_from_env(monkeypatch, env)
    assert not settings.kafka.embedded and not settings.clickhouse.embedded
    # the same variables reach every service (nobody overrides the anchor with a partial copy)
    for svc in spendstream_services(compose).values():
        assert {k: compose_default(v) for k, v in svc["environment"].items()} == env


def test_compose_ports_agree(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: compose_default(v) for k, v in compose["x-spendstream"]["environment"].items()}
    settings = settings_from_env(monkeypatch, env)
    ports = {
        "gateway": settings.gateway.port,
        "query-api": settings.query_api.port,
        "processors": settings.processors.web_port,
    }
    services = compose["services"]
    prometheus = yaml.safe_load((COMPOSE_FILE.parent / "prometheus.yml").read_text())
    scraped = {
        job["job_name"]: (sd["names"], sd["port"])
        for job in prometheus["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }
    for name, port in ports.items():
        assert f"127.0.0.1:{port}/" in " ".join(services[name]["healthcheck"]["test"])
        assert scraped[name] == ([name], port)
        for published in services[name].get("ports", []):
            assert published.endswith(f":{port}")


def test_compose_processors_fit_the_partitions(compose: dict[str, Any]) -> None:
    partitions = int(compose["x-spendstream"]["environment"]["SPENDSTREAM_KAFKA__PARTITIONS"])
    assert 1 <= compose["services"]["processors"]["deploy"]["replicas"] <= partitions


# ---- Kubernetes ------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / name for name in kustomization["resources"]]


def all_k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in k8s_files() for doc in load_yaml_docs(path)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in all_k8s_docs() if doc["kind"] == kind}


def test_kustomization_lists_every_manifest() -> None:
    listed = {p.name for p in k8s_files()}
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    docs = all_k8s_docs()
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Job",
        "ConfigMap",
        "Secret",
    } <= {d["kind"] for d in docs}
    for doc in docs:
        # strict: unknown fields (a misspelt probe, say) fail instead of being ignored
        kubernetes_validate.validate(doc, version, strict=True)


def workloads() -> dict[str, dict[str, Any]]:
    return {**by_kind("Deployment"), **by_kind("Job")}


def containers() -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, w in workloads().items() for c in w["spec"]["template"]["spec"]["containers"]]


def k8s_env() -> dict[str, str]:
    (config,) = by_kind("ConfigMap").values()
    (secret,) = by_kind("Secret").values()
    return {**config["data"], **secret["stringData"]}


def test_k8s_settings_are_valid_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = k8s_env()
    for name in env:
        assert_is_setting(name)
    settings = settings_from_env(monkeypatch, env)
    assert not settings.kafka.embedded and not settings.clickhouse.embedded
    assert settings.kafka.replication_factor >= 3, "production topics survive a broker loss"
    for name, container in containers():
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == set(by_kind("ConfigMap")) | set(by_kind("Secret")), name


def test_k8s_containers_run_real_spendstream_commands() -> None:
    kustomize_images = {i["name"] for i in yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]}
    commands = {}
    for name, container in containers():
        assert "command" not in container, f"{name}: keep the image's ENTRYPOINT"
        assert container["image"].split(":")[0] in kustomize_images
        args = container["args"]
        assert_cli_command(args)
        assert_known_stages(args)
        commands[args[0]] = args
    assert set(commands) == {"gateway", "query-api", "processors", "migrate", "collectors"}


def test_k8s_migrate_job_applies_the_cluster_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job passes no --cluster: `spendstream migrate` takes settings.clickhouse.cluster then."""
    (job,) = by_kind("Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    settings = settings_from_env(monkeypatch, k8s_env())
    assert settings.clickhouse.cluster, "the k8s deployment targets a ClickHouse cluster"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_k8s_selectors_match_their_pods() -> None:
    deployments = by_kind("Deployment")
    for name, deployment in deployments.items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name

    def selected(selector: dict[str, str]) -> list[str]:
        return [
            n for n, d in deployments.items() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for kind, path in (("Service", ("spec", "selector")), ("PodDisruptionBudget", ("spec", "selector", "matchLabels"))):
        for name, doc in by_kind(kind).items():
            if doc["spec"].get("type") == "ExternalName":
                continue
            selector = doc
            for key in path:
                selector = selector[key]
            assert len(selected(selector)) == 1, f"{kind} {name} selects {selected(selector)}"
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind("HorizontalPodAutoscaler").values()}
    assert hpa_targets == {"spendstream-gateway", "spendstream-query-api"}
    for target in hpa_targets:
        assert "replicas" not in deployments[target]["spec"], f"{target}: the HPA owns replicas"
    assert {p["metadata"]["name"] for p in by_kind("PodDisruptionBudget").values()} == set(deployments)


def test_k8s_ports_and_probes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_env(monkeypatch, k8s_env())
    expected = {
        "spendstream-gateway": settings.gateway.port,
        "spendstream-query-api": settings.query_api.port,
        "spendstream-processors": settings.processors.web_port,
    }
    deployments = by_kind("Deployment")
    for name, port in expected.items():
        pod = deployments[name]["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        assert [p["containerPort"] for p in container["ports"]] == [port]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        probe_paths = {container[p]["httpGet"]["path"] for p in container if p.endswith("Probe")}
        assert probe_paths <= {"/readyz", "/healthz", "/metrics"} and probe_paths, name
    for name, service in by_kind("Service").items():
        if name in expected:
            assert [p["port"] for p in service["spec"]["ports"]] == [expected[name]]


def test_k8s_processors_are_sized_to_partitions() -> None:
    partitions = int(k8s_env()["SPENDSTREAM_KAFKA__PARTITIONS"])
    processors = by_kind("Deployment")["spendstream-processors"]
    replicas = processors["spec"]["replicas"]
    assert partitions % replicas == 0, "each worker should hold an equal share of partitions"
    assert "spendstream-processors" not in {
        h["spec"]["scaleTargetRef"]["name"] for h in by_kind("HorizontalPodAutoscaler").values()
    }


def test_k8s_pods_are_locked_down() -> None:
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], name
            # the read-only root needs a writable data dir (the image's WORKDIR) and /tmp
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/var/lib/spendstream", "/tmp"} <= mounts, name


# ---- deploy/README.md: every command is one the repo provides --------------------------------


def readme_commands() -> list[list[str]]:
    """Every line of the ```sh blocks, and every inline `code` span that starts with a tool."""
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    lines = [line.strip() for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    lines += re.findall(r"(?<!`)`((?:docker|kubectl|spendstream|make) [^`]+)`", text)
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def _option_value(args: list[str], *names: str) -> str | None:
    for name in names:
        if name in args:
            return args[args.index(name) + 1]
    return None


def check_docker(args: list[str], compose: dict[str, Any]) -> None:
    if args[:2] == ["compose", "-f"]:
        assert (REPO_ROOT / args[2]).resolve() == COMPOSE_FILE
        verb, rest = args[3], args[4:]
        if verb == "run":
            positional = [a for a in rest if not a.startswith("-")]
            service, command = positional[0], rest[rest.index(positional[0]) + 1 :]
            assert service in spendstream_services(compose), service
            assert_cli_command(command)
        elif verb == "up":
            scale = _option_value(rest, "--scale")
            assert scale is None or scale.split("=")[0] in compose["services"]
        else:
            assert verb in ("ps", "down") and not rest, args
    elif args[0] == "build":
        assert (REPO_ROOT / _option_value(args, "-f")).resolve() == DOCKERFILE and args[-1] == "."
    elif args[0] == "run":
        image_at = next(i for i, a in enumerate(args) if re.match(r"^[\w./-]*spendstream:", a))
        assert_cli_command(args[image_at + 1 :])
    else:
        assert args[0] == "push" and args[1].split("/")[-1].startswith("spendstream:"), args


def check_kubectl(args: list[str]) -> None:
    if args[:2] == ["apply", "-k"]:
        assert (REPO_ROOT / args[2] / "kustomization.yaml").exists()
        return
    assert args[:2] == ["-n", "spendstream"], "every object lives in namespace spendstream"
    assert {d["metadata"].get("namespace", "spendstream") for d in all_k8s_docs()} == {"spendstream"}
    verb, rest = args[2], args[3:]
    kinds = {"job": "Job", "deployment": "Deployment", "service": "Service"}
    objects = [a for a in rest if "/" in a and a.split("/")[0] in kinds]
    if verb == "delete":
        objects = [f"{rest[0]}/{rest[1]}"]
    for ref in objects:
        kind, name = ref.split("/")
        assert name in by_kind(kinds[kind]), ref
    if verb == "exec":
        command = rest[rest.index("--") + 1 :]
        assert command[0] == "spendstream"
        assert_cli_command(command[1:])
    elif verb == "port-forward":
        local, remote = rest[-1].split(":")
        service = by_kind("Service")[objects[0].split("/")[1]]
        assert int(remote) in {p["port"] for p in service["spec"]["ports"]}
    else:
        assert verb in ("wait", "rollout", "delete"), verb


def test_readme_commands_are_ones_the_repo_provides(compose: dict[str, Any]) -> None:
    commands = readme_commands()
    assert len(commands) >= 15
    makefile_targets = set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))
    for args in commands:
        tool, rest = args[0], args[1:]
        if tool == "docker":
            check_docker(rest, compose)
        elif tool == "kubectl":
            check_kubectl(rest)
        elif tool == "spendstream":
            assert_cli_command(rest)
        elif tool == "make":
            assert set(rest) <= makefile_targets, rest
        else:
            raise AssertionError(f"`{' '.join(args)}` is not a command the repository provides")


def test_sizing_table_cites_sections_the_bench_results_have() -> None:
    readme = (DEPLOY / "README.md").read_text()
    # the second column of the sizing table: a quoted section name, or "not yet measured"
    cited = set(re.findall(r'^\|[^|\n]*\| "([^"]+)" \|', readme, re.M))
    assert cited, "the sizing guide points at measured figures"
    headings = re.findall(r"^#+\s*(.+?)\s*$", (REPO_ROOT / "bench" / "RESULTS.md").read_text(), re.M)
    assert cited <= set(headings), (
        f"deploy/README.md cites sections bench/RESULTS.md does not have: {cited - set(headings)}"
    )
    for module in re.findall(r"`(bench/\w+\.py)`", readme):
        assert (REPO_ROOT / module).exists(), module
