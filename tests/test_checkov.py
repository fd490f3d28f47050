"""checkov's Kubernetes checks on every pod the repo's manifests make: each pod template written as
the Pod it becomes (checkov does not look inside an MPIJob or a ClusterTrainingRuntime), the
TensorBoard Deployment as it is, and each render's NetworkPolicies beside them. One checkov process
scans them all: ~14 s, 13 of them checkov's start-up. Each pod template is its own test."""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from pod_security import REPO_ROOT, pod_templates, renders

# launch/setup.sh installs it here: its pins would move TensorFlow's dependencies in .venv/.
CHECKOV = REPO_ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"
KINDS_CHECKOV_READS = {"Deployment", "NetworkPolicy"}

# Failed checks the manifests keep on purpose: check -> (why, the pods it may fail on: a part of
# the test id, or "" for every pod). docs/kubernetes.md's "Security: what the pods may do"
# section gives the same list.
ALLOWED_FAILURES = {
    "CKV_K8S_21": ("the namespace is chosen when the manifests are applied (kubectl -n, an overlay)",
                   ""),
    "CKV_K8S_43": ("images are named by tag (--image); a digest exists only once one is pushed",
                   ""),
    "CKV_K8S_11": ("no CPU limit: TensorFlow sizes its thread pools by the node's cores, not the "
                   "quota, so a limit throttles every step; the request reserves the cores", ""),
    "CKV_K8S_15": ("imagePullPolicy is Kubernetes' default (IfNotPresent for a tag): a side-loaded "
                   "image (kind, minikube) cannot be pulled; clusters that want Always enforce it "
                   "with the AlwaysPullImages admission plugin", ""),
    "CKV_K8S_8": ("the launcher runs mpirun to its end and listens on no port: its liveness is "
                  "mpirun's exit", "Launcher"),
    "CKV_K8S_9": ("the launcher is ready once started: nothing connects to it before mpirun does",
                  "Launcher"),
}

RENDERS = renders()
POD_TEMPLATES = [f"{render}:{label}" for render, documents in RENDERS.items()
                 for label, _ in pod_templates(documents)]


def _file_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".yaml"


def manifests(rendered: dict[str, list[dict]]) -> dict[str, dict]:
    """File name -> manifest: a Pod for each pod template that is not a Deployment's, the
    Deployments and NetworkPolicies as rendered. A pod template's file is named after it."""
    found = {}
    for render, documents in rendered.items():
        for label, template in pod_templates(documents):
            kind, name = label.split("/", 2)[:2]
            if kind in KINDS_CHECKOV_READS:
                [document] = [d for d in documents
                              if d["kind"] == kind and d["metadata"]["name"] == name]
            else:
                metadata = template.get("metadata") or {}
                document = {"apiVersion": "v1", "kind": "Pod",
                            "metadata": {**metadata, "name": _file_name(f"{render} {label}")[:-5]},
                            "spec": template["spec"]}
            found[_file_name(f"{render}:{label}")] = document
        for document in documents:
            if document["kind"] == "NetworkPolicy":
                name = document["metadata"]["name"]
                found[_file_name(f"{render} NetworkPolicy {name}")] = document
    return found


def run_checkov(directory: Path) -> dict[str, dict[str, str]]:
    """File name -> {id: name} of the checks that failed in it."""
    completed = subprocess.run(
        [str(CHECKOV), "--directory", str(directory), "--framework", "kubernetes",
         "--skip-download", "--quiet", "--output", "json"],
        capture_output=True, text=True, timeout=300)
    if completed.returncode not in (0, 1):  # 1: some check failed
        raise RuntimeError(f"checkov exited {completed.returncode}: {completed.stderr[-2000:]}")
    report = json.loads(completed.stdout)
    failed = defaultdict(dict)
    for check in report["results"]["failed_checks"]:
        failed[Path(check["file_path"]).name][check["check_id"]] = check["check_name"]
    return failed


@pytest.fixture(scope="module")
def failed_checks(tmp_path_factory) -> dict[str, dict[str, str]]:
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed at {CHECKOV}: launch/setup.sh installs it")
    directory = tmp_path_factory.mktemp("checkov")
    for file_name, document in manifests(RENDERS).items():
        (directory / file_name).write_text(yaml.safe_dump(document, sort_keys=False))
    return run_checkov(directory)


@pytest.mark.parametrize("name", POD_TEMPLATES)
def test_pod_fails_no_checkov_check_outside_the_allow_list(name, failed_checks):
    failed = {check: title for check, title in failed_checks[_file_name(name)].items()
              if check.startswith("CKV_K8S_") and not _allowed(check, name)}
    assert dict(sorted(failed.items(), key=lambda item: int(item[0].split("_")[-1]))) == {}


def _allowed(check: str, pod_template: str) -> bool:
    return check in ALLOWED_FAILURES and ALLOWED_FAILURES[check][1].lower() in pod_template.lower()


def test_allow_list_names_only_checks_that_still_fail(failed_checks):
    still_failing = {check for failed in failed_checks.values() for check in failed}
    assert sorted(ALLOWED_FAILURES.keys() - still_failing) == []
