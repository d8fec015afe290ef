"""ph6.8 - Kubernetes manifests for the orders service.

No cluster: every document is validated against the real Kubernetes OpenAPI schemas (the
kubernetes-validate package ships them, strict mode: an unknown field is an error, as
`kubectl apply --validate=strict` would say), then the rules the API server does not check
but a rollout depends on: selectors that select the pods, probes that hit a port the container
declares and a path the app serves, resources, the Ingress's TLS secret, ConfigMap and Secret
keys that exist."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S_VERSION = "1.30.0"
APP_PATHS = {"/health/live", "/health/ready", "/orders"}   # what the app serves (README)
HOST = "orders.example.com"


@pytest.fixture
def docs(learner: Any) -> list[dict[str, Any]]:
    try:
        loaded = [d for d in yaml.safe_load_all(learner.path("k8s.yaml").read_text()) if d]
    except yaml.YAMLError as exc:
        pytest.fail(f"k8s.yaml is not valid YAML: {exc}")
    bad = [d for d in loaded if not isinstance(d, dict) or "kind" not in d]
    if bad:
        pytest.fail(f"k8s.yaml holds a document that is not a Kubernetes object: {bad[0]!r:.120}")
    return loaded


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    if not found:
        pytest.fail(f"k8s.yaml has no {kind}: the orders service needs a Deployment, a "
                    "Service, an Ingress, a ConfigMap and Secrets (see README.md)")
    return found[0]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in of_kind(docs, kind)
                 if (d.get("metadata") or {}).get("name") == name), None)


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    return list(spec.get("containers") or [])


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(one(docs, "Deployment")["spec"]["template"]["metadata"].get("labels") or {})


def test_every_document_matches_the_kubernetes_schema(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        what = f"{doc.get('kind')} {(doc.get('metadata') or {}).get('name')!r}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(top level)"
            pytest.fail(f"{what} does not match the Kubernetes {K8S_VERSION} schema at "
                        f"{where}: {exc.message}\nthe API server would refuse it "
                        "(kubectl apply --validate=strict)")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{what}: Kubernetes {K8S_VERSION} has no {doc.get('apiVersion')} "
                        f"{doc.get('kind')} - that API version was removed or never existed; "
                        "use the current one (apps/v1, networking.k8s.io/v1, v1)")


def test_selectors_select_the_pods(docs: list[dict[str, Any]]) -> None:
    labels = pod_labels(docs)
    dep = one(docs, "Deployment")
    match = dep["spec"].get("selector", {}).get("matchLabels") or {}
    wrong = {k: v for k, v in match.items() if labels.get(k) != v}
    assert match and not wrong, (
        f"the Deployment's selector {match} does not match its pod template's labels "
        f"{labels}: the API server refuses a Deployment whose selector misses its own pods")
    for svc in of_kind(docs, "Service"):
        sel = svc["spec"].get("selector") or {}
        wrong = {k: v for k, v in sel.items() if labels.get(k) != v}
        assert sel and not wrong, (
            f"Service {svc['metadata']['name']!r} selects {sel}, but the pods are labelled "
            f"{labels}: its endpoints would be empty and every request to it refused "
            f"(mismatch on {wrong or 'an empty selector'})")


def port_exists(container: dict[str, Any], port: Any) -> bool:
    ports = container.get("ports") or []
    if isinstance(port, str):
        return any(p.get("name") == port for p in ports)
    return any(p.get("containerPort") == port for p in ports)


def test_service_and_ingress_reach_a_declared_port(docs: list[dict[str, Any]]) -> None:
    (container, *_) = containers(docs) or [{}]
    for svc in of_kind(docs, "Service"):
        for p in svc["spec"].get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            assert port_exists(container, target), (
                f"Service {svc['metadata']['name']!r} forwards to targetPort {target!r}, which "
                f"the container does not declare (its ports: {container.get('ports')}): "
                "traffic would go to a port nothing listens on")
    ing = one(docs, "Ingress")
    for rule in ing["spec"].get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            backend = path["backend"]["service"]
            svc = named(docs, "Service", backend["name"])
            assert svc is not None, (f"the Ingress sends {path.get('path')} to Service "
                                     f"{backend['name']!r}, which k8s.yaml does not define")
            want = backend.get("port", {})
            ok = any(want.get("name") == p.get("name") if "name" in want
                     else want.get("number") == p.get("port") for p in svc["spec"]["ports"])
            assert ok, (f"the Ingress names port {want} of Service {backend['name']!r}, "
                        f"which has {svc['spec']['ports']}")


@pytest.mark.parametrize("probe", ["startupProbe", "livenessProbe", "readinessProbe"])
def test_probes_hit_a_declared_port_and_a_served_path(docs: list[dict[str, Any]],
                                                      probe: str) -> None:
    for c in containers(docs):
        got = c.get(probe)
        assert got and "httpGet" in got, (
            f"container {c.get('name')!r} has no {probe} with httpGet: "
            + {"startupProbe": "without it a slow start is killed by the liveness probe",
               "livenessProbe": "a wedged process is never restarted",
               "readinessProbe": "pods get traffic before they can serve it and keep it when "
                                 "the database is gone"}[probe])
        http = got["httpGet"]
        assert port_exists(c, http.get("port")), (
            f"{probe} of {c.get('name')!r} probes port {http.get('port')!r}, which the "
            f"container does not declare (ports: {c.get('ports')}): the probe fails forever")
        assert http.get("path") in APP_PATHS, (
            f"{probe} of {c.get('name')!r} asks for {http.get('path')!r}, a path the app does "
            f"not serve (it serves {sorted(APP_PATHS)}): a 404 is a failed probe")
    for c in containers(docs):
        live = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
        assert live != "/health/ready", (
            f"the livenessProbe of {c.get('name')!r} asks /health/ready, which checks the "
            "database: when the database is down every pod would be restarted, over and over. "
            "Liveness asks only whether the process is alive (/health/live)")


def test_resources_requested_and_limited(docs: list[dict[str, Any]]) -> None:
    for c in containers(docs):
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for what in ("cpu", "memory"):
                assert (res.get(kind) or {}).get(what), (
                    f"container {c.get('name')!r} sets no resources.{kind}.{what} (has "
                    f"{res or 'none'}): without requests the scheduler packs pods blindly, "
                    "without limits one pod can starve its node")


def keys_of(doc: dict[str, Any]) -> set[str]:
    return set(doc.get("data") or {}) | set(doc.get("stringData") or {})


def test_config_and_secret_references_exist(docs: list[dict[str, Any]]) -> None:
    for c in containers(docs):
        env = {e["name"]: e for e in c.get("env") or []}
        db = env.get("DATABASE_URL", {})
        assert "secretKeyRef" in (db.get("valueFrom") or {}), (
            f"DATABASE_URL of {c.get('name')!r} is {db or 'not set'}: expected it from a "
            "Secret (valueFrom.secretKeyRef) - a password in a plain value or a ConfigMap is "
            "readable by anyone who can read the Deployment")
        assert "configMapKeyRef" in (env.get("LOG_LEVEL", {}).get("valueFrom") or {}), (
            f"LOG_LEVEL of {c.get('name')!r} does not come from the ConfigMap "
            "(valueFrom.configMapKeyRef)")
        for name, e in env.items():
            src = e.get("valueFrom") or {}
            for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if ref in src:
                    target = named(docs, kind, src[ref]["name"])
                    assert target is not None, (
                        f"env {name} refers to {kind} {src[ref]['name']!r}, which k8s.yaml "
                        "does not define: the pod would stay in CreateContainerConfigError")
                    assert src[ref]["key"] in keys_of(target), (
                        f"env {name} refers to key {src[ref]['key']!r} of {kind} "
                        f"{src[ref]['name']!r}, which has only {sorted(keys_of(target))}: the "
                        "pod would stay in CreateContainerConfigError")


def test_ingress_terminates_tls_with_a_secret_that_exists(docs: list[dict[str, Any]]) -> None:
    ing = one(docs, "Ingress")
    tls = ing["spec"].get("tls") or []
    entry = next((t for t in tls if HOST in (t.get("hosts") or [])), None)
    assert entry, (f"the Ingress has no tls entry for {HOST} (tls: {tls}): it would serve "
                   "plain HTTP only")
    secret = named(docs, "Secret", entry.get("secretName", ""))
    assert secret is not None, (
        f"the Ingress's TLS secret {entry.get('secretName')!r} is not defined in k8s.yaml: "
        "the controller falls back to its default self-signed certificate")
    assert secret.get("type") == "kubernetes.io/tls" and {"tls.crt", "tls.key"} <= keys_of(
        secret), (f"Secret {entry.get('secretName')!r} must be of type kubernetes.io/tls with "
                  f"keys tls.crt and tls.key (type {secret.get('type')!r}, keys "
                  f"{sorted(keys_of(secret))})")
