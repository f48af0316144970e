"""The image, compose and Swarm files: valid for the docker-compose client, and in step with the code
(every FRACTAL_* variable is a real setting with a readable value, ports and volumes line up)."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broker.broker import BrokerSettings
from broker.settings import field_env, load
from fractal.gunicorn_args import WORKER_CLASS
from fractal.serve import ServeSettings
from frontend.settings import FrontendSettings
from worker.settings import WorkerSettings

from .harness import BUNDLED, REPO, debian_tool

COMPONENTS = {"broker": BrokerSettings, "worker": WorkerSettings, "frontend": FrontendSettings,
              "serve": ServeSettings}
COMPOSE, STACK = REPO / "docker-compose.yml", REPO / "deploy" / "stack.yml"


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return debian_tool("docker-compose", "docker-compose")


def services(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def with_defaults(value: str) -> str:
    """A compose value as it reads with none of its ${NAME:-default} variables set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.mark.slow  # may install Debian's docker-compose first
@pytest.mark.parametrize("path", [COMPOSE, STACK], ids=["compose", "stack"])
def test_the_docker_compose_client_accepts_the_file(docker_compose, path):
    result = subprocess.run([docker_compose, "-f", str(path), "config", "--quiet"], capture_output=True,
                            cwd=path.parent, env=dict(os.environ, FRACTAL_IMAGE="fractal-ml-server:test"))
    assert result.returncode == 0, result.stderr.decode()


def readers() -> dict[str, set[str]]:
    """{FRACTAL_* variable: the components that read it} (FRACTAL_TRACING, FRACTAL_LOG_FORMAT: several)."""
    found: dict[str, set[str]] = {}
    for component, cls in COMPONENTS.items():
        for f in dataclasses.fields(cls):
            found.setdefault(field_env(component, f), set()).add(component)
    return found


@pytest.mark.parametrize("path", [COMPOSE, STACK], ids=["compose", "stack"])
def test_every_fractal_variable_is_a_setting_with_a_valid_value(path):
    known = readers()
    seen = 0
    for name, service in services(path).items():
        env = {k: with_defaults(str(v)) for k, v in (service.get("environment") or {}).items()
               if k.startswith("FRACTAL_")}
        unknown = sorted(set(env) - set(known))
        assert unknown == [], f"{path.name}/{name}: {unknown} are read by no component"
        if env:
            role = service["command"][0]
            assert all(role in known[k] for k in env), f"{path.name}/{name} runs {role}"
            load(COMPONENTS[role], role, env=env)  # raises ConfigError on a bad value
        seen += len(env)
    assert seen >= 8


TRACING = ("FRACTAL_TRACING", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")


@pytest.mark.parametrize("path", [COMPOSE, STACK], ids=["compose", "stack"])
def test_tracing_is_off_by_default_and_the_shell_points_it_at_a_collector(docker_compose, path):
    """Workers and frontends read FRACTAL_TRACING (default false), the OTLP endpoint, the sampler and its
    argument, each overridable from the shell: what the docker-compose client renders."""
    def rendered(**env: str) -> dict:
        base = {k: v for k, v in os.environ.items() if k not in TRACING}  # the defaults, whatever this shell has
        result = subprocess.run([docker_compose, "-f", str(path), "config"], capture_output=True, cwd=path.parent,
                                env=dict(base, FRACTAL_IMAGE="fractal-ml-server:test", **env), check=True)
        return yaml.safe_load(result.stdout)["services"]
    default = rendered()
    switched = rendered(FRACTAL_TRACING="true", OTEL_EXPORTER_OTLP_ENDPOINT="http://jaeger:4318")
    for role, settings in (("worker", WorkerSettings), ("frontend", FrontendSettings)):
        env = {n: str(default[role]["environment"][n]) for n in TRACING}
        assert load(settings, role, env=env).tracing is False
        assert re.fullmatch(r"http://[a-z.-]+:4318", env["OTEL_EXPORTER_OTLP_ENDPOINT"]), env
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio", env
        assert 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1, env
        on = switched[role]["environment"]
        assert load(settings, role, env={"FRACTAL_TRACING": on["FRACTAL_TRACING"]}).tracing is True
        assert on["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert not set(TRACING) & set(default["broker"]["environment"])  # the broker has nothing to trace


@pytest.mark.parametrize("path", [COMPOSE, STACK], ids=["compose", "stack"])
def test_services_ports_and_the_shared_pool_line_up(path):
    s = services(path)
    assert set(s) == {"frontend", "broker", "broker2", "worker", "prometheus"}
    assert [with_defaults(p) for p in s["frontend"]["ports"]] == ["8002:8002"]
    assert [with_defaults(p) for p in s["prometheus"]["ports"]] == ["9091:9090"]
    # Two brokers running the same thing; workers register with both, the frontend lists both.
    assert {k: v for k, v in s["broker2"].items() if k != "deploy"} == \
        {k: v for k, v in s["broker"].items() if k != "deploy"}
    bind_port = s["broker"]["environment"]["FRACTAL_BROKER_BIND"].rsplit(":", 1)[1]
    both = f"tcp://broker:{bind_port},tcp://broker2:{bind_port}"
    assert s["worker"]["environment"]["FRACTAL_WORKER_CONNECT"] == both
    assert s["frontend"]["environment"]["FRACTAL_FRONTEND_BROKER"] == both
    pool = s["worker"]["environment"]["FRACTAL_WORKER_MODEL_DIR"]
    assert any(v.split(":")[1] == pool for v in s["worker"]["volumes"])
    assert s["worker"]["deploy"]["replicas"] == 2
    assert "--bind" in s["frontend"]["command"] and "0.0.0.0:8002" in s["frontend"]["command"]
    assert_frontend_worker(s["frontend"]["command"])


def assert_frontend_worker(args: list[str]) -> None:
    """The frontend's gunicorn runs the worker class its config names (an ASGI one) unless told another."""
    if "--worker-class" in args:
        assert args[args.index("--worker-class") + 1] == WORKER_CLASS


def test_compose_starts_in_order_with_healthchecks():
    s = services(COMPOSE)
    for name in ("broker", "broker2", "worker", "frontend", "prometheus"):
        assert s[name]["healthcheck"]["test"][0] == "CMD"
    # prom/prometheus is busybox-based, so wget is there (the local image adds busybox for it)
    assert s["prometheus"]["healthcheck"]["test"][1] == "wget"
    assert "busybox" in (REPO / "deploy" / "prometheus.Dockerfile").read_text()
    for name in ("worker", "frontend"):
        assert {b: d["condition"] for b, d in s[name]["depends_on"].items()} == {
            "broker": "service_healthy", "broker2": "service_healthy"}


def test_prometheus_scrapes_the_ports_the_services_export():
    s = services(COMPOSE)
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["fractal-frontend"]["static_configs"][0]["targets"] == ["frontend:8002"]
    assert jobs["fractal-broker"]["static_configs"][0]["targets"] == [
        f"{b}:{s[b]['environment']['FRACTAL_BROKER_METRICS_PORT']}" for b in ("broker", "broker2")]
    assert jobs["fractal-worker"]["dns_sd_configs"][0]["port"] == int(
        s["worker"]["environment"]["FRACTAL_WORKER_METRICS_PORT"])


def test_compose_images_and_host_ports_are_overridable_with_the_usual_defaults():
    s = services(COMPOSE)
    for name in ("broker", "broker2", "worker", "frontend"):
        assert s[name]["image"] == "${FRACTAL_IMAGE:-fractal-ml-server:latest}"
    assert s["prometheus"]["image"] == "${FRACTAL_PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}"
    assert s["frontend"]["ports"] == ["${FRACTAL_HTTP_PORT:-8002}:8002"]
    assert s["prometheus"]["ports"] == ["${FRACTAL_PROMETHEUS_PORT:-9091}:9090"]


def test_dockerfile_is_one_slim_non_root_image_for_every_role():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim\s*$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE}", "${BASE}"]
    assert "--no-index --find-links /wheelhouse" in text  # offline install, from whichever wheelhouse
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    for package in ("broker", "worker", "frontend", "metrics", "fractal"):
        assert f"COPY {package} {package}" in text
    assert 'ENTRYPOINT ["fractal-entrypoint"]' in text


def test_entrypoint_seeds_an_empty_pool_then_runs_the_role(tmp_path):
    pool = tmp_path / "models"
    pool.mkdir()
    env = dict(os.environ, FRACTAL_WORKER_MODEL_DIR=str(pool),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["sh", str(REPO / "deploy" / "entrypoint.sh"), "worker", "--help"], env=env,
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and b"fractal worker" in result.stdout
    assert sorted(p.name for p in pool.glob("*.onnx")) == sorted(p.name for p in BUNDLED.glob("*.onnx"))
    (pool / "mine.onnx").write_bytes(b"x")
    (pool / "iris.onnx").unlink()
    subprocess.run(["sh", str(REPO / "deploy" / "entrypoint.sh"), "worker", "--help"], env=env,
                   capture_output=True, timeout=60, check=True)
    assert not (pool / "iris.onnx").exists()  # an existing pool is never touched


def test_fractal_health_checks_each_role_as_a_client_would(procs, model_dir):
    from .harness import free_port, start_frontend, wait_workers
    url, metrics_port = f"tcp://127.0.0.1:{free_port()}", free_port()

    def health(*args: str, env: dict | None = None) -> int:
        return subprocess.run([sys.executable, "-m", "fractal", "health", *args], capture_output=True,
                              env=dict(os.environ, **(env or {})), timeout=30).returncode

    broker_env = {"FRACTAL_BROKER_BIND": url}
    assert health("broker", env=broker_env) == 1  # nothing there yet
    procs.broker(url)
    assert health("broker", env=broker_env) == 0
    procs.worker(url, model_dir, "--metrics-port", str(metrics_port))
    wait_workers(url, 1)
    assert health("worker", env={"FRACTAL_WORKER_METRICS_PORT": str(metrics_port)}) == 0
    assert health("worker", env={"FRACTAL_WORKER_METRICS_PORT": str(free_port())}) == 1
    base = start_frontend(procs, url)
    assert health("frontend", base.rsplit(":", 1)[1]) == 0
    assert health("frontend", str(free_port())) == 1


def test_the_image_installs_the_otel_extra_from_the_wheelhouse_the_local_build_makes():
    """Tracing can be switched on in a container: the image installs fractal-ml-server[otel], and the
    offline build's wheelhouse holds that extra's wheels (else the --no-index install would fail)."""
    import configparser
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert "--no-index --find-links /wheelhouse 'fractal-ml-server[otel]'" in text
    assert "pip wheel --no-cache-dir --wheel-dir /wheelhouse '.[otel]'" in text  # no wheelhouse: from the index
    builder = _builder()
    assert builder.EXTRAS == "otel"
    argv = builder.wheelhouse_argv(Path("/src"), Path("/wheels"))
    assert argv[argv.index("--wheel-dir") + 1] == "/wheels" and argv[-1] == "/src[otel]"
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extra = setup["options.extras_require"]["otel"]
    assert "opentelemetry-sdk" in extra and "opentelemetry-exporter-otlp-proto-http" in extra


def test_the_image_and_compose_use_fractal_health():
    assert 'CMD ["fractal", "health"]' in (REPO / "deploy" / "Dockerfile").read_text()
    for name in ("broker", "worker", "frontend"):
        assert services(COMPOSE)[name]["healthcheck"]["test"][:4] == ["CMD", "fractal", "health", name]


def _builder():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_local_image", REPO / "deploy" / "build_local_image.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_local_build_context_holds_every_file_the_dockerfile_copies(tmp_path):
    context = _builder().make_context(tmp_path / "context")
    sources = [word for line in (REPO / "deploy" / "Dockerfile").read_text().splitlines()
               if line.startswith("COPY ") and "--from=" not in line for word in line.split()[1:-1]]
    wheelhouse = re.search(r"^ARG WHEELHOUSE=(\S+)$", (REPO / "deploy" / "Dockerfile").read_text(), re.M)[1]
    sources = [s.replace("${WHEELHOUSE}", wheelhouse) for s in sources]
    assert sources and all((context / s).exists() for s in sources), sources
    assert list((context / wheelhouse).iterdir()) == []  # the checkout's wheels (if any) stay out
    assert (REPO / wheelhouse / ".gitignore").exists()  # the default folder exists in a checkout
    assert not list(context.rglob("__pycache__")) and not (context / "tests").exists()


def test_debootstrap_uses_the_mirror_apt_is_configured_with(tmp_path):
    builder = _builder()
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert builder.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert builder.debian_mirror(tmp_path) == "http://other.example/debian"
    (tmp_path / "sources.list").write_text("")
    assert builder.debian_mirror(tmp_path) == "http://deb.debian.org/debian"
