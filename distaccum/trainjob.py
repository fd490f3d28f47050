"""Kubernetes manifests for Kubeflow Trainer v2 (`trainer.kubeflow.org/v1alpha1`): a TrainJob and
the ClusterTrainingRuntime it runs on.

Why: Trainer v2 is Kubeflow's current training API. It has one TrainJob kind for every framework,
runs each job as a JobSet, and replaces Training Operator v1's per-framework jobs. Kueue admits
TrainJobs, and Kubeflow's Python SDK lists and follows them. Choose it where the cluster runs
Kubeflow Trainer. Choose the MPIJob (`k8s.py`) where only mpi-operator is installed. Both run the
same pods (`k8s_pods.py`): the image, sshd on the workers and the same `mpirun` line
(`k8s_pods.launcher_command`).

What `render()` gives, in apply order: the config's ConfigMap `<name>-train-config` (none for a
command of your own; Trainer's own ConfigMap is `<name>-mpi-hostfile`), the data claim, the job's
NetworkPolicy, the ClusterTrainingRuntime `<name>-runtime`, the TrainJob `<name>`, and TensorBoard.
All of them except the runtime and the job are `k8s.render()`'s objects.

How Trainer v2.3 runs these. The runtime follows Trainer's own MPI runtimes (deepspeed-distributed,
mlx-distributed). The points below come from its MPI plugin and JobSet builder:
- ReplicatedJob `node` has `workers` pods, each running sshd on port 2222. ReplicatedJob `launcher`
  has one pod running `mpirun`. It carries the `trainjob-ancestor-step: trainer` label. Because
  runLauncherAsNode is false, the launcher is not in the hostfile, as with mpi-operator's launcher.
- The launcher waits for the nodes the way Trainer's runtimes make it wait. It `dependsOn` the node
  job being Ready, so JobSet creates it only when every node pod's readiness probe has passed
  (sshd answers on 2222). `publishNotReadyAddresses` publishes the nodes' DNS names from the start.
  `successPolicy` ends the job when the launcher completes, because the sshd pods never exit.
- Trainer mounts its per-job ssh key pair (a Secret, mode 0640) only into containers named `node`.
  In the launcher it also mounts the hostfile there. So both containers are named `node`, and both
  pods have fsGroup k8s_pods.USER_ID (mpiuser's group), which lets mpiuser read the key.
- The hostfile is at /etc/mpi/hostfile (Trainer's MPIHostfileDir `/etc/mpi` + `hostfile`). That is
  the same path as mpi-operator's `k8s_pods.HOSTFILE`, so the launcher runs
  `k8s_pods.launcher_command` as it is. Each line reads
  `<job>-node-0-<i>.<job> slots=<numProcPerNode>`.
- TrainJob.spec.trainer (image, command, env, resourcesPerNode) is applied only to the `node`
  container of the ancestor-labelled job, that is, the launcher. So the runtime holds everything
  the node pods need: the image, their CPU requests and GPU limits, and the volumes. One runtime
  is rendered per job. `resourcesPerNode` is left out because it would put the workers' GPUs on the
  launcher.
- Trainer sets OMPI_MCA_plm_rsh_args=`-o ConnectionAttempts=10` on the launcher, replacing the
  `-p 2222` in `k8s_pods.launcher_pod`. Open MPI 5, the image's, reads only PRTE_MCA_plm_ssh_args,
  which Trainer leaves alone, so mpirun still reaches port 2222. An Open MPI 4 image would try port
  22.

A ClusterTrainingRuntime is cluster-scoped. Jobs with the same name in two namespaces therefore
share `<name>-runtime`, which is identical for identical options.
"""

from __future__ import annotations

from distaccum import k8s, k8s_pods

API_GROUP = "trainer.kubeflow.org"
API_VERSION = f"{API_GROUP}/v1alpha1"
ANCESTOR_LABEL = f"{API_GROUP}/trainjob-ancestor-step"
FRAMEWORK_LABEL = f"{API_GROUP}/framework"
HOSTFILE = "/etc/mpi/hostfile"  # where Trainer's MPI plugin mounts the hostfile it generates
LAUNCHER, NODE = "launcher", "node"  # the PodSet names, and the container name, Trainer looks for
_POD_SUFFIX = "-abcde"  # JobSet checks pod names with a stand-in for the pod's random suffix


def runtime_name(options: k8s_pods.ClusterOptions) -> str:
    return f"{options.name}-runtime"


def _pod_template(replica_spec: dict) -> dict:
    """An MPIJob replica's pod template (its labels select it for the job's NetworkPolicy), made
    into a Trainer pod. The container is named `node` so Trainer mounts the ssh keys into it.
    fsGroup lets mpiuser read the keys in their 0640 Secret. The replica's restartPolicy moves
    into the pod, where JobSet's Jobs read it."""
    template = replica_spec["template"]
    pod = template["spec"]
    [container] = pod["containers"]
    container["name"] = NODE
    pod["securityContext"]["fsGroup"] = k8s_pods.USER_ID
    pod["restartPolicy"] = replica_spec["restartPolicy"]
    return template


def cluster_training_runtime(options: k8s_pods.ClusterOptions) -> dict:
    """The pods of one distaccum job. The node pods are the MPIJob's workers and the launcher pod
    is the MPIJob's launcher, except that its command comes from the TrainJob."""
    launcher = _pod_template(k8s.launcher_replica(options))
    del launcher["spec"]["containers"][0]["command"]  # TrainJob.spec.trainer.command sets it
    nodes = _pod_template(k8s.worker_replica(options))
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": runtime_name(options),
                     "labels": {FRAMEWORK_LABEL: "mpi", "app.kubernetes.io/name": "distaccum"}},
        "spec": {
            "mlPolicy": {
                "numNodes": options.workers,
                "mpi": {
                    "numProcPerNode": options.slots_per_worker,  # the hostfile's slots= per node
                    "mpiImplementation": "OpenMPI",
                    "sshAuthMountPath": f"{k8s_pods.HOME}/.ssh",
                    "runLauncherAsNode": False,
                },
            },
            "template": {"spec": {
                "network": {"publishNotReadyAddresses": True},
                "successPolicy": {"operator": "All", "targetReplicatedJobs": [LAUNCHER]},
                # JobSet refuses dependsOn on the first ReplicatedJob: the nodes come first.
                "replicatedJobs": [
                    {"name": NODE,
                     "template": {"spec": {"template": nodes}}},
                    {"name": LAUNCHER,
                     "dependsOn": [{"name": NODE, "status": "Ready"}],
                     "template": {"metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                                  "spec": {"template": launcher}}},
                ],
            }},
        },
    }


def _check_pod_names(options: k8s_pods.ClusterOptions) -> None:
    """JobSet names pods `<job>-<replicatedJob>-0-<index>-<5 random>` and refuses a TrainJob whose
    longest pod name would exceed 63 characters. The launcher's name is the longest one."""
    longest = max((f"{options.name}-{LAUNCHER}-0-0{_POD_SUFFIX}",
                   f"{options.name}-{NODE}-0-{options.workers - 1}{_POD_SUFFIX}"), key=len)
    if len(longest) > 63:
        raise k8s_pods.ManifestError(
            f"name too long for a TrainJob: pod {longest!r} exceeds 63 characters (JobSet adds "
            f"{len(_POD_SUFFIX)} characters). Received: name={options.name!r}")


def train_job(options: k8s_pods.ClusterOptions) -> dict:
    """The job: which runtime, how many nodes, and the launcher's image and `mpirun` line. That
    line uses the hostfile Trainer mounts (HOSTFILE, the same path as mpi-operator's)."""
    _check_pod_names(options)
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": options.name, "labels": {"app.kubernetes.io/name": "distaccum"}},
        "spec": {
            "runtimeRef": {"apiGroup": API_GROUP, "kind": "ClusterTrainingRuntime",
                           "name": runtime_name(options)},
            "trainer": {
                "image": options.image,
                "command": k8s_pods.launcher_command(options),
                "numNodes": options.workers,
            },
        },
    }


def render(options: k8s_pods.ClusterOptions, config_text: str | None) -> list[dict]:
    """Every object of one Trainer submission, in apply order. It is the MPIJob submission with
    the runtime and the TrainJob in place of the MPIJob, so the two cannot drift apart."""
    if options.elastic:
        raise k8s.ManifestError(
            "Kubeflow Trainer v2 has no elastic mode for MPI (its TrainJob's node count is "
            "fixed): render an elastic job as an MPIJob (--api mpijob). Received: --api trainjob "
            f"with min_workers={options.min_workers}")
    documents = k8s.render(options, config_text)  # also refuses a config together with a command
    at = [document["kind"] for document in documents].index("MPIJob")
    return [*documents[:at], cluster_training_runtime(options), train_job(options),
            *documents[at + 1:]]
