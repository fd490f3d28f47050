"""Every pod the repo's manifests make is admitted by a namespace enforcing the restricted Pod
Security Standard, mounts no service account token, and sits behind a NetworkPolicy; and the checker
(tests/pod_security.py) reports each rule a pod breaks."""

from __future__ import annotations

import copy

import pytest

from pod_security import PROFILES, pod_templates, renders, violations

RENDERS = renders()
POD_TEMPLATES = {f"{render}:{label}": template
                 for render, documents in RENDERS.items()
                 for label, template in pod_templates(documents)}


def _annotations(template: dict) -> dict:
    return (template.get("metadata") or {}).get("annotations") or {}


def test_every_render_has_its_pod_templates():
    # the launcher, the workers (or nodes) and TensorBoard, in each of the six renders
    assert {render: len(pod_templates(documents)) for render, documents in RENDERS.items()} == {
        render: 3 for render in RENDERS}


@pytest.mark.parametrize("name", POD_TEMPLATES)
def test_pod_passes_restricted_profile_when_rendered(name):
    template = POD_TEMPLATES[name]
    assert violations(template["spec"], "restricted", _annotations(template)) == []


@pytest.mark.parametrize("name", POD_TEMPLATES)
def test_pod_mounts_no_service_account_token_when_rendered(name):
    assert POD_TEMPLATES[name]["spec"].get("automountServiceAccountToken") is False


@pytest.mark.parametrize("render", RENDERS)
def test_render_includes_a_network_policy(render):
    assert any(document["kind"] == "NetworkPolicy" for document in RENDERS[render])


RESTRICTED_CONTAINER_CONTEXT = {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}}


def _container(name: str) -> dict:
    return {"name": name, "image": "distaccum:0.1.0",
            "securityContext": copy.deepcopy(RESTRICTED_CONTAINER_CONTEXT)}


COMPLIANT = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"}},
    "automountServiceAccountToken": False,
    "initContainers": [_container("setup")],
    "containers": [{**_container("main"), "ports": [{"name": "ssh", "containerPort": 2222}],
                    "readinessProbe": {"tcpSocket": {"port": 2222}}}],
    "ephemeralContainers": [_container("debug")],
    "volumes": [{"name": "config", "configMap": {"name": "config"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}}],
}


def _with(path: str, value) -> dict:
    """COMPLIANT with one field set (None deletes it); `path` is dotted, list indexes as numbers,
    and "main.", "setup." or "debug." at its start stand for that container's securityContext."""
    spec = copy.deepcopy(COMPLIANT)
    prefixes = {"main": "containers.0.securityContext", "setup": "initContainers.0.securityContext",
                "debug": "ephemeralContainers.0.securityContext"}
    head, _, rest = path.partition(".")
    path = f"{prefixes[head]}.{rest}" if head in prefixes else path
    *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]
    node = spec
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return spec


def _with_volume(name: str, source: str, body: dict) -> dict:
    return _with("volumes", COMPLIANT["volumes"] + [{"name": name, source: body}])


# name: (profile, a spec that breaks exactly one rule, the rule, a word its message must name)
BROKEN = {
    "host_network": ("baseline", _with("hostNetwork", True), "hostNamespaces", "hostNetwork"),
    "host_pid": ("baseline", _with("hostPID", True), "hostNamespaces", "hostPID"),
    "host_ipc": ("restricted", _with("hostIPC", True), "hostNamespaces", "hostIPC"),
    "privileged_ephemeral": ("restricted", _with("debug.privileged", True),
                             "privileged", "'debug'"),
    "capability_outside_baseline": ("baseline", _with("main.capabilities.add", ["NET_RAW"]),
                                    "capabilities_baseline", "NET_RAW"),
    "capability_other_than_bind": ("restricted", _with("main.capabilities.add", ["CHOWN"]),
                                   "capabilities_restricted", "CHOWN"),
    "capabilities_not_dropped": ("restricted", _with("setup.capabilities", None),
                                 "capabilities_restricted", "'setup'"),
    "host_path_baseline": ("baseline", _with_volume("host", "hostPath", {"path": "/"}),
                           "hostPathVolumes", "'host'"),
    "host_path_restricted": ("restricted", _with_volume("host", "hostPath", {"path": "/"}),
                             "restrictedVolumes", "hostPath"),
    "nfs_volume": ("restricted", _with_volume("shared", "nfs", {"server": "nfs", "path": "/"}),
                   "restrictedVolumes", "nfs"),
    "host_port": ("restricted", _with("containers.0.ports.0.hostPort", 2222),
                  "hostPorts", "'main'"),
    "apparmor_unconfined": ("baseline", _with("securityContext.appArmorProfile.type", "Unconfined"),
                            "appArmorProfile", "Unconfined"),
    "selinux_type": ("baseline", _with("main.seLinuxOptions.type", "spc_t"),
                     "seLinuxOptions", "spc_t"),
    "selinux_user": ("restricted", _with("securityContext.seLinuxOptions.user", "system_u"),
                     "seLinuxOptions", "user"),
    "proc_mount_baseline": ("baseline", _with("main.procMount", "Unmasked"),
                            "procMount", "Unmasked"),
    "proc_mount_restricted": ("restricted", _with("main.procMount", "Unmasked"),
                              "procMount_restricted", "Unmasked"),
    "seccomp_unconfined": ("baseline", _with("securityContext.seccompProfile.type", "Unconfined"),
                           "seccompProfile_baseline", "Unconfined"),
    "seccomp_unconfined_container": ("restricted", _with("setup.seccompProfile.type", "Unconfined"),
                                     "seccompProfile_restricted", "'setup'"),
    "seccomp_unset": ("restricted", _with("securityContext.seccompProfile", None),
                      "seccompProfile_restricted", "'debug'"),
    "unsafe_sysctl": ("baseline", _with("securityContext.sysctls", [{"name": "kernel.msgmax"}]),
                      "sysctls", "kernel.msgmax"),
    "privilege_escalation": ("restricted", _with("setup.allowPrivilegeEscalation", None),
                             "allowPrivilegeEscalation", "'setup'"),
    "run_as_root_allowed": ("restricted", _with("securityContext.runAsNonRoot", False),
                            "runAsNonRoot", "pod"),
    "run_as_non_root_unset": ("restricted", _with("securityContext.runAsNonRoot", None),
                              "runAsNonRoot", "'main'"),
    "run_as_root": ("restricted", _with("main.runAsUser", 0), "runAsUser", "'main'"),
    "windows_host_process": ("baseline", _with("main.windowsOptions.hostProcess", True),
                             "windowsHostProcess", "'main'"),
    "probe_host": ("baseline", _with("containers.0.readinessProbe.tcpSocket.host", "10.0.0.1"),
                   "hostProbesAndHostLifecycle", "10.0.0.1"),
}


@pytest.mark.parametrize("profile", PROFILES)
def test_checker_reports_nothing_when_pod_is_compliant(profile):
    assert violations(COMPLIANT, profile) == []


@pytest.mark.parametrize("profile, spec, rule, named", BROKEN.values(), ids=BROKEN.keys())
def test_checker_reports_the_rule_when_a_pod_breaks_it(profile, spec, rule, named):
    found = violations(spec, profile)
    assert {message.split(":")[0] for message in found} == {rule}, found
    assert any(named in message for message in found), found
    if profile == "baseline":  # whatever Baseline forbids, Restricted forbids too
        assert violations(spec, "restricted")


def test_checker_reports_apparmor_annotation_when_unconfined():
    key = "container.apparmor.security.beta.kubernetes.io/main"
    found = violations(COMPLIANT, "baseline", {key: "unconfined"})
    assert [message.split(":")[0] for message in found] == ["appArmorProfile"], found
    assert violations(COMPLIANT, "baseline", {key: "runtime/default"}) == []
    assert violations(COMPLIANT, "baseline", {key: "localhost/distaccum"}) == []


def test_baseline_allows_what_only_restricted_forbids():
    relaxed = _with("containers.0.securityContext", {"capabilities": {"add": ["CHOWN"]}})
    del relaxed["securityContext"]
    assert violations(relaxed, "baseline") == []
    assert {m.split(":")[0] for m in violations(relaxed, "restricted")} == {
        "allowPrivilegeEscalation", "capabilities_restricted", "runAsNonRoot",
        "seccompProfile_restricted"}


def test_checker_relaxes_as_upstream_when_pod_is_windows_or_in_a_user_namespace():
    windows = _with("os", {"name": "windows"})
    for key in ("initContainers", "containers", "ephemeralContainers"):
        del windows[key][0]["securityContext"]
    del windows["securityContext"]["seccompProfile"]
    assert violations(windows, "restricted") == []
    user_namespace = _with("hostUsers", False)
    user_namespace["securityContext"].update(runAsNonRoot=False, runAsUser=0)
    user_namespace["containers"][0]["securityContext"]["procMount"] = "Unmasked"
    assert violations(user_namespace, "baseline") == []
    found = violations(user_namespace, "restricted")
    assert [message.split(":")[0] for message in found] == ["procMount_restricted"], found
