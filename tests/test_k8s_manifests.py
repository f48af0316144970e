"""The Kubernetes manifests (deploy/k8s/): valid for the API versions we promise, checked offline
against the schemas kubernetes-validate ships, and in step with the code, as the compose checks are:
every FRACTAL_* variable is a real setting with a readable value, ports, names and selectors line up.

KServe's ServingRuntime and InferenceService are CRDs with no schema here: their containers are
checked as core/v1 Containers (inside a Pod), the rest of their structure by hand.
"""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from broker.settings import load
from metrics.definitions import BrokerMetrics

from .harness import REPO
from .test_deploy_files import COMPONENTS, TRACING, assert_frontend_worker, readers

K8S = REPO / "deploy" / "k8s"
# The oldest release the manifests promise (HPA autoscaling/v2 and PDB policy/v1 are GA long before)
# and a recent one.
VERSIONS = ("1.27.0", "1.33.0")
CORE_FILES = ("pool.yaml", "broker.yaml", "worker.yaml", "frontend.yaml")
BROKERS = ("fractal-broker", "fractal-broker-2")  # two brokers that share nothing (docs/protocol.md)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def core() -> dict[tuple[str, str], dict]:
    """Every resource that `kubectl apply -k deploy/k8s` creates, by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for f in CORE_FILES for d in documents(K8S / f)}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def port(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def runtime() -> dict:
    (doc,) = documents(K8S / "kserve" / "servingruntime.yaml")
    return doc


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", CORE_FILES)
def test_every_manifest_is_valid_for_the_kubernetes_api(name, version):
    for doc in documents(K8S / name):
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError, naming the field


@pytest.mark.parametrize("version", VERSIONS)
def test_the_serving_runtimes_containers_are_valid_pod_containers(version):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fractal-onnx"},
           "spec": {"containers": runtime()["spec"]["containers"]}}
    kubernetes_validate.validate(pod, version, strict=True)


def test_the_validator_rejects_what_the_api_would():
    broken = documents(K8S / "worker.yaml")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9151"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    broken = documents(K8S / "broker.yaml")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["cmd"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_kustomization_lists_every_core_file_and_names_the_image():
    (k,) = documents(K8S / "kustomization.yaml")
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert k["resources"] == list(CORE_FILES)
    images = {c["image"] for d in core().values() if d["kind"] == "Deployment" for c in [container(d)]}
    assert images == {"fractal-ml-server"} and [i["name"] for i in k["images"]] == ["fractal-ml-server"]


def test_every_fractal_variable_is_a_setting_with_a_valid_value():
    known = readers()
    containers = [container(d) for d in core().values() if d["kind"] == "Deployment"]
    containers += runtime()["spec"]["containers"]
    seen = 0
    for c in containers:
        variables = {k: v for k, v in env(c).items() if k.startswith("FRACTAL_")}
        assert sorted(set(variables) - set(known)) == [], f"{c['name']}: read by no component"
        role = c["args"][0]
        assert all(role in known[k] for k in variables), f"{c['name']} runs {role}"
        load(COMPONENTS[role], role, env=variables)  # raises ConfigError on a bad value
        seen += len(variables)
    assert seen >= 14


def test_workers_and_frontends_can_trace_to_a_collector_and_do_not_by_default():
    resources = core()
    for role, name in (("worker", "fractal-worker"), ("frontend", "fractal-frontend")):
        variables = env(container(resources[("Deployment", name)]))
        assert set(TRACING) <= set(variables), name
        assert load(COMPONENTS[role], role, env={"FRACTAL_TRACING": variables["FRACTAL_TRACING"]}).tracing is False
        assert load(COMPONENTS[role], role, env={"FRACTAL_TRACING": "true"}).tracing is True  # as the comment says
        assert variables["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://")
        assert variables["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")  # OTLP/HTTP, as the exporter speaks
        assert 0 < float(variables["OTEL_TRACES_SAMPLER_ARG"]) <= 1


def test_ports_services_and_the_pool_line_up():
    r = core()
    worker, frontend = (container(r[("Deployment", f"fractal-{n}")]) for n in ("worker", "frontend"))
    broker_urls = []
    for name in BROKERS:
        broker = container(r[("Deployment", name)])
        service = {p["name"]: p for p in r[("Service", name)]["spec"]["ports"]}
        b = env(broker)
        assert int(b["FRACTAL_BROKER_BIND"].rsplit(":", 1)[1]) == port(broker, "mdp")
        assert int(b["FRACTAL_BROKER_METRICS_PORT"]) == port(broker, "metrics")
        assert service["mdp"]["targetPort"] == "mdp" and service["metrics"]["targetPort"] == "metrics"
        broker_urls.append(f"tcp://{name}:{service['mdp']['port']}")
    assert env(worker)["FRACTAL_WORKER_CONNECT"] == ",".join(broker_urls)  # workers register with both
    assert env(frontend)["FRACTAL_FRONTEND_BROKER"] == ",".join(broker_urls)  # and frontends fail over

    w = env(worker)
    pod = r[("Deployment", "fractal-worker")]["spec"]["template"]
    assert int(w["FRACTAL_WORKER_METRICS_PORT"]) == port(worker, "metrics")
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == w["FRACTAL_WORKER_METRICS_PORT"]
    mount = next(m for m in worker["volumeMounts"] if m["mountPath"] == w["FRACTAL_WORKER_MODEL_DIR"])
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    claim = r[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # workers on any node share the pool

    bind = frontend["args"][frontend["args"].index("--bind") + 1]
    assert_frontend_worker(frontend["args"])
    assert int(bind.rsplit(":", 1)[1]) == port(frontend, "http")
    health = ["fractal", "health", "frontend", str(port(frontend, "http"))]
    assert frontend["livenessProbe"]["exec"]["command"] == health
    assert r[("Service", "fractal-frontend")]["spec"]["ports"][0]["targetPort"] == "http"


def test_selectors_match_the_pods_they_mean():
    r = core()
    deployments = {name: d for (kind, name), d in r.items() if kind == "Deployment"}
    assert set(deployments) == {*BROKERS, "fractal-worker", "fractal-frontend"}
    for deployment in deployments:
        labels = deployments[deployment]["spec"]["template"]["metadata"]["labels"]
        selectors = [deployments[deployment]["spec"]["selector"]["matchLabels"]]
        selectors += [d["spec"]["selector"] for (kind, name), d in r.items()
                      if kind == "Service" and name == deployment]
        selectors += [d["spec"]["selector"]["matchLabels"] for (kind, name), d in r.items()
                      if kind == "PodDisruptionBudget" and name == deployment]
        assert selectors and all(s.items() <= labels.items() for s in selectors), deployment
        for other in set(deployments) - {deployment}:  # no selector takes another Deployment's pods
            theirs = deployments[other]["spec"]["template"]["metadata"]["labels"]
            assert not any(s.items() <= theirs.items() for s in selectors), (deployment, other)
    assert {n for k, n in r if k == "PodDisruptionBudget"} == {"fractal-worker", "fractal-frontend"}


def test_probes_use_fractal_health_for_each_role():
    for role, deployment in (("broker", BROKERS[0]), ("broker", BROKERS[1]), ("worker", "fractal-worker")):
        c = container(core()[("Deployment", deployment)])
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"] == ["fractal", "health", role]
    for probe in ("readinessProbe", "livenessProbe"):
        assert runtime()["spec"]["containers"][0][probe]["exec"]["command"] == ["fractal", "health", "serve"]


def test_the_worker_autoscaler_follows_the_brokers_queue_through_prometheus_adapter():
    r = core()
    hpa = r[("HorizontalPodAutoscaler", "fractal-worker")]["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("Deployment", "fractal-worker")
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    # One metric per broker: the queue counts at whichever broker the frontends send to.
    described = [m["object"]["describedObject"] for m in hpa["metrics"]]
    assert [(d["kind"], d["name"]) for d in described] == [("Service", name) for name in BROKERS]
    (name,) = {m["object"]["metric"]["name"] for m in hpa["metrics"]}
    registry = CollectorRegistry()
    BrokerMetrics(registry)
    assert name in {m.name for m in registry.collect()}  # a gauge the broker really exports

    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert rule["resources"]["overrides"]["service"] == {"resource": "service"}
    for d in described:
        annotations = r[("Service", d["name"])]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"  # so Prometheus has the series to adapt


def test_the_two_brokers_run_the_same_container_preferably_on_two_nodes():
    r = core()
    first, second = (r[("Deployment", name)]["spec"]["template"]["spec"] for name in BROKERS)
    assert first["containers"] == second["containers"]
    for spec in (first, second):
        (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "broker"


def test_the_kserve_serving_runtime_serves_onnx_over_v2_on_kserves_port():
    doc = runtime()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    spec = doc["spec"]
    assert set(spec) <= {"supportedModelFormats", "protocolVersions", "multiModel", "containers",
                         "annotations", "disabled", "grpcEndpoint", "httpDataEndpoint", "volumes"}
    assert spec["protocolVersions"] == ["v2"] and spec["multiModel"] is False
    assert {"name": "onnx", "version": "1", "autoSelect": True} in spec["supportedModelFormats"]
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container" and c["args"] == ["serve"]
    e = env(c)
    assert int(e["FRACTAL_SERVE_HTTP_PORT"]) == port(c, "http1") == 8080  # KServe routes to 8080
    assert e["FRACTAL_SERVE_HTTP_HOST"] == "0.0.0.0" and e["FRACTAL_SERVE_MODEL_DIR"] == "/mnt/models"
    assert doc["metadata"]["annotations"]["prometheus.kserve.io/port"] == e["FRACTAL_SERVE_HTTP_PORT"]

    (isvc,) = documents(K8S / "kserve" / "inferenceservice-example.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == doc["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
