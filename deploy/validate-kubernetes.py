#!/usr/bin/env python3
"""Offline check of deploy/kubernetes: every manifest against a schema, then the ties between them.

Schemas:
- Kubernetes' own kinds: kubernetes-validate's bundled schemas, strict (an unknown field fails),
  for the oldest and the newest Kubernetes version the manifests claim to support.
- KEDA's ScaledObject and TriggerAuthentication, and the Kustomization: the small JSON schemas in
  deploy/schemas/ (kubernetes-validate has none for custom resources and only warns on them).
- Any other kind fails: nothing passes unchecked.

Ties: the names one manifest gives another (Deployment, ConfigMap, Secrets and their keys,
TriggerAuthentication), the labels the selectors match, the config's mount path, the drain time
against the grace period, KEDA's queue and target against the config's queue and prefetch, the
pod's security settings against the Dockerfile's user, and placeholders in the Secret example.

Usage: python3 deploy/validate-kubernetes.py   (exit 0: all good; 1: findings, one line each)
"""

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kubernetes

try:
    import tomllib
except ImportError:  # Python < 3.11
    sys.exit("validate-kubernetes.py needs Python 3.11 or later (tomllib)")

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
SCHEMAS = ROOT / "deploy" / "schemas"
# The oldest Kubernetes the manifests support (PodDisruptionBudget.unhealthyPodEvictionPolicy is
# beta from 1.27, on by default) and the newest the bundled schemas know.
KUBERNETES_VERSIONS = ["1.29.0", kubernetes.latest_version()]
LOCAL_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.json",
}
# What the worker needs beyond its own time to drain: writing the answers of its last calls
# (at most one state call, 2 s: PgStore::answers_recorded), then flushing queued spans (5 s,
# telemetry.rs).
EXIT_FLUSH_SECONDS = 2 + 5

findings = []


def problem(where, message):
    findings.append(f"{where}: {message}")


def load_all():
    """Every document of every YAML file, as (file name, document)."""
    documents = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        try:
            for document in yaml.safe_load_all(path.read_text()):
                if document:
                    documents.append((path.name, document))
        except yaml.YAMLError as e:
            problem(path.name, f"not YAML: {e}")
    return documents


def validate_schema(name, document):
    key = (document.get("apiVersion"), document.get("kind"))
    object_name = document.get("metadata", {}).get("name")
    what = f"{name} {key[1]}" + (f"/{object_name}" if object_name else "")
    if key in LOCAL_SCHEMAS:
        schema = json.loads((SCHEMAS / LOCAL_SCHEMAS[key]).read_text())
        validator = jsonschema.Draft202012Validator(schema)
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path)):
            problem(what, f"{'.'.join(map(str, error.path)) or '(root)'}: {error.message}")
        return f"{what}: valid against deploy/schemas/{LOCAL_SCHEMAS[key]}"
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes.validate(document, version, strict=True)
        except kubernetes.SchemaNotFoundError:
            problem(what, f"no schema for {key[0]} {key[1]}: add one to deploy/schemas/")
            return None
        except kubernetes.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(what, f"Kubernetes {e.version}: {path}: {e.message}")
    return f"{what}: valid against Kubernetes {' and '.join(KUBERNETES_VERSIONS)} (strict)"


def one(documents, kind, name=None):
    found = [d for _, d in documents if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        problem("manifests", f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
        return None
    return found[0]


def seconds(duration):
    """A humantime duration of the config ("60s", "1m", "1m30s") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h|d)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration.replace(" ", ""):
        raise ValueError(f"not a duration: {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


def check_ties(documents):
    deployment = one(documents, "Deployment")
    configmap = one(documents, "ConfigMap")
    pdb = one(documents, "PodDisruptionBudget")
    scaled = one(documents, "ScaledObject")
    auth = one(documents, "TriggerAuthentication")
    kustomization = one(documents, "Kustomization")
    if None in (deployment, configmap, pdb, scaled, auth, kustomization):
        return
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for _, d in documents if d.get("kind") == "Secret"}
    pod = deployment["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    containers = spec["containers"]
    container = containers[0]

    # Selectors.
    for owner, selector in [("Deployment", deployment["spec"]["selector"]), ("PodDisruptionBudget", pdb["spec"]["selector"])]:
        for key, value in selector.get("matchLabels", {}).items():
            if labels.get(key) != value:
                problem(owner, f"selector {key}={value} matches no label of the pod template")

    # The config: mounted where FALLBACK_CONFIG points, and valid TOML.
    env = {e["name"]: e for e in container.get("env", [])}
    config_path = env.get("FALLBACK_CONFIG", {}).get("value", "")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounted = False
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"], {}).get("configMap", {})
        if source.get("name") == configmap["metadata"]["name"]:
            for key in configmap["data"]:
                mounted |= config_path == f"{mount['mountPath'].rstrip('/')}/{key}"
    if not mounted:
        problem("Deployment", f"FALLBACK_CONFIG {config_path!r} is not a key of the mounted ConfigMap")
    try:
        config = tomllib.loads(configmap["data"]["fallback.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        problem("ConfigMap", f"fallback.toml: {e}")
        return
    amqp, worker, http = config.get("amqp", {}), config.get("worker", {}), config.get("http", {})

    # Grace period above the drain, and the flush after it.
    drain = seconds(worker.get("drain_timeout", "60s"))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= drain + EXIT_FLUSH_SECONDS:
        problem("Deployment", f"terminationGracePeriodSeconds {grace} is not above drain_timeout {drain}s + {EXIT_FLUSH_SECONDS}s")

    # Ports and probes.
    port = int(http.get("addr", "0.0.0.0:9090").rsplit(":", 1)[1])
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if ports.get("http") != port:
        problem("Deployment", f"port `http` is {ports.get('http')}, the config's http.addr listens on {port}")
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        if container.get(probe, {}).get("httpGet", {}).get("path") != path:
            problem("Deployment", f"{probe} must GET {path}")

    # Security.
    pod_security, security = spec.get("securityContext", {}), container.get("securityContext", {})
    expected = [
        (pod_security.get("runAsNonRoot"), True, "securityContext.runAsNonRoot"),
        (pod_security.get("seccompProfile", {}).get("type"), "RuntimeDefault", "securityContext.seccompProfile.type"),
        (security.get("readOnlyRootFilesystem"), True, "container readOnlyRootFilesystem"),
        (security.get("allowPrivilegeEscalation"), False, "container allowPrivilegeEscalation"),
        (security.get("capabilities", {}).get("drop"), ["ALL"], "container capabilities.drop"),
        (spec.get("automountServiceAccountToken"), False, "automountServiceAccountToken"),
    ]
    for actual, wanted, what in expected:
        if actual != wanted:
            problem("Deployment", f"{what} is {actual!r}, expected {wanted!r}")
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    image_user = users[-1].split(":")[0] if users else "root"
    if not image_user.isdigit() or image_user == "0":
        problem("Dockerfile", f"the runtime image's USER {image_user!r} must be a numeric non-root UID (runAsNonRoot)")
    elif pod_security.get("runAsUser") not in (None, int(image_user)):
        problem("Deployment", f"runAsUser {pod_security.get('runAsUser')} is not the image's user {image_user}")
    for resource in ("cpu", "memory"):
        for bound in ("requests", "limits"):
            if resource not in container.get("resources", {}).get(bound, {}):
                problem("Deployment", f"resources.{bound}.{resource} is not set")

    # Secrets: every reference resolves in the example, which holds no real-looking value.
    references = [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                  for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})]
    references += [(ref["name"], ref["key"]) for ref in auth["spec"].get("secretTargetRef", [])]
    for name, key in references:
        if key not in secrets.get(name, {}):
            problem("Secret example", f"no key {key} in Secret {name}")
    env_from = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
    keys_from_env = {k for name in env_from for k in secrets.get(name, {})}
    for provider in config.get("providers", []):
        if "api_key_env" in provider and provider["api_key_env"] not in keys_from_env:
            problem("Secret example", f"provider {provider['name']}'s {provider['api_key_env']} is in no Secret the pod loads")
    for name, data in secrets.items():
        for key, value in data.items():
            if value and "CHANGE-ME" not in value:
                problem("Secret example", f"{name}.{key} must be empty or a CHANGE-ME placeholder, never a real-looking value")

    # KEDA: the right target, queue, authentication, and a target that follows the prefetch.
    if scaled["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problem("ScaledObject", "scaleTargetRef names another Deployment")
    minimum, maximum = scaled["spec"].get("minReplicaCount", 0), scaled["spec"].get("maxReplicaCount", 100)
    if not 1 <= minimum <= maximum:
        problem("ScaledObject", f"replicas {minimum}..{maximum}: at least one worker, min <= max")
    for trigger in scaled["spec"]["triggers"]:
        metadata = trigger["metadata"]
        if trigger.get("authenticationRef", {}).get("name") != auth["metadata"]["name"]:
            problem("ScaledObject", "the trigger's authenticationRef is not the TriggerAuthentication")
        if metadata.get("queueName") != amqp.get("jobs_queue", "llm.jobs"):
            problem("ScaledObject", f"queueName {metadata.get('queueName')!r} is not amqp.jobs_queue")
        if metadata.get("mode") == "QueueLength" and int(metadata["value"]) != amqp.get("prefetch", 32):
            problem("ScaledObject", f"value {metadata['value']} is not amqp.prefetch ({amqp.get('prefetch', 32)})")
    if "replicas" in deployment["spec"]:
        problem("Deployment", "sets replicas, which the ScaledObject owns (an apply would reset it)")

    # Kustomization: lists every manifest but the Secret example, and only existing files.
    listed = set(kustomization["resources"])
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        if path.name.endswith(".example.yaml"):
            if path.name in listed:
                problem("Kustomization", f"lists {path.name}, an example with placeholders")
        elif path.name not in listed:
            problem("Kustomization", f"does not list {path.name}")
    for name in listed - {p.name for p in MANIFESTS.glob("*.yaml")}:
        problem("Kustomization", f"lists {name}, which does not exist")


def main():
    documents = load_all()
    if not documents:
        problem(str(MANIFESTS), "no manifests")
    for name, document in documents:
        passed = validate_schema(name, document)
        if passed and not any(f.startswith(f"{name} ") for f in findings):
            print(f"ok   {passed}")
    check_ties(documents)
    if findings:
        for finding in findings:
            print(f"FAIL {finding}")
        return 1
    print(f"{len(documents)} manifests valid; names, selectors, ports, probes, security, grace period, "
          "Secrets and KEDA's queue and target agree with each other and with the config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
