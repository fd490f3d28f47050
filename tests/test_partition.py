"""A network partition, really injected: two workers in two network namespaces joined by a veth
pair, as two hosts of an `mpirun` hostfile; mid-run the link goes down while both processes
live on. Every worker must then exit within `collective_timeout` instead of waiting in the
allreduce until TCP gives up.

`mpirun` reaches the second "host" through an ssh stand-in that runs the command in that host's
namespace. Both namespaces share this machine's hostname, which misleads Open MPI's hierarchical
collectives (HAN) into treating the two as one node; a real cluster has distinct names, so HAN is
turned off here only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from conftest import REPO_ROOT, VENV_BIN
from test_reliability import _environment, _wait_for, _workers

pytestmark = pytest.mark.multiworker

DIGITS = str(REPO_ROOT / "distaccum" / "configs" / "digits.yaml")
SUBNET = "10.231.0.0/24"
HOSTS = ("10.231.0.1", "10.231.0.2")


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
                     ["ip", "-n", namespace, "addr", "add", f"{host}/24", "dev", end],
                     ["ip", "-n", namespace, "link", "set", end, "up"],
                     ["ip", "-n", namespace, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
        ssh = tmp_path / "ssh-to-namespace"
        ssh.write_text("#!/bin/sh\n# ssh HOST COMMAND, for hosts that are namespaces here.\n"
                       'host=$1; shift\ncase "$host" in\n'
                       + "".join(f"  {h}) ns={n} ;;\n" for h, n in zip(HOSTS, namespaces))
                       + '  *) echo "unknown host $host" >&2; exit 255 ;;\nesac\n'
                       'exec ip netns exec "$ns" sh -c "$*"\n')
        ssh.chmod(0o755)
        yield namespaces, ends, hostfile, ssh
    finally:
        for namespace in namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def test_every_worker_exits_within_collective_timeout_when_the_link_is_cut(tmp_path, two_hosts):
    namespaces, ends, hostfile, ssh = two_hosts
    timeout = 10
    logdir = tmp_path / "run"
    # Each rank writes its own stderr on its own host: the launcher's output path crosses the cut.
    train = (f"exec {VENV_BIN / 'distaccum'} train --config {DIGITS} --set logdir={logdir} "
             "--set epochs=null --set update_steps=100000 --set checkpoint_interval=5 "
             f"--set collective_timeout={timeout} 2> {tmp_path}/rank-$OMPI_COMM_WORLD_RANK.err")
    command = ["ip", "netns", "exec", namespaces[0], str(VENV_BIN / "mpirun"),
               "--hostfile", str(hostfile), "-np", "2", "--mca", "plm_ssh_agent", str(ssh),
               "--mca", "oob_tcp_if_include", SUBNET, "--mca", "btl_tcp_if_include", SUBNET,
               "--mca", "btl", "tcp,self", "--mca", "coll", "^han",
               "-x", "DISTACCUM_BACKEND", "sh", "-c", train]
    output = (tmp_path / "launcher.log").open("w+")
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True,
                               env={**_environment(), "DISTACCUM_BACKEND": "mpi"})
    try:
        _wait_for((logdir / "checkpoints" / "update-000000005").exists, process)
        workers = _workers(process)
        assert sorted(workers) == [0, 1]
        subprocess.run(["ip", "-n", namespaces[0], "link", "set", ends[0], "down"], check=True)
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
