"""Offline checks of deploy/: the Dockerfile, the kustomize base and overlays.

Run through scripts/validate-deploy, which makes the virtual environment this needs.

For each kustomization (deploy/base, deploy/overlays/*):
  1. `kubectl kustomize` renders it;
  2. every object validates against its schema: Kubernetes objects strictly (unknown fields
     refused) with kubernetes-validate's bundled schemas, KEDA's ScaledObject with the
     cloudcoil KEDA models (unknown fields refused here too) and the nats-jetstream
     trigger's documented parameters;
  3. the objects agree with each other and with framehost's effective configuration, as
     `framehost config check` prints it for the ConfigMap's file with the container's
     environment applied.
Then the Dockerfile is linted (hadolint) and checked against the workspace, and, with
--nats, a throwaway nats-server shows that the stream and consumer the ScaledObject names
carry the lag KEDA reads.

--self-test breaks copies of the manifests, one mistake at a time, and fails unless every
check catches the mistake it is there for.
"""

from __future__ import annotations

import argparse
import base64
import copy
import fnmatch
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# The Kubernetes versions the manifests must be valid for: the oldest we claim and the
# newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]

# The nats-jetstream trigger's parameters, as KEDA documents them (the CRD types trigger
# metadata only as a map of strings).
JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer"}
JETSTREAM_OPTIONAL = {"lagThreshold", "activationLagThreshold", "useHttps"}

SECRET_PLACEHOLDER = "validate-deploy-placeholder"


class Failure(Exception):
    """One check that did not pass; the message says what to fix."""


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except Failure as failure:
            self.failures.append(f"{name}: {failure}")
        except (KeyError, TypeError, ValueError, IndexError, StopIteration) as error:
            # Objects the schema check refused can break a check's assumptions.
            self.failures.append(f"{name}: cannot check ({type(error).__name__}: {error})")

    def fail(self, name: str, message: str) -> None:
        self.failures.append(f"{name}: {message}")


# ---------------------------------------------------------------------------------------
# Rendering and schemas


def kubectl() -> str:
    return os.environ.get("KUBECTL", "kubectl")


def render(kustomization: Path) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise Failure(f"`kubectl kustomize {kustomization}` failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_kubernetes(obj: dict) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils

    # It reads and parses the schema files on every call; the self-test makes hundreds.
    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)

    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.path) or "(top)"
            raise Failure(f"{name_of(obj)} is invalid for Kubernetes {version} at {path}: "
                          f"{error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            raise Failure(f"{name_of(obj)}: no schema for {obj.get('apiVersion')} "
                          f"{obj.get('kind')} in Kubernetes {version}")


def unknown_fields(given, known, path="") -> list[str]:
    """Keys of `given` that the model dropped: fields the schema does not have."""
    found = []
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if key not in known:
                found.append(f"{path}/{key}")
            else:
                found += unknown_fields(value, known[key], f"{path}/{key}")
    elif isinstance(given, list) and isinstance(known, list):
        for i, (a, b) in enumerate(zip(given, known)):
            found += unknown_fields(a, b, f"{path}/{i}")
    return found


def validate_scaled_object(obj: dict) -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from pydantic import ValidationError

    try:
        model = ScaledObject.model_validate(obj)
    except ValidationError as error:
        raise Failure(f"{name_of(obj)} does not match KEDA's ScaledObject schema:\n{error}")
    # The models keep unknown keys out rather than refusing them; a key that does not come
    # back is one the CRD does not have, which the API server would refuse.
    echoed = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    extra = unknown_fields(obj, echoed)
    if extra:
        raise Failure(f"{name_of(obj)} has fields KEDA's ScaledObject does not: "
                      f"{', '.join(extra)}")

    # The HPA behaviour's enumerations, which the models type as plain strings.
    behavior = (obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
                .get("behavior", {}))
    for direction, rules in behavior.items():
        if rules.get("selectPolicy", "Max") not in ("Max", "Min", "Disabled"):
            raise Failure(f"{name_of(obj)}: {direction}.selectPolicy must be Max, Min or "
                          "Disabled")
        for policy in rules.get("policies", []):
            if policy.get("type") not in ("Pods", "Percent"):
                raise Failure(f"{name_of(obj)}: {direction} policy type "
                              f"{policy.get('type')!r} must be Pods or Percent")

    for trigger in obj["spec"].get("triggers", []):
        if trigger.get("type") != "nats-jetstream":
            continue
        meta = trigger.get("metadata", {})
        missing = JETSTREAM_REQUIRED - meta.keys()
        unknown = meta.keys() - JETSTREAM_REQUIRED - JETSTREAM_OPTIONAL
        if missing or unknown:
            raise Failure(f"{name_of(obj)}: nats-jetstream trigger metadata: missing "
                          f"{sorted(missing)}, unknown {sorted(unknown)}")
        for key in ("lagThreshold", "activationLagThreshold"):
            if key in meta and not re.fullmatch(r"\d+", meta[key]):
                raise Failure(f"{name_of(obj)}: {key} {meta[key]!r} is not a whole number")
        if meta.get("useHttps", "false") not in ("true", "false"):
            raise Failure(f"{name_of(obj)}: useHttps must be \"true\" or \"false\"")


def validate_schemas(objects: list[dict], report: Report) -> None:
    for obj in objects:
        if obj.get("apiVersion") == "keda.sh/v1alpha1":
            if obj.get("kind") != "ScaledObject":
                report.fail("schema", f"{name_of(obj)}: no schema here for KEDA kind "
                            f"{obj.get('kind')}")
                continue
            report.check("schema", validate_scaled_object, obj)
        else:
            report.check("schema", validate_kubernetes, obj)


# ---------------------------------------------------------------------------------------
# Consistency


def one(objects: list[dict], kind: str, required=True) -> dict | None:
    found = [o for o in objects if o.get("kind") == kind]
    if len(found) > 1:
        raise Failure(f"expected one {kind}, found {len(found)}")
    if not found and required:
        raise Failure(f"no {kind} rendered")
    return found[0] if found else None


def framehost_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    for container in containers:
        if container.get("name") == "framehost":
            return container
    raise Failure(f"{name_of(deployment)} has no container named framehost")


def env_value(container: dict, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var.get("value", SECRET_PLACEHOLDER)
    return None


def parse_quantity(text) -> int:
    """Bytes in a Kubernetes memory quantity."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(text))
    if not match:
        raise Failure(f"cannot read memory quantity {text!r}")
    return int(float(match.group(1)) * units.get(match.group(2) or "", 1))


def parse_size(number: str, unit: str) -> int:
    scale = {"b": 1, "bytes": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    return int(float(number) * scale[unit.lower()])


@dataclass
class Effective:
    """framehost's effective configuration, as `framehost config check` prints it."""

    config: dict
    cache_dir: str | None
    memory_budget: int | None
    output: str


def framehost_bin() -> Path:
    if os.environ.get("FRAMEHOST_BIN"):
        return Path(os.environ["FRAMEHOST_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "framehost"


def config_check(objects: list[dict]) -> Effective:
    """Runs `framehost config check` on the mounted file with the container's environment."""
    deployment = one(objects, "Deployment")
    container = framehost_container(deployment)
    pod = deployment["spec"]["template"]["spec"]

    config_path = env_value(container, "FRAMEHOST_CONFIG")
    if not config_path:
        raise Failure("the container does not set FRAMEHOST_CONFIG")
    args = container.get("args", [])
    if not args or args[0] != "serve":
        raise Failure(f"the container's args {args} do not start with `serve`")

    # Which ConfigMap key is at FRAMEHOST_CONFIG?
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    text = None
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "configMap" not in volume:
            continue
        mount_path = PurePosixPath(mount["mountPath"])
        if mount.get("subPath"):
            key = mount["subPath"] if str(mount_path) == config_path else None
        elif PurePosixPath(config_path).parent == mount_path:
            key = PurePosixPath(config_path).name
        else:
            key = None
        if key is None:
            continue
        configmaps = [o for o in objects if o.get("kind") == "ConfigMap"
                      and o["metadata"]["name"] == volume["configMap"]["name"]]
        if not configmaps or key not in configmaps[0].get("data", {}):
            raise Failure(f"FRAMEHOST_CONFIG {config_path} is key {key!r} of ConfigMap "
                          f"{volume['configMap']['name']}, which is not rendered or lacks it")
        text = configmaps[0]["data"][key]
    if text is None:
        raise Failure(f"no ConfigMap volume is mounted at FRAMEHOST_CONFIG ({config_path})")

    binary = framehost_bin()
    if not binary.exists():
        raise Failure(f"{binary} does not exist: build it (cargo build -p framehost) or set "
                      "FRAMEHOST_BIN")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", SECRET_PLACEHOLDER)
    with tempfile.TemporaryDirectory() as tmp:
        # Files the configuration names under a Secret's mount are made here, from the
        # rendered Secret (or placeholders when none is rendered), and the paths moved.
        for n, (mount_path, data) in enumerate(secret_mounts(objects, pod, container)):
            local = Path(tmp) / f"secret-{n}"
            local.mkdir(mode=0o700)
            named = "\n".join(toml_strings(text) + list(env.values()))
            wanted = set(re.findall(re.escape(mount_path) + r"/([\w.-]+)", named))
            if data is not None:
                missing = sorted(wanted - data.keys())
                if missing:
                    raise Failure(f"the configuration reads {mount_path}/{missing[0]}, but "
                                  f"the Secret mounted there has no key {missing[0]!r}")
            for key in wanted:
                file = local / key
                file.write_bytes(data[key] if data is not None else SECRET_PLACEHOLDER.encode())
                file.chmod(0o400)
            text = text.replace(mount_path + "/", f"{local}/")
            env = {k: v.replace(mount_path + "/", f"{local}/") for k, v in env.items()}
        path = Path(tmp) / "framehost.toml"
        path.write_text(text)
        env["FRAMEHOST_CONFIG"] = str(path)
        result = subprocess.run([str(binary), "config", "check", str(path)], env=env,
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise Failure("`framehost config check` refuses the ConfigMap's file with the "
                      f"container's environment:\n{(result.stderr or result.stdout).strip()}")

    effective = tomllib.loads(result.stdout)
    cache = re.search(r"^# compiled plugins are cached in (.+)$", result.stdout, re.M)
    budget = None
    for line in result.stdout.splitlines():
        if "memory budget" in line.lower():
            sizes = re.findall(r"(\d+(?:\.\d+)?)\s*(GiB|MiB|KiB|bytes|B)\b", line)
            # The line may also show the parts of the sum: the total is the largest.
            if sizes:
                budget = max(parse_size(*size) for size in sizes)
    return Effective(effective, cache.group(1).strip() if cache else None, budget,
                     result.stdout)


def toml_strings(text: str) -> list[str]:
    """Every string value in a TOML document (none if it does not parse)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    found, stack = [], [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack += value.values()
        elif isinstance(value, list):
            stack += value
        elif isinstance(value, str):
            found.append(value)
    return found


def secret_mounts(objects: list[dict], pod: dict, container: dict):
    """(mount path, the Secret's files by key, or None when the Secret is not rendered)
    for each Secret volume the container mounts."""
    secrets = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "Secret"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "secret" not in volume:
            continue
        secret = secrets.get(volume["secret"]["secretName"])
        data = None
        if secret is not None:
            data = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
            data |= {k: v.encode() for k, v in secret.get("stringData", {}).items()}
            items = volume["secret"].get("items")
            if items:
                data = {i["path"]: data[i["key"]] for i in items if i["key"] in data}
        yield mount["mountPath"].rstrip("/"), data


def container_port(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def metrics_port(effective: Effective) -> int | None:
    listen = effective.config.get("metrics", {}).get("listen")
    if not listen:
        return None
    return int(str(listen).rsplit(":", 1)[1])


def check_probes(objects: list[dict], effective: Effective, report: Report) -> None:
    deployment = one(objects, "Deployment")
    container = framehost_container(deployment)
    port = metrics_port(effective)
    if effective.config.get("metrics", {}).get("enabled") is False:
        raise Failure("metrics.enabled is false: nothing answers the probes")
    if port is None:
        report.notes.append("probes: this framehost has no [metrics] listen option yet; "
                            "probe ports not compared with it")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet")
        if not get:
            raise Failure(f"the container has no {probe} httpGet")
        if get.get("path") != path:
            raise Failure(f"{probe} asks {get.get('path')}, framehost answers {path}")
        probe_port = container_port(container, get.get("port"))
        if probe_port is None:
            raise Failure(f"{probe} port {get.get('port')!r} is not a container port")
        if port is not None and probe_port != port:
            raise Failure(f"{probe} is on port {probe_port}, metrics.listen is {port}")
    named = container_port(container, "metrics")
    if named is None:
        raise Failure("the container has no port named `metrics`")
    if port is not None and named != port:
        raise Failure(f"the `metrics` container port is {named}, metrics.listen is {port}")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations and int(annotations["prometheus.io/port"]) != named:
        raise Failure(f"prometheus.io/port {annotations['prometheus.io/port']} is not the "
                      f"metrics port {named}")
    service = one(objects, "Service")
    for p in service["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        if container_port(container, target) != named:
            raise Failure(f"Service port {p.get('name')} targets {target!r}, not the metrics "
                          f"port {named}")


def check_selectors(objects: list[dict]) -> None:
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    selectors = [("Deployment", deployment["spec"]["selector"].get("matchLabels", {})),
                 ("Service", one(objects, "Service")["spec"].get("selector", {})),
                 ("PodDisruptionBudget", (one(objects, "PodDisruptionBudget")["spec"]
                                          .get("selector") or {}).get("matchLabels", {}))]
    for kind, selector in selectors:
        if not selector:
            raise Failure(f"the {kind}'s selector is empty (it would select every pod)")
        wrong = {k: v for k, v in selector.items() if labels.get(k) != v}
        if wrong:
            raise Failure(f"the {kind}'s selector {wrong} does not match the pod's labels")


def check_security(objects: list[dict]) -> None:
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = framehost_container(deployment)
    pod_sc = pod.get("securityContext", {})
    sc = container.get("securityContext", {})

    def either(key):
        return sc.get(key, pod_sc.get(key))

    if either("runAsNonRoot") is not True:
        raise Failure("runAsNonRoot is not true")
    user = either("runAsUser")
    if not isinstance(user, int) or user == 0:
        raise Failure(f"runAsUser {user!r} is not a numeric non-root user")
    if sc.get("readOnlyRootFilesystem") is not True:
        raise Failure("readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        raise Failure("allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        raise Failure("capabilities do not drop ALL")
    if sc.get("capabilities", {}).get("add"):
        raise Failure(f"capabilities are added: {sc['capabilities']['add']}")
    if (either("seccompProfile") or {}).get("type") != "RuntimeDefault":
        raise Failure("seccompProfile is not RuntimeDefault")
    account = one(objects, "ServiceAccount")
    if pod.get("automountServiceAccountToken", account.get("automountServiceAccountToken")) \
            is not False:
        raise Failure("the service account token is mounted (automountServiceAccountToken)")
    if pod.get("serviceAccountName") != account["metadata"]["name"]:
        raise Failure(f"the pod runs as service account {pod.get('serviceAccountName')!r}, "
                      f"not {account['metadata']['name']!r}")
    dockerfile_user = dockerfile_runtime_user()
    if dockerfile_user is not None and dockerfile_user != user:
        raise Failure(f"runAsUser {user} is not the image's USER {dockerfile_user}")


def check_shutdown(objects: list[dict], effective: Effective) -> None:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    grace = effective.config["host"]["shutdown_grace_secs"]
    period = pod.get("terminationGracePeriodSeconds", 30)
    if period < grace + 5:
        raise Failure(f"terminationGracePeriodSeconds {period} leaves less than 5 s after "
                      f"host.shutdown_grace_secs {grace}: jobs would be killed, not handed back")


def check_writable_cache(objects: list[dict], effective: Effective) -> None:
    deployment = one(objects, "Deployment")
    container = framehost_container(deployment)
    if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        return
    if effective.cache_dir is None:
        return
    cache = PurePosixPath(effective.cache_dir)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    best = None
    for mount in container.get("volumeMounts", []):
        path = PurePosixPath(mount["mountPath"])
        if cache == path or path in cache.parents:
            if best is None or len(str(path)) > len(str(best["mountPath"])):
                best = mount
    if best is None:
        raise Failure(f"catalogue.cache_dir {cache} is on the read-only root filesystem: "
                      "mount a volume there")
    volume = volumes.get(best["name"], {})
    if best.get("readOnly") or not ({"emptyDir", "persistentVolumeClaim", "ephemeral"}
                                    & volume.keys()):
        raise Failure(f"catalogue.cache_dir {cache} is on mount {best['mountPath']} "
                      f"({best['name']}), which is not a writable volume")
    if PurePosixPath(best["mountPath"]) == cache:
        raise Failure(f"catalogue.cache_dir {cache} is the mount point itself, which belongs "
                      "to root: framehost refuses a cache dir not owned by its user; use a "
                      "directory inside the mount")


def check_memory(objects: list[dict], effective: Effective, report: Report) -> None:
    container = framehost_container(one(objects, "Deployment"))
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit is None:
        raise Failure("the container has no memory limit")
    if effective.memory_budget is None:
        report.notes.append("memory: `framehost config check` prints no memory budget yet; "
                            "limit not compared with it")
        return
    if parse_quantity(limit) < effective.memory_budget:
        raise Failure(f"memory limit {limit} is below the configuration's memory budget of "
                      f"{effective.memory_budget >> 20} MiB (framehost config check)")


def check_autoscaling(objects: list[dict], effective: Effective, report: Report) -> None:
    deployment = one(objects, "Deployment")
    scaled = [o for o in objects if o.get("kind") == "ScaledObject"]
    if any(o.get("kind") == "HorizontalPodAutoscaler" for o in objects) and scaled:
        raise Failure("an HorizontalPodAutoscaler is rendered next to a ScaledObject: KEDA "
                      "makes and owns the HPA")
    if not scaled:
        return
    if "replicas" in deployment["spec"]:
        raise Failure("the Deployment sets replicas while a ScaledObject scales it: every "
                      "apply would reset the count KEDA chose")
    nats = effective.config["nats"]
    for obj in scaled:
        spec = obj["spec"]
        target = spec["scaleTargetRef"]
        if target.get("kind", "Deployment") != "Deployment" or \
                target["name"] != deployment["metadata"]["name"]:
            raise Failure(f"{name_of(obj)} scales {target}, not {name_of(deployment)}")
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if low > high:
            raise Failure(f"minReplicaCount {low} is above maxReplicaCount {high}")
        triggers = [t for t in spec["triggers"] if t["type"] == "nats-jetstream"]
        if not triggers:
            raise Failure(f"{name_of(obj)} has no nats-jetstream trigger")
        for trigger in triggers:
            meta = trigger["metadata"]
            if meta["stream"] != nats["stream"]:
                raise Failure(f"the trigger's stream {meta['stream']!r} is not nats.stream "
                              f"{nats['stream']!r}")
            if meta["consumer"] != nats["consumer"]:
                raise Failure(f"the trigger's consumer {meta['consumer']!r} is not "
                              f"nats.consumer {nats['consumer']!r}")
            lag = int(meta.get("lagThreshold", "10"))
            if not 1 <= lag <= effective.config["host"]["max_jobs"]:
                raise Failure(f"lagThreshold {lag} is not between 1 and host.max_jobs "
                              f"({effective.config['host']['max_jobs']}): jobs would wait "
                              "for a slot while KEDA sees no need for another pod")
            endpoint = meta["natsServerMonitoringEndpoint"]
            if not re.fullmatch(r"[A-Za-z0-9.-]+:\d+", endpoint):
                raise Failure(f"natsServerMonitoringEndpoint {endpoint!r} must be host:port "
                              "(KEDA adds the scheme and /jsz)")
            nats_hosts = {re.sub(r"^\w+://([^@]*@)?", "", u.strip()).rsplit(":", 1)[0]
                          for u in nats["url"].split(",")}
            if endpoint.rsplit(":", 1)[0] not in nats_hosts:
                report.notes.append(f"autoscaling: natsServerMonitoringEndpoint {endpoint} "
                                    f"is not a host of nats.url ({nats['url']}): make sure "
                                    "it is the same NATS")
        grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        down = (spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
                .get("behavior", {}).get("scaleDown"))
        if not down:
            raise Failure(f"{name_of(obj)} sets no scale-down behaviour: the HPA default may "
                          "remove every surplus pod at once, all draining together")
        for policy in down.get("policies", []):
            if policy["periodSeconds"] < grace:
                raise Failure(f"a scale-down policy's periodSeconds {policy['periodSeconds']} "
                              f"is shorter than terminationGracePeriodSeconds {grace}: pods "
                              "removed one after another would drain at the same time")


def check_secrets(objects: list[dict], report: Report) -> None:
    secrets = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "Secret"}
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    wanted = []
    for container in pod["containers"]:
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                wanted.append((ref["name"], ref["key"], ref.get("optional", False)))
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            keys = [i["key"] for i in volume["secret"].get("items", [])] or [None]
            for key in keys:
                wanted.append((volume["secret"]["secretName"], key,
                               volume["secret"].get("optional", False)))
    if not secrets:
        if wanted:
            report.notes.append("secrets: none rendered; the pod needs "
                                + ", ".join(sorted({n for n, _, _ in wanted}))
                                + " from the cluster")
        return
    for name, key, optional in wanted:
        if optional:
            continue
        if name not in secrets:
            raise Failure(f"the pod needs Secret {name!r}, which is not rendered")
        data = {**secrets[name].get("data", {}), **secrets[name].get("stringData", {})}
        if key is not None and key not in data:
            raise Failure(f"Secret {name!r} has no key {key!r}")


def check_consistency(objects: list[dict], report: Report) -> Effective | None:
    try:
        effective = config_check(objects)
    except Failure as failure:
        report.fail("config", str(failure))
        return None
    report.check("probes", check_probes, objects, effective, report)
    report.check("selectors", check_selectors, objects)
    report.check("security", check_security, objects)
    report.check("shutdown", check_shutdown, objects, effective)
    report.check("cache", check_writable_cache, objects, effective)
    report.check("memory", check_memory, objects, effective, report)
    report.check("autoscaling", check_autoscaling, objects, effective, report)
    report.check("secrets", check_secrets, objects, report)
    return effective


def validate_objects(objects: list[dict]) -> tuple[Report, Effective | None]:
    report = Report()
    validate_schemas(objects, report)
    effective = check_consistency(objects, report)
    return report, effective


# ---------------------------------------------------------------------------------------
# The Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def dockerfile_runtime_user(root: Path = ROOT) -> int | None:
    path = root / "deploy" / "Dockerfile"
    if not path.exists():
        return None
    users = [args for word, args in dockerfile_instructions(path) if word == "USER"]
    if not users:
        return None
    user = users[-1].split(":")[0]
    return int(user) if user.isdigit() else None


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker's context would leave `path` out (patterns matched as Docker does
    for the forms used here: names, globs, ** and ! exceptions; a directory's pattern
    covers what is inside)."""
    ignored = False
    parts = PurePosixPath(path).parts
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for n in range(1, len(parts) + 1):
            prefix = "/".join(parts[:n])
            regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
            regex = regex.replace("[^/]*[^/]*/", "(.*/)?").replace("[^/]*[^/]*", ".*")
            if re.match(regex, prefix):
                ignored = not negate
                break
    return ignored


def needed_sources(root: Path) -> list[str]:
    """The files `cargo build --locked -p framehost` reads that are easy to leave out of a
    context: the workspace manifests, the lock file, and files the crates embed."""
    workspace = tomllib.loads((root / "Cargo.toml").read_text())["workspace"]
    needed = ["Cargo.toml", "Cargo.lock"]
    for member in workspace["members"]:
        needed.append(f"{member}/Cargo.toml")
        for source in sorted((root / member).glob("src/**/*.rs")):
            text = source.read_text()
            embedded = re.findall(r'include_(?:bytes|str)!\(\s*"([^"]+)"', text)
            embedded += re.findall(r'^\s*path:\s*"([^"]+)"', text, re.M)
            for rel in embedded:
                target = (source.parent / rel).resolve()
                if not target.exists():
                    target = (root / member / rel).resolve()
                if target.exists():
                    needed.append(str(target.relative_to(root.resolve())))
    return needed


def check_dockerfile(report: Report, hadolint: str | None, root: Path = ROOT) -> None:
    path = root / "deploy" / "Dockerfile"
    if hadolint:
        result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            report.fail("dockerfile", f"hadolint:\n{(result.stdout + result.stderr).strip()}")
    instructions = dockerfile_instructions(path)
    froms = [args for word, args in instructions if word == "FROM"]
    if len(froms) < 2:
        report.fail("dockerfile", "not a multi-stage build")
    runs = " ".join(args for word, args in instructions if word == "RUN")
    build = re.search(r"cargo build ([^&;]*)", runs)
    if not build or not {"--release", "--locked"} <= set(build.group(1).split()) or \
            "-p framehost" not in build.group(1):
        report.fail("dockerfile", "the builder does not run cargo build --release --locked "
                    "-p framehost")
    package = tomllib.loads((root / "host" / "Cargo.toml").read_text())
    binaries = [b["name"] for b in package.get("bin", [])] or [package["package"]["name"]]
    if package["package"]["name"] != "framehost" or "framehost" not in binaries:
        report.fail("dockerfile", "host/Cargo.toml no longer builds package/binary framehost")
    if "target/release/framehost" not in runs + " ".join(a for w, a in instructions
                                                           if w == "COPY"):
        report.fail("dockerfile", "the builder does not take target/release/framehost")
    user = dockerfile_runtime_user(root)
    if user is None or user == 0:
        report.fail("dockerfile", "the runtime stage's USER is not a numeric non-root uid")
    ignore = root / ".dockerignore"
    if not ignore.exists():
        report.fail("dockerfile", "no .dockerignore at the root: target/ and .git would be "
                    "sent as the build context")
        return
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for must in ("target", ".git"):
        if not dockerignored(must, patterns):
            report.fail("dockerfile", f".dockerignore does not leave out {must}/")
    for needed in needed_sources(root):
        if dockerignored(needed, patterns):
            report.fail("dockerfile", f".dockerignore leaves out {needed}, which the build "
                        "reads")


def check_context(report: Report, ignore_text: str | None = None) -> None:
    """Copies what the build context would hold (the tracked files .dockerignore keeps) and
    has cargo load the workspace there with --locked, as the builder will."""
    if ignore_text is None:
        ignore_text = (ROOT / ".dockerignore").read_text()
    patterns = [line.strip() for line in ignore_text.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        report.notes.append("dockerfile: not a git checkout; build context not rehearsed")
        return
    files = [f for f in listed.stdout.decode().split("\0") if f]
    with tempfile.TemporaryDirectory() as tmp:
        kept = 0
        for name in files:
            if dockerignored(name, patterns) or not (ROOT / name).is_file():
                continue
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, Path(tmp) / name)
            kept += 1
        result = subprocess.run(
            ["cargo", "metadata", "--locked", "--offline", "--format-version", "1"],
            cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            report.fail("dockerfile", "cargo cannot load the workspace from the build "
                        f"context ({kept} files):\n{result.stderr.strip()[-1500:]}")
            return
        members = {p["name"] for p in json.loads(result.stdout)["packages"]
                   if p["source"] is None}
        if "framehost" not in members:
            report.fail("dockerfile", "the build context has no framehost package")
        missing = [n for n in needed_sources(Path(tmp)) if not (Path(tmp) / n).exists()]
        if missing:
            report.fail("dockerfile", f"the build context lacks {missing}")


# ---------------------------------------------------------------------------------------
# Lag on a real nats-server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsz(monitor: int, account: str) -> dict:
    # The query KEDA's nats-jetstream scaler makes.
    url = f"http://127.0.0.1:{monitor}/jsz?acc={account}&consumers=true&config=true"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def lag_of(report: dict, account: str, stream: str, consumer: str) -> int | None:
    """What KEDA computes: num_pending + num_ack_pending of the named consumer, or None
    when it is not there (KEDA would then fall back to the stream's last sequence)."""
    for acc in report.get("account_details", []):
        if acc.get("name") != account:
            continue
        for st in acc.get("stream_detail", []):
            if st.get("name") != stream:
                continue
            for con in st.get("consumer_detail", []):
                if con.get("name") == consumer:
                    return con.get("num_pending", 0) + con.get("num_ack_pending", 0)
    return None


def nats_lag_check(objects: list[dict], effective: Effective, jobs: int = 3) -> str:
    server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(server).exists():
        raise Failure("nats-server not found (scripts/test installs it)")
    scaled = one(objects, "ScaledObject")
    meta = next(t["metadata"] for t in scaled["spec"]["triggers"]
                if t["type"] == "nats-jetstream")
    with tempfile.TemporaryDirectory() as tmp:
        port, monitor = free_port(), free_port()
        server_config = Path(tmp) / "nats-server.conf"
        server_config.write_text(
            f"listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n"
            f"jetstream {{ store_dir: {json.dumps(str(Path(tmp) / 'js'))} }}\n")
        process = subprocess.Popen([server, "-c", str(server_config)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    jsz(monitor, meta["account"])
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise Failure("nats-server did not start")
                    time.sleep(0.1)
            config = Path(tmp) / "framehost.toml"
            config.write_text(tomllib_dump_nats(effective.config["nats"]))
            for i in range(jobs):
                result = subprocess.run(
                    [str(framehost_bin()), "job", "submit", "--config", str(config),
                     "--nats", f"nats://127.0.0.1:{port}", "--type", "deploy-check",
                     "--id", f"deploy-check-{i}", "--capture", "/nonexistent.fhcap"],
                    capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
                if result.returncode != 0:
                    raise Failure(f"framehost job submit failed:\n{result.stderr.strip()}")
            lag = lag_of(jsz(monitor, meta["account"]), meta["account"], meta["stream"],
                         meta["consumer"])
        finally:
            process.terminate()
            process.wait(timeout=10)
    if lag is None:
        raise Failure(f"/jsz shows no consumer {meta['consumer']!r} on stream "
                      f"{meta['stream']!r} in account {meta['account']!r}: KEDA would "
                      "scale on the stream's last sequence instead")
    if lag != jobs:
        raise Failure(f"KEDA would read a lag of {lag} after {jobs} jobs")
    return (f"{jobs} jobs submitted, nobody consuming: /jsz shows lag {lag} on "
            f"{meta['account']}/{meta['stream']}/{meta['consumer']}")


def tomllib_dump_nats(nats: dict) -> str:
    """The [nats] names that decide where jobs go (the throwaway server has no TLS or
    authentication, so the rest stays out)."""
    lines = ["[nats]"]
    for key in ("stream", "consumer", "subject_prefix", "dead_letter_stream",
                "ack_wait_secs", "max_deliver"):
        if key in nats:
            lines.append(f"{key} = {json.dumps(nats[key])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Self-test: each check must catch its mistake


def find(objects, kind):
    return next(o for o in objects if o.get("kind") == kind)


def container_of(objects):
    return framehost_container(find(objects, "Deployment"))


def set_toml(objects, section, key, value):
    """Rewrites one option in the ConfigMap's framehost.toml."""
    cm = find(objects, "ConfigMap")
    text = cm["data"]["framehost.toml"]
    pattern = re.compile(rf"(^\[{re.escape(section)}\]\n(?:(?!\[).*\n)*?){key} = [^\n]*",
                         re.M)
    if pattern.search(text):
        text = pattern.sub(lambda m: f"{m.group(1)}{key} = {value}", text, count=1)
    else:
        text += f"\n[{section}]\n{key} = {value}\n"
    cm["data"]["framehost.toml"] = text


def trigger_meta(objects):
    return find(objects, "ScaledObject")["spec"]["triggers"][0]["metadata"]


# (name, the check that must fail, how to break the rendered objects)
MISTAKES = [
    ("unknown Deployment field", "schema",
     lambda o: find(o, "Deployment")["spec"].update(replica=2)),
    ("probe field of the wrong type", "schema",
     lambda o: container_of(o)["livenessProbe"].update(periodSeconds="10")),
    ("unknown ScaledObject field", "schema",
     lambda o: find(o, "ScaledObject")["spec"].update(minReplicas=1)),
    ("ScaledObject field of the wrong type", "schema",
     lambda o: find(o, "ScaledObject")["spec"].update(maxReplicaCount="many")),
    ("scale-down policy of an unknown type", "schema",
     lambda o: find(o, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
     ["behavior"]["scaleDown"]["policies"][0].update(type="Pod")),
    ("unknown nats-jetstream parameter", "schema",
     lambda o: trigger_meta(o).update(lagTreshold="4")),
    ("lagThreshold not a string", "schema",
     lambda o: trigger_meta(o).update(lagThreshold=4)),
    ("unknown option in framehost.toml", "config",
     lambda o: set_toml(o, "decode", "max_detection", "10")),
    ("option out of range in framehost.toml", "config",
     lambda o: set_toml(o, "catalogue.defaults", "memory_mib", "4096")),
    ("FRAMEHOST_CONFIG not where the ConfigMap is mounted", "config",
     lambda o: container_of(o)["env"][0].update(value="/etc/framehost/config.toml")),
    ("configuration naming a file the Secret does not have", "config",
     lambda o: set_toml(o, "livekit", "api_secret_file",
                        '"/etc/framehost/secrets/livekit-secret"')),
    ("readiness probe on another path", "probes",
     lambda o: container_of(o)["readinessProbe"]["httpGet"].update(path="/ready")),
    ("liveness probe on a port that is not the container's", "probes",
     lambda o: container_of(o)["livenessProbe"]["httpGet"].update(port="http")),
    ("Service aimed at another port", "probes",
     lambda o: find(o, "Service")["spec"]["ports"][0].update(targetPort=8080)),
    ("PodDisruptionBudget selecting nothing in particular", "selectors",
     lambda o: find(o, "PodDisruptionBudget")["spec"].update(selector={})),
    ("root filesystem writable", "security",
     lambda o: container_of(o)["securityContext"].update(readOnlyRootFilesystem=False)),
    ("capabilities kept", "security",
     lambda o: container_of(o)["securityContext"].update(capabilities={"drop": ["NET_RAW"]})),
    ("grace period no longer than the host's", "shutdown",
     lambda o: find(o, "Deployment")["spec"]["template"]["spec"].update(
         terminationGracePeriodSeconds=25)),
    ("cache dir on the read-only root", "cache",
     lambda o: set_toml(o, "catalogue", "cache_dir", '"/var/lib/framehost/compiled"')),
    ("cache dir is the mount point", "cache",
     lambda o: set_toml(o, "catalogue", "cache_dir", '"/var/cache/framehost"')),
    ("no memory limit", "memory",
     lambda o: container_of(o)["resources"]["limits"].pop("memory")),
    ("ScaledObject on another stream", "autoscaling",
     lambda o: trigger_meta(o).update(stream="JOBS")),
    ("consumer renamed in framehost.toml only", "autoscaling",
     lambda o: set_toml(o, "nats", "consumer", '"workers"')),
    ("lagThreshold above max_jobs", "autoscaling",
     lambda o: trigger_meta(o).update(lagThreshold="40")),
    ("monitoring endpoint with a scheme", "autoscaling",
     lambda o: trigger_meta(o).update(
         natsServerMonitoringEndpoint="http://nats.nats.svc:8222")),
    ("monitoring endpoint without a port", "autoscaling",
     lambda o: trigger_meta(o).update(natsServerMonitoringEndpoint="nats.nats.svc")),
    ("fixed replicas next to the ScaledObject", "autoscaling",
     lambda o: find(o, "Deployment")["spec"].update(replicas=3)),
    ("scale-down faster than pods drain", "autoscaling",
     lambda o: find(o, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
     ["behavior"]["scaleDown"]["policies"][0].update(periodSeconds=15)),
    ("secret key the Secret lacks", "secrets",
     lambda o: container_of(o)["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {
         "name": find(o, "Secret")["metadata"]["name"], "key": "livekit-secret"}}})),
]


def self_test(overlay: Path, hadolint: str | None, nats: bool) -> list[str]:
    problems = []
    objects = render(overlay)
    baseline, effective = validate_objects(objects)
    if baseline.failures:
        return [f"the unbroken {overlay} fails: {baseline.failures}"]

    for name, check, breaks in MISTAKES:
        broken = copy.deepcopy(objects)
        breaks(broken)
        report, _ = validate_objects(broken)
        hits = [f for f in report.failures if f.startswith(f"{check}:")]
        if not hits:
            problems.append(f"{name}: the {check} check did not catch it "
                            f"(failures: {report.failures})")
        else:
            first = hits[0].split(": ", 1)[1].splitlines()[0]
            print(f"  caught  {name:55} {check}: {first[:70]}")

    # An environment override that renames the consumer, where this framehost has them.
    broken = copy.deepcopy(objects)
    container_of(broken)["env"].append({"name": "FRAMEHOST_NATS__CONSUMER",
                                        "value": "framehost-other"})
    try:
        overridden = config_check(broken).config["nats"]["consumer"] == "framehost-other"
    except Failure:
        overridden = True
    if overridden:
        report, _ = validate_objects(broken)
        if not any(f.startswith(("autoscaling:", "config:")) for f in report.failures):
            problems.append("FRAMEHOST_NATS__CONSUMER renaming the consumer was not caught")
        else:
            print(f"  caught  {'consumer renamed by FRAMEHOST_NATS__CONSUMER':55} autoscaling")
    else:
        print("  note    this framehost ignores FRAMEHOST_<SECTION>__<KEY>; override not tried")

    if effective is not None and metrics_port(effective) is not None:
        broken = copy.deepcopy(objects)
        set_toml(broken, "metrics", "listen", '"0.0.0.0:9999"')
        report, _ = validate_objects(broken)
        if not any(f.startswith("probes:") for f in report.failures):
            problems.append("metrics.listen moved to another port was not caught by the "
                            "probes check")
        else:
            print(f"  caught  {'metrics.listen on another port than the probes':55} probes")

    if effective is not None and effective.memory_budget is not None:
        broken = copy.deepcopy(objects)
        container_of(broken)["resources"]["limits"]["memory"] = "64Mi"
        report, _ = validate_objects(broken)
        if not any(f.startswith("memory:") for f in report.failures):
            problems.append("a 64Mi memory limit was not caught by the memory check")
        else:
            print(f"  caught  {'memory limit below the budget':55} memory")

    if nats and effective is not None:
        # KEDA reading a consumer that is not there: only a live server shows it.
        broken = copy.deepcopy(objects)
        trigger_meta(broken)["consumer"] = "framehost-worker"
        try:
            nats_lag_check(broken, effective)
            problems.append("the lag check found a consumer named framehost-worker")
        except Failure as failure:
            print(f"  caught  {'ScaledObject naming a consumer NATS does not have':55} "
                  f"nats: {str(failure)[:70]}")

    # A kustomization that does not render.
    with tempfile.TemporaryDirectory() as tmp:
        copy_deploy = Path(tmp) / "deploy"
        shutil.copytree(DEPLOY, copy_deploy)
        (copy_deploy / "base" / "service.yaml").unlink()
        try:
            render(copy_deploy / overlay.relative_to(DEPLOY))
            problems.append("a kustomization with a missing resource rendered")
        except Failure:
            print(f"  caught  {'kustomization naming a missing file':55} render")

    problems += dockerfile_mistakes(hadolint)
    return problems


def dockerfile_mistakes(hadolint: str | None) -> list[str]:
    """Breaks a copy of the Dockerfile and .dockerignore (with the workspace manifests and
    what the build embeds) one way at a time."""
    problems = []
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    dockerignore = (ROOT / ".dockerignore").read_text()
    mistakes = [
        ("release build without --locked", dockerfile.replace(" --locked", ""), dockerignore),
        ("image running as root", dockerfile.replace("USER 10001:10001", "USER root"),
         dockerignore),
        (".dockerignore leaving out wit/", dockerfile, dockerignore + "wit/\n"),
        (".dockerignore keeping target/", dockerfile, dockerignore.replace("target/\n", "")),
    ]
    # A context without a workspace member: only cargo itself notices.
    report = Report()
    check_context(report, dockerignore + "plugins/tracker/\n")
    if not report.failures:
        problems.append("a context without plugins/tracker was not caught")
    else:
        first = " ".join(report.failures[0].split())
        print(f"  caught  {'.dockerignore leaving out a workspace member':55} {first[:80]}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(ROOT / "Cargo.toml", root)
        shutil.copy(ROOT / "Cargo.lock", root)
        shutil.copytree(ROOT / "host", root / "host", ignore=shutil.ignore_patterns("target"))
        shutil.copytree(ROOT / "wit", root / "wit")
        workspace = tomllib.loads((root / "Cargo.toml").read_text())["workspace"]
        for member in workspace["members"]:
            if member != "host":
                (root / member).mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / member / "Cargo.toml", root / member)
        (root / "deploy").mkdir()
        for name, dockerfile_text, ignore_text in mistakes:
            (root / "deploy" / "Dockerfile").write_text(dockerfile_text)
            (root / ".dockerignore").write_text(ignore_text)
            report = Report()
            check_dockerfile(report, hadolint, root)
            if not report.failures:
                problems.append(f"{name}: the dockerfile check did not catch it")
            else:
                first = " ".join(report.failures[0].split())
                print(f"  caught  {name:55} {first[:80]}")
    return problems


# ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", action="store_true",
                        help="also show the ScaledObject's consumer lag on a throwaway "
                             "nats-server")
    parser.add_argument("--self-test", action="store_true",
                        help="also break copies of the manifests and check each is caught")
    parser.add_argument("--hadolint", help="hadolint binary (default: none, lint skipped)")
    args = parser.parse_args()

    kustomizations = [DEPLOY / "base"] + sorted(
        p for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    failed = False
    for kustomization in kustomizations:
        where = kustomization.relative_to(ROOT)
        try:
            objects = render(kustomization)
        except Failure as failure:
            print(f"FAIL {where}: {failure}")
            failed = True
            continue
        report, effective = validate_objects(objects)
        kinds = ", ".join(sorted({o["kind"] for o in objects}))
        if report.failures:
            failed = True
            print(f"FAIL {where} ({kinds}):")
            for failure in report.failures:
                print("  - " + failure.replace("\n", "\n    "))
        else:
            print(f"ok   {where}: rendered, schemas valid, consistent ({kinds})")
        for note in report.notes:
            print(f"     note: {note}")
        if args.nats and not report.failures and any(o["kind"] == "ScaledObject"
                                                      for o in objects):
            try:
                print(f"ok   {where}: {nats_lag_check(objects, effective)}")
            except Failure as failure:
                failed = True
                print(f"FAIL {where}: lag on nats-server: {failure}")

    report = Report()
    check_dockerfile(report, args.hadolint)
    if not report.failures:
        check_context(report)
    if report.failures:
        failed = True
        print("FAIL deploy/Dockerfile:")
        for failure in report.failures:
            print("  - " + failure.replace("\n", "\n    "))
    else:
        linted = "hadolint clean, " if args.hadolint else ""
        print(f"ok   deploy/Dockerfile: {linted}builds -p framehost --release --locked, "
              "non-root USER; cargo loads the workspace --locked from the context "
              ".dockerignore leaves")
    for note in report.notes:
        print(f"     note: {note}")

    if args.self_test:
        overlay = next((k for k in kustomizations if k.parent.name == "overlays"), None)
        print("self-test: each mistake must be caught by its check")
        problems = (self_test(overlay, args.hadolint, args.nats) if overlay
                    else ["no overlay"])
        if problems:
            failed = True
            for problem in problems:
                print(f"FAIL self-test: {problem}")

    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
