"""Checks deploy/ and docker-compose.yml without a Docker engine or cluster.

Parses the compose file, every Kubernetes manifest, the Prometheus rules and
the Grafana dashboard, and checks them against the binaries themselves: ports
and environment variables against `outbox-writer --help` / `outbox-relay
--help`, metric names against the metric constants in the Rust sources. Also
checks the closed defaults: compose ports on loopback, ServiceAccounts without
tokens, securityContexts, NetworkPolicies and the example Secret's placeholder.

    python check-deploy.py ROOT BIN_DIR
Exits 1 and lists every problem when anything is off.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(sys.argv[1])
BIN_DIR = Path(sys.argv[2])
problems: list[str] = []
checks = 0


def check(ok: bool, message: str) -> None:
    global checks
    checks += 1
    if not ok:
        problems.append(message)


def help_of(binary: str) -> str:
    return subprocess.run(
        [str(BIN_DIR / binary), "--help"], check=True, capture_output=True, text=True
    ).stdout


def env_defaults(help_text: str) -> dict[str, str | None]:
    """Environment variable -> default, from clap's help output."""
    found: dict[str, str | None] = {}
    # Each option's help ends with "[env: NAME=] [default: VALUE]" (possibly wrapped).
    flat = re.sub(r"\s+", " ", help_text)
    for match in re.finditer(r"\[env: ([A-Z0-9_]+)(?:=[^\]]*)?\](?: \[default: ([^\]]*)\])?", flat):
        found[match.group(1)] = match.group(2)
    return found


writer_env = env_defaults(help_of("outbox-writer"))
relay_env = env_defaults(help_of("outbox-relay"))
known_env = set(writer_env) | set(relay_env) | {"RUST_LOG"}
writer_port = int(writer_env["WRITER_BIND"].rsplit(":", 1)[1])
relay_port = int(relay_env["RELAY_ADMIN_BIND"].rsplit(":", 1)[1])
check(writer_port == 8000, f"writer default port is {writer_port}, docs say 8000")
check(relay_port == 9090, f"relay default admin port is {relay_port}, docs say 9090")

source = "\n".join(p.read_text() for p in (ROOT / "crates").rglob("*.rs"))
metric_names = set(re.findall(r'"(outbox_[a-z_]+)"', source))


def metrics_in(expr: str) -> set[str]:
    names = set(re.findall(r"\b(outbox_[a-z_]+?)(?:_bucket|_count|_sum)?\b", expr))
    return names


def load_all(path: Path) -> list[dict]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        problems.append(f"{path}: invalid YAML: {e}")
        return []


# -- Dockerfile -------------------------------------------------------------
dockerfile = (ROOT / "deploy/docker/Dockerfile").read_text()
stage_names = {stage for _, stage in re.findall(r"^FROM (\S+) AS (\S+)", dockerfile, re.M)}
check({"writer", "relay"} <= stage_names, "Dockerfile needs targets writer and relay")
for image in re.findall(r"^FROM (\S+)", dockerfile, re.M):
    base = image.split(" ")[0]
    if base in stage_names:
        continue
    check(":" in base and not base.endswith(":latest"), f"Dockerfile: base image {base} is not pinned")
check(re.search(r"^USER (?!0\b|root\b)\S+", dockerfile, re.M) is not None, "Dockerfile: runtime must not run as root")
check(dockerfile.count("HEALTHCHECK") >= 2, "Dockerfile: each target needs a HEALTHCHECK")
check(f"EXPOSE {writer_port}" in dockerfile, f"Dockerfile: writer must EXPOSE {writer_port}")
check(f"EXPOSE {relay_port}" in dockerfile, f"Dockerfile: relay must EXPOSE {relay_port}")
check("--help" in dockerfile, "Dockerfile: the build should run both binaries' --help")

# -- docker-compose.yml -------------------------------------------------------
compose = load_all(ROOT / "docker-compose.yml")[0]
services = compose.get("services", {})
for name in ("mongo", "mongo-init", "pubsub", "pubsub-init", "writer", "relay-1", "relay-2"):
    check(name in services, f"compose: service {name} missing")
mongo = services.get("mongo", {})
check(str(mongo.get("image", "")).startswith("mongo:7"), "compose: MongoDB must be version 7")
check("--replSet" in mongo.get("command", []), "compose: mongod must run as a replica set")
check("healthcheck" in mongo, "compose: mongo needs a health check")
check("rs.initiate" in json.dumps(services.get("mongo-init", {})), "compose: mongo-init must initiate the replica set")
replset = mongo.get("command", [None, None, None, None])[mongo.get("command", []).index("--replSet") + 1] if "--replSet" in mongo.get("command", []) else None
pubsub_cmd = " ".join(services.get("pubsub", {}).get("command", []))
check("--host-port=0.0.0.0:8085" in pubsub_cmd, "compose: the emulator must listen on 8085")
check("enableMessageOrdering" in json.dumps(services.get("pubsub-init", {})), "compose: the subscription must be ordered")
relay_ids = set()
for name, service in services.items():
    env = service.get("environment", {}) or {}
    for key in env:
        check(key in known_env, f"compose: {name} sets {key}, which no binary reads")
    build = service.get("build")
    if build:
        target = build.get("target")
        check(target in stage_names, f"compose: {name} builds unknown target {target}")
        check(build.get("dockerfile") == "deploy/docker/Dockerfile", f"compose: {name} must build deploy/docker/Dockerfile")
        port = writer_port if target == "writer" else relay_port
        ports = [str(p) for p in service.get("ports", [])]
        check(any(p.endswith(f":{port}") for p in ports), f"compose: {name} must publish container port {port}")
        url = env.get("MONGODB_URL", "")
        check(f"replicaSet={replset}" in url and "mongo:27017" in url, f"compose: {name} MONGODB_URL must point at replica set {replset} on mongo:27017")
        deps = service.get("depends_on", {})
        check(deps.get("mongo-init", {}).get("condition") == "service_completed_successfully",
              f"compose: {name} must wait for mongo-init")
        if target == "relay":
            check(env.get("PUBSUB_EMULATOR_HOST") == "pubsub:8085", f"compose: {name} must use the emulator at pubsub:8085")
            check(env.get("RELAY_ID") not in relay_ids, f"compose: {name} needs its own RELAY_ID")
            relay_ids.add(env.get("RELAY_ID"))
check(len(relay_ids) >= 2, "compose: two relays with distinct RELAY_IDs")
mongo_command = " ".join(services.get("mongo", {}).get("command", []))
check("transactionLifetimeLimitSeconds=15" in mongo_command, "compose: mongod must lower transactionLifetimeLimitSeconds")

# -- Kubernetes ---------------------------------------------------------------
k8s = ROOT / "deploy/k8s"
kustomization = load_all(k8s / "kustomization.yaml")[0]
objects: dict[tuple[str, str], dict] = {}
for resource in kustomization.get("resources", []):
    path = k8s / resource
    check(path.exists(), f"k8s: {resource} listed but missing")
    if not path.exists():
        continue
    for doc in load_all(path):
        for key in ("apiVersion", "kind", "metadata"):
            check(key in doc, f"k8s: {resource} lacks {key}")
        objects[(doc.get("kind"), doc.get("metadata", {}).get("name"))] = doc
for doc in load_all(k8s / "secret.example.yaml"):
    objects[(doc["kind"], doc["metadata"]["name"])] = doc
listed = set(kustomization.get("resources", [])) | {"kustomization.yaml", "secret.example.yaml"}
for path in k8s.glob("*.yaml"):
    check(path.name in listed, f"k8s: {path.name} is not in kustomization.yaml")
image_names = {i["name"] for i in kustomization.get("images", [])}
configmap = objects.get(("ConfigMap", "batch-outbox-config"), {})
for key in configmap.get("data", {}):
    check(key in known_env, f"k8s: ConfigMap key {key} is read by no binary")

expected = {
    "outbox-writer": ("writer", writer_port, int(writer_env.get("SHUTDOWN_GRACE_SECONDS") or 30)),
    "outbox-relay": ("relay", relay_port, int(relay_env.get("PUBLISH_RETRY_SECONDS") or 30)),
}
for name, (target, port, shutdown) in expected.items():
    deployment = objects.get(("Deployment", name))
    check(deployment is not None, f"k8s: Deployment {name} missing")
    if deployment is None:
        continue
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    check(deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"k8s: {name} selector does not match its pods")
    pod = deployment["spec"]["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(grace > shutdown, f"k8s: {name} terminationGracePeriodSeconds {grace} must exceed its shutdown time {shutdown}")
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"k8s: {name} must run as non-root")
    container = pod["containers"][0]
    check(container["image"].split(":")[0] in image_names, f"k8s: {name} image {container['image']} not managed by kustomization images")
    check(container["image"].split(":")[0] == f"batch-outbox/{target}", f"k8s: {name} must run the {target} image")
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    check(port in port_names.values(), f"k8s: {name} must expose {port}")
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        http = container.get(probe, {}).get("httpGet", {})
        check(http.get("path") == path, f"k8s: {name} {probe} must GET {path}")
        check(http.get("port") in port_names or http.get("port") == port, f"k8s: {name} {probe} port unknown")
    resources = container.get("resources", {})
    check("requests" in resources and "limits" in resources, f"k8s: {name} needs resource requests and limits")
    for source_ref in container.get("envFrom", []):
        ref = source_ref.get("configMapRef", {}).get("name")
        check(("ConfigMap", ref) in objects, f"k8s: {name} uses missing ConfigMap {ref}")
    for var in container.get("env", []):
        check(var["name"] in known_env, f"k8s: {name} sets {var['name']}, which no binary reads")
        secret = var.get("valueFrom", {}).get("secretKeyRef")
        if secret:
            stored = objects.get(("Secret", secret["name"]), {})
            check(secret["key"] in stored.get("stringData", {}), f"k8s: {name} reads missing secret key {secret['key']}")
    check(any(p.get("kind") == "PodDisruptionBudget" and p["spec"]["selector"]["matchLabels"].items() <= labels.items()
              for p in objects.values()), f"k8s: {name} needs a PodDisruptionBudget")
    services_for = [s for s in objects.values() if s.get("kind") == "Service" and s["spec"]["selector"].items() <= labels.items()]
    check(bool(services_for), f"k8s: {name} needs a Service")
    for service in services_for:
        for p in service["spec"]["ports"]:
            check(p["targetPort"] in port_names or p["targetPort"] == port, f"k8s: Service {service['metadata']['name']} targets unknown port {p['targetPort']}")
relay = objects.get(("Deployment", "outbox-relay"), {})
check(relay.get("spec", {}).get("replicas", 1) >= 2, "k8s: the relay needs at least two replicas")
hpa = objects.get(("HorizontalPodAutoscaler", "outbox-writer"), {})
check(hpa.get("spec", {}).get("scaleTargetRef", {}).get("name") == "outbox-writer", "k8s: the HPA must scale outbox-writer")

lifetime_job = objects.get(("Job", "mongo-transaction-lifetime"), {})
check("transactionLifetimeLimitSeconds" in json.dumps(lifetime_job), "k8s: a Job must lower MongoDB's transactionLifetimeLimitSeconds")
check("directConnection" in json.dumps(lifetime_job), "k8s: the lifetime Job must set the parameter on every member (directConnection), not only the primary")

# -- Closed defaults ------------------------------------------------------------
# Nothing is reachable by default that a stranger could use: compose publishes on
# loopback only, every pod runs under its own ServiceAccount without an API token
# and with a locked-down securityContext, NetworkPolicies open the writer's and the
# relay's ports to labelled peers only, and the example Secret holds no usable
# admin token. docs/OPERATIONS.md, "Security", describes the same.
LOOPBACK = {"127.0.0.1", "::1"}


def published_host_ip(port: object) -> str | None:
    """The host address a compose `ports:` entry binds to; None when it binds every address."""
    if isinstance(port, dict):  # long syntax: {target, published, host_ip}
        return port.get("host_ip")
    text = str(port).split("/", 1)[0]
    if text.startswith("["):  # "[::1]:9091:9090"
        host, _, rest = text[1:].partition("]")
        return host if rest.count(":") == 2 else None
    parts = text.rsplit(":", 2)  # "127.0.0.1:9091:9090", "::1:9091:9090"; "9091:9090" has none
    return parts[0] if len(parts) == 3 else None


for name, service in services.items():
    for port in service.get("ports", []) or []:
        check(published_host_ip(port) in LOOPBACK,
              f"compose: {name} publishes {port!r} on every address; bind it to loopback (\"127.0.0.1:HOST:CONTAINER\")")
    check(service.get("network_mode") != "host", f"compose: {name} must not use the host's network (it would listen on every address)")

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
workloads = []  # (what, pod labels, pod spec)
for (kind, name), doc in objects.items():
    if kind not in WORKLOAD_KINDS:
        continue
    spec = doc.get("spec", {})
    if kind == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template", {})
    workloads.append((f"{kind} {name}", template.get("metadata", {}).get("labels", {}) or {}, template.get("spec", {}) or {}))
check(len(workloads) >= 3, "k8s: expected the writer and relay Deployments and the settings Job")

# Each pod under its own ServiceAccount, and no Kubernetes API token in any pod.
service_accounts = {name: doc for (kind, name), doc in objects.items() if kind == "ServiceAccount"}
for name, account in service_accounts.items():
    check(account.get("automountServiceAccountToken") is False, f"k8s: ServiceAccount {name} must set automountServiceAccountToken: false")
dedicated_accounts = {"Deployment outbox-writer": "outbox-writer", "Deployment outbox-relay": "outbox-relay"}
for what, _, pod in workloads:
    account = pod.get("serviceAccountName")
    check(account not in (None, "", "default"), f"k8s: {what} must name its own serviceAccountName, not the namespace's default")
    check(account in (None, "", "default") or account in service_accounts,
          f"k8s: {what} runs as ServiceAccount {account}, which the kustomization does not create")
    check(pod.get("automountServiceAccountToken") is False, f"k8s: {what} must set automountServiceAccountToken: false on its pod")
    if what in dedicated_accounts:
        check(account == dedicated_accounts[what], f"k8s: {what} must run as ServiceAccount {dedicated_accounts[what]}")

# Every container of every pod (Jobs and init containers too): non-root, seccomp,
# no privilege escalation, read-only root filesystem, no capabilities.
for what, _, pod in workloads:
    pod_context = pod.get("securityContext", {}) or {}
    check(not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"),
          f"k8s: {what} must not share the node's network, PID or IPC namespace")
    for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        context = container.get("securityContext", {}) or {}
        who = f"k8s: {what} container {container.get('name')}"
        # The container's setting wins over the pod's.
        check(context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, f"{who} must run with runAsNonRoot: true")
        check(context.get("runAsUser", pod_context.get("runAsUser")) != 0, f"{who} must not run as user 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile")) or {}
        check(seccomp.get("type") == "RuntimeDefault", f"{who} needs seccompProfile type RuntimeDefault")
        check(context.get("allowPrivilegeEscalation") is False, f"{who} must set allowPrivilegeEscalation: false")
        check(context.get("privileged") is not True, f"{who} must not be privileged")
        check(context.get("readOnlyRootFilesystem") is True, f"{who} must set readOnlyRootFilesystem: true")
        capabilities = context.get("capabilities", {}) or {}
        check("ALL" in (capabilities.get("drop") or []) and not capabilities.get("add"), f"{who} must drop ALL capabilities and add none")

# NetworkPolicies: ingress denied in the namespace, the writer's and the relay's
# ports opened to these peers alone (deploy/k8s/networkpolicy.yaml documents them).
# No relay-to-relay rule: the replicas meet in MongoDB, never over HTTP.
CLIENT = {"matchLabels": {"batch-outbox/client": "true"}}
ADMIN = {"matchLabels": {"batch-outbox/admin": "true"}}
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
allowed_peers = {
    "outbox-writer": [{"podSelector": CLIENT}, {"namespaceSelector": CLIENT}, PROMETHEUS],
    "outbox-relay": [{"podSelector": ADMIN}, {"namespaceSelector": ADMIN, "podSelector": ADMIN}, PROMETHEUS],
}
policies = [doc for (kind, _), doc in objects.items() if kind == "NetworkPolicy"]
for policy in policies:
    selector = policy.get("spec", {}).get("podSelector")
    check(isinstance(selector, dict) and not selector.get("matchExpressions"),
          f"k8s: NetworkPolicy {policy['metadata']['name']} must select pods by matchLabels (this check reads no matchExpressions)")
check(any(p["spec"].get("podSelector") == {} and "Ingress" in p["spec"].get("policyTypes", []) and not p["spec"].get("ingress")
          for p in policies), "k8s: a NetworkPolicy must deny all ingress in the namespace (podSelector: {}, policyTypes: [Ingress], no rules)")
for name, (target, port, _) in expected.items():
    deployment = objects.get(("Deployment", name))
    if deployment is None:
        continue
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    selecting = [p for p in policies
                 if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and (p["spec"].get("podSelector") or {}).get("matchLabels", {}).items() <= labels.items()]
    check(any((p["spec"].get("podSelector") or {}).get("matchLabels") for p in selecting),
          f"k8s: no NetworkPolicy selects the {name} pods by their labels")
    seen_peers = []
    for policy in selecting:
        where = f"k8s: NetworkPolicy {policy['metadata']['name']}"
        for rule in policy["spec"].get("ingress") or []:
            rule_ports = rule.get("ports") or []
            check(bool(rule_ports), f"{where} opens every port of {name}; name its port {port}")
            for p in rule_ports:
                number = port_names.get(p.get("port"), p.get("port"))
                check(number == port and p.get("protocol", "TCP") == "TCP" and "endPort" not in p,
                      f"{where} opens {p} on {name}, which listens on TCP {port} alone")
            peers = rule.get("from") or []
            check(bool(peers), f"{where} lets anyone reach {name}; name the peers")
            for peer in peers:
                check(peer in allowed_peers[name],
                      f"{where} lets {peer} reach {name}; only the documented selectors may (docs/OPERATIONS.md, \"Network policies\")")
                seen_peers.append(peer)
    for peer in allowed_peers[name]:
        check(peer in seen_peers, f"k8s: no NetworkPolicy lets {peer} reach {name} on port {port}")

# The example Secret holds no usable admin token: a placeholder the relay refuses
# (it refuses an ADMIN_TOKEN shorter than 32 characters) and that says so.
ADMIN_TOKEN_MIN_CHARS = 32
example_secret = objects.get(("Secret", "batch-outbox-secrets"), {})
example_token = str(example_secret.get("stringData", {}).get("ADMIN_TOKEN", ""))
check(len(example_token) < ADMIN_TOKEN_MIN_CHARS and "REPLACE" in example_token.upper(),
      f"k8s: secret.example.yaml's ADMIN_TOKEN must be a placeholder the relay refuses: shorter than "
      f"{ADMIN_TOKEN_MIN_CHARS} characters and saying REPLACE, not {example_token!r}")
check("ADMIN_TOKEN" not in (example_secret.get("data") or {}), "k8s: secret.example.yaml must not carry an ADMIN_TOKEN in data")

# -- Prometheus and Grafana ---------------------------------------------------
rules = load_all(ROOT / "deploy/prometheus/alerts.yml")[0]
alerts = [r for g in rules["groups"] for r in g["rules"]]
for rule in alerts:
    for key in ("alert", "expr"):
        check(key in rule, f"alerts: a rule lacks {key}")
    check("severity" in rule.get("labels", {}), f"alerts: {rule.get('alert')} lacks a severity")
    check("summary" in rule.get("annotations", {}), f"alerts: {rule.get('alert')} lacks a summary")
    for metric in metrics_in(rule.get("expr", "")):
        check(metric in metric_names, f"alerts: {rule.get('alert')} uses unknown metric {metric}")
needed_alerts = {"OutboxRelayNoLeader", "OutboxRelayLagging", "OutboxRelayHalted", "OutboxRelayPublishErrors", "OutboxWriter5xx"}
check(needed_alerts <= {r.get("alert") for r in alerts}, f"alerts: need {sorted(needed_alerts)}")
prometheus = load_all(ROOT / "deploy/prometheus/prometheus.yml")[0]
targets = [t for job in prometheus["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
for target in targets:
    host, port = target.rsplit(":", 1)
    check(host in services, f"prometheus: target {host} is not a compose service")
    check(int(port) in (writer_port, relay_port), f"prometheus: target {target} is not a metrics port")
dashboard = json.loads((ROOT / "deploy/prometheus/grafana-dashboard.json").read_text())
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        for metric in metrics_in(target["expr"]):
            check(metric in metric_names, f"dashboard: panel {panel['title']!r} uses unknown metric {metric}")

if problems:
    print(f"deploy check: {len(problems)} problem(s) in {checks} checks:")
    for problem in problems:
        print(f"  - {problem}")
    sys.exit(1)
print(f"deploy check: compose, {len(objects)} Kubernetes objects, {len(alerts)} alert rules and the dashboard pass {checks} checks")
