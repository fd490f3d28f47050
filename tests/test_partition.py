"""A network partition, really injected: two workers in two network namespaces joined by a veth
pair, as two hosts of an `mpirun` hostfile or of `horovodrun --gloo -H`; mid-run the link goes
down while both processes live on. Every worker must then exit within `collective_timeout`
instead of waiting in the allreduce until TCP gives up.

The launchers reach the second "host" through an ssh stand-in that runs the command in that
host's namespace. Both namespaces share this machine's hostname, which misleads Open MPI's
hierarchical collectives (HAN) into treating the two as one node; a real cluster has distinct
names, so HAN is turned off here only. Both veth ends are named alike, as horovodrun wants one
interface name common to all hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from conftest import REPO_ROOT, VENV_BIN, worker_processes
from test_reliability import _environment, _wait_for

pytestmark = pytest.mark.multiworker

DIGITS = str(REPO_ROOT / "distaccum" / "configs" / "digits.yaml")
SUBNET = "10.231.0.0/24"
HOSTS = ("10.231.0.1", "10.231.0.2")
INTERFACE = "dpart0"  # the veth end's name in both namespaces


@pytest.fixture
def two_hosts(tmp_path):
    """(namespaces, hostfile, ssh stand-in): hosts HOSTS[i] in namespace i, one veth between."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = os.getpid() % 100_000
    namespaces = (f"distaccum-a{tag}", f"distaccum-b{tag}")
    ends = (f"dva{tag}", f"dvb{tag}")
    commands = [["ip", "netns", "add", namespaces[0]], ["ip", "netns", "add", namespaces[1]],
                ["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]]]
    for namespace, end, host in zip(namespaces, ends, HOSTS):
        commands += [["ip", "link", "set", end, "netns", namespace],
                     ["ip", "-n", namespace, "link", "set", end, "name", INTERFACE],
                     ["ip", "-n", namespace, "addr", "add", f"{host}/24", "dev", INTERFACE],
                     ["ip", "-n", namespace, "link", "set", INTERFACE, "up"],
                     ["ip", "-n", namespace, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        ssh = bin_dir / "ssh"  # horovodrun runs `ssh` from PATH; mpirun is told where it is
        skip_options = ('while [ $# -gt 0 ]; do case "$1" in -o|-p|-i|-l) shift 2 ;; '
                        '-*) shift ;; *) break ;; esac; done\n')
        ssh.write_text("#!/bin/sh\n# ssh [OPTIONS] HOST [OPTIONS] COMMAND, for hosts that are "
                       "namespaces here.\n" + skip_options + "host=$1; shift\n" + skip_options
                       + 'case "$host" in\n'
                       + "".join(f"  {h}) ns={n} ;;\n" for h, n in zip(HOSTS, namespaces))
                       + '  *) echo "unknown host $host" >&2; exit 255 ;;\nesac\n'
                       'exec ip netns exec "$ns" sh -c "$*"\n')
        ssh.chmod(0o755)
        yield namespaces, hostfile, ssh
    finally:
        for namespace in namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _launch_command(launcher: str, hostfile, ssh, train: str) -> list[str]:
    if launcher == "mpirun":
        return [str(VENV_BIN / "mpirun"), "--hostfile", str(hostfile), "-np", "2",
                "--mca", "plm_ssh_agent", str(ssh), "--mca", "oob_tcp_if_include", SUBNET,
                "--mca", "btl_tcp_if_include", SUBNET, "--mca", "btl", "tcp,self",
                "--mca", "coll", "^han", "-x", "DISTACCUM_BACKEND", "sh", "-c", train]
    return [str(VENV_BIN / "horovodrun"), "--gloo", "-np", "2", "-H",
            ",".join(f"{host}:1" for host in HOSTS), "--network-interface", INTERFACE,
            "sh", "-c", train]


@pytest.mark.parametrize("launcher, backend, rank_variable",
                         [("mpirun", "mpi", "OMPI_COMM_WORLD_RANK"),
                          ("horovodrun", "horovod", "HOROVOD_RANK")])
def test_every_worker_exits_within_collective_timeout_when_the_link_is_cut(
        tmp_path, two_hosts, launcher, backend, rank_variable):
    namespaces, hostfile, ssh = two_hosts
    timeout = 10
    logdir = tmp_path / "run"
    # Each rank writes its own stderr on its own host: the launcher's output path crosses the cut.
    train = (f"exec {VENV_BIN / 'distaccum'} train --config {DIGITS} --set logdir={logdir} "
             "--set epochs=null --set update_steps=100000 --set checkpoint_interval=5 "
             f"--set collective_timeout={timeout} 2> {tmp_path}/rank-${rank_variable}.err")
    command = ["ip", "netns", "exec", namespaces[0],
               *_launch_command(launcher, hostfile, ssh, train)]
    output = (tmp_path / "launcher.log").open("w+")
    environment = _environment()
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True,
                               env={**environment, "DISTACCUM_BACKEND": backend,
                                    "PATH": f"{ssh.parent}:{environment['PATH']}"})
    try:
        _wait_for((logdir / "checkpoints" / "update-000000005").exists, process)
        workers = worker_processes(process)
        assert sorted(workers) == [0, 1]
        subprocess.run(["ip", "-n", namespaces[0], "link", "set", INTERFACE, "down"], check=True)
        cut_at = time.monotonic()
        exited = {}
        while len(exited) < 2 and time.monotonic() < cut_at + timeout + 30:
            for rank, worker in workers.items():
                if rank not in exited and (not worker.is_running()
                                           or worker.status() == "zombie"):
                    exited[rank] = time.monotonic() - cut_at
            time.sleep(0.05)
        print(f"seconds from the cut to each rank's exit: {exited}")
        assert sorted(exited) == [0, 1], f"still running {timeout + 30} s after the cut: {exited}"
        assert max(exited.values()) < timeout + 15, exited
        for rank in (0, 1):
            error = (tmp_path / f"rank-{rank}.err").read_text()
            assert (f"distaccum: error: rank {rank}: update step " in error
                    and f"'s allreduce did not complete within collective_timeout={timeout} s"
                    in error), error[-2000:]
    finally:
        # mpirun itself may still wait for the daemon on the far side of the cut.
        os.killpg(process.pid, 9)
        process.wait(timeout=30)
        output.close()
