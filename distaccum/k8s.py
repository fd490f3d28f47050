"""Kubernetes manifests for a Kubeflow MPIJob (mpi-operator, `kubeflow.org/v2beta1`).

This module owns the objects of one submission and how they refer to each other: the MPIJob and
its replicas, the config's ConfigMap, the data claim, the job's and TensorBoard's NetworkPolicies,
TensorBoard's Deployment and Service, and their YAML or Kustomize base (`render`, `to_yaml`,
`write_kustomize_base`). The pods these objects run, and what those pods may do, belong to
`k8s_pods.py`, which `trainjob.py` shares. `ClusterOptions` and `ManifestError` live there too, and
this module's interface takes and raises them as `k8s.ClusterOptions` and `k8s.ManifestError`.

The single source of truth: `k8s/base` and the overlays are checked against `render()` by the
tests. One value, `slots_per_worker` (the GPUs per worker when there are GPUs), sets the
MPIJob's `slotsPerWorker`, and so the hostfile the operator writes; `mpirun` is given no `-np`,
so it starts exactly one rank per hostfile slot, and the GPU limit is that same number.

A config is checked against the ranks it is rendered for (`check_ranks`), so that a job resized
under the same name (claim, logdir) resumes on the new ranks instead of stopping at start-up.

An elastic job (`ClusterOptions.min_workers`) runs `horovodrun`'s elastic mode on the discovery
script mpi-operator keeps (`k8s_pods.elastic_launcher`): its launcher starts at once and trains on
the worker pods that run, from min to max, each count checked against the config; a worker pod
that stops is a worker that leaves (no preStop hook stopping every rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from distaccum import k8s_pods, order
# render() takes ClusterOptions and raises ManifestError: both are part of this module's interface.
from distaccum.k8s_pods import ClusterOptions, ManifestError

if TYPE_CHECKING:
    from distaccum.config import TrainConfig

API_VERSION = "kubeflow.org/v2beta1"


def check_ranks(options: ClusterOptions, config: TrainConfig) -> None:
    """Refuse a config that the rendered ranks cannot run, before it reaches the cluster.

    Every slot is a rank, so num_workers = workers x slots per worker. The job would stop at
    start-up (every rank, one line) unless the global batch is a whole number of micro-batches
    per rank and num_workers divides the data's partitions; an elastic job, at every count of
    worker pods it may train on, and only with `global_batch_size` (k follows the count).

    Raises:
        ManifestError: one line naming the workers, the slots and the config's values.
    """
    if options.elastic and config.global_batch_size is None:
        raise ManifestError(
            "an elastic job keeps the global batch while workers come and go: give the config "
            f"global_batch_size, not accumulation_steps. Received: min_workers="
            f"{options.min_workers}, accumulation_steps={config.accumulation_steps}")
    for workers in options.worker_counts:
        num_workers = workers * options.slots_per_worker
        try:
            config.accumulation_steps_on(num_workers)
            order.check_num_workers(num_workers, config.partitions)
        except ValueError as error:
            raise ManifestError(
                f"the config cannot run on workers={workers} x slots_per_worker="
                f"{options.slots_per_worker} = num_workers {num_workers}: {error}") from None


def job_labels(options: ClusterOptions) -> dict:
    """The labels of the job's launcher and worker pods, which its NetworkPolicy selects."""
    return {"app.kubernetes.io/name": "distaccum", "distaccum/job": options.name}


def tensorboard_labels(options: ClusterOptions) -> dict:
    return {"app.kubernetes.io/name": "distaccum-tensorboard", "distaccum/job": options.name}


def _replica(options: ClusterOptions, replicas: int, pod: dict) -> dict:
    """An MPIJob replica spec running `pod`, labelled for the job's NetworkPolicy, with the
    restart policy (see `mpijob`)."""
    return {
        "replicas": replicas,
        "restartPolicy": k8s_pods.RESTART_POLICY,
        "template": {"metadata": {"labels": job_labels(options)}, "spec": pod},
    }


def launcher_replica(options: ClusterOptions) -> dict:
    """The MPIJob's one launcher. `trainjob.py` runs it as the TrainJob runtime's launcher."""
    return _replica(options, 1, k8s_pods.launcher_pod(options))


def worker_replica(options: ClusterOptions) -> dict:
    """The MPIJob's workers. `trainjob.py` runs them as the TrainJob runtime's nodes."""
    return _replica(options, options.workers, k8s_pods.worker_pod(options))


def mpijob(options: ClusterOptions) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "MPIJob",
        "metadata": {"name": options.name, "labels": {"app.kubernetes.io/name": "distaccum"}},
        "spec": {
            "slotsPerWorker": options.slots_per_worker,
            "mpiImplementation": "OpenMPI",
            # An elastic launcher starts at once: horovodrun waits for min_workers itself.
            "launcherCreationPolicy": "AtStartup" if options.elastic else "WaitForWorkersReady",
            "sshAuthMountPath": f"{k8s_pods.HOME}/.ssh",
            "runPolicy": {
                "cleanPodPolicy": "Running",
                "backoffLimit": 3,
                "ttlSecondsAfterFinished": 86400,
            },
            # Each replica spec carries restartPolicy: mpi-operator overwrites a pod template's
            # with it (and records a warning event for the launcher's).
            "mpiReplicaSpecs": {"Launcher": launcher_replica(options),
                                "Worker": worker_replica(options)},
        },
    }


def config_map(options: ClusterOptions, config_text: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": k8s_pods.config_map_name(options)},
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
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{options.name}-tensorboard"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": k8s_pods.tensorboard_pod(options)},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{options.name}-tensorboard"},
        "spec": {"selector": labels,
                 "ports": [{"name": "http", "port": k8s_pods.TENSORBOARD_PORT,
                            "targetPort": "http"}]},
    }
    # Pods of the namespace may read the logs (a `kubectl port-forward` is not subject to it).
    reachable = _network_policy(f"{options.name}-tensorboard", labels, {"podSelector": {}},
                                {"protocol": "TCP", "port": k8s_pods.TENSORBOARD_PORT})
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
    """The job's pods accept TCP only from each other. Any port: besides sshd's
    k8s_pods.SSH_PORT (the launcher's mpirun starting a daemon on each worker), Open MPI's daemons
    call back to mpirun and its ranks exchange data (the tcp BTL), Horovod's Gloo and NCCL connect
    rank to rank, all on ports the kernel picks; NCCL offers no setting to pin them."""
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
