"""The Pod Security Standards as kubernetes/pod-security-admission checks them, and the pod
templates of every render this repo ships.

`violations(pod_spec, profile)` follows policy/check_*.go at its newest policy version (what a
namespace labelled `enforce-version: latest` gets, 1.37): each message starts with the upstream
check ID and names the pod or container and the field. Restricted is every Baseline check except
the four it overrides (hostPathVolumes, capabilities_baseline, seccompProfile_baseline, procMount),
plus its own. The checks see init and ephemeral containers like regular ones (policy/visitor.go).
Pods with `hostUsers: false` and Windows pods are relaxed where upstream relaxes them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from distaccum import k8s, trainjob

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("baseline", "restricted")

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# check_sysctls.go: the 1.0 set, then 1.27, 1.29, 1.32 and 1.37 additions.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_slow_start_after_idle", "net.ipv4.tcp_notsent_lowat"}
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
                           "persistentVolumeClaim", "projected", "secret"}
CONFINED_PROFILE_TYPES = {"RuntimeDefault", "Localhost"}  # seccomp and AppArmor alike
APPARMOR_ANNOTATION_PREFIX = "container.apparmor.security.beta.kubernetes.io/"


def containers(pod_spec: dict) -> list[tuple[str, dict]]:
    """(`kind 'name'`, container) for every init, regular and ephemeral container."""
    return [(f"{kind} {c.get('name', '?')!r}", c)
            for key, kind in (("initContainers", "initContainer"), ("containers", "container"),
                              ("ephemeralContainers", "ephemeralContainer"))
            for c in pod_spec.get(key) or []]


def _context(item: dict) -> dict:
    return item.get("securityContext") or {}


def _setters(pod_spec: dict) -> list[tuple[str, dict]]:
    """The pod and every container, each with its securityContext."""
    return [("pod", _context(pod_spec))] + [(who, _context(c)) for who, c in containers(pod_spec)]


def _host_namespaces(spec):
    return [f"hostNamespaces: pod must not set {field}=true"
            for field in ("hostNetwork", "hostPID", "hostIPC") if spec.get(field)]


def _privileged(spec):
    return [f"privileged: {who} must not set securityContext.privileged=true"
            for who, c in containers(spec) if _context(c).get("privileged")]


def _added_capabilities(spec, allowed):
    return [f"{who} must not include {sorted(set(added) - allowed)} in"
            " securityContext.capabilities.add"
            for who, c in containers(spec)
            if set(added := (_context(c).get("capabilities") or {}).get("add") or []) - allowed]


def _capabilities_baseline(spec):
    return ["capabilities_baseline: " + m for m in _added_capabilities(spec, BASELINE_CAPABILITIES)]


def _capabilities_restricted(spec):
    if _is_windows(spec):
        return []
    missing = [f"{who} must set securityContext.capabilities.drop=['ALL']"
               for who, c in containers(spec)
               if "ALL" not in ((_context(c).get("capabilities") or {}).get("drop") or [])]
    return ["capabilities_restricted: " + m
            for m in missing + _added_capabilities(spec, {"NET_BIND_SERVICE"})]


def _volume_type(volume: dict) -> str:
    return next((key for key in volume if key != "name"), "?")


def _host_path_volumes(spec):
    return [f"hostPathVolumes: volume {v.get('name')!r} must not be a hostPath"
            for v in spec.get("volumes") or [] if "hostPath" in v]


def _restricted_volumes(spec):
    return [f"restrictedVolumes: volume {v.get('name')!r} has the restricted type {_volume_type(v)}"
            for v in spec.get("volumes") or [] if _volume_type(v) not in RESTRICTED_VOLUME_TYPES]


def _host_ports(spec):
    return [f"hostPorts: {who} must not set ports[{p.get('name', i)!r}].hostPort={p['hostPort']}"
            for who, c in containers(spec) for i, p in enumerate(c.get("ports") or [])
            if p.get("hostPort")]


def _app_armor(spec, annotations):
    found = [f"appArmorProfile: {who} must not set securityContext.appArmorProfile.type={t}"
             for who, context in _setters(spec)
             if (t := (context.get("appArmorProfile") or {}).get("type", "RuntimeDefault"))
             not in CONFINED_PROFILE_TYPES]
    return found + [f"appArmorProfile: annotation {key}={value!r} is forbidden"
                    for key, value in (annotations or {}).items()
                    if key.startswith(APPARMOR_ANNOTATION_PREFIX) and value
                    and value != "runtime/default" and not value.startswith("localhost/")]


def _se_linux(spec):
    found = []
    for who, context in _setters(spec):
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            found.append(f"seLinuxOptions: {who} must not set"
                         f" seLinuxOptions.type={options['type']}")
        found += [f"seLinuxOptions: {who} must not set seLinuxOptions.{key}"
                  for key in ("user", "role") if options.get(key)]
    return found


def _proc_mount(spec, relax_for_user_namespaces=True):
    if relax_for_user_namespaces and spec.get("hostUsers") is False:
        return []
    return [f"procMount: {who} must not set securityContext.procMount={mount}"
            for who, c in containers(spec)
            if (mount := _context(c).get("procMount", "Default")) != "Default"]


def _seccomp_baseline(spec):
    return [f"seccompProfile_baseline: {who} must not set securityContext.seccompProfile.type={t}"
            for who, context in _setters(spec)
            if (t := (context.get("seccompProfile") or {}).get("type"))
            and t not in CONFINED_PROFILE_TYPES]


def _seccomp_restricted(spec):
    if _is_windows(spec):
        return []
    found = [m.replace("seccompProfile_baseline", "seccompProfile_restricted")
             for m in _seccomp_baseline(spec)]
    if (_context(spec).get("seccompProfile") or {}).get("type") in CONFINED_PROFILE_TYPES:
        return found
    return found + [f"seccompProfile_restricted: pod or {who} must set"
                    " securityContext.seccompProfile.type to RuntimeDefault or Localhost"
                    for who, c in containers(spec) if not _context(c).get("seccompProfile")]


def _sysctls(spec):
    return [f"sysctls: pod must not set securityContext.sysctls {s.get('name')!r}"
            for s in _context(spec).get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]


def _host_process(spec):
    return [f"windowsHostProcess: {who} must not set"
            " securityContext.windowsOptions.hostProcess=true"
            for who, context in _setters(spec)
            if (context.get("windowsOptions") or {}).get("hostProcess")]


def _host_probes_and_lifecycle(spec):
    handlers = ("livenessProbe", "readinessProbe", "startupProbe", "postStart", "preStop")
    found = []
    for who, c in containers(spec):
        owners = {**{h: c.get(h) for h in handlers[:3]}, **(c.get("lifecycle") or {})}
        found += [f"hostProbesAndHostLifecycle: {who} must not set {handler}.{action}.host={host}"
                  for handler, body in owners.items() if body
                  for action in ("httpGet", "tcpSocket")
                  if (host := (body.get(action) or {}).get("host"))]
    return found


def _allow_privilege_escalation(spec):
    if _is_windows(spec):
        return []
    return [f"allowPrivilegeEscalation: {who} must set"
            " securityContext.allowPrivilegeEscalation=false"
            for who, c in containers(spec)
            if _context(c).get("allowPrivilegeEscalation") is not False]


def _run_as_non_root(spec):
    if spec.get("hostUsers") is False:
        return []
    found = [f"runAsNonRoot: {who} must not set securityContext.runAsNonRoot=false"
             for who, context in _setters(spec) if context.get("runAsNonRoot") is False]
    if _context(spec).get("runAsNonRoot") is True:
        return found
    return found + [f"runAsNonRoot: pod or {who} must set securityContext.runAsNonRoot=true"
                    for who, c in containers(spec) if "runAsNonRoot" not in _context(c)]


def _run_as_user(spec):
    if spec.get("hostUsers") is False:
        return []
    return [f"runAsUser: {who} must not set securityContext.runAsUser=0"
            for who, context in _setters(spec) if context.get("runAsUser") == 0]


def _is_windows(spec) -> bool:
    return (spec.get("os") or {}).get("name") == "windows"


BASELINE_CHECKS = {
    "hostNamespaces": _host_namespaces, "privileged": _privileged,
    "capabilities_baseline": _capabilities_baseline, "hostPathVolumes": _host_path_volumes,
    "hostPorts": _host_ports, "seLinuxOptions": _se_linux, "procMount": _proc_mount,
    "seccompProfile_baseline": _seccomp_baseline, "sysctls": _sysctls,
    "windowsHostProcess": _host_process, "hostProbesAndHostLifecycle": _host_probes_and_lifecycle}
RESTRICTED_CHECKS = {
    "restrictedVolumes": _restricted_volumes,
    "allowPrivilegeEscalation": _allow_privilege_escalation,
    "runAsNonRoot": _run_as_non_root, "runAsUser": _run_as_user,
    "seccompProfile_restricted": _seccomp_restricted,
    "capabilities_restricted": _capabilities_restricted,
    "procMount_restricted": lambda spec: [
        m.replace("procMount:", "procMount_restricted:")
        for m in _proc_mount(spec, relax_for_user_namespaces=False)]}
OVERRIDDEN_BY_RESTRICTED = {"hostPathVolumes", "capabilities_baseline", "seccompProfile_baseline",
                            "procMount"}


def violations(pod_spec: dict, profile: str = "restricted",
               annotations: dict | None = None) -> list[str]:
    """Every way `pod_spec` (and the pod's `annotations`, for AppArmor) breaks `profile`."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}. Received: profile={profile!r}")
    checks = dict(BASELINE_CHECKS)
    if profile == "restricted":
        checks = {key: check for key, check in checks.items()
                  if key not in OVERRIDDEN_BY_RESTRICTED}
        checks.update(RESTRICTED_CHECKS)
    found = _app_armor(pod_spec, annotations)
    for check in checks.values():
        found += check(pod_spec)
    return found


def pod_templates(documents: list[dict]) -> list[tuple[str, dict]]:
    """(`Kind/name/role`, pod template with metadata and spec) for every pod the documents make."""
    found = []
    for document in documents:
        kind, name = document["kind"], document["metadata"]["name"]
        spec = document.get("spec") or {}
        if kind == "Pod":
            found.append((f"Pod/{name}", document))
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            found.append((f"{kind}/{name}", spec["template"]))
        elif kind == "CronJob":
            found.append((f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]))
        elif kind == "MPIJob":
            found += [(f"{kind}/{name}/{role}", replica["template"])
                      for role, replica in spec["mpiReplicaSpecs"].items()]
        elif kind in ("ClusterTrainingRuntime", "TrainingRuntime"):
            found += [(f"{kind}/{name}/{job['name']}", job["template"]["spec"]["template"])
                      for job in spec["template"]["spec"]["replicatedJobs"]]
    return found


def renders() -> dict[str, list[dict]]:
    """Every set of manifests the repo ships, by name: both overlays, both renderers, CPU, GPU."""
    config_text = (REPO_ROOT / "distaccum" / "configs" / "digits.yaml").read_text()
    found = {}
    variants = {"cpu": k8s.ClusterOptions(), "gpu": k8s.ClusterOptions(gpus_per_worker=1)}
    for variant, options in variants.items():
        overlay = REPO_ROOT / "k8s" / "overlays" / variant
        built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                               text=True, check=True)
        found[f"kustomize_{variant}"] = list(yaml.safe_load_all(built.stdout))
        found[f"k8s_{variant}"] = k8s.render(options, config_text)
        found[f"trainjob_{variant}"] = trainjob.render(options, config_text)
    return found
