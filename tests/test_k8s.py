"""Kubernetes manifests: the renderer is the source of truth, everything validates against the real
CRD and Kubernetes schemas, mpi-operator's own rules hold, and the launcher's command really runs.
A job rendered again on other workers under its name differs only in its counts, and a config its
ranks cannot run is refused at render time."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import REPO_ROOT, VENV_BIN
from distaccum import k8s, k8s_pods
from distaccum.config import load_config

CRD_DIR = REPO_ROOT.parent / "shared" / "k8s" / "crds"
DIGITS = REPO_ROOT / "distaccum" / "configs" / "digits.yaml"
KUBERNETES_VERSION = "1.37.0"


def _config_text() -> str:
    return DIGITS.read_text()


def _by_kind(documents: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in documents}


def _kustomize(directory: Path) -> list[dict]:
    built = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                           text=True, check=True)
    return list(yaml.safe_load_all(built.stdout))


@pytest.fixture(scope="module")
def mpijob_schema() -> dict:
    crd_file = CRD_DIR / "kubeflow.org_mpijobs.yaml"
    if not crd_file.exists():
        pytest.skip(f"the real MPIJob CRD is not here ({crd_file}): ../shared is absent")
    crd = yaml.safe_load(crd_file.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _strict(schema):
    """Reject unknown fields like the API server's strict field validation does."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


# mpi-operator's replica defaults (pkg/apis/kubeflow/v2beta1/default.go:
# DefaultLauncherRestartPolicy OnFailure, DefaultRestartPolicy Never); its validation.go accepts
# Never and OnFailure (validRestartPolicies).
DEFAULT_RESTART_POLICY = {"Launcher": "OnFailure", "Worker": "Never"}


def mpi_operator_problems(job: dict) -> list[str]:
    """mpi-operator's Go-side rules that the CRD schema does not express."""
    problems = []
    specs = job["spec"]["mpiReplicaSpecs"]
    if specs.get("Launcher", {}).get("replicas", 1) != 1:
        problems.append("exactly one Launcher replica is allowed")
    for role, spec in specs.items():
        policy = spec.get("restartPolicy", DEFAULT_RESTART_POLICY[role])
        if policy not in ("Never", "OnFailure"):
            problems.append(f"{role} restartPolicy must be Never or OnFailure, not {policy}")
        # mpi_job_controller.go's setRestartPolicy overwrites it with the replica spec's (and
        # newLauncherPodTemplate records a SetPodTemplateRestartPolicy warning).
        if "restartPolicy" in spec["template"]["spec"]:
            problems.append(f"{role} pod template sets restartPolicy, which the replica spec's "
                            "overrides")
    workers = specs["Worker"]["replicas"]
    if len(f"{job['metadata']['name']}-worker-{workers - 1}") > 63:
        problems.append("worker pod name exceeds 63 characters")
    return problems


def validate(documents: list[dict], mpijob_schema: dict) -> None:
    for document in documents:
        if document["kind"] == "MPIJob":
            jsonschema.validate(document, mpijob_schema)
            assert mpi_operator_problems(document) == []
        else:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


RENDERED = {
    "cpu_2_workers": k8s.ClusterOptions(),
    "cpu_4_workers_2_slots": k8s.ClusterOptions(workers=4, cpu_slots_per_worker=2),
    "gpu_3_workers_4_gpus": k8s.ClusterOptions(workers=3, gpus_per_worker=4, name="big-run"),
}


@pytest.mark.parametrize("options", list(RENDERED.values()), ids=list(RENDERED))
def test_rendered_manifests_validate_when_options_vary(options, mpijob_schema):
    validate(k8s.render(options, _config_text()), mpijob_schema)


@pytest.mark.parametrize("overlay, gpus", [("cpu", 0), ("gpu", 1)])
def test_overlay_equals_renderer_output_and_validates(overlay, gpus, mpijob_schema):
    built = _kustomize(REPO_ROOT / "k8s" / "overlays" / overlay)
    validate(built, mpijob_schema)
    expected = k8s.render(k8s.ClusterOptions(gpus_per_worker=gpus), _config_text())
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(built, key=key) == sorted(expected, key=key)


def test_committed_base_is_what_the_renderer_writes(tmp_path):
    subprocess.run(
        [str(VENV_BIN / "distaccum"), "k8s", "render", "--config", str(DIGITS),
         "--output-dir", str(tmp_path)], check=True,
    )
    base = REPO_ROOT / "k8s" / "base"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in base.iterdir())
    for rendered in tmp_path.iterdir():
        assert rendered.read_text() == (base / rendered.name).read_text(), rendered.name


def _images(documents: list[dict]) -> set[str]:
    """Every container image the documents name (pod templates of every workload)."""
    found = set()

    def visit(node):
        if isinstance(node, dict):
            if "containers" in node:
                found.update(c["image"] for c in node["containers"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(documents)
    return found


def _rendered_by_cli(*arguments: str) -> list[dict]:
    """`distaccum k8s render ARGUMENTS` (with the bundled digits config unless given a config or
    a command)."""
    config = [] if {"--config", "--command"} & set(arguments) else ["--config", str(DIGITS)]
    completed = subprocess.run(
        [str(VENV_BIN / "distaccum"), "k8s", "render", *config, *arguments],
        capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(completed.stdout))


def test_gpu_manifests_name_only_the_gpu_image_and_forward_nccl_settings():
    gpu_renders = {
        "cli": _rendered_by_cli("--gpus-per-worker", "2"),
        "cli_own_registry": _rendered_by_cli("--gpus-per-worker", "1",
                                             "--image", "registry.example/distaccum:0.1.0-gpu"),
        "overlay": _kustomize(REPO_ROOT / "k8s" / "overlays" / "gpu"),
        **{name: k8s.render(options, _config_text())
           for name, options in RENDERED.items() if options.gpus_per_worker},
    }
    for name, documents in gpu_renders.items():
        images = _images(documents)
        assert len(images) == 1 and images.pop().endswith(k8s_pods.GPU_TAG_SUFFIX), name
        assert "NCCL_SOCKET_IFNAME" in k8s.to_yaml(documents), name
    cpu_render = _rendered_by_cli()
    assert _images(cpu_render) == {k8s_pods.IMAGE}
    assert "NCCL" not in k8s.to_yaml(cpu_render)  # NCCL is built only into the GPU image


EXAMPLE = REPO_ROOT / "examples" / "my_project"


STOP_RANKS = ["distaccum", "stop-ranks", "--timeout", "25"]
STOPPED_BY_KUBERNETES = {
    **{name: lambda options=options: k8s.render(options, _config_text())
       for name, options in RENDERED.items()},
    "committed_base": lambda: [document for path in sorted((REPO_ROOT / "k8s" / "base").glob("*"))
                               if path.name != "kustomization.yaml"
                               for document in yaml.safe_load_all(path.read_text())],
    "gpu_overlay": lambda: _kustomize(REPO_ROOT / "k8s" / "overlays" / "gpu"),
}


@pytest.mark.parametrize("render", list(STOPPED_BY_KUBERNETES.values()),
                         ids=list(STOPPED_BY_KUBERNETES))
def test_pods_stop_the_job_with_a_checkpoint_when_kubernetes_stops_them(render, mpijob_schema):
    # The launcher's SIGTERM reaches mpirun as the SIGUSR1 it passes on; a worker's preStop hook
    # signals its ranks before sshd (PID 1) gets the SIGTERM that would take them down unsignalled.
    documents = render()
    validate(documents, mpijob_schema)
    specs = _by_kind(documents)["MPIJob"]["spec"]["mpiReplicaSpecs"]
    launcher_pod, worker_pod = (specs[role]["template"]["spec"] for role in ("Launcher", "Worker"))
    [launcher], [worker] = launcher_pod["containers"], worker_pod["containers"]
    assert launcher["command"][:3] == ["distaccum", "launch", "mpirun"]
    assert launcher["command"][-6:-4] == ["distaccum", "train"]
    assert worker["lifecycle"] == {"preStop": {"exec": {"command": STOP_RANKS}}}
    assert "lifecycle" not in launcher
    # The hook gives up before the grace period ends, so that sshd still gets its SIGTERM.
    assert launcher_pod["terminationGracePeriodSeconds"] == 30
    assert worker_pod["terminationGracePeriodSeconds"] == 30 > int(STOP_RANKS[-1])


@pytest.mark.parametrize("command, train", [
    (["python", "train.py", "--epochs", "3"], False),
    (["distaccum", "train", "--config", "/opt/my_project/config.yaml"], True),
], ids=["own_program", "own_distaccum_train"])
def test_own_command_is_stopped_as_distaccum_train_only_when_it_is_one(command, train,
                                                                        mpijob_schema):
    # SIGUSR1 would end a program that does not handle it at once: any other program gets
    # mpirun's SIGTERM, as under a bare mpirun, and no hook (it looks for `distaccum train`).
    documents = _rendered_by_cli("--command", *command)
    validate(documents, mpijob_schema)
    specs = _by_kind(documents)["MPIJob"]["spec"]["mpiReplicaSpecs"]
    launcher_pod, worker_pod = (specs[role]["template"]["spec"] for role in ("Launcher", "Worker"))
    [launcher], [worker] = launcher_pod["containers"], worker_pod["containers"]
    assert launcher["command"][0] == ("distaccum" if train else "mpirun")
    assert launcher["command"][-len(command):] == command
    assert ("lifecycle" in worker) is train
    assert launcher_pod["terminationGracePeriodSeconds"] == 30
    assert worker_pod["terminationGracePeriodSeconds"] == 30


def _launcher_container(documents: list[dict]) -> dict:
    job = _by_kind(documents)["MPIJob"]
    return job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]


def test_example_project_renders_valid_manifests_that_train_it_by_import_path(mpijob_schema):
    documents = _rendered_by_cli("--config", str(EXAMPLE / "config.yaml"), "--workdir",
                                 "/opt/my_project", "--image", "registry.example/my-project:1")
    validate(documents, mpijob_schema)
    command = _launcher_container(documents)["command"]
    assert command[command.index("--wdir") + 1] == "/opt/my_project"
    train = command[command.index("train") - 1:]
    assert train[:4] == ["distaccum", "train", "--workdir", "/opt/my_project"]
    config = _by_kind(documents)["ConfigMap"]["data"]["config.yaml"]
    assert "model: my_project.models:build_model" in config
    assert _images(documents) == {"registry.example/my-project:1"}


def test_example_dockerfile_extends_distaccum_image_with_the_project_where_manifests_look():
    lines = [line.split(None, 1) for line in (EXAMPLE / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    [base] = [argument for keyword, argument in lines if keyword == "FROM"]
    assert base == k8s_pods.IMAGE
    for keyword, argument in lines:
        if keyword == "COPY":
            *sources, _ = [a for a in argument.split() if not a.startswith("--")]
            assert all((EXAMPLE / source).exists() for source in sources), argument
    assert ["WORKDIR", "/opt/my_project"] in lines  # the --workdir docs/kubernetes.md renders with


def test_own_command_renders_valid_manifests_without_a_distaccum_config(mpijob_schema):
    documents = _rendered_by_cli("--workdir", "/opt/my_project", "--gpus-per-worker", "2",
                                 "--command", "python", "train.py", "--epochs", "3")
    validate(documents, mpijob_schema)
    assert "ConfigMap" not in _by_kind(documents)
    command = _launcher_container(documents)["command"]
    assert command[-4:] == ["python", "train.py", "--epochs", "3"]
    assert command[command.index("--wdir") + 1] == "/opt/my_project"
    worker = _by_kind(documents)["MPIJob"]["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert [v["name"] for v in worker["volumes"]] == ["scratch", "data", "shm"]  # no config


def test_render_command_offers_trainer_v2_when_asked_for_trainjob():
    # The TrainJob and its runtime are checked in depth in test_trainjob.py.
    documents = _rendered_by_cli("--api", "trainjob", "--workers", "4")
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", "ClusterTrainingRuntime",
                     "TrainJob", "Deployment", "Service", "NetworkPolicy"]
    assert _by_kind(documents)["TrainJob"]["spec"]["trainer"]["numNodes"] == 4


@pytest.mark.parametrize(
    "arguments, expected",
    [([], "takes --config FILE or --command"),
     (["--config", str(DIGITS), "--command", "python", "train.py"], "one of them"),
     (["--config", str(DIGITS), "--workdir", "relative/dir"], "workdir must be an absolute path"),
     (["--config", str(DIGITS), "--memory-per-rank", "2G"],
      "memory_per_rank must be a whole number of Mi or Gi, such as 2Gi or 1536Mi. "
      "Received: memory_per_rank='2G'")],
    ids=["neither", "both", "relative_workdir", "memory_unit"],
)
def test_render_exits_2_with_one_line_when_command_line_is_bad(arguments, expected):
    completed = subprocess.run([str(VENV_BIN / "distaccum"), "k8s", "render", *arguments],
                               capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and expected in completed.stderr


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_slots_ranks_and_gpu_limits_agree_when_gpus_per_worker_varies(gpus):
    job = _by_kind(k8s.render(k8s.ClusterOptions(gpus_per_worker=gpus), _config_text()))["MPIJob"]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert job["spec"]["slotsPerWorker"] == gpus
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus
    command = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
    assert "-np" not in command and "-n" not in command  # mpirun fills every hostfile slot
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in worker["volumes"]


def test_job_has_what_mpi_operator_users_ask_for():
    job = _by_kind(k8s.render(k8s.ClusterOptions(), _config_text()))["MPIJob"]
    spec = job["spec"]
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    assert spec["runPolicy"]["backoffLimit"] >= 1 and spec["runPolicy"]["ttlSecondsAfterFinished"] > 0
    assert spec["sshAuthMountPath"] == "/home/mpiuser/.ssh"
    for role in ("Launcher", "Worker"):
        pod = spec["mpiReplicaSpecs"][role]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["tcpSocket"]["port"] == 2222
    # Set where mpi-operator reads it: the Worker's default (Never) would leave a pod whose sshd
    # died Failed for good.
    assert {role: replica["restartPolicy"] for role, replica in spec["mpiReplicaSpecs"].items()} \
        == {"Launcher": "OnFailure", "Worker": "OnFailure"}
    assert worker["ports"] == [{"name": "ssh", "containerPort": 2222}]


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda job: job["spec"].update(slotsPerWorkr=2), "slotsPerWorkr"),
        (lambda job: job["spec"].update(slotsPerWorker="two"), "'two' is not of type 'integer'"),
        (lambda job: job["spec"]["mpiReplicaSpecs"]["Launcher"].update(replicas=2), "one Launcher"),
        (lambda job: job["spec"]["mpiReplicaSpecs"]["Worker"].update(restartPolicy="Always"),
         "restartPolicy must be Never or OnFailure, not Always"),
        (lambda job: job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"].update(
            restartPolicy="OnFailure"), "Launcher pod template sets restartPolicy"),
        (lambda job: job["metadata"].update(name="x" * 60), "63 characters"),
    ],
    ids=["misspelt_field", "wrong_type", "two_launchers", "restart_always",
         "restart_in_pod_template", "long_name"],
)
def test_validation_catches_broken_manifest(mutate, error, mpijob_schema):
    documents = k8s.render(k8s.ClusterOptions(), _config_text())
    mutate(_by_kind(documents)["MPIJob"])
    with pytest.raises((jsonschema.ValidationError, AssertionError), match=error):
        validate(documents, mpijob_schema)


def test_validation_catches_misspelt_field_in_builtin_kind(mpijob_schema):
    documents = k8s.render(k8s.ClusterOptions(), _config_text())
    _by_kind(documents)["Deployment"]["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(documents, mpijob_schema)


def rendered_objects(documents: list[dict]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in documents}


def mpi_operator_objects(job: dict) -> set[tuple[str, str]]:
    """(kind, name) of each object mpi-operator creates for an MPIJob, from its
    pkg/controller/mpi_job_controller.go: configSuffix "-config" (newConfigMap: the hostfile and
    discover_hosts.sh), sshAuthSecretSuffix "-ssh" (newSSHAuthSecret), launcherSuffix "-launcher"
    (newLauncherJob; newLauncherService for Intel MPI and MPICH), workerSuffix "-worker"
    (newWorkersService, and workerName's pods "<name>-worker-<i>"). It uses none that it does not
    own: "Resource %q of Kind %q already exists and is not managed by MPIJob"."""
    name = job["metadata"]["name"]
    workers = job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    return {("ConfigMap", f"{name}-config"), ("Secret", f"{name}-ssh"),
            ("Job", f"{name}-launcher"), ("Service", f"{name}-launcher"),
            ("Service", f"{name}-worker"),
            *{("Pod", f"{name}-worker-{index}") for index in range(workers)}}


NAMED = {**RENDERED, "own_command": k8s.ClusterOptions(command=("python", "train.py"))}


@pytest.mark.parametrize("options", list(NAMED.values()), ids=list(NAMED))
def test_rendered_names_differ_from_what_mpi_operator_creates_when_options_vary(options):
    documents = k8s.render(options, None if options.command else _config_text())
    by_kind = _by_kind(documents)
    ours, theirs = rendered_objects(documents), mpi_operator_objects(by_kind["MPIJob"])
    assert ours & theirs == set()
    # Not under another kind either, so that a name in `kubectl get` output means one object.
    assert {name for _, name in ours} & {name for _, name in theirs} == set()
    if not options.command:  # the workers mount the ConfigMap rendered beside them
        worker = by_kind["MPIJob"]["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
        assert {"name": "config", "configMap": {"name": by_kind["ConfigMap"]["metadata"]["name"]}} \
            in worker["volumes"]


def test_name_check_catches_the_configmap_mpi_operator_owns(monkeypatch):
    monkeypatch.setattr(k8s_pods, "CONFIG_MAP_SUFFIX", "-config")  # the name before the fix
    documents = k8s.render(k8s.ClusterOptions(), _config_text())
    assert rendered_objects(documents) & mpi_operator_objects(_by_kind(documents)["MPIJob"]) \
        == {("ConfigMap", "distaccum-config")}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"name": "Bad_Name"}, "name must be a DNS-1123 label"),
        ({"name": "n" * 55, "workers": 100}, "exceeds 63 characters"),
        ({"workers": 0}, "workers=0"),
        ({"gpus_per_worker": -1}, "-1"),
        ({"image": ""}, "image"),
        ({"gpus_per_worker": 1, "image": "registry/distaccum:0.1.0"},
         "needs the GPU image.*Received: image='registry/distaccum:0.1.0'"),
        ({"memory_per_rank": "0Gi"}, "memory_per_rank='0Gi'"),
        ({"memory_per_rank": "1.5Gi"}, "memory_per_rank='1.5Gi'"),
    ],
    ids=["bad_name", "long_name", "no_workers", "negative_gpus", "no_image", "cpu_image_on_gpus",
         "no_memory", "fractional_memory"],
)
def test_cluster_options_name_bad_value(options, message):
    with pytest.raises(k8s.ManifestError, match=message):
        k8s.ClusterOptions(**options)


def test_render_command_exits_2_with_one_line_when_config_is_bad(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\naccumulation_steps: 0\n")
    completed = subprocess.run(
        [str(VENV_BIN / "distaccum"), "k8s", "render", "--config", str(bad)],
        capture_output=True, text=True,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "distaccum: error: accumulation_steps: must be >= 1. Received: accumulation_steps=0"
    ]


SSHD_CONFIG = REPO_ROOT / "k8s" / "image" / "sshd_config"


def test_sshd_config_listens_where_manifests_probe():
    settings = dict(line.split(None, 1) for line in SSHD_CONFIG.read_text().splitlines()
                    if line.strip() and not line.startswith("#"))
    assert settings["Port"] == str(k8s_pods.SSH_PORT)
    job = _by_kind(k8s.render(k8s.ClusterOptions(), _config_text()))["MPIJob"]
    assert settings["AuthorizedKeysFile"].startswith(job["spec"]["sshAuthMountPath"] + "/")
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["command"][-1] == f"{k8s_pods.HOME}/.sshd_config"


# --- resizing: the same job (name, claim, logdir) on another number of workers ---

RESIZE_NAME = "big-run"
RESIZED_FROM = (2, 1)  # (workers, GPUs per worker) before the resize
# (workers, GPUs per worker) whose ranks the bundled global batch splits over: 128 = ranks x k x 32.
RESIZES = {"1x1": (1, 1), "4x1": (4, 1), "1x2": (1, 2), "2x2": (2, 2)}
README = REPO_ROOT / "README.md"
KUBERNETES_DOC = REPO_ROOT / "docs" / "kubernetes.md"  # the README's Kubernetes details
_WORKER = ("MPIJob", RESIZE_NAME, "spec", "mpiReplicaSpecs", "Worker")
_WORKER_RESOURCES = (*_WORKER, "template", "spec", "containers", 0, "resources")
# What a resize may change in an MPIJob render: the worker count, and the slots per worker.
MPIJOB_COUNTS = {
    "workers": {(*_WORKER, "replicas")},
    "slots": {("MPIJob", RESIZE_NAME, "spec", "slotsPerWorker"),
              (*_WORKER_RESOURCES, "limits", "nvidia.com/gpu"),
              (*_WORKER_RESOURCES, "requests", "cpu"),
              (*_WORKER_RESOURCES, "requests", "memory"),  # memory_per_rank x slots
              (*_WORKER_RESOURCES, "limits", "memory")},
}


def resize_render(api: str, workers: int, gpus: int) -> list[dict]:
    """`distaccum k8s render` of the bundled config, always under RESIZE_NAME."""
    return _rendered_by_cli("--api", api, "--name", RESIZE_NAME, "--workers", str(workers),
                            "--gpus-per-worker", str(gpus))


def _differences(before, after, path: tuple = ()) -> set[tuple]:
    if isinstance(before, dict) and isinstance(after, dict):
        return {found for key in before.keys() | after.keys()
                for found in _differences(before.get(key), after.get(key), (*path, key))}
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return {found for index, pair in enumerate(zip(before, after))
                for found in _differences(*pair, (*path, index))}
    return set() if before == after else {path}


def render_differences(before: list[dict], after: list[dict]) -> set[tuple]:
    """The paths, each starting with the object's kind and name, at which two renders differ."""
    def keyed(documents):
        return {(d["kind"], d["metadata"]["name"]): d for d in documents}
    return {(*key, *path) for key, *path in _differences(keyed(before), keyed(after))}


def expected_differences(counts: dict[str, set], workers: int, gpus: int) -> set[tuple]:
    return ((counts["workers"] if workers != RESIZED_FROM[0] else set())
            | (counts["slots"] if gpus != RESIZED_FROM[1] else set()))


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, what `kubectl patch --type merge` sends the API server."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def doc_section(path: Path, heading: str) -> str:
    """The text of a Markdown file's section under `heading` (a whole line, `#`s included), up to
    the next heading of any level (a `# comment` line inside a code block is not a heading)."""
    lines, in_code = [], False
    for line in path.read_text().split(f"\n{heading}\n", 1)[1].splitlines(keepends=True):
        in_code ^= line.startswith("```")
        if not in_code and re.match(r"#+ ", line):
            break
        lines.append(line)
    return "".join(lines)


def shown_resize_commands() -> list[tuple[list[str], str | None]]:
    """The commands docs/kubernetes.md's "Resize a running job" shows, split into words, each with
    the output shown after it (console blocks) or None: code block lines (continuations joined,
    comments dropped) and inline code that starts with a command."""
    section = doc_section(KUBERNETES_DOC, "## Resize a running job")
    commands = []
    for language, block in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
        for index, line in enumerate(lines):
            if language == "console" and line.startswith("$ "):
                output = [out for out in lines[index + 1:] if not out.startswith("$ ")]
                commands.append((shlex.split(line[2:]), "\n".join(output) or None))
            elif language == "bash":
                commands.append((shlex.split(line.split(" #")[0]), None))
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", "", section, flags=re.S)):
        if span.startswith(("kubectl ", ".venv/bin/distaccum ")):
            commands.append((shlex.split(span), None))
    return commands


def resize_command_api(words: list[str]) -> str:
    """Which API a command of the resize section (docs/kubernetes.md) is about."""
    if words[:2] in (["kubectl", "delete"], ["kubectl", "patch"]):
        assert words[2] in ("mpijob", "trainjob"), words
        return words[2]
    assert words[:3] == [".venv/bin/distaccum", "k8s", "render"], words
    return words[words.index("--api") + 1] if "--api" in words else "mpijob"


def run_shown_render(words: list[str]) -> subprocess.CompletedProcess:
    """A render command the README or docs/kubernetes.md shows, as typed from the project's root
    (the pipe to kubectl apply dropped; the API server is not here)."""
    if "|" in words:
        assert words[words.index("|") + 1:] == ["kubectl", "apply", "-f", "-"], words
        words = words[:words.index("|")]
    return subprocess.run([str(VENV_BIN / "distaccum"), *words[1:]], cwd=REPO_ROOT,
                          capture_output=True, text=True)


def with_workers(words: list[str], workers: int) -> list[str]:
    at = words.index("--workers") + 1
    return [*words[:at], str(workers), *words[at + 1:]]


def _name_claims_logdir(documents: list[dict]) -> tuple:
    """What ties a job to its checkpoints: its name, the claims its workers mount, its logdir."""
    job = _by_kind(documents)["MPIJob"]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in worker["volumes"]
              if "persistentVolumeClaim" in v}
    command = _launcher_container(documents)["command"]
    return job["metadata"]["name"], claims, [a for a in command if a.startswith("logdir=")]


@pytest.mark.parametrize("workers, gpus", list(RESIZES.values()), ids=list(RESIZES))
def test_resized_mpijob_validates_and_differs_only_in_workers_and_slots(workers, gpus,
                                                                        mpijob_schema):
    before, after = resize_render("mpijob", *RESIZED_FROM), resize_render("mpijob", workers, gpus)
    validate(before, mpijob_schema)
    validate(after, mpijob_schema)
    assert render_differences(before, after) == expected_differences(MPIJOB_COUNTS, workers, gpus)
    assert _name_claims_logdir(before) == _name_claims_logdir(after) == (
        RESIZE_NAME, {f"{RESIZE_NAME}-data"}, [f"logdir={k8s_pods.DATA_DIR}/runs/{RESIZE_NAME}"])
    job = _by_kind(after)["MPIJob"]["spec"]
    ranks = job["mpiReplicaSpecs"]["Worker"]["replicas"] * job["slotsPerWorker"]
    assert ranks == workers * gpus
    assert ranks * load_config(DIGITS).accumulation_steps_on(ranks) * 32 == 128


GLOBAL_BATCH_320 = "global_batch_size: 320\nmicro_batch_size: 32\nepochs: 1\n"  # k = 2 on 5 ranks


@pytest.mark.parametrize("api", ["mpijob", "trainjob"])
@pytest.mark.parametrize(
    "config, arguments, message",
    [
        (None, ["--workers", "3"],
         "workers=3 x slots_per_worker=1 = num_workers 3: global_batch_size: 128 is not a whole "
         "number of micro-batches per worker (num_workers x micro_batch_size = 3 x 32 = 96). "
         "Received: global_batch_size=128, num_workers=3, micro_batch_size=32"),
        (None, ["--workers", "4", "--gpus-per-worker", "2"],
         "workers=4 x slots_per_worker=2 = num_workers 8: global_batch_size: 128 is not a whole "
         "number"),
        (GLOBAL_BATCH_320, ["--workers", "5"],
         "num_workers 5: num_workers 5 does not divide partitions 48"),
        ("accumulation_steps: 2\nepochs: 1\n", ["--workers", "5"],
         "num_workers 5: num_workers 5 does not divide partitions 48"),
    ],
    ids=["3_workers", "4_workers_2_gpus", "partitions_not_divided", "partitions_with_k_given"],
)
def test_render_exits_2_with_one_line_when_the_ranks_cannot_run_the_config(
        api, config, arguments, message, tmp_path):
    config_file = DIGITS
    if config is not None:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(config)
    completed = subprocess.run(
        [str(VENV_BIN / "distaccum"), "k8s", "render", "--api", api, "--config", str(config_file),
         *arguments], capture_output=True, text=True)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert completed.stderr.startswith("distaccum: error: the config cannot run on ")
    assert message in completed.stderr


# Configs that do run on ranks the bundled one refuses.
ALSO_RUNS = {
    "3_workers_global_batch_96": ("global_batch_size: 128", "global_batch_size: 96", 3),
    "5_workers_partitions_60": ("global_batch_size: 128", "global_batch_size: 320\npartitions: 60",
                                5),
}


@pytest.mark.parametrize("old, new, workers", list(ALSO_RUNS.values()), ids=list(ALSO_RUNS))
def test_render_accepts_ranks_when_the_global_batch_and_partitions_allow(old, new, workers,
                                                                        tmp_path, mpijob_schema):
    config = tmp_path / "config.yaml"
    config.write_text(_config_text().replace(old, new))
    documents = _rendered_by_cli("--config", str(config), "--workers", str(workers))
    validate(documents, mpijob_schema)
    assert _by_kind(documents)["MPIJob"]["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == workers


def test_shown_resize_commands_are_the_ones_tests_check():
    commands = shown_resize_commands()
    apis = [resize_command_api(words) for words, _ in commands]
    assert sorted(set(apis)) == ["mpijob", "trainjob"]
    checked = ([".venv/bin/distaccum", "k8s", "render"], ["kubectl", "patch", "mpijob"],
               ["kubectl", "delete", "mpijob"], ["kubectl", "delete", "trainjob"])
    for words, _ in commands:
        assert words[:3] in checked, words


def test_shown_resize_commands_for_an_mpijob_render_validate_and_patch(mpijob_schema):
    commands = [(w, shown) for w, shown in shown_resize_commands()
                if resize_command_api(w) == "mpijob"]
    renders = {}
    for words, shown in commands:
        if words[0] != ".venv/bin/distaccum":
            continue
        completed = run_shown_render(words)
        if shown is not None:  # the refused command, with the line docs/kubernetes.md shows
            assert (completed.returncode, completed.stderr) == (2, shown + "\n")
            continue
        assert completed.returncode == 0, completed.stderr
        renders[tuple(words)] = list(yaml.safe_load_all(completed.stdout))
        validate(renders[tuple(words)], mpijob_schema)
    [(render_words, resized)] = renders.items()
    job = _by_kind(resized)["MPIJob"]
    deletes = [words for words, _ in commands if words[:2] == ["kubectl", "delete"]]
    assert deletes == [["kubectl", "delete", "mpijob", job["metadata"]["name"]]]
    # The patch, applied to the job as the README's submit command renders it (4 workers),
    # gives a valid MPIJob: the one rendered for the new count.
    [patch] = [words for words, _ in commands if words[:2] == ["kubectl", "patch"]]
    assert patch[3:6] == [job["metadata"]["name"], "--type", "merge"] and patch[6] == "-p"
    before = _by_kind(list(yaml.safe_load_all(
        run_shown_render(with_workers(list(render_words), 4)).stdout)))["MPIJob"]
    patched = merge_patch(before, json.loads(patch[7]))
    validate([patched], mpijob_schema)
    assert patched == job != before


def readme_submit_commands() -> tuple[list[list[str]], str]:
    """The commands of the README's Kubernetes block, split into words (continuations joined,
    comments dropped), and the block's text."""
    section = doc_section(README, "## Kubernetes (Kubeflow MPI Operator, Kubeflow Trainer v2)")
    [block] = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [shlex.split(line.split(" #")[0]) for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.startswith("#")], block


def test_readme_submit_commands_build_the_images_the_render_names_and_reach_its_objects(
        mpijob_schema):
    # No Docker engine or API server here: the builds name the Dockerfile, its variant argument
    # and the tags the manifests run; the render runs; each kubectl line names a rendered object.
    commands, block = readme_submit_commands()
    tags = {}
    for words in [w for w in commands if w[:2] == ["docker", "build"]]:
        assert words[words.index("-f") + 1] == "k8s/Dockerfile" and words[-1] == ".", words
        variant = "cpu"
        if "--build-arg" in words:
            variant = words[words.index("--build-arg") + 1].removeprefix("DISTACCUM_VARIANT=")
            assert variant == "gpu" and "ARG DISTACCUM_VARIANT=cpu" in (
                REPO_ROOT / "k8s" / "Dockerfile").read_text(), words
        tags[variant] = words[words.index("-t") + 1]
    assert tags == {"cpu": f"REGISTRY/{k8s_pods.IMAGE}",
                    "gpu": f"REGISTRY/{k8s_pods.IMAGE}{k8s_pods.GPU_TAG_SUFFIX}"}
    [render] = [w for w in commands if w[0] == ".venv/bin/distaccum"]
    completed = run_shown_render(render)
    assert completed.returncode == 0, completed.stderr
    documents = list(yaml.safe_load_all(completed.stdout))
    validate(documents, mpijob_schema)
    assert _images(documents) == {tags["gpu"]}
    name = _by_kind(documents)["MPIJob"]["metadata"]["name"]
    [service] = [d for d in documents if d["kind"] == "Service"]
    port = service["spec"]["ports"][0]["port"]
    assert [w for w in commands if w[0] == "kubectl"] == [
        ["kubectl", "get", "mpijob", name, "-w"],
        ["kubectl", "logs", "-f", f"job/{name}-launcher"],  # mpi-operator's launcher Job
        ["kubectl", "port-forward", f"svc/{service['metadata']['name']}", f"{port}:{port}"],
        ["kubectl", "delete", "mpijob", name]]
    for overlay in re.findall(r"k8s/overlays/\w+", block):
        assert (REPO_ROOT / overlay / "kustomization.yaml").exists(), overlay


# --- what each pod may reach ---

@pytest.mark.parametrize("gpus", [0, 2])
def test_worker_memory_is_memory_per_rank_times_ranks(gpus):
    options = k8s.ClusterOptions(gpus_per_worker=gpus, cpu_slots_per_worker=3)
    [worker] = _by_kind(k8s.render(options, _config_text()))["MPIJob"]["spec"]["mpiReplicaSpecs"][
        "Worker"]["template"]["spec"]["containers"]
    expected = "16Gi" if gpus else "6Gi"  # 2 GPUs x 8Gi; 3 CPU slots x 2Gi
    assert worker["resources"]["requests"]["memory"] == worker["resources"]["limits"]["memory"] \
        == expected
    chosen = k8s.ClusterOptions(gpus_per_worker=gpus, memory_per_rank="1536Mi")
    assert chosen.worker_memory == f"{1536 * chosen.slots_per_worker}Mi"


def _selects(selector: dict, labels: dict) -> bool:
    """A NetworkPolicy's podSelector as the API reads it ({} selects every pod)."""
    assert set(selector) <= {"matchLabels"}, selector  # the renders use matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


def _reachable(documents: list[dict]) -> dict[tuple[str, str], set]:
    """(pod, source pod) -> the TCP ports (None: any) on which the pod accepts the source's
    connections, for the pods of `documents`, under their NetworkPolicies (ingress only: a pod
    no policy selects accepts everything, which the renders must not leave)."""
    from pod_security import pod_templates

    pods = {label: template["metadata"]["labels"] for label, template in pod_templates(documents)}
    policies = [d["spec"] for d in documents if d["kind"] == "NetworkPolicy"]
    reach = {}
    for pod, labels in pods.items():
        selecting = [p for p in policies if _selects(p["podSelector"], labels)]
        assert selecting, f"no NetworkPolicy selects {pod}"
        for policy in selecting:
            assert policy["policyTypes"] == ["Ingress"]
            for rule in policy["ingress"]:
                ports = {port.get("port") for port in rule["ports"] if port["protocol"] == "TCP"}
                for source, source_labels in pods.items():
                    if any(_selects(peer["podSelector"], source_labels) for peer in rule["from"]):
                        reach.setdefault((pod, source), set()).update(ports)
    return reach


@pytest.mark.parametrize("api", ["mpijob", "trainjob"])
def test_network_policies_admit_only_the_jobs_own_pods_and_tensorboard_from_the_namespace(api):
    from distaccum import trainjob

    render = trainjob.render if api == "trainjob" else k8s.render
    # Two jobs in one namespace: neither's pods may reach the other's.
    documents = [*render(k8s.ClusterOptions(name="one"), _config_text()),
                 *render(k8s.ClusterOptions(name="two", gpus_per_worker=1), _config_text())]
    reach = _reachable(documents)
    ranks = {job: {pod for pod, _ in reach if "tensorboard" not in pod and f"/{job}" in pod}
             for job in ("one", "two")}
    assert all(len(pods) == 2 for pods in ranks.values()), ranks  # launcher and workers
    tensorboards = {pod for pod, _ in reach if "tensorboard" in pod}
    for job, pods in ranks.items():
        for pod in pods:
            sources = {source: ports for (target, source), ports in reach.items() if target == pod}
            # Any TCP port (Open MPI, Gloo and NCCL pick theirs), and only from the same job.
            assert sources == {source: {None} for source in pods}
    for pod in tensorboards:
        sources = {source: ports for (target, source), ports in reach.items() if target == pod}
        # Every pod of the namespace, on TensorBoard's port only.
        assert sources == {source: {k8s_pods.TENSORBOARD_PORT} for source in {p for p, _ in reach}}
    [tensorboard] = [d for d in documents if d["kind"] == "Deployment"
                     and d["metadata"]["name"] == "one-tensorboard"]
    assert tensorboard["spec"]["template"]["spec"]["containers"][0]["ports"] == [
        {"name": "http", "containerPort": k8s_pods.TENSORBOARD_PORT}]


def test_network_policy_check_fails_when_a_policy_admits_another_job():
    documents = k8s.render(k8s.ClusterOptions(name="one"), _config_text()) \
        + k8s.render(k8s.ClusterOptions(name="two"), _config_text())
    [policy] = [d for d in documents if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "one"]
    del policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["distaccum/job"]
    reach = _reachable(documents)
    assert ("MPIJob/one/Worker", "MPIJob/two/Launcher") in reach


# --- an elastic job ---------------------------------------------------------------------------

GLOBAL_BATCH_384 = "global_batch_size: 384\nmicro_batch_size: 32\nepochs: 1\n"  # 2, 3, 4 ranks


def test_elastic_mpijob_runs_horovodrun_on_the_operators_discovery_script_and_validates(
        tmp_path, mpijob_schema):
    config = tmp_path / "config.yaml"
    config.write_text(GLOBAL_BATCH_384)
    documents = _rendered_by_cli("--config", str(config), "--elastic", "--workers", "3",
                                 "--min-workers", "2", "--max-workers", "4")
    validate(documents, mpijob_schema)
    spec = _by_kind(documents)["MPIJob"]["spec"]
    launcher_pod, worker_pod = (spec["mpiReplicaSpecs"][role]["template"]["spec"]
                                for role in ("Launcher", "Worker"))
    [launcher], [worker] = launcher_pod["containers"], worker_pod["containers"]
    command = launcher["command"]
    assert command[:4] == ["distaccum", "launch", "horovodrun", "--gloo"]
    options = dict(zip(command[4:], command[5:]))
    assert (options["-np"], options["--min-np"], options["--max-np"]) == ("2", "2", "4")
    assert options["--host-discovery-script"] == k8s_pods.DISCOVER_HOSTS
    assert options["--ssh-port"] == str(k8s_pods.SSH_PORT)
    assert command[-6:-4] == ["distaccum", "train"]
    # The launcher starts at once (horovodrun waits for the fewest workers itself), and a worker
    # pod that stops is a worker that leaves: no hook stops every rank with it.
    assert spec["launcherCreationPolicy"] == "AtStartup"
    assert "lifecycle" not in worker
    assert spec["mpiReplicaSpecs"]["Worker"]["replicas"] == 3
    assert launcher["resources"]["limits"]["memory"] == "1Gi"  # horovodrun imports TensorFlow


@pytest.mark.parametrize("config, arguments, message", [
    (None, ["--elastic", "--workers", "2", "--max-workers", "3"],
     "the config cannot run on workers=3 x slots_per_worker=1 = num_workers 3: global_batch_size"),
    (None, ["--elastic", "--workers", "2", "--cpu-slots-per-worker", "3", "--min-workers", "2"],
     "the config cannot run on workers=2 x slots_per_worker=3 = num_workers 6"),
    ("accumulation_steps: 2\nepochs: 1\n", ["--elastic"],
     "give the config global_batch_size, not accumulation_steps"),
    (None, ["--elastic", "--api", "trainjob"], "Kubeflow Trainer v2 has no elastic mode"),
    (None, ["--min-workers", "1"], "--min-workers and --max-workers are an elastic job's"),
    (None, ["--elastic", "--workers", "2", "--min-workers", "3"],
     "needs 1 <= min_workers <= workers <= max_workers. Received: min_workers=3, workers=2"),
], ids=["a_count_in_between", "slots_times_min", "k_given", "trainjob", "not_elastic",
        "min_above_workers"])
def test_elastic_render_exits_2_with_one_line_for_what_cannot_be_elastic(
        config, arguments, message, tmp_path):
    config_file = DIGITS
    if config is not None:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(config)
    completed = subprocess.run(
        [str(VENV_BIN / "distaccum"), "k8s", "render", "--config", str(config_file), *arguments],
        capture_output=True, text=True)
    assert completed.returncode == 2 and completed.stdout == "", completed.stderr
    assert completed.stderr.count("\n") == 1 and message in completed.stderr, completed.stderr
