"""Kubernetes manifests for a Kubeflow MPIJob (mpi-operator, `kubeflow.org/v2beta1`).

The single source of truth: `k8s/base` and the overlays are checked against `render()` by the
tests. One value, `slots_per_worker` (the GPUs per worker when there are GPUs), sets the
MPIJob's `slotsPerWorker`, and so the hostfile the operator writes; `mpirun` is given no `-np`,
so it starts exactly one rank per hostfile slot, and the GPU limit is that same number.

Workers with GPUs run the GPU image (`launch/setup.sh --gpu` inside: TensorFlow with CUDA, Horovod
with NCCL), tagged `<version>-gpu`; the CPU image has no CUDA, so GPU manifests refuse it.

A config is checked against the ranks it is rendered for (`check_ranks`), so that a job resized
under the same name (claim, logdir) resumes on the new ranks instead of stopping at start-up.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from distaccum import launcher, order

if TYPE_CHECKING:
    from distaccum.config import TrainConfig

API_VERSION = "kubeflow.org/v2beta1"
SSH_PORT = 2222
USER_ID = 10000  # 10000 and up: no clash with a node's own users (checkov CKV_K8S_40)
HOME = "/home/mpiuser"
CONFIG_DIR = "/etc/distaccum"
DATA_DIR = "/data"
HOSTFILE = "/etc/mpi/hostfile"  # where mpi-operator mounts the hostfile it generates
TENSORBOARD_PORT = 6006
# The one writable directory of every container (an emptyDir): the root filesystem is read-only.
# Open MPI's session directory, TensorFlow's and Keras's files go to /tmp; sshd writes nothing.
SCRATCH_DIR = "/tmp"
IMAGE = "distaccum:0.1.0"  # the CPU image; the GPU image is the same tag plus GPU_TAG_SUFFIX
GPU_TAG_SUFFIX = "-gpu"
# mpi-operator creates and owns `<name>-config` (its hostfile) and refuses a namesake it does not
# own, so the training config takes another suffix (Trainer's hostfile is `<name>-mpi-hostfile`).
CONFIG_MAP_SUFFIX = "-train-config"
# A launcher whose ranks stopped (exit 143 after a preemption's checkpoint, or a crash) reruns
# `mpirun`, which resumes, up to backoffLimit; a worker whose sshd dies restarts in the same pod,
# which mpi-operator would otherwise leave Failed (it replaces only missing worker pods).
RESTART_POLICY = "OnFailure"
# Kubernetes' default, stated: a stop takes the update in flight plus < 1 s (benchmark figure 8),
# and a node's shutdown may cut it shorter (GKE Spot: 15 s). The worker's preStop hook gives up 5 s
# before the end, so that sshd still gets its SIGTERM before the kubelet's SIGKILL.
TERMINATION_GRACE_SECONDS = 30
STOP_RANKS = ["distaccum", "stop-ranks", "--timeout", str(TERMINATION_GRACE_SECONDS - 5)]
# Memory: requests equal limits, so a pod is never evicted under node pressure for memory it was
# promised, and a rank that outgrows it is OOM-killed at a known size. One rank of the bundled jobs
# peaks at 0.65 GB (digits) to 0.82 GB (synthetic); TensorFlow with CUDA maps more host memory.
MEMORY_PER_RANK = {"cpu": "2Gi", "gpu": "8Gi"}
LAUNCHER_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "256Mi"}}
TENSORBOARD_RESOURCES = {"requests": {"cpu": "250m", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
_MEMORY = re.compile(r"^([1-9][0-9]*)(Mi|Gi)$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(ValueError):
    """An option that would produce manifests the cluster or mpi-operator rejects."""


@dataclass(frozen=True)
class ClusterOptions:
    """What varies between submissions. Every other field of the manifests follows from these."""

    name: str = "distaccum"
    workers: int = 2
    gpus_per_worker: int = 0
    cpu_slots_per_worker: int = 1
    image: str | None = None  # None: IMAGE, or its GPU variant when there are GPUs
    storage: str = "10Gi"
    # Where the user's project lives in their image: ranks start there, and `distaccum train`
    # imports its packages (--workdir).
    workdir: str | None = None
    # The user's own command line, run on every slot instead of `distaccum train` with the
    # ConfigMap's config (e.g. ("python", "train.py", "--epochs", "3")).
    command: tuple[str, ...] = ()
    # Each worker pod's memory request and limit is this times its ranks. None: MEMORY_PER_RANK.
    memory_per_rank: str | None = None

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name):
            raise ManifestError(f"name must be a DNS-1123 label. Received: name={self.name!r}")
        # mpi-operator names pods <name>-worker-<i>; a pod's hostname must fit a DNS label.
        last_worker = f"{self.name}-worker-{self.workers - 1}"
        if len(last_worker) > 63:
            raise ManifestError(
                f"name too long: pod {last_worker!r} exceeds 63 characters. Received: name={self.name!r}"
            )
        for key in ("workers", "cpu_slots_per_worker"):
            if getattr(self, key) < 1:
                raise ManifestError(f"{key} must be >= 1. Received: {key}={getattr(self, key)}")
        if self.gpus_per_worker < 0:
            raise ManifestError(f"gpus_per_worker must be >= 0. Received: {self.gpus_per_worker}")
        if self.image is None:
            object.__setattr__(self, "image", IMAGE + (GPU_TAG_SUFFIX if self.gpus_per_worker else ""))
        if not self.image:
            raise ManifestError("image must not be empty. Received: image=''")
        if self.memory_per_rank is None:
            object.__setattr__(self, "memory_per_rank",
                               MEMORY_PER_RANK["gpu" if self.gpus_per_worker else "cpu"])
        if not _MEMORY.match(self.memory_per_rank):
            raise ManifestError("memory_per_rank must be a whole number of Mi or Gi, such as 2Gi "
                                f"or 1536Mi. Received: memory_per_rank={self.memory_per_rank!r}")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ManifestError(f"workdir must be an absolute path in the image. Received: "
                                f"workdir={self.workdir!r}")
        if self.gpus_per_worker and not self.image.endswith(GPU_TAG_SUFFIX):
            # A CPU image on a GPU node trains on its CPU and reduces through host memory.
            raise ManifestError(
                f"gpus_per_worker={self.gpus_per_worker} needs the GPU image, whose tag ends in "
                f"{GPU_TAG_SUFFIX!r} (docker build --build-arg DISTACCUM_VARIANT=gpu -t "
                f"REGISTRY/{IMAGE}{GPU_TAG_SUFFIX}). Received: image={self.image!r}")

    @property
    def slots_per_worker(self) -> int:
        """Ranks per worker pod: one per GPU, or `cpu_slots_per_worker` without GPUs."""
        return self.gpus_per_worker or self.cpu_slots_per_worker

    @property
    def worker_memory(self) -> str:
        """A worker pod's memory request and limit: `memory_per_rank` for each of its ranks."""
        amount, unit = _MEMORY.match(self.memory_per_rank).groups()
        return f"{int(amount) * self.slots_per_worker}{unit}"


def check_ranks(options: ClusterOptions, config: TrainConfig) -> None:
    """Refuse a config that the rendered ranks cannot run, before it reaches the cluster.

    Every slot is a rank, so num_workers = workers x slots per worker. The job would stop at
    start-up (every rank, one line) unless the global batch is a whole number of micro-batches
    per rank and num_workers divides the data's partitions.

    Raises:
        ManifestError: one line naming the workers, the slots and the config's values.
    """
    num_workers = options.workers * options.slots_per_worker
    try:
        config.accumulation_steps_on(num_workers)
        order.check_num_workers(num_workers, config.partitions)
    except ValueError as error:
        raise ManifestError(
            f"the config cannot run on workers={options.workers} x slots_per_worker="
            f"{options.slots_per_worker} = num_workers {num_workers}: {error}") from None


def runs_distaccum_train(options: ClusterOptions) -> bool:
    """Whether the ranks run `distaccum train`: on the ConfigMap's config, or as the user's own
    command line."""
    return not options.command or launcher.is_train_command(options.command)


def launcher_command(options: ClusterOptions) -> list[str]:
    """The launcher's `mpirun` line: every hostfile slot gets a rank (no `-np` to disagree),
    running `distaccum train` on the ConfigMap's config, or the user's own command.

    Under `distaccum launch` when the ranks run `distaccum train`: the pod's SIGTERM reaches
    mpirun as the SIGUSR1 it passes on, so the job stops with a checkpoint instead of being
    SIGKILLed 0.5 s later. Any other command gets mpirun's own SIGTERM (SIGUSR1 would end a
    program that does not handle it at once, without even that notice).
    """
    forwarded = ["PATH", "PYTHONUNBUFFERED"]
    if options.gpus_per_worker:
        forwarded += ["NCCL_DEBUG", "NCCL_SOCKET_IFNAME"]
    command = ["distaccum", "launch"] if runs_distaccum_train(options) else []
    command += ["mpirun", "--hostfile", HOSTFILE, "--bind-to", "none", "--map-by", "slot"]
    for variable in forwarded:
        command += ["-x", variable]
    if options.workdir:
        command += ["--wdir", options.workdir]
    if options.command:
        return command + list(options.command)
    workdir = ["--workdir", options.workdir] if options.workdir else []
    return command + [
        "distaccum", "train", *workdir, "--config", f"{CONFIG_DIR}/config.yaml",
        "--set", f"logdir={DATA_DIR}/runs/{options.name}",
    ]


def config_map_name(options: ClusterOptions) -> str:
    return f"{options.name}{CONFIG_MAP_SUFFIX}"


def job_labels(options: ClusterOptions) -> dict:
    """The labels of the job's launcher and worker pods, which its NetworkPolicy selects."""
    return {"app.kubernetes.io/name": "distaccum", "distaccum/job": options.name}


def tensorboard_labels(options: ClusterOptions) -> dict:
    return {"app.kubernetes.io/name": "distaccum-tensorboard", "distaccum/job": options.name}


def _container(options: ClusterOptions, name: str, **fields) -> dict:
    """A container that Pod Security's "restricted" profile admits: no capability at all, no
    privilege escalation, nothing written outside its volumes (the scratch emptyDir at
    SCRATCH_DIR and the job's own). sshd runs under exactly this (tests/test_image.py)."""
    container = {"name": name, "image": options.image, **fields}
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    container["volumeMounts"] = [{"name": "scratch", "mountPath": SCRATCH_DIR},
                                 *container.get("volumeMounts", [])]
    return container


def _pod(container: dict, volumes: list[dict] = (), **fields) -> dict:
    """A pod running `container` as mpiuser, under the runtime's default seccomp profile, with no
    Kubernetes API token: mpi-operator v2 and Trainer v2 reach the workers by ssh, and nothing in
    the job calls the API."""
    return {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsUser": USER_ID, "runAsGroup": USER_ID, "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        **fields,
        "containers": [container],
        "volumes": [{"name": "scratch", "emptyDir": {}}, *volumes],
    }


def _launcher(options: ClusterOptions) -> dict:
    environment = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # Open MPI 5 (PRRTE) reads PRTE_MCA_*; Open MPI 4 reads OMPI_MCA_*: sshd listens on 2222.
        {"name": "PRTE_MCA_plm_ssh_args", "value": f"-p {SSH_PORT}"},
        {"name": "OMPI_MCA_plm_rsh_args", "value": f"-p {SSH_PORT}"},
    ]
    if options.gpus_per_worker:
        # Ranks start through ssh with a bare environment: mpirun -x forwards these to them.
        environment += [
            {"name": "NCCL_DEBUG", "value": "WARN"},
            {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
        ]
    container = _container(options, "launcher", command=launcher_command(options),
                           env=environment, resources=copy.deepcopy(LAUNCHER_RESOURCES))
    return {
        "replicas": 1,
        "restartPolicy": RESTART_POLICY,
        "template": {
            "metadata": {"labels": job_labels(options)},
            "spec": _pod(container, terminationGracePeriodSeconds=TERMINATION_GRACE_SECONDS),
        },
    }


def _worker(options: ClusterOptions) -> dict:
    ssh_answers = {"tcpSocket": {"port": SSH_PORT}, "periodSeconds": 5}
    container = _container(
        options, "worker",
        command=["/usr/sbin/sshd", "-De", "-f", f"{HOME}/.sshd_config"],
        ports=[{"name": "ssh", "containerPort": SSH_PORT}],
        # The operator starts the launcher only once every worker's sshd answers; a worker whose
        # sshd stops answering is restarted.
        readinessProbe={**ssh_answers, "initialDelaySeconds": 2},
        livenessProbe={**ssh_answers, "initialDelaySeconds": 10, "failureThreshold": 6},
        volumeMounts=[{"name": "data", "mountPath": DATA_DIR}],
        resources={"requests": {"cpu": str(options.slots_per_worker),
                                "memory": options.worker_memory},
                   "limits": {"memory": options.worker_memory}},
    )
    if runs_distaccum_train(options):
        # sshd (PID 1) would exit on the pod's SIGTERM and take the ranks with it, unsignalled:
        # the kubelet runs this first, and it returns once the job has stopped with a checkpoint.
        container["lifecycle"] = {"preStop": {"exec": {"command": STOP_RANKS}}}
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": f"{options.name}-data"}}]
    if not options.command:  # `distaccum train` reads the ConfigMap's config on every rank
        container["volumeMounts"].insert(0, {"name": "config", "mountPath": CONFIG_DIR,
                                             "readOnly": True})
        volumes.insert(0, {"name": "config", "configMap": {"name": config_map_name(options)}})
    if options.gpus_per_worker:
        _add_gpu_settings(container, volumes, options.gpus_per_worker)
    return {
        "replicas": options.workers,
        "restartPolicy": RESTART_POLICY,
        "template": {
            "metadata": {"labels": job_labels(options)},
            "spec": _pod(container, volumes,
                         terminationGracePeriodSeconds=TERMINATION_GRACE_SECONDS),
        },
    }


def _add_gpu_settings(container: dict, volumes: list, gpus: int) -> None:
    container["resources"]["limits"]["nvidia.com/gpu"] = gpus
    # NCCL's shared-memory transport needs more than the container runtime's 64 MiB /dev/shm.
    container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})


def mpijob(options: ClusterOptions) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "MPIJob",
        "metadata": {"name": options.name, "labels": {"app.kubernetes.io/name": "distaccum"}},
        "spec": {
            "slotsPerWorker": options.slots_per_worker,
            "mpiImplementation": "OpenMPI",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "sshAuthMountPath": f"{HOME}/.ssh",
            "runPolicy": {
                "cleanPodPolicy": "Running",
                "backoffLimit": 3,
                "ttlSecondsAfterFinished": 86400,
            },
            # Each replica spec carries restartPolicy: mpi-operator overwrites a pod template's
            # with it (and records a warning event for the launcher's).
            "mpiReplicaSpecs": {"Launcher": _launcher(options), "Worker": _worker(options)},
        },
    }


def config_map(options: ClusterOptions, config_text: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(options)},
        "data": {"config.yaml": config_text},
    }


def volume_claim(options: ClusterOptions) -> dict:
    # ReadWriteMany: rank 0 (on worker-0) writes logs and the model while TensorBoard reads.
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{options.name}-data"},
        "spec": {"accessModes": ["ReadWriteMany"],
                 "resources": {"requests": {"storage": options.storage}}},
    }


def tensorboard(options: ClusterOptions) -> list[dict]:
    """A TensorBoard Deployment reading the job's logs from the claim, and its Service."""
    labels = tensorboard_labels(options)
    container = _container(
        options, "tensorboard",
        command=["tensorboard", "--logdir", f"{DATA_DIR}/runs", "--bind_all",
                 "--port", str(TENSORBOARD_PORT)],
        ports=[{"name": "http", "containerPort": TENSORBOARD_PORT}],
        readinessProbe={"tcpSocket": {"port": TENSORBOARD_PORT}, "periodSeconds": 10},
        livenessProbe={"tcpSocket": {"port": TENSORBOARD_PORT}, "initialDelaySeconds": 30,
                       "periodSeconds": 10},
        volumeMounts=[{"name": "data", "mountPath": DATA_DIR, "readOnly": True}],
        resources=copy.deepcopy(TENSORBOARD_RESOURCES),
    )
    claim = {"name": "data", "persistentVolumeClaim": {"claimName": f"{options.name}-data",
                                                       "readOnly": True}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{options.name}-tensorboard"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": _pod(container, [claim])},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{options.name}-tensorboard"},
        "spec": {"selector": labels,
                 "ports": [{"name": "http", "port": TENSORBOARD_PORT, "targetPort": "http"}]},
    }
    # Pods of the namespace may read the logs (a `kubectl port-forward` is not subject to it).
    reachable = _network_policy(f"{options.name}-tensorboard", labels, {"podSelector": {}},
                                {"protocol": "TCP", "port": TENSORBOARD_PORT})
    return [deployment, service, reachable]


def _network_policy(name: str, labels: dict, source: dict, ports: dict) -> dict:
    """Pods with `labels` accept connections only from `source`, on `ports`."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [source], "ports": [ports]}]},
    }


def job_network_policy(options: ClusterOptions) -> dict:
    """The job's pods accept TCP only from each other. Any port: besides sshd's SSH_PORT (the
    launcher's mpirun starting a daemon on each worker), Open MPI's daemons call back to mpirun
    and its ranks exchange data (the tcp BTL), Horovod's Gloo and NCCL connect rank to rank, all
    on ports the kernel picks; NCCL offers no setting to pin them."""
    labels = job_labels(options)
    return _network_policy(options.name, labels, {"podSelector": {"matchLabels": labels}},
                           {"protocol": "TCP"})


def render(options: ClusterOptions, config_text: str | None) -> list[dict]:
    """Every object of one submission, in apply order (no ConfigMap for the user's own command,
    which reads no distaccum config)."""
    if bool(options.command) == (config_text is not None):
        raise ManifestError("give a distaccum config or a command to run, not both. Received: "
                            f"command={list(options.command)!r} and a config")
    config = [] if options.command else [config_map(options, config_text)]
    return [*config, volume_claim(options), job_network_policy(options), mpijob(options),
            *tensorboard(options)]


def to_yaml(documents: list[dict]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def write_kustomize_base(documents: list[dict], directory) -> list[str]:
    """Write one file per object plus a `kustomization.yaml` listing them; returns file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for document in documents:
        name = f"{document['kind'].lower()}-{document['metadata']['name']}.yaml"
        (directory / name).write_text(to_yaml([document]))
        names.append(name)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": names}
    (directory / "kustomization.yaml").write_text(to_yaml([kustomization]))
    return names
