"""The image, checked where it cannot be built: its Dockerfile's text, and its scripts and configs
run here as the pods run them. sshd and ssh work as mpiuser (uid 1000) with every capability
dropped, no new privileges and a read-only root filesystem, with the host key from the job's
Secret as mpi-operator and Kubeflow Trainer mount it; `mpirun` trains through them; the build
fails when the image holds a private key or a file with file capabilities."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from distaccum import k8s, k8s_pods

IMAGE_DIR = REPO_ROOT / "k8s" / "image"
DOCKERFILE = REPO_ROOT / "k8s" / "Dockerfile"
SSHD = Path("/usr/sbin/sshd")
# The Secret's files as the kubelet writes them (mode, group): root owns them. mpi-operator leaves
# defaultMode unset (0644); Trainer sets 0640 and the pod's fsGroup makes mpiuser's group theirs.
SECRET_FILES = {"mpi-operator": (0o644, 0), "trainer": (0o640, k8s_pods.USER_ID)}
# security.capability as `setcap cap_net_raw+ep` writes it (VFS_CAP_REVISION_2).
NET_RAW_CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)

# A pod of the image in a mount namespace: mpiuser's home with the image's files, the job's Secret
# at sshAuthMountPath, every mount read-only, and a fresh /tmp (the pod's emptyDir). $SRC holds the
# files; the namespace's PID 1 ends every process started here when it exits.
POD = r"""
set -euo pipefail
mount --bind "$SRC/passwd" /etc/passwd
mount --bind "$SRC/group" /etc/group
mount -t tmpfs -o mode=0755 tmpfs /home
mkdir -p /home/mpiuser/.ssh /home/job /home/data
install -o "$USER_ID" -g "$USER_ID" -m 0644 "$SRC/sshd_config" /home/mpiuser/.sshd_config
chown "$USER_ID:$USER_ID" /home/mpiuser
mount -t tmpfs -o mode=0755 tmpfs /home/mpiuser/.ssh
for file in id_rsa id_rsa.pub authorized_keys; do
  install -o 0 -g "$SECRET_GROUP" -m "$SECRET_MODE" "$SRC/$file" "/home/mpiuser/.ssh/$file"
done
mount -t tmpfs -o mode=0755 tmpfs /etc/ssh/ssh_config.d
cp "$SRC/ssh_config" /etc/ssh/ssh_config.d/distaccum.conf
cp -r "$SRC/job/." /home/job/
mount -t tmpfs -o mode=0755 tmpfs /run  # the image has no /run/sshd: non-root sshd needs none
# The venv at the image's path, and the interpreter it links to reachable by mpiuser.
mkdir /home/venv /home/python
mount --bind "$VENV" /home/venv
if [ -n "$HIDDEN" ]; then
  mount --bind "$HIDDEN/$HIDDEN_CHILD" /home/python
  mount -t tmpfs -o mode=0755 tmpfs "$HIDDEN"
  mkdir "$HIDDEN/$HIDDEN_CHILD"
  mount --move /home/python "$HIDDEN/$HIDDEN_CHILD"
fi
mount -t tmpfs -o mode=0755 tmpfs /opt
mkdir -p /opt/distaccum/.venv
mount --move /home/venv /opt/distaccum/.venv
# A checkout under /tmp, which the pod's emptyDir below hides, stays at its own path: the venv's
# scripts name their interpreter there.
if [ -n "$CHECKOUT_IN_TMP" ]; then
  mkdir /home/checkout
  mount --bind "$CHECKOUT_IN_TMP" /home/checkout
fi
for target in $(findmnt -rn -o TARGET); do  # (a mount under one of ours is out of reach)
  case "$target" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  if [ -e "$target" ]; then mount -o remount,bind,ro "$target"; fi
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
if [ -n "$CHECKOUT_IN_TMP" ]; then
  mkdir -p "$CHECKOUT_IN_TMP"
  mount --no-mtab --move /home/checkout "$CHECKOUT_IN_TMP"  # (/run/mount is read-only now)
fi
mount -t tmpfs -o mode=0777 tmpfs /home/data
cd /
as_mpiuser() {
  setpriv --reuid="$USER_ID" --regid="$USER_ID" --groups="$USER_ID" --inh-caps=-all \
    --bounding-set=-all --no-new-privs \
    env -i HOME=/home/mpiuser PATH=/opt/distaccum/.venv/bin:/usr/bin:/bin "$@"
}
as_mpiuser /usr/sbin/sshd -De -f /home/mpiuser/.sshd_config -p "$PORT" &
for _ in $(seq 100); do (: > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
"""


def _free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def _hidden_ancestor(path: Path) -> tuple[str, str]:
    """The first directory above path that others may not enter, and its child on the way."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            return str(parent), path.relative_to(parent).parts[0]
    return "", ""


def _locked_down_pod(tmp_path: Path, secret: str, script: str, job_files: dict[str, str],
                     timeout: float, **variables: str) -> subprocess.CompletedProcess:
    """Run `script` (bash, given `variables`) as root in a locked-down pod, after sshd has started
    there."""
    missing = [tool for tool in ("setpriv", "unshare", "ssh", "ssh-keygen")
               if not shutil.which(tool)]
    if os.geteuid() != 0 or not SSHD.exists() or missing:
        pytest.skip("needs root, /usr/sbin/sshd (.ci/run installs openssh-server) and "
                    f"util-linux's setpriv and unshare; missing here: {missing or 'root or sshd'}")
    source = tmp_path / "pod"
    (source / "job").mkdir(parents=True)
    for name, text in job_files.items():
        (source / "job" / name).write_text(text)
    # The job's key pair as both operators make it: ECDSA P-521, the private key in PEM.
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-m", "PEM", "-N", "",
                    "-f", str(source / "id_rsa")], check=True)
    shutil.copy(source / "id_rsa.pub", source / "authorized_keys")
    for name in ("sshd_config", "ssh_config"):
        shutil.copy(IMAGE_DIR / name, source / name)
    for name, entry in (("passwd",
                         f"mpiuser:x:{k8s_pods.USER_ID}:{k8s_pods.USER_ID}::{k8s_pods.HOME}:/bin/bash"),
                        ("group", f"mpiuser:x:{k8s_pods.USER_ID}:")):
        kept = [line for line in Path("/etc", name).read_text().splitlines()
                if line.split(":")[2] != str(k8s_pods.USER_ID) and not line.startswith("mpiuser:")]
        (source / name).write_text("\n".join([*kept, entry]) + "\n")
    mode, group = SECRET_FILES[secret]
    hidden, hidden_child = _hidden_ancestor(Path(sys.executable).resolve())
    env = {"PATH": os.environ["PATH"], "SRC": str(source), "PORT": str(_free_port()),
           "SECRET_MODE": f"{mode:o}", "SECRET_GROUP": str(group), "USER_ID": str(k8s_pods.USER_ID),
           "VENV": sys.prefix,
           "HIDDEN": hidden, "HIDDEN_CHILD": hidden_child,
           "CHECKOUT_IN_TMP": str(REPO_ROOT) if REPO_ROOT.is_relative_to("/tmp") else "",
           **variables}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                           "--mount-proc", "--kill-child", "bash", "-c", POD + script],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("secret", SECRET_FILES)
def test_ssh_runs_command_through_sshd_when_pod_is_locked_down(tmp_path, secret):
    remote = ("id -u; echo PATH=$PATH; echo KERAS_HOME=$KERAS_HOME; "
              "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; touch ~/written")
    completed = _locked_down_pod(tmp_path, secret, 'as_mpiuser ssh -p "$PORT" localhost "$REMOTE"',
                                 {}, timeout=60, REMOTE=remote)
    assert completed.returncode != 0, "the home directory should be read-only"
    assert "Read-only file system" in completed.stderr, completed.stderr
    assert completed.stdout.split("\n")[:6] == [
        str(k8s_pods.USER_ID), "PATH=/opt/distaccum/.venv/bin:/usr/local/bin:/usr/bin:/bin",
        "KERAS_HOME=/tmp/keras", "CapEff:\t0000000000000000", "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1"], completed.stderr


@pytest.mark.multiworker
def test_mpirun_trains_through_sshd_when_pod_is_locked_down(tmp_path):
    digits = REPO_ROOT / "distaccum" / "configs" / "digits.yaml"
    documents = k8s.render(k8s.ClusterOptions(),
                           digits.read_text().replace("epochs: 30", "update_steps: 2"))
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    launcher = next(d for d in documents if d["kind"] == "MPIJob")["spec"]["mpiReplicaSpecs"][
        "Launcher"]["template"]["spec"]["containers"][0]
    # 127.0.0.2 is not one of this machine's addresses to Open MPI: it starts prted through ssh.
    local = {k8s_pods.HOSTFILE: "/home/job/hostfile",
             f"{k8s_pods.CONFIG_DIR}/config.yaml": "/home/job/config.yaml",
             f"logdir={k8s_pods.DATA_DIR}/runs/distaccum": "logdir=/home/data/runs/distaccum"}
    command = " ".join(local.get(part, part) for part in launcher["command"])
    script = (f'as_mpiuser PRTE_MCA_plm_ssh_args="-p $PORT" KERAS_HOME=/tmp/keras {command}\n'
              "ls -A /tmp /home/data/runs/distaccum\n")
    completed = _locked_down_pod(tmp_path, "trainer", script,
                                 {"config.yaml": config, "hostfile": "127.0.0.2 slots=2\n"},
                                 timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Accepted publickey for mpiuser" in completed.stderr
    assert "num_workers 2," in completed.stdout  # both slots of the hostfile
    assert "distaccum: done: 2 update steps" in completed.stdout
    assert "model.keras" in completed.stdout.split()
    # The ranks wrote Keras's file where sshd_config's SetEnv says, not in Keras's fallback.
    assert "keras" in completed.stdout.split() and ".keras" not in completed.stdout.split()


def test_sshd_accepts_config_when_sshd_is_installed(tmp_path):
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed here (.ci/run installs it)")
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-m", "PEM", "-N", "", "-f",
                    str(tmp_path / "id_rsa")], check=True)
    config = tmp_path / "sshd_config"
    config.write_text((IMAGE_DIR / "sshd_config").read_text().replace(
        f"{k8s_pods.HOME}/.ssh/id_rsa", str(tmp_path / "id_rsa")))
    checked = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_sshd_config_takes_host_key_from_job_secret():
    settings = [line.split(None, 1) for line in (IMAGE_DIR / "sshd_config").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    mount_path = k8s.mpijob(k8s.ClusterOptions())["spec"]["sshAuthMountPath"]
    assert [value for key, value in settings if key == "HostKey"] == [f"{mount_path}/id_rsa"]
    assert ["PidFile", "none"] in settings


# --- the image build's audit ---


def _audit(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(IMAGE_DIR / "audit"), str(root)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """A small clean file tree, with a key's marker strings as programs that read keys hold them."""
    root = tmp_path / "image"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(b"\x00-----BEGIN OPENSSH PRIVATE KEY-----\n\x00")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("worker\n")
    (root / "etc" / "link").symlink_to("/etc/ssh/ssh_host_ed25519_key")
    return root


def test_audit_passes_when_image_holds_no_key_or_capability(image_tree):
    audited = _audit(image_tree)
    assert (audited.returncode, audited.stdout) == (0, ""), audited.stderr


@pytest.mark.parametrize("key_type", [["-t", "ed25519"], ["-t", "ecdsa", "-m", "PEM"]],
                         ids=["openssh-ed25519", "pem-ecdsa"])
def test_audit_fails_naming_file_when_image_holds_private_key(image_tree, key_type):
    key = image_tree / "home" / "mpiuser" / ".sshd" / "host_key"
    key.parent.mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", *key_type, "-N", "", "-f", str(key)], check=True)
    key.with_suffix(".pub").unlink()
    audited = _audit(image_tree)
    assert (audited.returncode, audited.stdout) == (1, f"audit: {key}: holds a private key\n")


def test_audit_fails_naming_file_when_file_has_capabilities(image_tree):
    if os.geteuid() != 0:
        pytest.skip("only root may set security.capability")
    binary = image_tree / "usr" / "bin" / "ping"
    shutil.copy("/bin/true", binary)
    os.setxattr(binary, "security.capability", NET_RAW_CAPABILITY)
    audited = _audit(image_tree)
    assert (audited.returncode, audited.stdout) == (
        1, f"audit: {binary}: has file capabilities (security.capability)\n")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerfile_audits_last_as_root_and_makes_no_key():
    instructions = _dockerfile_instructions()
    runs = [(index, argument) for index, (keyword, argument) in enumerate(instructions)
            if keyword == "RUN"]
    last_index, last_run = runs[-1]
    assert "audit" in last_run
    assert [a for k, a in instructions[:last_index] if k == "USER"][-1] == "root"
    assert ("COPY", f"k8s/image/audit {last_run.split()[-2]}") in instructions
    assert not any("ssh-keygen" in run for _, run in runs)
    # The package's host keys go in the layer that installs them: a later layer would hide them,
    # not remove them from the image.
    [install] = [run for _, run in runs if "openssh-server" in run]
    assert "rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub" in install


def test_dockerfile_builds_with_readme_setup_as_non_root_user():
    instructions = _dockerfile_instructions()
    for keyword, argument in instructions:
        if keyword == "COPY":
            *sources, _ = [a for a in argument.split() if not a.startswith("--")]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY source {source} is missing"
    runs = [argument for keyword, argument in instructions if keyword == "RUN"]
    assert any("bash launch/setup.sh" in run for run in runs)
    users = [argument for keyword, argument in instructions if keyword == "USER"]
    assert users and users[-1] == "mpiuser"
    assert f"--uid {k8s_pods.USER_ID}" in " ".join(runs)
    assert ("EXPOSE", str(k8s_pods.SSH_PORT)) in instructions
    assert k8s_pods.HOME == "/home/mpiuser"
    assert "openssh-server" in " ".join(runs)


def test_dockerfile_builds_either_variant_with_one_build_argument():
    instructions = _dockerfile_instructions()
    assert ("ARG", "DISTACCUM_VARIANT=cpu") in instructions
    [setup] = [argument for keyword, argument in instructions
               if keyword == "RUN" and "launch/setup.sh" in argument]
    assert setup.startswith("DISTACCUM_VARIANT=$DISTACCUM_VARIANT bash launch/setup.sh --horovod")
