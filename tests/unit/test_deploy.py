"""The deployment files stay true to the code: Dockerfile, docker-compose.yml and the Helm chart.

No Docker engine or helm binary is needed: the files are parsed, every `fleet` command line in them is parsed by
the CLI's own click commands (unknown options and bad choices fail), every environment variable is a declared
setting, every pool's queue is a real queue, and every template is balanced. When the optional ``helm_python``
package (Helm's Go SDK) is importable, the chart is also rendered and the rendered commands are checked the same
way.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, Iterator

import click
import pytest
import yaml

from producer_api.cli import cli
from shared.routing import queue_name
from shared.schemas import ModelType, TimeFrame
from shared.settings import FleetSettings, settings_table

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "finsight-fleet"
TEMPLATES = CHART / "templates"

SETTINGS = {name for name, _, _ in settings_table()}
#: Variables of other programs that the deployment files set on purpose.
FOREIGN_ENV = {"FLOWER_BASIC_AUTH"}  # Flower reads its own options from FLOWER_*
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --- helpers -------------------------------------------------------------------------------------------------


def parse_fleet(argv: list[str]) -> click.Context:
    """Parse ``fleet ARGV`` with the real click commands, without running anything."""
    command: click.Command = cli
    args = list(argv)
    path = ["fleet"]
    while isinstance(command, click.Group):
        assert args, f"`{' '.join(path)}` needs a subcommand"
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"`{' '.join(path)}` has no subcommand {args[0]!r}"
        path.append(args.pop(0))
        command = sub
    return command.make_context(" ".join(path), args)


def option_names(*path: str) -> set[str]:
    command: click.Command = cli
    for name in path:
        command = command.get_command(click.Context(command), name)  # type: ignore[union-attr]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose interpolation with every variable unset: ``${X:-default}`` -> default, ``$$`` -> ``$``."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def shell_fleet_calls(script: str) -> Iterator[list[str]]:
    """The argv of every ``fleet ...`` command in a shell script (up to the next ``;``, ``|``, ``)``...)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        if token == "fleet":
            argv = []
            for t in tokens[i + 1:]:
                if t and set(t) <= set(";|&()"):
                    break
                argv.append(t)
            yield argv


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service_fleet_calls(service: dict[str, Any]) -> list[list[str]]:
    """The `fleet` command lines a compose service runs (its command, or the fleet calls of its sh script)."""
    entrypoint = service.get("entrypoint")
    command = interpolate(service.get("command"))
    if entrypoint is None:
        return [command] if command else []
    assert entrypoint[-2:] == ["sh", "-c"], entrypoint
    return list(shell_fleet_calls(command[0] if isinstance(command, list) else command))


def values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def worker_argv(pool: dict[str, Any]) -> list[str]:
    """What templates/workers.yaml runs for a pool (test_worker_template_args keeps the two in step)."""
    return ["worker", "--engine", pool.get("engine", "batching"), "--adapter", pool["adapter"],
            "--device", pool["device"], "-c", str(pool.get("concurrency", 1))]


def cpu_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- Dockerfile ----------------------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_fleet_image() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r'^ARG PIP_EXTRA_INDEX_URL=""$', text, re.M)  # empty by default: no index is named
    assert re.search(r'^ARG EXTRAS=""$', text, re.M)
    assert 'pip install ".${EXTRAS:+[${EXTRAS}]}"' in text and "pip install --no-deps ." in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), "the image must not run as root"
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.+)$", text, re.M)[-1])
    assert entrypoint[-1] == "fleet"
    # The project's own files are what the image copies; none of them may be ignored by .dockerignore.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert src not in ignored and (ROOT / src).exists(), src


# --- docker-compose.yml --------------------------------------------------------------------------------------


def test_compose_services_run_real_fleet_commands() -> None:
    services = compose()["services"]
    assert {"redis", "models", "api", "worker", "worker-celery", "flower", "triton", "worker-triton"} <= set(services)
    seen = set()
    for name, service in services.items():
        if name in ("redis", "triton"):
            continue
        calls = service_fleet_calls(service)
        assert calls, f"{name} runs no fleet command"
        for argv in calls:
            ctx = parse_fleet(argv)
            seen.add(ctx.info_name)
            if ctx.info_name == "fleet models create":
                assert all(TimeFrame(t) for t in ctx.params["timeframes"].split(","))
                assert all(ModelType(t) for t in ctx.params["types_"].split(","))
            if ctx.info_name == "fleet worker":
                queue_name(ctx.params["adapter"], ctx.params["device"])
    assert {"fleet api", "fleet worker", "fleet flower", "fleet models create", "fleet models list"} <= seen
    assert parse_fleet(services["api"]["command"]).params["port"] == 8000
    assert parse_fleet(interpolate(services["worker"]["command"])).params["engine"] is None  # default: batching
    assert parse_fleet(interpolate(services["worker-celery"]["command"])).params["engine"] == "celery"


def test_compose_environment_names_are_fleet_settings() -> None:
    services = compose()["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        unknown = set(env) - SETTINGS - FOREIGN_ENV
        assert not unknown, f"{name} sets {sorted(unknown)}, which are not settings (shared/settings.py)"


def test_compose_wiring() -> None:
    services = compose()["services"]
    redis = services["redis"]
    script = interpolate(redis["command"][0])
    assert "--appendonly yes --appendfsync everysec" in script
    assert re.search(r"--maxmemory \S+ --maxmemory-policy noeviction", script)
    assert "${REDIS_MAXMEMORY:-" in redis["command"][0]  # a compose variable with a default
    models = services["models"]
    assert models["restart"] == "no" and "build" in models
    for name in ("api", "worker", "worker-celery", "flower", "worker-triton"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["models"]["condition"] == "service_completed_successfully", name
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert any(interpolate(port).endswith("5555:5555") for port in services["flower"]["ports"])
    assert services["worker-celery"]["profiles"] == ["celery"]
    assert services["triton"]["profiles"] == services["worker-triton"]["profiles"] == ["triton"]
    assert "--model-control-mode=explicit" in services["triton"]["command"]
    # Scalable: no fixed container name or host port on a worker; a warm shutdown outlasts the longest job.
    job_limit = FleetSettings.model_fields["job_time_limit_seconds"].default
    for name in ("worker", "worker-celery", "worker-triton"):
        worker = services[name]
        assert "container_name" not in worker and "ports" not in worker, name
        assert int(interpolate(worker["stop_grace_period"]).rstrip("s")) > job_limit, name
        assert "WORKER_TORCH_THREADS" in worker["environment"], name
    # Every service that uses the model store mounts it where MODEL_STORE_DIR says.
    for name, service in services.items():
        env = interpolate(service.get("environment") or {})
        if "MODEL_STORE_DIR" in env and name != "flower":
            mounts = [str(v).split(":")[1] for v in service.get("volumes", [])]
            assert env["MODEL_STORE_DIR"] in mounts, name


def test_deploy_files_name_no_registry_host() -> None:
    """Images are named without a registry host, and URLs only point at local or in-cluster services."""
    for image in [interpolate(s["image"]) for s in compose()["services"].values()] + ["finsight-fleet"]:
        first = image.split("/")[0]
        assert "/" not in image or ("." not in first and ":" not in first), image
    allowed = {"127.0.0.1", "localhost", "redis", "triton"}
    files = [DOCKERFILE, COMPOSE, ROOT / ".dockerignore", *CHART.rglob("*")]
    for path in filter(Path.is_file, files):
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            for host in re.findall(r"\w+://([^/:\s\"'{}]+)", code):
                assert host in allowed or "%s" in code, f"{path.name}: {line.strip()}"


SECRET_FILES = {"redis-password": "./secrets/redis-password", "flower-basic-auth": "./secrets/flower-basic-auth",
                "api-keys.json": "./secrets/api-keys.json"}
FLEET_SERVICES = ("models", "api", "worker", "worker-celery", "flower", "worker-triton")


def test_compose_redis_requires_the_password_of_a_secret() -> None:
    doc = compose()
    assert {name: s["file"] for name, s in doc["secrets"].items()} == SECRET_FILES
    redis = doc["services"]["redis"]
    assert "redis-password" in redis["secrets"]
    script = interpolate(redis["command"][0])
    # The password is read from the secret and handed over on stdin (`-`), never on the command line.
    assert 'password="$(cat /run/secrets/redis-password)"' in script and '[ -n "$password" ]' in script
    assert re.search(r'exec redis-server "\$@" - <<EOF\nrequirepass "\$password"\nEOF', script)
    assert "--requirepass" not in script
    # The healthcheck authenticates, and only a PONG counts (redis-cli exits 0 on NOAUTH).
    check = interpolate(redis["healthcheck"]["test"])
    assert check[0] == "CMD-SHELL" and 'REDISCLI_AUTH="$(cat /run/secrets/redis-password)"' in check[1]
    assert check[1].endswith("ping | grep -q PONG")
    assert redis.get("user") == "redis"  # the shell entrypoint would otherwise leave Redis running as root
    for name in FLEET_SERVICES:
        service = doc["services"][name]
        env = service["environment"]
        assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis-password", name
        assert "redis-password" in service["secrets"], name
        assert "REDIS_PASSWORD" not in env, name


def test_compose_holds_no_secret_literal() -> None:
    text = COMPOSE.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"rediss?://[^/\s@]*:[^/\s@]+@", code), "a password inside a Redis URL"
    assert not re.search(r"requirepass\s+(?![\"']?\$)", code), "a requirepass that is not read from the secret"
    assert "FLOWER_UNAUTHENTICATED_API" not in text
    for name, service in compose()["services"].items():
        secret_like = [key for key in service.get("environment") or {}
                       if re.search(r"PASSWORD|BASIC_AUTH|API_KEYS?$", key) and not key.endswith("_FILE")]
        assert not secret_like, f"{name} sets {secret_like} in the file: they belong in secrets"


def test_compose_tls_is_optional_and_redis_key_stays_in_redis() -> None:
    services = compose()["services"]
    script = services["redis"]["command"][0]
    assert 'if [ "${REDIS_TLS:-no}" = yes ]' in script and "--port 0 --tls-port 6379" in script
    assert interpolate(services["worker"]["environment"]["REDIS_URL"]).startswith("redis://")  # TLS off by default
    for name, service in services.items():
        mounts = [interpolate(v) for v in service.get("volumes", [])]
        assert ("./secrets/tls-server:/run/redis-tls-server:ro" in mounts) == (name == "redis"), name
        if name in FLEET_SERVICES:
            assert "./secrets/tls:/run/redis-tls:ro" in mounts, name
            assert service["environment"]["REDIS_SSL_CA_CERTS"] == "/run/redis-tls/ca.crt", name


def test_compose_publishes_on_loopback_only() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert interpolate(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_api_reads_its_keys_from_a_secret() -> None:
    api = compose()["services"]["api"]
    assert api["environment"]["API_KEYS_FILE"] == "/run/secrets/api-keys.json"
    assert "api-keys.json" in api["secrets"]


def _flower_script(secrets: Path) -> str:
    script = interpolate(compose()["services"]["flower"]["command"][0])
    assert "exec fleet flower" in script
    # The child prints what it inherits: FLOWER_BASIC_AUTH must be exported to the process that runs Flower.
    child = """exec sh -c 'printf "%s" "$FLOWER_BASIC_AUTH"' fleet"""
    return script.replace("/run/secrets", str(secrets)).replace("exec fleet flower", child)


@pytest.mark.parametrize("content", [None, "", "admin:s3cret"], ids=["missing", "empty", "set"])
def test_compose_flower_refuses_to_start_without_basic_auth(tmp_path: Path, content: str | None) -> None:
    flower = compose()["services"]["flower"]
    assert "flower-basic-auth" in flower["secrets"] and "FLOWER_BASIC_AUTH" not in flower["environment"]
    if content is not None:
        (tmp_path / "flower-basic-auth").write_text(content)
    done = subprocess.run(["sh", "-c", _flower_script(tmp_path)], capture_output=True, text=True, timeout=10)
    if content:
        assert (done.returncode, done.stdout) == (0, content)
    else:
        assert done.returncode == 1 and "flower-basic-auth" in done.stderr and done.stdout == ""


def test_gitignore_keeps_secrets_out() -> None:
    assert "/secrets/" in (ROOT / ".gitignore").read_text().splitlines()


# --- Helm chart ----------------------------------------------------------------------------------------------


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == CHART.name and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]) and chart["appVersion"]


def test_values_pools_name_real_queues_and_commands() -> None:
    pools = values()["pools"]
    names = [pool["name"] for pool in pools]
    assert len(names) == len(set(names)) and all(DNS_1035.match(n) and len(n) <= 40 for n in names), names
    assert any(pool.get("enabled", True) for pool in pools)
    for pool in pools:
        queue_name(pool["adapter"], pool["device"])  # raises for an unknown adapter or device
        params = parse_fleet(worker_argv(pool)).params
        assert (params["adapter"], params["device"]) == (pool["adapter"], pool["device"])
        threads, concurrency = int(pool.get("torchThreads", 1)), int(pool.get("concurrency", 1))
        cpu_limit = pool.get("resources", {}).get("limits", {}).get("cpu")
        assert pool.get("engine", "batching") in ("batching", "celery"), pool["name"]
        if cpu_limit is not None:
            assert concurrency * threads <= cpu_quantity(cpu_limit), f"{pool['name']} oversubscribes its CPUs"
        if pool["device"] == "cuda":
            assert "nvidia.com/gpu" in pool["resources"]["limits"], pool["name"]
        scaling = pool.get("autoscaling") or {}
        if scaling:
            assert scaling["minReplicas"] <= scaling["maxReplicas"], pool["name"]


def test_values_environment_names_are_fleet_settings() -> None:
    v = values()
    maps = {"config": v["config"], "api.env": v["api"]["env"], "flower.env": v["flower"]["env"]}
    maps.update({f"pools[{p['name']}].env": p.get("env") or {} for p in v["pools"]})
    for where, env in maps.items():
        unknown = set(env) - SETTINGS
        assert not unknown, f"{where} sets {sorted(unknown)}, which are not settings (shared/settings.py)"
    models = v["modelsInit"]
    assert all(TimeFrame(t) for t in models["timeframes"].split(","))
    assert all(ModelType(t) for t in models["types"].split(","))


def _actions(text: str) -> list[str]:
    return re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", text, flags=re.S)


@pytest.mark.parametrize("path", sorted(p.name for p in TEMPLATES.iterdir()), ids=str)
def test_template_is_balanced(path: str) -> None:
    text = (TEMPLATES / path).read_text()
    assert text.count("{{") == text.count("}}"), "unbalanced {{ }}"
    depth = 0
    for piece in re.split(r"(\{\{|\}\})", text):
        depth += {"{{": 1, "}}": -1}.get(piece, 0)
        assert depth in (0, 1), "nested or unopened {{ }}"
    blocks = 0
    for action in _actions(text):
        if action.startswith("/*"):
            assert action.endswith("*/"), action
            continue
        word = action.split(None, 1)[0] if action else ""
        blocks += 1 if word in ("if", "range", "with", "define", "block") else -1 if word == "end" else 0
        assert blocks >= 0, "an {{ end }} closes nothing"
    assert blocks == 0, "an if/range/with/define is not closed"


def test_template_environment_names_are_fleet_settings() -> None:
    for path in [*TEMPLATES.glob("*.yaml"), *TEMPLATES.glob("*.tpl")]:
        names = set(re.findall(r"-\s+name:\s+([A-Z][A-Z0-9_]+)\s*$", path.read_text(), re.M))
        assert not names - SETTINGS - FOREIGN_ENV, f"{path.name}: {sorted(names - SETTINGS - FOREIGN_ENV)}"
    config = (TEMPLATES / "configmap.yaml").read_text()
    assert all(f'"{name}"' in config for name in ("MODEL_STORE_DIR", "POOLS"))


def _define(name: str) -> str:
    """The body of one ``{{ define }}`` of _helpers.tpl."""
    text = (TEMPLATES / "_helpers.tpl").read_text()
    return text.split(f'{{{{- define "{name}" -}}}}', 1)[1].split('{{- define "', 1)[0]


def test_chart_keeps_redis_connection_out_of_configmaps() -> None:
    redis_names = {n for n in SETTINGS if n.startswith("REDIS_") and n != "REDIS_KEY_PREFIX"}
    assert not redis_names & set(values()["config"]), "Redis' connection belongs in a Secret"
    for path in TEMPLATES.glob("*.yaml"):
        text = path.read_text()
        if re.search(r"^kind: ConfigMap$", text, re.M):
            settings = text.split("$settings := dict", 1)[1].split("\n", 1)[0]
            assert "REDIS" not in settings and not re.search(r'set \$settings "REDIS', text), path.name
            # and a REDIS_* entry of values.config is refused rather than rendered
            assert '"REDIS_URL"' in text and "fail" in text, path.name
    env = _define("finsight-fleet.redisSecretEnv")
    assert re.match(r"\s*- name: REDIS_URL\n\s+valueFrom:\n\s+secretKeyRef:", env)
    assert "- name: REDIS_PASSWORD_FILE" in env and "REDIS_SSL_CA_CERTS" in env
    secret = (TEMPLATES / "redis-secret.yaml").read_text()
    assert "kind: Secret" in secret and "redis-url:" in secret and "redis-password:" in secret
    assert "lookup" in secret  # an upgrade keeps the password Redis runs with


def test_chart_redis_runs_with_the_secret_password() -> None:
    text = (TEMPLATES / "redis.yaml").read_text()
    assert 'password="$(cat /run/secrets/redis/password)" && [ -n "$password" ]' in text
    assert re.search(r'- <<EOF\n\s+requirepass "\$password"\n\s+EOF', text)
    assert "--requirepass" not in text and "--appendonly yes --appendfsync everysec" in text
    assert "--maxmemory {{ $r.maxmemory | quote }} --maxmemory-policy noeviction" in text
    assert values()["redis"]["embedded"]["maxmemory"]
    assert text.count("command: [\"sh\", \"-c\", {{ $probe | quote }}]") == 2  # both probes authenticate
    assert 'REDISCLI_AUTH=\\"$(cat /run/secrets/redis/password)\\"' in text and "grep -q PONG" in text
    assert 'secretName: {{ include "finsight-fleet.redisPasswordSecret" . }}' in text


def test_chart_tls_values_reach_redis_and_the_fleet() -> None:
    tls = values()["redis"]["tls"]
    assert tls["enabled"] is False and tls["certReqs"] in ("required", "optional", "none")
    text = (TEMPLATES / "redis.yaml").read_text()
    assert "--tls-port 6379" in text and "--port 0" in text and "redis-cli --tls --cacert" in text
    assert '"rediss" "redis"' in _define("finsight-fleet.redisUrl")
    assert "/run/secrets/redis-tls/ca.crt" in _define("finsight-fleet.redisSecretEnv")
    assert "redis-tls" in _define("finsight-fleet.redisVolumes")


def test_chart_network_policy_lets_only_fleet_pods_reach_redis() -> None:
    assert values()["networkPolicy"]["enabled"] is True
    text = (TEMPLATES / "networkpolicy.yaml").read_text()
    policies = text.split("---")
    redis = next(p for p in policies if "kind: NetworkPolicy" in p and '"component" "redis"' in p)
    selector = redis.split("podSelector:", 1)[1].split("policyTypes", 1)[0]
    assert 'selectorLabels" (dict "root" . "component" "redis")' in selector
    assert "finsight-fleet.redisClientLabel" in redis and "port: 6379" in redis
    assert 'policyTypes: ["Ingress"]' in redis
    # Every fleet pod carries the label the policy admits, in its pod template.
    for name in ("api.yaml", "workers.yaml", "flower.yaml", "models-job.yaml"):
        template = (TEMPLATES / name).read_text().split("template:", 1)[1]
        assert "finsight-fleet.redisClientLabel" in template.split("spec:", 1)[0], name
    assert 'finsight-fleet/redis-client: "true"' in _define("finsight-fleet.redisClientLabel")
    flower = next(p for p in policies if '"component" "flower")' in p.split("podSelector:", 1)[-1])
    assert "networkPolicy.flower.from" in flower and "ingress: []" in flower  # no peer listed: nobody


def test_chart_flower_requires_basic_auth() -> None:
    text = (TEMPLATES / "flower.yaml").read_text()
    assert re.search(r"\$auth := required \"[^\"]+\" \.Values\.flower\.basicAuthSecret", text)
    assert re.search(r"- name: FLOWER_BASIC_AUTH\n\s+valueFrom:\n\s+secretKeyRef:\n\s+name: \{\{ \$auth \}\}", text)
    assert values()["flower"]["basicAuthSecret"] == ""  # nothing ships a credential: the user must name one
    for path in filter(Path.is_file, [COMPOSE, *CHART.rglob("*")]):
        assert "FLOWER_UNAUTHENTICATED_API" not in path.read_text(), path.name


def test_chart_api_mounts_its_keys_secret() -> None:
    assert values()["api"]["apiKeys"] == {"existingSecret": "", "key": "api-keys.json"}
    text = (TEMPLATES / "api.yaml").read_text()
    assert re.search(r"- name: API_KEYS_FILE\n\s+value: /run/secrets/api-keys/api-keys.json", text)
    assert "mountPath: /run/secrets/api-keys" in text and "path: api-keys.json" in text


def test_template_commands_use_real_options() -> None:
    # api and flower: a one-line args list; template actions stand for numbers (ports).
    for path, expected in (("api.yaml", "fleet api"), ("flower.yaml", "fleet flower")):
        line = re.search(r"^\s*args: (\[.*\])$", (TEMPLATES / path).read_text(), re.M).group(1)
        assert parse_fleet(json.loads(re.sub(r"\{\{.*?\}\}", "1", line))).info_name == expected
    # workers: the literal items of the args block are the options worker_argv() uses, in the same order.
    text = (TEMPLATES / "workers.yaml").read_text()
    block = text.split("args:", 1)[1].split("envFrom:", 1)[0]
    literal = [m for m in re.findall(r"^\s*- ([^{\s]\S*)\s*$", block, re.M)]
    assert literal == ["worker", "--engine", "--adapter", "--device", "-c"], literal
    assert set(literal[1:]) <= option_names("worker")
    assert [a for a in worker_argv({"adapter": "simple", "device": "cpu"}) if a.startswith("-")] == literal[1:]
    # models-init Job: the create command it formats, and the plain fleet calls of its script.
    job = (TEMPLATES / "models-job.yaml").read_text()
    create = re.search(r'printf "fleet (models create [^"]*)"', job).group(1)
    parse_fleet(create.replace("%s", "AAPL").replace("%d", "0").split())
    plain = [line.split("$(", 1)[-1].rstrip(")").strip() for line in job.splitlines()
             if "fleet " in line and "{{" not in line and "printf" not in line]
    assert plain, "the Job's script calls no fleet command"
    for line in plain:
        for argv in shell_fleet_calls(line[line.index("fleet"):]):
            parse_fleet(argv)


def test_probes_hit_real_routes() -> None:
    from producer_api.routes.health import routes

    paths = {route.path for route in routes}
    assert {"/healthz", "/readyz"} <= paths
    api = (TEMPLATES / "api.yaml").read_text()
    assert set(re.findall(r"path: (/\w+)", api)) <= paths
    assert values()["api"]["readinessPath"] in paths


def test_chart_renders_when_helm_sdk_is_installed() -> None:
    helm = pytest.importorskip("helm_python", reason="optional: pip install helm-python-sdk renders the chart")
    with helm.Chart.load(str(CHART)) as chart:
        pools = [dict(pool, enabled=True) for pool in chart.values["pools"]]
        with pytest.raises(helm.HelmError, match="flower.basicAuthSecret"):
            chart.render({"pools": pools}, name="fleet", namespace="test")
        rendered = chart.render({"pools": pools, "flower": {"basicAuthSecret": "flower-auth"}}, name="fleet",
                                namespace="test")
    docs = [doc for name, text in rendered.items() if name.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-redis"))
    redis = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-redis"))
    redis_pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_pod_labels.items()
    workers = [d for d in docs if d["kind"] == "Deployment" and "-worker-" in d["metadata"]["name"]]
    assert len(workers) == len(pools)
    for deployment in workers:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        params = parse_fleet(container["args"]).params
        queue = deployment["metadata"]["labels"]["finsight-fleet/queue"]
        assert queue == queue_name(params["adapter"], params["device"])
        assert not {e["name"] for e in container.get("env", [])} - SETTINGS - FOREIGN_ENV
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 600
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert set(config) <= SETTINGS and not {n for n in config if n.startswith("REDIS_")} - {"REDIS_KEY_PREFIX"}
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for d in docs:
        if d["kind"] in ("Deployment", "Job") and d is not redis:
            pod = d["spec"]["template"]
            assert admitted.items() <= pod["metadata"]["labels"].items(), d["metadata"]["name"]
            env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
            assert "secretKeyRef" in env["REDIS_URL"]["valueFrom"] and "REDIS_PASSWORD_FILE" in env
    assert config["POOLS"].split(",") == list(dict.fromkeys(f"{p['adapter']}:{p['device']}" for p in pools))


# --- KEDA autoscaling on the pools' backlog ------------------------------------------------------------------


def render(overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's manifests with ``overrides`` (Flower's required Secret named), through Helm's own Go SDK."""
    helm = pytest.importorskip("helm_python", reason="optional: pip install helm-python-sdk renders the chart")
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render({"flower": {"basicAuthSecret": "flower-auth"}, **overrides}, name="fleet",
                                namespace="test")
    return [doc for name, text in rendered.items() if name.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def keda_values(**keda: Any) -> dict[str, Any]:
    """Every pool on, simple-cpu with its CPU HPA on, torchscript-cuda scaled to zero, triton-cpu off KEDA."""
    pools = []
    for pool in values()["pools"]:
        pool = dict(pool, enabled=True)
        if pool["name"] == "simple-cpu":
            pool["autoscaling"] = dict(pool["autoscaling"], enabled=True)
        if pool["name"] == "torchscript-cuda":
            pool["keda"] = {"minReplicaCount": 0, "maxReplicaCount": 3, "targetBacklogPerReplica": 50}
        if pool["name"] == "triton-cpu":
            pool["keda"] = {"enabled": False}
            pool["autoscaling"] = {"enabled": True, "targetCPUUtilizationPercentage": 70}
        pools.append(pool)
    settings = {"enabled": True, "prometheus": {"serverAddress": "http://prometheus.monitoring:9090"}, **keda}
    return {"pools": pools, "autoscaling": {"keda": settings}}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The ``kind`` manifests by the pool they are for (``worker-<pool>`` component)."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"].removeprefix("worker-"): d
            for d in docs if d["kind"] == kind}


def test_keda_is_off_by_default_and_documented() -> None:
    keda = values()["autoscaling"]["keda"]
    assert keda["enabled"] is False and keda["minReplicaCount"] >= 1 and keda["prometheus"]["aggregation"] == "max"
    assert not any("keda" in pool for pool in values()["pools"])
    text = (TEMPLATES / "scaledobject.yaml").read_text()
    assert "apiVersion: keda.sh/v1alpha1" in text and "type: prometheus" in text
    assert 'printf "%s(fleet_pool_backlog_total{%s})"' in text


def test_keda_renders_nothing_by_default() -> None:
    pools = [dict(pool, enabled=True) for pool in values()["pools"]]
    docs = render({"pools": pools})
    assert not [d for d in docs if d["kind"] == "ScaledObject"]
    assert all("replicas" in d["spec"] for d in by_kind(docs, "Deployment").values())


def test_keda_scaled_object_per_pool_on_its_backlog() -> None:
    docs = render(keda_values())
    scaled, hpas, deployments = by_kind(docs, "ScaledObject"), by_kind(docs, "HorizontalPodAutoscaler"), \
        by_kind(docs, "Deployment")
    pools = {pool["name"]: pool for pool in values()["pools"]}
    assert set(scaled) == set(pools) - {"triton-cpu"}
    for name, obj in scaled.items():
        queue = queue_name(pools[name]["adapter"], pools[name]["device"])
        spec = obj["spec"]
        assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["metadata"]["labels"]["finsight-fleet/queue"] == queue
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": deployments[name]["metadata"]["name"]}
        [trigger] = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
        assert trigger["metadata"]["query"] == f'max(fleet_pool_backlog_total{{queue="{queue}"}})'
        assert spec["pollingInterval"] == 15 and spec["cooldownPeriod"] == 300
        assert "replicas" not in deployments[name]["spec"], name  # KEDA owns them
    assert (scaled["simple-cpu"]["spec"]["minReplicaCount"], scaled["simple-cpu"]["spec"]["maxReplicaCount"]) == (1, 8)
    assert scaled["simple-cpu"]["spec"]["triggers"][0]["metadata"]["threshold"] == "20"
    # KEDA makes the pool's HPA: the chart renders none for a pool under KEDA, even with autoscaling on
    assert set(hpas) == {"triton-cpu"} and "replicas" not in deployments["triton-cpu"]["spec"]


def test_keda_scale_to_zero_keeps_the_api_ready_for_the_pool() -> None:
    docs = render(keda_values())
    cuda = by_kind(docs, "ScaledObject")["torchscript-cuda"]["spec"]
    assert (cuda["minReplicaCount"], cuda["maxReplicaCount"]) == (0, 3)
    assert cuda["triggers"][0]["metadata"]["threshold"] == "50"
    assert cuda["triggers"][0]["metadata"]["activationThreshold"] == "0"  # the first job wakes it
    # /readyz must not wait for a worker of a pool at zero (the API would refuse traffic and never see its jobs)
    pools_spec = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["POOLS"].split(",")
    assert "torchscript:cuda" not in pools_spec and {"simple:cpu", "torchscript:cpu", "triton:cpu"} <= set(pools_spec)


def test_keda_options_and_refusals() -> None:
    helm = pytest.importorskip("helm_python", reason="optional: pip install helm-python-sdk renders the chart")
    docs = render(keda_values(minReplicaCount=0, maxReplicaCount=20, pollingInterval=5, cooldownPeriod=60,
                              prometheus={"serverAddress": "http://p:9090", "aggregation": "sum",
                                          "labelSelector": 'namespace="test"', "authenticationRef": "prom-auth"}))
    spec = by_kind(docs, "ScaledObject")["simple-cpu"]["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"], spec["cooldownPeriod"]) == \
        (0, 20, 5, 60)
    [trigger] = spec["triggers"]
    assert trigger["metadata"]["query"] == 'sum(fleet_pool_backlog_total{queue="infer.simple.cpu",namespace="test"})'
    assert trigger["authenticationRef"] == {"name": "prom-auth"}
    assert next(d for d in docs if d["kind"] == "ConfigMap")["data"]["POOLS"] == "triton:cpu"  # the rest reach 0
    with pytest.raises(helm.HelmError, match="serverAddress"):
        render(keda_values(prometheus={}))
    with pytest.raises(helm.HelmError, match="minReplicaCount <= maxReplicaCount"):
        render(keda_values(minReplicaCount=5, maxReplicaCount=2))


# --- Prometheus scrapes /metrics with a key of its own ------------------------------------------------------


def test_chart_scrapes_metrics_with_a_key_the_api_accepts(tmp_path: Path) -> None:
    import base64

    from producer_api.security.keystore import static_keys

    docs = render({})
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-api"))
    pod = api["spec"]["template"]
    assert not any(k.startswith("prometheus.io/") for k in pod["metadata"].get("annotations", {}))  # 401s
    assert not [d for d in docs if d["kind"] == "PodMonitor"]  # needs the Prometheus Operator's CRD: asked for
    container = pod["spec"]["containers"][0]
    key_file = next(e["value"] for e in container["env"] if e["name"] == "API_METRICS_KEY_FILE")
    mount = next(m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])["secret"]
    [item] = volume["items"]
    assert key_file == f"{mount['mountPath']}/{item['path']}"
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == volume["secretName"])
    # the generated key is one the API loads at start (the file a pod sees holds the decoded value)
    (tmp_path / "metrics-key").write_bytes(base64.b64decode(secret["data"][item["key"]]))
    [principal] = static_keys(None, tmp_path / "metrics-key").values()
    assert principal.scopes == frozenset({"metrics"})


def test_chart_pod_monitor_sends_the_scrape_key() -> None:
    docs = render({"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}})
    [monitor] = [d for d in docs if d["kind"] == "PodMonitor"]
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-api"))
    pod = api["spec"]["template"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["path"] == "/metrics"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "metrics-key")["secret"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": volume["secretName"],
                                                                          "key": volume["items"][0]["key"]}}
    # your own Secret: the chart makes none and both sides read yours
    docs = render({"metrics": {"podMonitor": {"enabled": True},
                               "scrapeKey": {"existingSecret": "my-scrape-key", "secretKey": "token"}}})
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-metrics-key")]
    [monitor] = [d for d in docs if d["kind"] == "PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"] == {"name": "my-scrape-key",
                                                                                          "key": "token"}
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-api"))
    volume = next(v for v in api["spec"]["template"]["spec"]["volumes"] if v["name"] == "metrics-key")["secret"]
    assert volume["secretName"] == "my-scrape-key" and volume["items"][0]["key"] == "token"
