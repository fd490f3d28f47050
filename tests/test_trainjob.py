"""Kubeflow Trainer v2 manifests. TrainJob and ClusterTrainingRuntime are checked against Trainer
v2.3's real CRDs: the strict schema, plus every create-time CEL rule evaluated with cel-python.
JobSet's and Trainer's rules that are checked in Go hold too, and the fields a working MPI job
depends on agree with each other."""

from __future__ import annotations

import copy

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import REPO_ROOT
from distaccum import k8s, k8s_pods, trainjob
from test_k8s import (CRD_DIR, KUBERNETES_VERSION, RESIZE_NAME, RESIZED_FROM, RESIZES, _by_kind,
                      _config_text, _strict, expected_differences, mpi_operator_objects,
                      render_differences, rendered_objects, resize_command_api, resize_render,
                      run_shown_render, shown_resize_commands, with_workers)

CRD_FILES = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
             "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml"}
TRAINER_KINDS = tuple(CRD_FILES)
OWN_COMMAND = ("python", "train.py", "--epochs", "3")
SSHD_CONFIG = REPO_ROOT / "k8s" / "image" / "sshd_config"


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    """Each Trainer kind's openAPIV3Schema from the CRD, as the API server holds it."""
    found = {}
    for kind, file_name in CRD_FILES.items():
        crd_file = CRD_DIR / file_name
        if not crd_file.exists():
            pytest.skip(f"the real Trainer CRDs are not here ({crd_file}): ../shared is absent")
        crd = yaml.safe_load(crd_file.read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        found[kind] = version["schema"]["openAPIV3Schema"]
    return found


@pytest.fixture(scope="module")
def strict_schemas(schemas) -> dict[str, dict]:
    return {kind: _strict(copy.deepcopy(schema)) for kind, schema in schemas.items()}


# --- CEL: the CRDs' x-kubernetes-validations, evaluated the way the API server does on create ---

_CEL = celpy.Environment()


def _child_schema(schema: dict, key: str) -> dict:
    if key in schema.get("properties", {}):
        return schema["properties"][key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else {}


def _with_defaults(node, schema: dict):
    """The object as the API server validates it: schema defaults fill in the absent fields of
    every object that is present. For example, spec.managedBy is defaulted, and its rule applies."""
    if isinstance(node, dict):
        defaults = {key: copy.deepcopy(child["default"])
                    for key, child in schema.get("properties", {}).items() if "default" in child}
        return {key: _with_defaults(value, _child_schema(schema, key))
                for key, value in {**defaults, **node}.items()}
    if isinstance(node, list):
        return [_with_defaults(item, schema.get("items", {})) for item in node]
    return node


def _visit(node, schema: dict, path: str, visit) -> None:
    """Call visit(path, node, schema) on node and on every descendant that the schema describes."""
    visit(path, node, schema)
    if isinstance(node, dict):
        for key, value in node.items():
            _visit(value, _child_schema(schema, key), f"{path}.{key}", visit)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _visit(item, schema.get("items", {}), f"{path}[{index}]", visit)


def _is_transition_rule(rule: str) -> bool:
    """Rules that read oldSelf compare an update with the stored object (here all of them are
    `self == oldSelf`, immutability). A create has no old object, so they are skipped."""
    return "oldSelf" in rule


def evaluate_cel(document: dict, schema: dict) -> tuple[list[str], list[str]]:
    """Evaluate each create-time CEL rule whose field is present, with `self` bound to the field.
    Returns (rules evaluated, rules that failed), each entry as 'path: rule'."""
    evaluated, failed = [], []

    def visit(path, node, node_schema):
        for validation in node_schema.get("x-kubernetes-validations", []):
            rule = validation["rule"]
            if _is_transition_rule(rule):
                continue
            result = _CEL.program(_CEL.compile(rule)).evaluate({"self": celpy.json_to_cel(node)})
            evaluated.append(f"{path}: {rule}")
            if not (isinstance(result, celpy.celtypes.BoolType) and result):
                failed.append(f"{path}: {rule}")

    _visit(_with_defaults(document, schema), schema, "", visit)
    return evaluated, failed


def _schema_rules(schema) -> list[str]:
    """Every CEL rule anywhere in a schema, found without the walker (to check the walker)."""
    if isinstance(schema, dict):
        own = [v["rule"] for v in schema.get("x-kubernetes-validations", [])]
        return own + [r for key, value in schema.items() if key != "x-kubernetes-validations"
                      for r in _schema_rules(value)]
    if isinstance(schema, list):
        return [r for value in schema for r in _schema_rules(value)]
    return []


def _walked_rules(schema: dict, path: str = "") -> list[str]:
    """The rules at the schema locations that evaluate_cel() walks to."""
    rules = [f"{path}: {v['rule']}" for v in schema.get("x-kubernetes-validations", [])]
    for key, child in schema.get("properties", {}).items():
        rules += _walked_rules(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            rules += _walked_rules(schema[key], f"{path}[]" if key == "items" else f"{path}{{}}")
    return rules


# --- what JobSet's webhook and Trainer check in Go, outside the CRDs ---

def go_side_problems(runtime: dict, job: dict) -> list[str]:
    """JobSet's webhook rules, and what Trainer's MPI plugin and JobSet builder look for."""
    problems = []
    spec = runtime["spec"]["template"]["spec"]
    replicated = spec["replicatedJobs"]
    names = [r["name"] for r in replicated]
    if sorted(names) != [trainjob.LAUNCHER, trainjob.NODE]:
        problems.append(f"the MPI plugin needs ReplicatedJobs launcher and node, not {names}")
    if replicated[0].get("dependsOn"):
        problems.append("DependsOn can't be set for the first ReplicatedJob")
    for index, r in enumerate(replicated):
        for dependency in r.get("dependsOn", []):
            if dependency["name"] not in names[:index]:
                problems.append(f"{r['name']} cannot depend on {dependency['name']}")
    for target in spec.get("successPolicy", {}).get("targetReplicatedJobs", []):
        if target not in names:
            problems.append(f"successPolicy names an unknown replicatedJob {target}")
    ancestors = [r["name"] for r in replicated
                 if r["template"].get("metadata", {}).get("labels", {}).get(trainjob.ANCESTOR_LABEL)
                 == "trainer"]
    if ancestors != [trainjob.LAUNCHER]:
        problems.append(f"the trainer ancestor label must be on the launcher alone: {ancestors}")
    for r in replicated:
        pod = r["template"]["spec"]["template"]["spec"]
        if pod.get("restartPolicy", "OnFailure") not in ("Never", "OnFailure"):
            problems.append(f"{r['name']} restartPolicy must be Never or OnFailure")
        if trainjob.NODE not in [c["name"] for c in pod["containers"]]:
            problems.append(f"{r['name']}: Trainer mounts ssh keys only into a container "
                            "named node")
        pods = 1 if r["name"] == trainjob.LAUNCHER else job["spec"]["trainer"]["numNodes"]
        longest = f"{job['metadata']['name']}-{r['name']}-0-{pods - 1}-abcde"
        if len(longest) > 63:
            problems.append(f"pod names of this JobSet will exceed 63 characters: {longest}")
    return problems


def validate(documents: list[dict], strict_schemas: dict, schemas: dict) -> dict[str, list[str]]:
    """Validate like the cluster: returns the CEL rules evaluated, by kind."""
    evaluated = {}
    for document in documents:
        kind = document["kind"]
        if kind in TRAINER_KINDS:
            jsonschema.validate(document, strict_schemas[kind])
            evaluated[kind], failed = evaluate_cel(document, schemas[kind])
            assert failed == [], failed
        else:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    by_kind = _by_kind(documents)
    assert go_side_problems(by_kind["ClusterTrainingRuntime"], by_kind["TrainJob"]) == []
    return evaluated


RENDERED = {
    "cpu_2_workers": (k8s.ClusterOptions(), True),
    "cpu_4_workers_2_slots": (k8s.ClusterOptions(workers=4, cpu_slots_per_worker=2), True),
    "gpu_3_workers_2_gpus": (k8s.ClusterOptions(
        name="big-run", workers=3, gpus_per_worker=2,
        image="registry.example/distaccum:0.1.0-gpu"), True),
    "own_command": (k8s.ClusterOptions(command=OWN_COMMAND, workdir="/opt/my_project"), False),
}


def _render(options: k8s.ClusterOptions, with_config: bool) -> list[dict]:
    return trainjob.render(options, _config_text() if with_config else None)


def _pods(runtime: dict) -> dict[str, dict]:
    """Pod spec by ReplicatedJob name."""
    return {r["name"]: r["template"]["spec"]["template"]["spec"]
            for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]}


# Create-time rules present at each kind's fields in these renders. spec.managedBy is there
# because its default fills it in.
EXPECTED_CEL = {
    "TrainJob": [
        ": self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        ": size(self.metadata.name) <= 63",
        ".spec.managedBy: self in ['trainer.kubeflow.org/trainjob-controller', "
        "'kueue.x-k8s.io/multikueue']",
    ],
    "ClusterTrainingRuntime": [
        ".spec.mlPolicy: [has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),"
        "has(self.flux)].filter(x, x).size() <= 1",
        ".spec.template.spec: !(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder "
        "== 'InOrder' && self.replicatedJobs.exists(x, has(x.dependsOn)))",
    ],
}


@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_rendered_manifests_validate_and_pass_every_cel_rule(options, with_config, schemas,
                                                             strict_schemas):
    evaluated = validate(_render(options, with_config), strict_schemas, schemas)
    assert evaluated == EXPECTED_CEL


def test_crds_have_the_cel_rules_this_suite_counts(schemas):
    """TrainJob has 19 rules: 13 transition rules (skipped) and 6 create-time rules. The runtime
    has 11: 6 transition and 5 create-time. The walker reaches every one of them."""
    counts = {}
    for kind, schema in schemas.items():
        rules = _schema_rules(schema)
        assert len(_walked_rules(schema)) == len(rules), kind
        transition = [r for r in rules if _is_transition_rule(r)]
        assert set(transition) == {"self == oldSelf"}, kind
        counts[kind] = (len(rules), len(transition), len(rules) - len(transition))
    assert counts == {"TrainJob": (19, 13, 6), "ClusterTrainingRuntime": (11, 6, 5)}


def _rendered(kind: str) -> tuple[list[dict], dict]:
    documents = _render(k8s.ClusterOptions(), with_config=True)
    return documents, _by_kind(documents)[kind]


def _set(path: str, value):
    """A mutation setting the dotted path (lists by index) of a document, creating objects."""
    def mutate(document):
        *parents, last = path.split(".")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    return mutate


# One negative for each of the 11 create-time rules. The ones the manifests rely on are the
# TrainJob's name rules and managedBy, and the runtime's single mlPolicy and dependsOn rules.
CEL_NEGATIVES = {
    "trainjob_name_format": ("TrainJob", _set("metadata.name", "Big_Run"),
                             ": self.metadata.name.matches("),
    "trainjob_name_length": ("TrainJob", _set("metadata.name", "a" * 64),
                             ": size(self.metadata.name) <= 63"),
    "trainjob_managed_by": ("TrainJob", _set("spec.managedBy", "example.com/other"),
                            ".spec.managedBy: self in ["),
    "dataset_storage_uri": ("TrainJob", _set("spec.initializer.dataset.storageUri", "bucket"),
                            ".spec.initializer.dataset.storageUri: self == ''"),
    "model_storage_uri": ("TrainJob", _set("spec.initializer.model.storageUri", "bucket"),
                          ".spec.initializer.model.storageUri: self == ''"),
    "trainer_status_time": ("TrainJob", _set("status.trainerStatus", {}),
                            ".status.trainerStatus: has(self.lastUpdatedTime)"),
    "runtime_two_policies": ("ClusterTrainingRuntime", _set("spec.mlPolicy.torch", {}),
                             ".spec.mlPolicy: [has(self.torch)"),
    "runtime_depends_on_in_order": (
        "ClusterTrainingRuntime",
        _set("spec.template.spec.startupPolicy", {"startupPolicyOrder": "InOrder"}),
        ".spec.template.spec: !(has(self.startupPolicy)"),
    "runtime_flux_procs": ("ClusterTrainingRuntime",
                           _set("spec.mlPolicy.flux", {"numProcPerNode": 0}),
                           ".spec.mlPolicy.flux.numProcPerNode: self >= 1"),
    "runtime_torch_env_targets": (
        "ClusterTrainingRuntime",
        _set("spec.mlPolicy.torch", {"envInjection": {"targets": [{"containerNames": ["node"]}]}}),
        ".spec.mlPolicy.torch.envInjection.targets[0].containerNames: !self.exists("),
    "runtime_claim_namespace": (
        "ClusterTrainingRuntime",
        _set("spec.template.spec.volumeClaimPolicies",
             [{"templates": [{"metadata": {"name": "scratch", "namespace": "other"}}]}]),
        ".spec.template.spec.volumeClaimPolicies[0]: self.templates.all("),
}


@pytest.mark.parametrize("kind, mutate, failing", list(CEL_NEGATIVES.values()),
                         ids=list(CEL_NEGATIVES))
def test_cel_evaluation_reports_the_rule_a_broken_manifest_breaks(kind, mutate, failing, schemas):
    _, document = _rendered(kind)
    mutate(document)
    _, failed = evaluate_cel(document, schemas[kind])
    assert [f for f in failed if f.startswith(failing)], failed


@pytest.mark.parametrize(
    "kind, mutate, error",
    [
        ("TrainJob", _set("spec.trainer.numNode", 2), "numNode"),
        ("TrainJob", _set("spec.trainer.numNodes", "two"), "'two' is not of type 'integer'"),
        ("ClusterTrainingRuntime", _set("spec.mlPolicy.mpi.mpiImplementation", "MPICH"),
         "'MPICH' is not one of"),  # Trainer v2.3 knows only OpenMPI
        ("ClusterTrainingRuntime",
         _set("spec.template.spec.replicatedJobs.0.template.spec.template.spec.containers.0."
              "readinessprobe", {}), "readinessprobe"),
    ],
    ids=["misspelt_trainer_field", "wrong_type", "unknown_mpi_implementation",
         "misspelt_container_field"],
)
def test_schema_catches_broken_manifest(kind, mutate, error, strict_schemas):
    _, document = _rendered(kind)
    mutate(document)
    with pytest.raises(jsonschema.ValidationError, match=error):
        jsonschema.validate(document, strict_schemas[kind])


def _swap_replicated_jobs(runtime):
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    jobs.reverse()


def _rename_launcher_container(runtime):
    _pods(runtime)[trainjob.LAUNCHER]["containers"][0]["name"] = "launcher"


@pytest.mark.parametrize(
    "kind, mutate, problem",
    [
        ("ClusterTrainingRuntime", _swap_replicated_jobs, "DependsOn can't be set for the first"),
        ("ClusterTrainingRuntime", _rename_launcher_container, "launcher: Trainer mounts ssh keys"),
        ("ClusterTrainingRuntime",
         _set("spec.template.spec.replicatedJobs.0.template.metadata",
              {"labels": {trainjob.ANCESTOR_LABEL: "trainer"}}), "ancestor label"),
        ("TrainJob", _set("metadata.name", "n" * 45), "exceed 63 characters"),
    ],
    ids=["launcher_first", "launcher_container_not_node", "nodes_labelled_trainer", "long_name"],
)
def test_go_side_checks_catch_broken_manifest(kind, mutate, problem):
    documents, document = _rendered(kind)
    mutate(document)
    by_kind = _by_kind(documents)
    problems = go_side_problems(by_kind["ClusterTrainingRuntime"], by_kind["TrainJob"])
    assert [p for p in problems if problem in p], problems


def test_validation_catches_misspelt_field_in_builtin_kind(schemas, strict_schemas):
    documents, _ = _rendered("TrainJob")
    _by_kind(documents)["PersistentVolumeClaim"]["spec"]["accessMode"] = ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(documents, strict_schemas, schemas)


# --- the relations that make the job work ---

@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_slots_nodes_gpus_and_images_agree(options, with_config):
    by_kind = _by_kind(_render(options, with_config))
    runtime, job = by_kind["ClusterTrainingRuntime"], by_kind["TrainJob"]
    pods = _pods(runtime)
    node, launcher = pods[trainjob.NODE]["containers"][0], pods[trainjob.LAUNCHER]["containers"][0]
    assert runtime["spec"]["mlPolicy"]["mpi"]["numProcPerNode"] == options.slots_per_worker
    assert job["spec"]["trainer"]["numNodes"] == runtime["spec"]["mlPolicy"]["numNodes"] \
        == options.workers
    # The node pods get their GPUs from the runtime. TrainJob resources would reach the launcher.
    assert node["resources"].get("limits", {}).get("nvidia.com/gpu", 0) == options.gpus_per_worker
    assert node["resources"]["requests"]["cpu"] == str(options.slots_per_worker)
    assert "nvidia.com/gpu" not in launcher["resources"]["limits"]
    assert "resourcesPerNode" not in job["spec"]["trainer"]
    assert job["spec"]["trainer"]["image"] == node["image"] == launcher["image"] == options.image
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime",
                                         "name": runtime["metadata"]["name"]}


@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_launcher_runs_mpirun_over_trainers_hostfile_after_the_nodes_are_ready(options,
                                                                               with_config):
    by_kind = _by_kind(_render(options, with_config))
    runtime, job = by_kind["ClusterTrainingRuntime"], by_kind["TrainJob"]
    command = job["spec"]["trainer"]["command"]
    assert command == k8s_pods.launcher_command(options)
    assert "-np" not in command and "-n" not in command  # mpirun fills every hostfile slot
    assert command[command.index("--hostfile") + 1] == trainjob.HOSTFILE == "/etc/mpi/hostfile"
    spec = runtime["spec"]["template"]["spec"]
    launcher = {r["name"]: r for r in spec["replicatedJobs"]}[trainjob.LAUNCHER]
    assert launcher["dependsOn"] == [{"name": trainjob.NODE, "status": "Ready"}]
    assert spec["network"]["publishNotReadyAddresses"] is True
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": [trainjob.LAUNCHER]}
    assert runtime["spec"]["mlPolicy"]["mpi"]["runLauncherAsNode"] is False  # not in the hostfile
    launcher_container = _pods(runtime)[trainjob.LAUNCHER]["containers"][0]
    assert "command" not in launcher_container  # the TrainJob's command is the one that runs
    environment = {e["name"]: e["value"] for e in launcher_container["env"]}
    # Open MPI 5 reads this one; Trainer overwrites only Open MPI 4's OMPI_MCA_plm_rsh_args.
    assert environment["PRTE_MCA_plm_ssh_args"] == f"-p {k8s_pods.SSH_PORT}"


@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_pods_stop_the_job_with_a_checkpoint_when_kubernetes_stops_them(options, with_config,
                                                                        schemas, strict_schemas):
    # As the MPIJob's pods (test_k8s.py): the launcher under `distaccum launch`, a preStop hook
    # that signals the node's ranks before sshd's SIGTERM; neither for a program of the user's own.
    documents = _render(options, with_config)
    validate(documents, strict_schemas, schemas)
    by_kind = _by_kind(documents)
    command = by_kind["TrainJob"]["spec"]["trainer"]["command"]
    pods = _pods(by_kind["ClusterTrainingRuntime"])
    node = pods[trainjob.NODE]["containers"][0]
    if with_config:
        assert command[:3] == ["distaccum", "launch", "mpirun"]
        assert node["lifecycle"] == {"preStop": {"exec": {"command": [
            "distaccum", "stop-ranks", "--timeout", "25"]}}}
    else:
        assert command[0] == "mpirun" and "lifecycle" not in node
    assert "lifecycle" not in pods[trainjob.LAUNCHER]["containers"][0]
    assert {name: pod["terminationGracePeriodSeconds"] for name, pod in pods.items()} == {
        trainjob.NODE: 30, trainjob.LAUNCHER: 30}


@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_nodes_serve_ssh_where_trainer_mounts_the_keys(options, with_config):
    runtime = _by_kind(_render(options, with_config))["ClusterTrainingRuntime"]
    node = _pods(runtime)[trainjob.NODE]["containers"][0]
    assert node["command"] == ["/usr/sbin/sshd", "-De", "-f", f"{k8s_pods.HOME}/.sshd_config"]
    assert node["ports"] == [{"name": "ssh", "containerPort": 2222}]
    assert node["readinessProbe"]["tcpSocket"]["port"] == 2222
    settings = dict(line.split(None, 1) for line in SSHD_CONFIG.read_text().splitlines()
                    if line.strip() and not line.startswith("#"))
    auth_path = runtime["spec"]["mlPolicy"]["mpi"]["sshAuthMountPath"]
    assert auth_path == "/home/mpiuser/.ssh" and settings["Port"] == "2222"
    assert settings["AuthorizedKeysFile"] == f"{auth_path}/authorized_keys"
    for name, pod in _pods(runtime).items():
        assert [c["name"] for c in pod["containers"]] == [trainjob.NODE], name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == k8s_pods.USER_ID, name
        assert security["fsGroup"] == k8s_pods.USER_ID, name  # reads the 0640 key Secret


@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_nodes_mount_the_claim_and_the_config_the_render_creates(options, with_config):
    documents = _render(options, with_config)
    by_kind = _by_kind(documents)
    pod = _pods(by_kind["ClusterTrainingRuntime"])[trainjob.NODE]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[k8s_pods.DATA_DIR]]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind["PersistentVolumeClaim"]["metadata"]["name"]
    if with_config:
        config_map = volumes[mounts[k8s_pods.CONFIG_DIR]]["configMap"]["name"]
        assert config_map == by_kind["ConfigMap"]["metadata"]["name"]
    else:
        assert k8s_pods.CONFIG_DIR not in mounts and "ConfigMap" not in by_kind
    assert [d["kind"] for d in documents] == [
        *(["ConfigMap"] if with_config else []), "PersistentVolumeClaim", "NetworkPolicy",
        "ClusterTrainingRuntime", "TrainJob", "Deployment", "Service", "NetworkPolicy"]
    shared = [d for d in documents if d["kind"] not in TRAINER_KINDS]
    mpijob_render = k8s.render(options, _config_text() if with_config else None)
    assert shared == [d for d in mpijob_render if d["kind"] != "MPIJob"]


def trainer_objects(job: dict) -> set[tuple[str, str]]:
    """(kind, name) of each object Trainer and JobSet create for a TrainJob. Trainer v2's
    pkg/constants/constants.go: MPIHostfileConfigMapSuffix "-mpi-hostfile" and
    MPISSHAuthSecretSuffix "-mpi-ssh-auth" (built by pkg/runtime/framework/plugins/mpi/mpi.go),
    and the JobSet named after the TrainJob (plugins/jobset). JobSet's
    pkg/controllers/jobset_controller.go: a Job "<jobset>-<replicatedJob>-<index>" (GenJobName)
    and the headless Service named after network.subdomain, the JobSet's name by default."""
    name = job["metadata"]["name"]
    return {("ConfigMap", f"{name}-mpi-hostfile"), ("Secret", f"{name}-mpi-ssh-auth"),
            ("JobSet", name), ("Service", name),
            ("Job", f"{name}-{trainjob.LAUNCHER}-0"), ("Job", f"{name}-{trainjob.NODE}-0")}


@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_rendered_names_differ_from_what_trainer_and_jobset_create(options, with_config):
    documents = _render(options, with_config)
    job = _by_kind(documents)["TrainJob"]
    assert rendered_objects(documents) & trainer_objects(job) == set()
    # One ConfigMap name for both APIs, free under either controller.
    mpijob = _by_kind(k8s.render(options, _config_text() if with_config else None))["MPIJob"]
    assert rendered_objects(documents) & mpi_operator_objects(mpijob) == set()


@pytest.mark.parametrize("options, with_config", list(RENDERED.values()), ids=list(RENDERED))
def test_pods_restart_as_the_mpijob_replicas_do(options, with_config):
    # JobSet's Jobs read restartPolicy from the pod template (no replica-level field here).
    pods = _pods(_by_kind(_render(options, with_config))["ClusterTrainingRuntime"])
    replicas = _by_kind(k8s.render(options, _config_text() if with_config else None)
                        )["MPIJob"]["spec"]["mpiReplicaSpecs"]
    assert pods[trainjob.LAUNCHER]["restartPolicy"] == replicas["Launcher"]["restartPolicy"]
    assert pods[trainjob.NODE]["restartPolicy"] == replicas["Worker"]["restartPolicy"]


@pytest.mark.parametrize(
    "options, config, message",
    [
        (k8s.ClusterOptions(name="n" * 45), "epochs: 1\n",
         r"pod 'n{45}-launcher-0-0-abcde' exceeds 63 .*Received: name='n{45}'"),
        (k8s.ClusterOptions(command=OWN_COMMAND), "epochs: 1\n", "not both. Received: command="),
    ],
    ids=["name_too_long_for_jobset", "config_and_command"],
)
def test_render_refuses_with_one_line(options, config, message):
    with pytest.raises(k8s.ManifestError, match=message) as raised:
        trainjob.render(options, config)
    assert "\n" not in str(raised.value)


def test_longest_accepted_name_validates(schemas, strict_schemas):
    options = k8s.ClusterOptions(name="n" * 44, workers=10)
    validate(trainjob.render(options, _config_text()), strict_schemas, schemas)


# --- resizing: a TrainJob is created again on other nodes, its runtime updated in place ---

def evaluate_transition_rules(new: dict, old: dict, schema: dict) -> list[str]:
    """The `oldSelf` rules that an update from `old` to `new` breaks, as 'path: message'. A rule
    applies where both objects have its field. List items are paired only in map lists, by their
    keys, as the API server pairs them."""
    failed = []

    def visit(path, new_node, old_node, node_schema):
        for validation in node_schema.get("x-kubernetes-validations", []):
            if not _is_transition_rule(validation["rule"]):
                continue
            result = _CEL.program(_CEL.compile(validation["rule"])).evaluate(
                {"self": celpy.json_to_cel(new_node), "oldSelf": celpy.json_to_cel(old_node)})
            if not (isinstance(result, celpy.celtypes.BoolType) and result):
                failed.append(f"{path}: {validation['message']}")
        if isinstance(new_node, dict) and isinstance(old_node, dict):
            for key in sorted(new_node.keys() & old_node.keys()):
                visit(f"{path}.{key}", new_node[key], old_node[key],
                      _child_schema(node_schema, key))
        elif isinstance(new_node, list) and node_schema.get("x-kubernetes-list-type") == "map":
            keys = node_schema["x-kubernetes-list-map-keys"]
            old_items = {tuple(item.get(k) for k in keys): item for item in old_node}
            for index, item in enumerate(new_node):
                paired = old_items.get(tuple(item.get(k) for k in keys))
                if paired is not None:
                    visit(f"{path}[{index}]", item, paired, node_schema.get("items", {}))

    visit("", _with_defaults(new, schema), _with_defaults(old, schema), schema)
    return failed


_RUNTIME = ("ClusterTrainingRuntime", f"{RESIZE_NAME}-runtime")
_NODE_RESOURCES = (*_RUNTIME, "spec", "template", "spec", "replicatedJobs", 0, "template", "spec",
                   "template", "spec", "containers", 0, "resources")
# What a resize may change in a Trainer render: the node count, and the processes per node.
TRAINJOB_COUNTS = {
    "workers": {("TrainJob", RESIZE_NAME, "spec", "trainer", "numNodes"),
                (*_RUNTIME, "spec", "mlPolicy", "numNodes")},
    "slots": {(*_RUNTIME, "spec", "mlPolicy", "mpi", "numProcPerNode"),
              (*_NODE_RESOURCES, "limits", "nvidia.com/gpu"),
              (*_NODE_RESOURCES, "requests", "cpu"),
              (*_NODE_RESOURCES, "requests", "memory"),  # memory_per_rank x slots
              (*_NODE_RESOURCES, "limits", "memory")},
}


def _name_claims_logdir(documents: list[dict]) -> tuple:
    """What ties a job to its checkpoints: its name, the claims its nodes mount, its logdir."""
    by_kind = _by_kind(documents)
    node = _pods(by_kind["ClusterTrainingRuntime"])[trainjob.NODE]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in node["volumes"]
              if "persistentVolumeClaim" in v}
    command = by_kind["TrainJob"]["spec"]["trainer"]["command"]
    return (by_kind["TrainJob"]["metadata"]["name"], claims,
            [a for a in command if a.startswith("logdir=")])


@pytest.mark.parametrize("workers, gpus", list(RESIZES.values()), ids=list(RESIZES))
def test_resized_trainjob_validates_and_differs_only_in_nodes_and_processes_per_node(
        workers, gpus, schemas, strict_schemas):
    before = resize_render("trainjob", *RESIZED_FROM)
    after = resize_render("trainjob", workers, gpus)
    for documents in (before, after):
        assert validate(documents, strict_schemas, schemas) == EXPECTED_CEL
    assert render_differences(before, after) == expected_differences(TRAINJOB_COUNTS, workers, gpus)
    assert _name_claims_logdir(before) == _name_claims_logdir(after) == (
        RESIZE_NAME, {f"{RESIZE_NAME}-data"}, [f"logdir={k8s_pods.DATA_DIR}/runs/{RESIZE_NAME}"])


@pytest.mark.parametrize("workers, gpus", list(RESIZES.values()), ids=list(RESIZES))
def test_resized_trainjob_is_refused_in_place_while_its_runtime_updates(workers, gpus, schemas):
    before = _by_kind(resize_render("trainjob", *RESIZED_FROM))
    after = _by_kind(resize_render("trainjob", workers, gpus))
    refused = evaluate_transition_rules(after["TrainJob"], before["TrainJob"], schemas["TrainJob"])
    # Same nodes, other GPUs per node: the TrainJob is unchanged, only its runtime changes.
    assert refused == ([".spec.trainer: field is immutable"] if workers != RESIZED_FROM[0] else [])
    assert evaluate_transition_rules(after["ClusterTrainingRuntime"],
                                     before["ClusterTrainingRuntime"],
                                     schemas["ClusterTrainingRuntime"]) == []


def _launcher_waits_for_completion(runtime):
    runtime["spec"]["template"]["spec"]["replicatedJobs"][1]["dependsOn"][0]["status"] = "Complete"


@pytest.mark.parametrize(
    "kind, mutate, refused",
    [
        ("TrainJob", _set("spec.trainer.image", "registry.example/other:1"),
         ".spec.trainer: field is immutable"),
        ("TrainJob", _set("spec.runtimeRef.name", "other-runtime"),
         ".spec.runtimeRef: field is immutable"),
        ("ClusterTrainingRuntime",
         _set("spec.template.spec.network.publishNotReadyAddresses", False),
         ".spec.template.spec.network: Value is immutable"),
        ("ClusterTrainingRuntime", _launcher_waits_for_completion,
         ".spec.template.spec.replicatedJobs[1].dependsOn: Value is immutable"),
    ],
    ids=["trainer_image", "runtime_ref", "runtime_network", "runtime_depends_on"],
)
def test_transition_rules_refuse_an_update_of_an_immutable_field(kind, mutate, refused, schemas):
    _, old = _rendered(kind)
    _, new = _rendered(kind)
    mutate(new)
    assert evaluate_transition_rules(new, old, schemas[kind]) == [refused]


def test_shown_resize_commands_for_a_trainjob_render_validate_and_recreate(schemas,
                                                                         strict_schemas):
    commands = [words for words, _ in shown_resize_commands()
                if resize_command_api(words) == "trainjob"]
    [render_words] = [words for words in commands if words[0] == ".venv/bin/distaccum"]
    completed = run_shown_render(render_words)
    assert completed.returncode == 0, completed.stderr
    resized = list(yaml.safe_load_all(completed.stdout))
    validate(resized, strict_schemas, schemas)
    job = _by_kind(resized)["TrainJob"]
    assert [words for words in commands if words[0] == "kubectl"] == [
        ["kubectl", "delete", "trainjob", job["metadata"]["name"]]]
    # Why delete: the job the README submits (4 workers) cannot be updated to the new count.
    before = _by_kind(list(yaml.safe_load_all(
        run_shown_render(with_workers(render_words, 4)).stdout)))
    assert evaluate_transition_rules(job, before["TrainJob"], schemas["TrainJob"]) == [
        ".spec.trainer: field is immutable"]
    runtime = _by_kind(resized)["ClusterTrainingRuntime"]
    assert evaluate_transition_rules(runtime, before["ClusterTrainingRuntime"],
                                     schemas["ClusterTrainingRuntime"]) == []
