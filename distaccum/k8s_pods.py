"""The pods of a distaccum submission: their containers and what they may do.

This module owns everything that forms a pod or a container, for the MPIJob (`k8s.py`) and the
TrainJob (`trainjob.py`) alike: the options a submission varies (`ClusterOptions`), the image, the
command lines, the volumes each container mounts, resources, probes, GPU settings, and the
security settings under which Pod Security's "restricted" profile admits every pod. The objects
that run these pods (the MPIJob's replicas, TensorBoard's Deployment, the TrainJob's runtime) and
the objects that select or serve them (labels, NetworkPolicies, the Service, the claim, the
ConfigMap) belong to `k8s.py` and `trainjob.py`.

Why apart: what a pod may do is one policy (docs/kubernetes.md, "Security: what the pods may do"),
and tests/pod_security.py checks it on every rendered pod. Kept in one module, it is the same
for both APIs' manifests, which reach it through public names. This module imports no manifest
module, so `k8s.py` and `trainjob.py` import it without a cycle.

Workers with GPUs run the GPU image (`launch/setup.sh --gpu` inside: TensorFlow with CUDA, Horovod
with NCCL), tagged `<version>-gpu`. The CPU image has no CUDA, so `ClusterOptions` refuses it
together with GPUs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from distaccum import launcher

SSH_PORT = 2222
USER_ID = 10000  # 10000 and up: no clash with a node's own users (checkov CKV_K8S_40)
HOME = "/home/mpiuser"
CONFIG_DIR = "/etc/distaccum"
DATA_DIR = "/data"
HOSTFILE = "/etc/mpi/hostfile"  # where mpi-operator mounts the hostfile it generates
# Beside it, the script mpi-operator rewrites as worker pods start and stop: one running worker
# pod per line (an elastic job's `horovodrun --host-discovery-script`).
DISCOVER_HOSTS = "/etc/mpi/discover_hosts.sh"
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
# horovodrun imports TensorFlow (its check that Horovod has Gloo): about 0.5 GB more.
ELASTIC_LAUNCHER_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"},
                              "limits": {"memory": "1Gi"}}
# A worker pod that failed (its host blacklisted) is tried again after 10 s, then after longer
# waits up to 2 min: a pod restarted under the same name rejoins the job.
BLACKLIST_COOLDOWN_SECONDS = (10, 120)
TENSORBOARD_RESOURCES = {"requests": {"cpu": "250m", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
_MEMORY = re.compile(r"^([1-9][0-9]*)(Mi|Gi)$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(ValueError):
    """An option that would produce manifests the cluster or mpi-operator rejects."""


@dataclass(frozen=True)
class ClusterOptions:
    """What varies between submissions. Every other field of the manifests follows from these.

    Owns the validated values and what follows from them alone (`slots_per_worker`,
    `worker_memory`). It does not own the manifests built from them (`k8s.py`, `trainjob.py`) or
    the check that a training config fits the ranks (`k8s.check_ranks`). It lives with the pods
    because most of its fields and checks concern them (image, memory, workdir, pod names), and
    because `k8s.py` can then build on this module without this module importing `k8s.py`.

    Raises:
        ManifestError: on construction, for a value the cluster or mpi-operator would reject.
    """

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
    # An elastic job (`horovodrun`'s elastic mode) trains on as many worker pods as are running,
    # from `min_workers` to `max_workers` (None: `workers`); None: not elastic (`mpirun`).
    min_workers: int | None = None
    max_workers: int | None = None

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
        if self.min_workers is None and self.max_workers is not None:
            raise ManifestError(f"max_workers is an elastic job's: give min_workers too. "
                                f"Received: max_workers={self.max_workers}")
        if self.min_workers is not None:
            if self.max_workers is None:
                object.__setattr__(self, "max_workers", self.workers)
            if not 1 <= self.min_workers <= self.workers <= self.max_workers:
                raise ManifestError(
                    f"an elastic job needs 1 <= min_workers <= workers <= max_workers. Received: "
                    f"min_workers={self.min_workers}, workers={self.workers}, "
                    f"max_workers={self.max_workers}")
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
    def elastic(self) -> bool:
        return self.min_workers is not None

    @property
    def worker_counts(self) -> range:
        """The numbers of worker pods the job may train on."""
        return range(self.min_workers or self.workers, (self.max_workers or self.workers) + 1)

    @property
    def worker_memory(self) -> str:
        """A worker pod's memory request and limit: `memory_per_rank` for each of its ranks."""
        amount, unit = _MEMORY.match(self.memory_per_rank).groups()
        return f"{int(amount) * self.slots_per_worker}{unit}"


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
    command = ["distaccum", "launch"] if runs_distaccum_train(options) else []
    if options.elastic:
        command += elastic_launcher(options)
    else:
        forwarded = ["PATH", "PYTHONUNBUFFERED"]
        if options.gpus_per_worker:
            forwarded += ["NCCL_DEBUG", "NCCL_SOCKET_IFNAME"]
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


def elastic_launcher(options: ClusterOptions) -> list[str]:
    """An elastic job's `horovodrun`: it starts once `min_workers` worker pods run (so a
    restarted launcher trains on as many as are running, not waiting for all), adds and drops
    workers as mpi-operator's discovery script lists them, up to `max_workers`, and reaches
    their sshd on SSH_PORT (over eth0, the pods' network, which it need not probe for). It
    passes its environment on and starts the ranks in its own working directory (the
    launcher's `workingDir`: `--workdir`)."""
    slots = options.slots_per_worker
    return ["horovodrun", "--gloo", "--network-interface", "eth0", "--ssh-port", str(SSH_PORT),
            "-np", str(options.min_workers * slots), "--min-np", str(options.min_workers * slots),
            "--max-np", str(options.max_workers * slots), "--slots-per-host", str(slots),
            "--blacklist-cooldown-range", *map(str, BLACKLIST_COOLDOWN_SECONDS),
            "--host-discovery-script", DISCOVER_HOSTS]


def config_map_name(options: ClusterOptions) -> str:
    """The training config's ConfigMap, which every worker mounts at CONFIG_DIR."""
    return f"{options.name}{CONFIG_MAP_SUFFIX}"


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


def launcher_pod(options: ClusterOptions) -> dict:
    """The launcher's pod spec: one container running `launcher_command`'s `mpirun`, which
    reaches the workers' sshd on SSH_PORT."""
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
    resources = ELASTIC_LAUNCHER_RESOURCES if options.elastic else LAUNCHER_RESOURCES
    container = _container(options, "launcher", command=launcher_command(options),
                           env=environment, resources=copy.deepcopy(resources))
    if options.elastic and options.workdir:  # horovodrun starts the ranks in its own
        container["workingDir"] = options.workdir
    return _pod(container, terminationGracePeriodSeconds=TERMINATION_GRACE_SECONDS)


def worker_pod(options: ClusterOptions) -> dict:
    """A worker's pod spec: sshd, in which the launcher's `mpirun` starts the worker's ranks,
    with the data claim, the training config (unless the user runs their own command) and,
    with GPUs, the GPUs and NCCL's shared memory."""
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
    if runs_distaccum_train(options) and not options.elastic:
        # sshd (PID 1) would exit on the pod's SIGTERM and take the ranks with it, unsignalled:
        # the kubelet runs this first, and it returns once the job has stopped with a checkpoint.
        # Not in an elastic job: there a worker pod that stops is a worker that leaves, and the
        # others go on from the last update (stopping its ranks would stop them all).
        container["lifecycle"] = {"preStop": {"exec": {"command": STOP_RANKS}}}
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": f"{options.name}-data"}}]
    if not options.command:  # `distaccum train` reads the ConfigMap's config on every rank
        container["volumeMounts"].insert(0, {"name": "config", "mountPath": CONFIG_DIR,
                                             "readOnly": True})
        volumes.insert(0, {"name": "config", "configMap": {"name": config_map_name(options)}})
    if options.gpus_per_worker:
        _add_gpu_settings(container, volumes, options.gpus_per_worker)
    return _pod(container, volumes, terminationGracePeriodSeconds=TERMINATION_GRACE_SECONDS)


def _add_gpu_settings(container: dict, volumes: list, gpus: int) -> None:
    container["resources"]["limits"]["nvidia.com/gpu"] = gpus
    # NCCL's shared-memory transport needs more than the container runtime's 64 MiB /dev/shm.
    container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})


def tensorboard_pod(options: ClusterOptions) -> dict:
    """TensorBoard's pod spec: it serves TENSORBOARD_PORT and reads the job's logs from the
    claim, mounted read-only."""
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
    return _pod(container, [claim])
