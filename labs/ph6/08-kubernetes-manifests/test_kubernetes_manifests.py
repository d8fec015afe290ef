"""ph6.8 - Kubernetes manifests for the orders service.

No cluster: every document is validated against the real Kubernetes OpenAPI schemas (the
kubernetes-validate package ships them, strict mode: an unknown field is an error, as
`kubectl apply --validate=strict` would say), then the rules the API server does not check
but a rollout depends on: selectors that select the pods, probes that hit a port the container
declares and a path the app serves (on the pod itself: no host, plain HTTP), resources, the
Ingress's TLS secret, ConfigMap and Secret keys that exist."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S_VERSION = "1.30.0"
APP_PATHS = {"/health/live", "/health/ready", "/orders"}   # what the app serves (README)
HOST = "orders.example.com"
LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
APP_PORT = 8080                                            # where the app listens (README)
REPLICAS = 3
IMAGE = "registry.example.com/shop/orders"                 # the app's image (README)
NODE_CPUS, NODE_MEMORY = 8, 32 * 2**30                     # what one node offers (README)
SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> float | None:
    """A Kubernetes resource quantity (100m, 128Mi, 0.5, 1e3) as a number, None if invalid."""
    found = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]?)",
                         str(value).strip())
    if not found:
        return None
    try:
        return float(found.group(1)) * SUFFIX[found.group(2)]
    except ValueError:
        return None


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


def test_the_api_server_admits_it(docs: list[dict[str, Any]]) -> None:
    """What the API server refuses beyond the OpenAPI schema (its validation code)."""
    for secret in of_kind(docs, "Secret"):
        for key, value in (secret.get("data") or {}).items():
            try:
                plain = base64.b64decode(str(value), validate=True)
            except (binascii.Error, ValueError):
                pytest.fail(
                    f"Secret {secret['metadata'].get('name')!r}: data.{key} is "
                    f"{str(value)[:40]!r}, not base64: the API server refuses it (data holds "
                    "base64-encoded bytes). Put plain text under stringData, or encode it")
            assert plain.startswith(b"-----BEGIN") or not plain.endswith(b"\n"), (
                f"Secret {secret['metadata'].get('name')!r}: data.{key} decodes to "
                f"{plain[-24:]!r}, ending in a newline (echo adds one: echo x | base64): the "
                "app gets the value with a trailing newline, and a URL or password with one "
                "fails. Encode without it (echo -n, printf) or use stringData")
    for c in containers(docs):
        res = c.get("resources") or {}
        for what in ("cpu", "memory"):
            ask, cap = ((res.get(k) or {}).get(what) for k in ("requests", "limits"))
            for kind, raw in (("requests", ask), ("limits", cap)):
                if raw is not None and quantity(raw) is None:
                    pytest.fail(f"container {c.get('name')!r}: resources.{kind}.{what} = "
                                f"{raw!r} is not a Kubernetes quantity (100m, 0.5, 128Mi): "
                                "the API server refuses it")
            if ask is not None and cap is not None:
                assert (quantity(ask) or 0) <= (quantity(cap) or 0), (
                    f"container {c.get('name')!r} requests {what} {ask} but is limited to "
                    f"{cap}: the API server refuses a request above its limit (the request "
                    "is what the pod is guaranteed, the limit its ceiling)")
    for c in containers(docs):
        for probe in ("livenessProbe", "startupProbe"):
            times = (c.get(probe) or {}).get("successThreshold")
            assert times in (None, 1), (
                f"the {probe} of {c.get('name')!r} sets successThreshold: {times}: the API "
                "server refuses it (must be 1 for liveness and startup probes): a probe whose "
                "failures restart the container takes one success as the answer 'the "
                "process is up'. Only a readinessProbe may ask for several successes in a "
                "row before the pod gets traffic again. Leave it unset (1)")
    for where, name in port_names(docs):
        problem = port_name_problem(name)
        if problem:
            pytest.fail(
                f"{where} is {name!r}, a string: Kubernetes reads a port given as a string as "
                f"a port's NAME, and {problem} - the API server refuses it (a port name is "
                "an IANA service name: at most 15 lower-case letters, digits and '-', at "
                "least one letter). A quoted number is such a string: write the number "
                f"unquoted ({APP_PORT}) or use the container port's name (http)")
    for dep in of_kind(docs, "Deployment"):
        rolling = ((dep["spec"].get("strategy") or {}).get("rollingUpdate") or {})
        if rolling and str(rolling.get("maxSurge", 1)) in ("0", "0%") and str(
                rolling.get("maxUnavailable", 1)) in ("0", "0%"):
            pytest.fail(f"Deployment {dep['metadata'].get('name')!r}: maxSurge and "
                        "maxUnavailable are both 0, which the API server refuses: a rollout "
                        "could neither add a new pod nor remove an old one")


def port_name_problem(name: str) -> str | None:
    """Why the API server refuses name as a port name (IsValidPortName), None if it does not."""
    if not 1 <= len(name) <= 15:
        return "a name has 1 to 15 characters"
    if not re.fullmatch(r"[a-z0-9-]+", name):
        return "a name holds only lower-case letters, digits and '-'"
    if not re.search(r"[a-z]", name):
        return "a name must contain at least one letter"
    if name.startswith("-") or name.endswith("-") or "--" in name:
        return "a name neither starts nor ends with '-' nor holds '--'"
    return None


def port_names(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every place where a port may be given by name, with the name given there (the
    places where a number or a name goes: IntOrString, a string is a name)."""
    found = []
    for dep in of_kind(docs, "Deployment"):
        for c in (dep["spec"].get("template") or {}).get("spec", {}).get("containers") or []:
            cname = c.get("name")
            for p in c.get("ports") or []:
                if "name" in p:
                    found.append((f"container {cname!r}: ports[].name", p["name"]))
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if isinstance(port, str):
                    found.append((f"container {cname!r}: {probe}.httpGet.port", port))
    for svc in of_kind(docs, "Service"):
        for p in svc["spec"].get("ports") or []:
            if isinstance(p.get("targetPort"), str):
                found.append((f"Service {svc['metadata'].get('name')!r}: targetPort",
                              p["targetPort"]))
    for ing in of_kind(docs, "Ingress"):
        for rule in ing["spec"].get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                port = ((path.get("backend") or {}).get("service") or {}).get("port") or {}
                if "name" in port:
                    found.append((f"the Ingress's backend for {path.get('path')}: port.name",
                                  port["name"]))
    return [(where, str(name)) for where, name in found]


def namespace(doc: dict[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("namespace") or "default")


def unmet(selector: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """The requirements of a LabelSelector (matchLabels and matchExpressions, all of them
    must hold) that labels do not meet: [] when it selects them."""
    out = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()
           if labels.get(k) != v]
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), list(e.get("values") or [])
        held = {"In": key in labels and labels.get(key) in values,
                "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False)
        if not held:
            out.append(f"{key} {op} {values}" if values else f"{key} {op}")
    return out


def requirements(selector: dict[str, Any]) -> str:
    """A LabelSelector as kubectl writes it: tier=backend,app in (orders)."""
    return ",".join([f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()] + [
        f"{e.get('key')} {str(e.get('operator')).lower()}"
        + (f" ({', '.join(map(str, e['values']))})" if e.get("values") else "")
        for e in selector.get("matchExpressions") or []])


def names_the_app(selector: dict[str, Any], app: str) -> bool:
    """Whether a LabelSelector requires a label naming the app (app: orders, or an In whose
    values all name it): what keeps it from selecting other apps' pods."""
    return any(app in str(v) for v in (selector.get("matchLabels") or {}).values()) or any(
        e.get("operator") == "In" and e.get("values")
        and all(app in str(v) for v in e["values"])
        for e in selector.get("matchExpressions") or [])


def test_selectors_select_the_pods(docs: list[dict[str, Any]]) -> None:
    labels = pod_labels(docs)
    dep = one(docs, "Deployment")
    selector = dep["spec"].get("selector") or {}
    match = selector.get("matchLabels") or {}
    missed = unmet(selector, labels)
    assert (match or selector.get("matchExpressions")) and not missed, (
        f"the Deployment's selector {selector} does not match its pod template's labels "
        f"{labels} (unmet: {missed or 'an empty selector'}): the API server refuses a "
        "Deployment whose selector misses its own pods")
    app = str(dep["metadata"].get("name", ""))
    assert names_the_app(selector, app), (
        f"the Deployment's selector {requirements(selector)} requires no label naming "
        f"{app!r}: it matches every pod of the namespace with {requirements(selector)}, "
        "another app's pods too. "
        "A Deployment owns the pods its selector matches: two Deployments whose selectors "
        "overlap fight over each other's pods (each ReplicaSet counts, adopts and deletes "
        "the other's), which Kubernetes' documentation warns against. Select the app's own "
        f"label: matchLabels {{app: {app}}}")
    spaces: dict[str, list[str]] = {}
    for d in docs:
        spaces.setdefault(namespace(d), []).append(
            f"{d.get('kind')} {(d.get('metadata') or {}).get('name')}")
    assert len(spaces) == 1, (
        "the objects are in different namespaces ("
        + "; ".join(f"{ns}: {', '.join(objs)}" for ns, objs in spaces.items())
        + "): a Service selects pods of its "
        "own namespace only, an Ingress reaches Services and TLS Secrets of its own, a pod "
        "reads ConfigMaps and Secrets of its own - so across namespaces the references find "
        "nothing. Put them all in one namespace (or leave it to kubectl -n)")
    for svc in of_kind(docs, "Service"):
        sel = svc["spec"].get("selector") or {}
        app = str(dep["metadata"].get("name", ""))
        loose = {} if any(app and app in str(v) for v in sel.values()) else {
            k: v for k, v in match.items() if sel.get(k) != v}
        wrong = {k: v for k, v in sel.items() if labels.get(k) != v}
        assert sel and not wrong, (
            f"Service {svc['metadata']['name']!r} selects {sel}, but the pods are labelled "
            f"{labels}: its endpoints would be empty and every request to it refused "
            f"(mismatch on {wrong or 'an empty selector'})")
        assert not loose, (
            f"Service {svc['metadata']['name']!r} selects {sel}: every pod of the namespace "
            f"with those labels (other apps' {sel} pods too), not only this Deployment's - "
            f"its selector lacks {loose}. Select at least the Deployment's own labels "
            f"{match}")


def port_exists(container: dict[str, Any], port: Any) -> bool:
    ports = container.get("ports") or []
    if isinstance(port, str):
        return any(p.get("name") == port for p in ports)
    return any(p.get("containerPort") == port for p in ports)


def resolve(container: dict[str, Any], port: Any) -> Any:
    """The container port number a named or numbered port stands for."""
    for p in container.get("ports") or []:
        if p.get("name") == port or p.get("containerPort") == port:
            return p.get("containerPort")
    return None


def routes(path: dict[str, Any], url: str) -> bool:
    """Whether an Ingress path matches the request path url (Exact or Prefix semantics)."""
    want = str(path.get("path") or "/")
    if path.get("pathType") == "Exact":
        return url == want
    base = want.rstrip("/")
    return base == "" or url == base or url.startswith(base + "/")


def test_service_and_ingress_reach_a_declared_port(docs: list[dict[str, Any]]) -> None:
    (container, *_) = containers(docs) or [{}]
    declared = [p.get("containerPort") for p in container.get("ports") or []]
    assert APP_PORT in declared, (
        f"container {container.get('name')!r} declares the ports {declared}, but the app "
        f"listens on {APP_PORT} (README): the Service and the probes that follow the port "
        f"name reach a port nothing listens on. Declare containerPort: {APP_PORT}")
    not_tcp = [f"container {container.get('name')!r}: containerPort {p.get('containerPort')}"
               f" has protocol: {p['protocol']}" for p in container.get("ports") or []
               if p.get("protocol", "TCP") != "TCP"] + [
        f"Service {svc['metadata'].get('name')!r}: port {p.get('port')} has protocol: "
        f"{p['protocol']}" for svc in of_kind(docs, "Service")
        for p in svc["spec"].get("ports") or [] if p.get("protocol", "TCP") != "TCP"]
    assert not not_tcp, (
        f"{'; '.join(not_tcp)}: the app speaks HTTP, which "
        "runs over TCP - a UDP (or SCTP) Service port forwards only datagrams of that "
        "protocol, so no HTTP connection ever reaches the pods, and a Service's named "
        "targetPort matches only a container port of the same protocol (the endpoints stay "
        "empty). Leave protocol unset (TCP)")
    for svc in of_kind(docs, "Service"):
        kind = svc["spec"].get("type", "ClusterIP")
        assert kind == "ClusterIP", (
            f"Service {svc['metadata']['name']!r} is of type {kind}: it opens a port on every "
            "node (and a cloud load balancer), so the pods are reachable from outside without "
            "the Ingress and its TLS. Behind an Ingress the Service stays type ClusterIP")
    for svc in of_kind(docs, "Service"):
        for p in svc["spec"].get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            assert port_exists(container, target), (
                f"Service {svc['metadata']['name']!r} forwards to targetPort {target!r}, which "
                f"the container does not declare (its ports: {container.get('ports')}): "
                "traffic would go to a port nothing listens on")
            assert resolve(container, target) == APP_PORT, (
                f"Service {svc['metadata']['name']!r} forwards to targetPort {target!r}, which "
                f"is container port {resolve(container, target)}, not {APP_PORT} where the app "
                "listens")
    ing = one(docs, "Ingress")
    hosts = [r.get("host") for r in ing["spec"].get("rules") or []]
    assert HOST in hosts, (
        f"the Ingress has rules for the hosts {hosts}, none of them {HOST}: requests for "
        f"{HOST} match no rule (and its TLS entry names a host no rule serves)")
    rule = next(r for r in ing["spec"]["rules"] if r.get("host") == HOST)
    paths = (rule.get("http") or {}).get("paths") or []
    for url in ("/orders", "/orders/42"):
        hit = [p for p in paths if routes(p, url)]
        assert hit, (
            f"on {HOST}, a request for {url} matches none of the Ingress's paths "
            f"{[(p.get('path'), p.get('pathType')) for p in paths]}: pathType Exact matches "
            "only that one path. Use pathType: Prefix, path: / to send the whole app")
    for rule in ing["spec"].get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            backend = path["backend"]["service"]
            routed = named(docs, "Service", backend["name"])
            assert routed is not None, (f"the Ingress sends {path.get('path')} to Service "
                                        f"{backend['name']!r}, which k8s.yaml does not define")
            want = backend.get("port", {})
            ok = any(want.get("name") == p.get("name") if "name" in want
                     else want.get("number") == p.get("port") for p in routed["spec"]["ports"])
            assert ok, (f"the Ingress names port {want} of Service {backend['name']!r}, "
                        f"which has {routed['spec']['ports']}")


def test_the_pods_are_reached_only_through_the_service(docs: list[dict[str, Any]]) -> None:
    """A port bound on the node (hostPort, hostNetwork) is the NodePort mistake made in the
    pod: the app answers on every node's address, beside the Ingress and its TLS."""
    spec = one(docs, "Deployment")["spec"]["template"].get("spec") or {}
    assert not spec.get("hostNetwork"), (
        "the pod template sets hostNetwork: true: the pods share their node's network, so "
        f"the app listens on port {APP_PORT} of the node's own address - reachable from "
        "outside the cluster without the Ingress and its TLS - and two replicas cannot "
        "share a node (the second finds the port taken). Leave hostNetwork unset: the "
        "pods are reached through the Service")
    for c in containers(docs):
        bound = [p for p in c.get("ports") or [] if p.get("hostPort")]
        assert not bound, (
            f"container {c.get('name')!r} declares {bound}: hostPort binds that port on the "
            "node the pod runs on, so the app answers on every such node's address from "
            "outside the cluster, without the Ingress and its TLS, and the scheduler can "
            "place only one replica per node (a rollout's extra pod stays Pending where "
            "the nodes are taken). Declare only containerPort: the Service and the "
            "Ingress reach the pods without it")



# The Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards),
# the profile the README asks for: restricted, which includes baseline. What each allows.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
WHY_RESTRICTED = (
    "The README asks for the Pod Security Standards' restricted profile (a namespace labelled "
    "pod-security.kubernetes.io/enforce: restricted refuses such a pod): the orders service "
    "needs no root, no privilege and nothing of its node, so a compromise of the app must "
    "not be a compromise of the node")


def pss_violations(pod: dict[str, Any]) -> list[str]:
    """Each way the pod spec breaks the restricted profile (baseline included): the field,
    the value, the profile and the rule that forbids it, and what it opens."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"the pod sets {field}: true - baseline 'Host Namespaces' forbids "
                         "it: the pod shares its node's network, processes or IPC")
    for v in pod.get("volumes") or []:
        kind = next((k for k in v if k != "name"), "?")
        if kind == "hostPath":
            found.append(f"volume {v.get('name')!r} is a hostPath - baseline 'HostPath "
                         "Volumes' forbids it: the pod reads and writes the node's files")
        elif kind not in RESTRICTED_VOLUMES:
            found.append(f"volume {v.get('name')!r} is of type {kind} - restricted 'Volume "
                         f"Types' allows only {sorted(RESTRICTED_VOLUMES)}")
    for s in pod_sc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            found.append(f"securityContext.sysctls sets {s.get('name')} - baseline "
                         "'Sysctls' allows only the namespaced safe set: it changes the node")
    listed = [("containers", c) for c in pod.get("containers") or []] + [
        ("initContainers", c) for c in pod.get("initContainers") or []]
    for kind, c in listed:
        sc = c.get("securityContext") or {}
        where = f"{kind[:-1]} {c.get('name')!r}: securityContext"
        if sc.get("privileged"):
            found.append(f"{where}.privileged = true - baseline 'Privileged Containers' "
                         "forbids it: a privileged container has every capability and the "
                         "node's devices, root in it is root on the node")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}.allowPrivilegeEscalation = "
                         f"{sc.get('allowPrivilegeEscalation', 'unset (true)')} - restricted "
                         "'Privilege Escalation' requires false: a setuid binary in the "
                         "image would give a process more rights than it started with")
        caps = sc.get("capabilities") or {}
        added = {str(a).upper().removeprefix("CAP_") for a in caps.get("add") or []}
        if added - BASELINE_CAPABILITIES:
            found.append(f"{where}.capabilities.add = {sorted(added)} - baseline "
                         "'Capabilities' forbids those beyond the runtime's default set")
        elif added - {"NET_BIND_SERVICE"}:
            found.append(f"{where}.capabilities.add = {sorted(added)} - restricted "
                         "'Capabilities' allows adding only NET_BIND_SERVICE")
        if "ALL" not in {str(d).upper() for d in caps.get("drop") or []}:
            found.append(f"{where}.capabilities.drop = {caps.get('drop', 'unset')} - "
                         "restricted 'Capabilities' requires drop: [ALL]: the runtime's "
                         "default set (CHOWN, SETUID, NET_RAW...) is more than an HTTP "
                         "service needs")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}.procMount = {sc['procMount']!r} - baseline '/proc Mount "
                         "Type' requires Default: the node's /proc unmasked")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}.windowsOptions.hostProcess = true - baseline 'HostProcess'"
                         " forbids it")
    for kind, c in [("pod", {"name": "", "securityContext": pod_sc})] + listed:
        sc = c.get("securityContext") or {}
        where = ("the pod's securityContext" if kind == "pod" else
                 f"{kind[:-1]} {c.get('name')!r}: securityContext")
        if sc.get("runAsUser") == 0:
            found.append(f"{where}.runAsUser = 0 - restricted 'Running as Non-root user' "
                         "forbids uid 0: root in the container owns every file the image "
                         "and the mounted volumes hold, and is one kernel or runtime flaw "
                         "away from the node")
        if sc.get("runAsNonRoot") is False:
            found.append(f"{where}.runAsNonRoot = false - restricted 'Running as Non-root' "
                         "forbids it")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or \
                selinux.get("role"):
            found.append(f"{where}.seLinuxOptions = {selinux} - baseline 'SELinux' allows "
                         "only the container types, and no user or role")
        for field in ("seccompProfile", "appArmorProfile"):
            if (sc.get(field) or {}).get("type") == "Unconfined":
                found.append(f"{where}.{field}.type = Unconfined - baseline "
                             f"'{field[:-7].capitalize()}' forbids it: every system call "
                             "the kernel has is open to the app")
    if not pod_sc.get("runAsNonRoot") and not all(
            (c.get("securityContext") or {}).get("runAsNonRoot") for _, c in listed):
        found.append("runAsNonRoot is set to true neither in the pod's securityContext nor "
                     "in every container's - restricted 'Running as Non-root' requires it: "
                     "without it the image's USER decides, and most images run as root "
                     "(the kubelet refuses to start a container that would run as uid 0 "
                     "only when runAsNonRoot is true)")
    allowed = {"RuntimeDefault", "Localhost"}
    if (pod_sc.get("seccompProfile") or {}).get("type") not in allowed and not all(
            ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
            in allowed for _, c in listed):
        found.append("seccompProfile.type is RuntimeDefault (or Localhost) neither in the "
                     "pod's securityContext nor in every container's - restricted "
                     "'Seccomp' requires it: unset, the container runs unconfined, every "
                     "system call open")
    return found


def test_the_pod_meets_the_restricted_pod_security_standard(
        docs: list[dict[str, Any]]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"].get("spec") or {}
    found = pss_violations(pod)
    assert not found, (
        f"the Deployment's pod template breaks the Pod Security Standards: "
        f"{'; '.join(found)}. {WHY_RESTRICTED}. Set in the pod's securityContext "
        "runAsNonRoot: true, runAsUser: 10001, seccompProfile {type: RuntimeDefault}, and "
        "in the container's allowPrivilegeEscalation: false, capabilities {drop: [ALL]}")


# The app's paths that fail while the database is down, and why.
DEPENDS_ON_DATABASE = {"/health/ready": "which checks the database",
                       "/orders": "which reads the database"}
# The probes whose failure restarts the container, and what a database outage then does.
RESTARTING_PROBES = {
    "startupProbe": "while the database is down (a rollout or a rescheduled pod during an "
                    "outage or a failover) every new pod is killed after failureThreshold x "
                    "periodSeconds and loops in CrashLoopBackOff, though the process is fine.",
    "livenessProbe": "when the database is down every pod would be restarted, over and over.",
}


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
        host = http.get("host")
        there = ("there is the node itself" if str(host).lower() in LOOPBACK else
                 "is looked up and dialled from the node (a Service name does not even "
                 "resolve there)")
        assert not host, (
            f"{probe} of {c.get('name')!r} sets httpGet.host {host!r}: the kubelet sends "
            "httpGet probes from the node, and host replaces the default target, the pod's "
            f"own IP - {host!r} {there}, never this container, so the probe fails forever. "
            "Leave host unset; set only path and port")
        scheme = http.get("scheme") or "HTTP"
        assert scheme == "HTTP", (
            f"{probe} of {c.get('name')!r} uses scheme {scheme!r}: the app speaks plain "
            f"HTTP on {APP_PORT} (TLS ends at the Ingress), so every TLS handshake the probe "
            "tries fails - leave scheme unset (HTTP)")
        assert http.get("path") in APP_PATHS, (
            f"{probe} of {c.get('name')!r} asks for {http.get('path')!r}, a path the app does "
            f"not serve (it serves {sorted(APP_PATHS)}): a 404 is a failed probe")
    for c in containers(docs):
        ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
        assert ready not in APP_PATHS or ready == "/health/ready", (
            f"the readinessProbe of {c.get('name')!r} asks {ready}, which answers 200 while "
            "the database is unreachable: the pod stays in the Service's endpoints and "
            "fails every request it gets. Readiness asks whether it can serve "
            "(/health/ready)")
        for restarting, when in RESTARTING_PROBES.items():
            path = c.get(restarting, {}).get("httpGet", {}).get("path")
            assert path not in DEPENDS_ON_DATABASE, (
                f"the {restarting} of {c.get('name')!r} asks {path}, "
                f"{DEPENDS_ON_DATABASE.get(path)}: a failing {restarting} restarts the "
                f"container, so {when} Ask it only whether the process is up (/health/live); "
                "whether it can serve is readiness's question, and readiness only takes the "
                "pod out of the Service's endpoints")


def test_resources_requested_and_limited(docs: list[dict[str, Any]]) -> None:
    for c in containers(docs):
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for what in ("cpu", "memory"):
                assert (res.get(kind) or {}).get(what), (
                    f"container {c.get('name')!r} sets no resources.{kind}.{what} (has "
                    f"{res or 'none'}): without requests the scheduler packs pods blindly, "
                    "without limits one pod can starve its node")
        memory = [(k, (res.get(k) or {}).get("memory")) for k in ("requests", "limits")]
        for kind, raw in memory:
            amount = quantity(raw) or 0
            assert amount >= 4 * 2**20, (
                f"container {c.get('name')!r}: resources.{kind}.memory = {raw!r} is "
                f"{amount:g} bytes" + (" (m means milli: thousandths of a byte)"
                                       if str(raw).endswith("m") else "")
                + ": the container would be OOM-killed at start. Write mebibytes: 128Mi")
        for kind in ("requests", "limits"):
            raw = (res.get(kind) or {}).get("cpu")
            assert (quantity(raw) or 0) <= NODE_CPUS, (
                f"container {c.get('name')!r}: resources.{kind}.cpu = {raw!r} is "
                f"{quantity(raw):g} CPUs, more than a node has ({NODE_CPUS}, README): "
                + ("no node can give the request, the pod would stay Pending (FailedScheduling"
                   ": Insufficient cpu)" if kind == "requests" else
                   "a limit no node reaches limits nothing")
                + ". Millicores are written with m: 500m is half a CPU")
        for kind in ("requests", "limits"):
            raw = (res.get(kind) or {}).get("memory")
            amount = quantity(raw) or 0
            assert amount <= NODE_MEMORY, (
                f"container {c.get('name')!r}: resources.{kind}.memory = {raw!r} is "
                f"{amount / 2**30:.4g} GiB, more than a node has ({NODE_MEMORY // 2**30} GiB, "
                "README): "
                + ("the scheduler finds no node with that much free, every pod stays Pending "
                   "(FailedScheduling: Insufficient memory)" if kind == "requests" else
                   "a limit no node reaches limits nothing, one pod can take its node's "
                   "memory")
                + ". Mi is mebibytes (128Mi), Gi gibibytes, G and M powers of ten")


def test_deployment_rolls_out_safely(docs: list[dict[str, Any]]) -> None:
    dep = one(docs, "Deployment")
    replicas = dep["spec"].get("replicas", 1)
    assert replicas == REPLICAS, (
        f"the Deployment runs {replicas} replica(s), expected {REPLICAS} (README): with one "
        "pod, a node drain, a crash or a rollout leaves nobody serving")
    strategy = dep["spec"].get("strategy") or {}
    assert strategy.get("type", "RollingUpdate") != "Recreate", (
        f"the Deployment's strategy is Recreate: a rollout stops all {replicas} old pods "
        "before it starts a new one, so every release takes the service down until the new "
        "pods are ready (and a new version that never gets ready leaves nobody serving). "
        "Use type: RollingUpdate, rollingUpdate {maxSurge: 1, maxUnavailable: 0}: a new pod "
        "must be ready before an old one goes")
    rolling = strategy.get("rollingUpdate") or {}
    down = rolling.get("maxUnavailable", "25%")
    down_pods = (int(str(down)[:-1]) * replicas // 100 if str(down).endswith("%")
                 else int(down))
    assert down_pods < replicas, (
        f"rollingUpdate.maxUnavailable = {down!r} lets a rollout take {down_pods} of "
        f"{replicas} pods down at once: every pod can be gone at the same time. Keep it below "
        "the replica count (0 with maxSurge: 1 keeps full capacity)")
    for c in containers(docs):
        image = str(c.get("image", ""))
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest"), (
            f"container {c.get('name')!r} runs image {image!r}: "
            + ("'latest'" if tag else "no tag (that is 'latest')")
            + " moves, so the pods of one Deployment run different code and a rollback goes "
            "nowhere. Use the release's tag (orders:1.4.2) or a digest")


def test_the_nodes_can_pull_the_image(docs: list[dict[str, Any]]) -> None:
    for c in containers(docs):
        image = str(c.get("image", "")).partition("@")[0]
        last = image.rsplit("/", 1)[-1]
        repository = image[:len(image) - len(last)] + last.partition(":")[0]
        assert repository == IMAGE, (
            f"container {c.get('name')!r} runs image {c.get('image')!r}, repository "
            f"{repository!r}: the app's image is {IMAGE} (README). A name without a "
            "registry host is looked up on Docker Hub (docker.io/library/...), where no "
            "such image is, so every pod stays in ImagePullBackOff. Name the image in full: "
            f"{IMAGE}:1.4.2")
        policy = c.get("imagePullPolicy")
        assert policy in (None, "IfNotPresent", "Always"), (
            f"container {c.get('name')!r} sets imagePullPolicy: {policy}: the kubelet never "
            "pulls the image, so a pod scheduled on a node that does not already hold it "
            "(a new node, an autoscaled one, any node after image garbage collection) fails "
            "with ErrImageNeverPull and never starts - Never is for images loaded onto the "
            "nodes by hand (kind load, minikube). Leave it unset: a tagged image defaults "
            "to IfNotPresent")


def keys_of(doc: dict[str, Any]) -> set[str]:
    return set(doc.get("data") or {}) | set(doc.get("stringData") or {})


def from_env_from(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The variables a container's envFrom gives, each with the ConfigMap or Secret it is
    taken from: every key of the source, under its own name (after the prefix, if any)."""
    given = {}
    for source in container.get("envFrom") or []:
        for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            name = (source.get(ref) or {}).get("name")
            doc = named(docs, kind, str(name)) if name else None
            for key in sorted(keys_of(doc) if doc else set()):
                given[f"{source.get('prefix') or ''}{key}"] = f"{kind} {name!r}"
    return given


def log_level_from_config_map(docs: list[dict[str, Any]], container: dict[str, Any],
                              env: dict[str, dict[str, Any]]) -> None:
    """LOG_LEVEL, by that name (variable names are case-sensitive), from a ConfigMap: an
    env entry with valueFrom.configMapKeyRef, or (no env entry overriding it) envFrom of a
    ConfigMap that has a key LOG_LEVEL."""
    given = from_env_from(docs, container)
    if "configMapKeyRef" in (env.get("LOG_LEVEL", {}).get("valueFrom") or {}) or (
            "LOG_LEVEL" not in env and given.get("LOG_LEVEL", "").startswith("ConfigMap")):
        return
    names = sorted(set(env) | set(given))
    pulled = sorted(k for k, src in given.items() if src.startswith("ConfigMap"))
    pytest.fail(
        f"LOG_LEVEL of {container.get('name')!r} does not come from the ConfigMap: the "
        f"container's environment holds {names}"
        + (f" (envFrom names each variable after its key: {pulled})" if pulled else "")
        + ", and the app reads LOG_LEVEL - variable names are taken as written, case "
        "included. Map the ConfigMap's key log-level to that name: env: - name: LOG_LEVEL, "
        "valueFrom.configMapKeyRef {name: ..., key: log-level}")


def test_each_variable_is_defined_once(docs: list[dict[str, Any]]) -> None:
    for c in containers(docs):
        seen: dict[str, dict[str, Any]] = {}
        for e in c.get("env") or []:
            first = seen.setdefault(e["name"], e)
            assert first is e, (
                f"env {e['name']} of {c.get('name')!r} is defined twice, {first} and then "
                f"{e}: the kubelet keeps the last (the API server warns that it 'hides "
                "previous definition'), so the other is dead text that misleads its reader - "
                "and a plain value left beside a secretKeyRef still puts the credential in "
                "the Deployment for anyone who can read it. Define each variable once")


def test_config_and_secret_references_exist(docs: list[dict[str, Any]]) -> None:
    for c in containers(docs):
        env = {e["name"]: e for e in c.get("env") or []}
        db = env.get("DATABASE_URL", {})
        assert "secretKeyRef" in (db.get("valueFrom") or {}), (
            f"DATABASE_URL of {c.get('name')!r} is {db or 'not set'}: expected it from a "
            "Secret (valueFrom.secretKeyRef) - a password in a plain value or a ConfigMap is "
            "readable by anyone who can read the Deployment")
        log_level_from_config_map(docs, c, env)
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


# What makes a controller (or a mesh) speak something else than plain HTTP to the pods:
# annotation names (their part after the prefix, any controller's prefix) and the values that
# ask for TLS, HTTP/2 or another protocol; and Service port declarations of the same.
NOT_PLAIN_HTTP = re.compile(r"https|tls|ssl|grpc|h2c?\b|http2|ajp|fcgi|wss", re.I)
PROTOCOL_ANNOTATIONS = {"backend-protocol", "protocol", "service.serversscheme",
                        "app-protocols", "upstream-protocol"}
TLS_UPSTREAM_SWITCHES = {"ssl-passthrough", "secure-backends", "server-ssl",
                         "backend-tls", "upstream-tls"}


def not_plain_http(docs: list[dict[str, Any]]) -> list[str]:
    """Each declaration in the Ingress's or a Service's manifest that has the pods spoken to
    in another protocol than the plain HTTP/1.1 the app serves on 8080."""
    found = []
    for doc in of_kind(docs, "Ingress") + of_kind(docs, "Service"):
        where = f"the {doc['kind']} {doc['metadata'].get('name')!r}"
        for key, value in ((doc.get("metadata") or {}).get("annotations") or {}).items():
            name = str(key).rsplit("/", 1)[-1].lower()
            if (name in PROTOCOL_ANNOTATIONS and NOT_PLAIN_HTTP.search(str(value))) or (
                    name in TLS_UPSTREAM_SWITCHES and str(value).lower() == "true"):
                found.append(f"{where} carries the annotation {key}: {value!r}")
        if doc["kind"] != "Service":
            continue
        for port in doc["spec"].get("ports") or []:
            if NOT_PLAIN_HTTP.search(str(port.get("appProtocol") or "")):
                found.append(f"{where}: its port {port.get('port')} declares appProtocol: "
                             f"{port['appProtocol']!r}")
            prefix = str(port.get("name") or "").split("-", 1)[0]
            if NOT_PLAIN_HTTP.fullmatch(prefix):
                found.append(f"{where}: its port {port.get('port')} is named {port['name']!r} "
                             "(controllers and meshes such as Traefik and Istio read the "
                             "protocol from the port's name)")
    return found


def test_the_ingress_speaks_plain_http_to_the_pods(docs: list[dict[str, Any]]) -> None:
    found = not_plain_http(docs)
    assert not found, (
        f"{'; '.join(found)}: the Ingress controller then speaks TLS to the pods on "
        f"{APP_PORT} (or passes the client's TLS on to them, or speaks HTTP/2, gRPC...), "
        "where the app serves plain HTTP - the handshake fails and "
        "every request through the Ingress is a 502 Bad Gateway, while the pods stay Ready "
        "(the kubelet's probes speak plain HTTP) and the Service has endpoints, so everything "
        "looks healthy. The Ingress terminates TLS and forwards plain HTTP to the Service: "
        "leave the backend protocol at HTTP (no backend-protocol HTTPS, no ssl-passthrough, "
        "no appProtocol https, a port named http)")
