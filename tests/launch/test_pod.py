"""musenet-pod: what each recipe's dry run prints, that executing runs exactly those commands (with fake
gcloud/kubectl/sbatch on PATH), the rendered remote scripts' behaviour, and one-line errors."""

import dataclasses
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from launch import cli, pod

HEREDOC = " <<'MUSENET_POD_EOF'"
TPU = ["--recipe=tpu_vm", "--name=mn", "--zone=us-east5-a", "--accelerator_type=v5p-64",
       "--repo_url=https://example.com/org/musenet-jax.git", "--git_ref=v1.2", "--config=configs/small.py",
       "--workdir=gs://bucket/my runs/small", "--data_dir=gs://bucket/data"]
GKE = ["--recipe=gke", "--name=mn", "--image=registry.example.com/musenet-jax:1", "--tpu_type=v5p",
       "--topology=2x2x4", "--num_slices=2", "--config=configs/small.py", "--workdir=gs://bucket/my runs/small",
       "--data_dir=gs://bucket/data"]
SLURM = ["--recipe=slurm", "--nodes=2", "--gpus_per_node=4", "--time=2-00:00:00", "--partition=gpu",
         "--venv=/shared/my env", "--config=configs/small.py", "--workdir=/shared/my runs/small",
         "--data_dir=/shared/data"]


def run_pod(*args, env=None):
    return subprocess.run([sys.executable, "-m", "launch.pod", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=120)


def parse_dry_run(text: str) -> list[tuple[list[str], str]]:
    """(argv, stdin) per printed command; a here-document is the command's stdin."""
    steps, lines = [], iter(text.splitlines())
    for line in lines:
        if line.endswith(HEREDOC):
            body = []
            for body_line in lines:
                if body_line == "MUSENET_POD_EOF":
                    break
                body.append(body_line)
            steps.append((shlex.split(line[:-len(HEREDOC)]), "\n".join(body) + "\n"))
        else:
            steps.append((shlex.split(line), ""))
    return steps


def remote_tokens(step_argv: list[str]) -> list[str]:
    """The shell words of a gcloud ssh --command script."""
    (command,) = [a for a in step_argv if a.startswith("--command=")]
    lexer = shlex.shlex(command.removeprefix("--command="), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # words end at blanks and at ; & > < | ( )
    return list(lexer)


def train_args(tokens: list[str]) -> list[str]:
    """The musenet-train argv within shell words (up to the first redirection / `&`)."""
    start = next(i for i, t in enumerate(tokens[:-1]) if t == "musenet-train" and tokens[i + 1].startswith("--"))
    end = next((i for i in range(start, len(tokens)) if tokens[i] in (">>", "&", ";", "}")), len(tokens))
    return tokens[start:end]


@pytest.fixture
def fake_bin(tmp_path):
    """A folder with fake gcloud, kubectl, sbatch that log {argv, stdin} as JSON lines to $FAKE_LOG, and
    exit with $FAKE_FAIL_CODE on call number $FAKE_FAIL_AT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        data = sys.stdin.read()
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "stdin": data}}) + "\\n")
        with open(os.environ["FAKE_LOG"]) as f:
            calls = len(f.readlines())
        sys.exit(int(os.environ.get("FAKE_FAIL_CODE", "0")) if calls == int(os.environ.get("FAKE_FAIL_AT", "0"))
                 else 0)
        """)
    for name in ("gcloud", "kubectl", "sbatch"):
        (bin_dir / name).write_text(recorder)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def fake_env(fake_bin, log, **extra):
    return {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), **extra}


def read_log(log: pathlib.Path) -> list[tuple[list[str], str]]:
    if not log.exists():
        return []
    return [(c["argv"], c["stdin"]) for c in map(json.loads, log.read_text().splitlines())]


# --- tpu_vm -------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_tpu_vm_all_dry_run_prints_gcloud_commands():
    result = run_pod(*TPU, "--action=all", "--spot", "--dry_run", "--config.model.num_layers=8", "--",
                     "--config.train.total_steps=20000", "--heartbeat_timeout_s=600")
    assert result.returncode == 0, result.stderr
    (create, _), (setup, _), (start, _) = parse_dry_run(result.stdout)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mn", "--accelerator-type=v5p-64",
                      "--version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a"]
    assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mn"] and "--worker=all" in setup
    words = remote_tokens(setup)
    assert "https://example.com/org/musenet-jax.git" in words and "v1.2" in words
    assert any(w.startswith("jax[tpu]==") for w in words)
    assert start[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mn"] and "--worker=all" in start
    words = remote_tokens(start)
    assert {"setsid", "nohup"} <= set(words)
    # The path with a space stays one argument on the worker; overrides before and after `--` pass through.
    assert train_args(words) == ["musenet-train", "--config=configs/small.py", "--workdir=gs://bucket/my runs/small",
                                 "--data_dir=gs://bucket/data", "--distributed=auto", "--config.model.num_layers=8",
                                 "--config.train.total_steps=20000", "--heartbeat_timeout_s=600"]
    assert result.stderr == ""


def test_tpu_vm_wheel_copies_wheel_and_config(tmp_path):
    wheel = tmp_path / "musenet_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    config = tmp_path / "my config.py"
    config.write_text("def get_config(): ...\n")
    opts = pod.Options(recipe="tpu_vm", name="mn", zone="z", project="proj", wheel=str(wheel), config=str(config),
                       workdir="gs://b/w", data_dir="gs://b/d")
    mkdir, copy, setup = pod.steps_for(dataclasses.replace(opts, action="setup"))
    assert copy.argv[4:] == ("scp", str(wheel), "mn:musenet-run/", "--worker=all", "--zone=z", "--project=proj")
    assert "mkdir" in remote_tokens(list(mkdir.argv))
    assert f"$HOME/musenet-run/{wheel.name}" in remote_tokens(list(setup.argv))  # installs the copied wheel
    copy_config, start = pod.steps_for(dataclasses.replace(opts, action="run"))
    assert copy_config.argv[4:7] == ("scp", str(config), "mn:musenet-run/")
    words = remote_tokens(list(start.argv))
    assert train_args(words)[1] == "--config=my config.py"
    assert words[words.index("cd") + 1] == "$HOME/musenet-run"


def test_tpu_vm_logs_and_delete():
    opts = dict(recipe="tpu_vm", name="mn", zone="z")
    (logs,) = pod.steps_for(pod.Options(**opts, action="logs"))
    assert "--worker=0" in logs.argv and "tail" in remote_tokens(list(logs.argv))
    (delete,) = pod.steps_for(pod.Options(**opts, action="delete"))
    assert delete.argv == ("gcloud", "compute", "tpus", "tpu-vm", "delete", "mn", "--zone=z")


def test_tpu_vm_run_script_detaches_and_refuses_a_second_start(tmp_path):
    # The rendered remote script, run here by bash with a fake musenet-train standing in for the worker's.
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "musenet-jax").mkdir(parents=True)
    (home / "musenet-venv" / "bin").mkdir(parents=True)
    (home / "musenet-venv" / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    (bin_dir / "musenet-train").write_text('#!/bin/sh\necho "train args: $*"\nsleep 20\n')
    (bin_dir / "musenet-train").chmod(0o755)
    (start,) = pod.steps_for(pod.Options(recipe="tpu_vm", action="run", name="mn", zone="z", config="configs/t.py",
                                         workdir="gs://b/my runs", data_dir="gs://b/d"))
    script = next(a for a in start.argv if a.startswith("--command=")).removeprefix("--command=")
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    pid = int((home / "musenet-run" / "train.pid").read_text())
    try:
        log = home / "musenet-run" / "train.log"
        for _ in range(100):
            if "train args" in log.read_text():
                break
            time.sleep(0.1)
        assert "train args: --config=configs/t.py --workdir=gs://b/my runs --data_dir=gs://b/d --distributed=auto" \
            in log.read_text()
        second = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "already running" in second.stderr
    finally:
        os.killpg(pid, signal.SIGKILL)  # setsid made the fake trainer the leader of its own process group


# --- gke ----------------------------------------------------------------------------------------------------

def gke_documents(*extra):
    result = run_pod(*GKE, "--dry_run", *extra)
    assert result.returncode == 0, result.stderr
    ((argv, manifest),) = parse_dry_run(result.stdout)
    assert argv == ["kubectl", "apply", "-f", "-"]
    return list(yaml.safe_load_all(manifest))


@pytest.mark.e2e
def test_gke_dry_run_prints_a_multislice_jobset():
    service, jobset = gke_documents("--spot", "--", "--config.train.total_steps=20000")
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"jobset.sigs.k8s.io/jobset-name": "mn"}
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    assert jobset["spec"]["network"]["subdomain"] == "mn"
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 10
    (job,) = jobset["spec"]["replicatedJobs"]
    assert job["replicas"] == 2
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 4 and spec["backoffLimit"] == 0
    pod_spec = spec["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                        "cloud.google.com/gke-tpu-topology": "2x2x4",
                                        "cloud.google.com/gke-spot": "true"}
    assert pod_spec["terminationGracePeriodSeconds"] == 120
    (container,) = pod_spec["containers"]
    assert container["image"] == "registry.example.com/musenet-jax:1"
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_COORDINATOR_ADDRESS"] == "mn-slice-0-0.mn"
    assert env["MEGASCALE_SLICE_ID"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
    assert container["command"] == ["bash", "-c"]
    assert train_args(shlex.split(container["args"][0])) == [
        "musenet-train", "--config=configs/small.py", "--workdir=gs://bucket/my runs/small",
        "--data_dir=gs://bucket/data", "--distributed=auto", "--config.train.total_steps=20000"]


@pytest.mark.e2e
def test_gke_single_slice_has_no_multislice_env():
    _, jobset = gke_documents("--num_slices=1", "--tpu_type=tpu-v5-lite-podslice", "--topology=2x4")
    (job,) = jobset["spec"]["replicatedJobs"]
    assert job["replicas"] == 1 and job["template"]["spec"]["parallelism"] == 1
    (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 8}
    assert not any(e["name"].startswith("MEGASCALE") for e in container["env"])


@pytest.mark.parametrize("tpu_type, topology, hosts, expected", [
    ("v5p", "2x2x4", None, ("tpu-v5p-slice", 4, 4)),
    ("v4", "2x2x1", None, ("tpu-v4-podslice", 1, 4)),
    ("v5e", "2x4", None, ("tpu-v5-lite-podslice", 1, 8)),
    ("v6e", "4x4", None, ("tpu-v6e-slice", 4, 4)),
    ("tpu-v6e-slice", "4x4", 4, ("tpu-v6e-slice", 4, 4)),
])
def test_gke_shape(tpu_type, topology, hosts, expected):
    assert pod.gke_shape(tpu_type, topology, hosts) == expected


@pytest.mark.parametrize("tpu_type, topology, hosts, message", [
    ("v5p", "4x4", None, "needs 3 sizes"), ("v5e", "2x2x2", None, "needs 2 sizes"), ("v7", "2x2", None, "v7"),
    ("v5p", "2x2x4", 3, "runs on 4 hosts of 4 chips"),
    ("v5p", "2x2x4", 16, "runs on 4 hosts of 4 chips"),  # 1 chip a pod: it would never be scheduled
    ("v6e", "2x4", 2, "runs on 1 host"),
    ("v5p", "3x3x3", None, "27 chips, not a whole number of tpu-v5p-slice hosts of 4 chips"),
])
def test_gke_shape_rejects(tpu_type, topology, hosts, message):
    with pytest.raises(cli.UsageError, match=re.escape(message)):
        pod.gke_shape(tpu_type, topology, hosts)


def entrypoint_script(tmp_path, trainer: str) -> tuple[str, dict]:
    """The manifest's container script with a fake musenet-train (shell code `trainer`) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "musenet-train").write_text(f"#!/bin/bash\n{trainer}\n")
    (bin_dir / "musenet-train").chmod(0o755)
    opts = pod.Options(recipe="gke", name="mn", image="i", tpu_type="v5p", topology="2x2x1", config="c.py",
                       workdir="gs://b/w", data_dir="gs://b/d")
    _, jobset = yaml.safe_load_all(pod.gke_manifest(opts))
    script = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    return script, {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("code", [0, 3])
def test_gke_entrypoint_passes_the_exit_code_through(tmp_path, code):
    script, env = entrypoint_script(tmp_path, f"exit {code}")
    assert subprocess.run(["bash", "-c", script], env=env, timeout=60).returncode == code


def test_gke_entrypoint_turns_sigterm_into_a_failure(tmp_path):
    # musenet-train checkpoints and exits 0 on SIGTERM; the pod must still fail so that the JobSet restarts.
    ready = tmp_path / "ready"
    script, env = entrypoint_script(tmp_path, f"trap 'echo saved; exit 0' TERM; touch {ready}; "
                                              "for i in $(seq 300); do sleep 0.1; done")
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for _ in range(300):
        if ready.exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "saved" in out and "preemption" in err


def test_gke_logs_and_delete():
    (logs,) = pod.steps_for(pod.Options(recipe="gke", action="logs", name="mn"))
    assert logs.argv[:3] == ("kubectl", "logs", "-f") and "jobset.sigs.k8s.io/jobset-name=mn" in logs.argv[-1]
    (delete,) = pod.steps_for(pod.Options(recipe="gke", action="delete", name="mn"))
    assert delete.argv == ("kubectl", "delete", "jobset/mn", "service/mn", "--ignore-not-found")


# --- slurm --------------------------------------------------------------------------------------------------

def slurm_batch_script(*extra) -> str:
    result = run_pod(*SLURM, "--dry_run", *extra)
    assert result.returncode == 0, result.stderr
    ((argv, script),) = parse_dry_run(result.stdout)
    assert argv == ["sbatch"]
    return script


@pytest.mark.e2e
def test_slurm_dry_run_prints_an_sbatch_script(tmp_path):
    script = slurm_batch_script("--", "--config.train.total_steps=20000")
    directives = [line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=2-00:00:00", "--partition=gpu",
            "--signal=TERM@120", "--requeue"} <= set(directives)
    body = script.split("\nset -u\n")[1]
    assert "#SBATCH" not in body  # sbatch reads directives only before the first command
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert train_args(shlex.split(srun)) == [
        "musenet-train", "--config=configs/small.py", "--workdir=/shared/my runs/small", "--data_dir=/shared/data",
        "--distributed=auto", "--config.train.total_steps=20000"]
    assert ". '/shared/my env/bin/activate'" in script.splitlines()
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], timeout=60).returncode == 0


@pytest.mark.parametrize("finished, restarts, expect_requeue, expect_code", [
    (False, 0, True, 0), (True, 0, False, 0), (False, 20, False, 1)])
def test_slurm_script_requeues_an_unfinished_run(tmp_path, finished, restarts, expect_requeue, expect_code):
    workdir, bin_dir = tmp_path / "work dir", tmp_path / "bin"
    workdir.mkdir()
    bin_dir.mkdir()
    if finished:
        (workdir / "final_metrics.json").write_text("{}")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {shlex.quote(str(tmp_path / "scontrol.args"))}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    script = pod.slurm_script(pod.Options(recipe="slurm", config="c.py", workdir=str(workdir), data_dir="d"))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": str(restarts)}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == expect_code
    requeued = (tmp_path / "scontrol.args").exists()
    assert requeued == expect_requeue
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "42"]


def test_here_document_end_marker_cannot_be_smuggled_in():
    assert pod.Step(("sbatch",), "a\nb").shell() == "sbatch <<'MUSENET_POD_EOF'\na\nb\nMUSENET_POD_EOF"
    with pytest.raises(ValueError, match="contains the line"):
        pod.Step(("sbatch",), "a\nMUSENET_POD_EOF\nrm -rf x\n").shell()


# --- execution ----------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("args", [[*TPU, "--action=all", "--reserved"], GKE, [*GKE, "--action=delete"], SLURM],
                         ids=["tpu_vm", "gke", "gke_delete", "slurm"])
def test_execution_runs_exactly_the_dry_run_commands(tmp_path, fake_bin, args):
    args = [*args, "--", "--config.train.total_steps=7"]
    dry = run_pod("--dry_run", *args)
    assert dry.returncode == 0, dry.stderr
    expected = parse_dry_run(dry.stdout)

    executed = run_pod(*args, env=fake_env(fake_bin, tmp_path / "run.log"))
    assert executed.returncode == 0, executed.stderr
    assert read_log(tmp_path / "run.log") == expected

    # The dry run is itself a shell script doing the same.
    (tmp_path / "dry.sh").write_text(dry.stdout)
    subprocess.run(["bash", str(tmp_path / "dry.sh")], env=fake_env(fake_bin, tmp_path / "bash.log"),
                   stdin=subprocess.DEVNULL, check=True, timeout=120)
    assert read_log(tmp_path / "bash.log") == expected


@pytest.mark.e2e
def test_execution_stops_at_the_first_failure(tmp_path, fake_bin):
    result = run_pod(*TPU, "--action=all", env=fake_env(fake_bin, tmp_path / "run.log", FAKE_FAIL_AT="2",
                                                        FAKE_FAIL_CODE="7"))
    assert result.returncode == 7
    assert len(read_log(tmp_path / "run.log")) == 2  # create, setup; run never started
    errors = [line for line in result.stderr.splitlines() if not line.startswith("+ ")]
    assert errors == [errors[0]] and "command 2/3" in errors[0] and "exit code 7" in errors[0]


@pytest.mark.e2e
def test_missing_cloud_cli_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_pod(*GKE, env={**os.environ, "PATH": str(tmp_path / "empty")})
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: kubectl not found on PATH (install it, or see the commands "
                                          "with --dry_run)"]


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    ([], "--recipe is required"),
    (["--recipe=aws"], "--recipe"),
    (["--recipe=gke", "--nope=1"], "nope"),
    (["--recipe=tpu_vm", "--name=mn", "--zone=z"], "needs --action"),
    ([*TPU[:2], "--action=create"], "needs --zone"),
    ([*TPU, "--action=create", "--accelerator_type=big"], "expected e.g. v5p-64"),
    ([*TPU, "--action=create", "--spot", "--reserved"], "exclude each other"),
    ([*TPU, "--action=run", "--workdir=/local/dir"], "must be a gs:// path"),
    ([*TPU, "--action=run", "--config=/abs/small.py"], "inside the repository"),
    ([*TPU, "--action=setup", "--wheel=x.whl"], "exactly one of --repo_url"),
    ([*TPU, "--action=run", "--", "--workdir=gs://other"], "sets --workdir itself"),
    ([*TPU, "--action=run", "stray"], "unexpected argument"),
    ([*TPU, "--action=create", "--name=My_TPU"], "lowercase letters"),
    ([*GKE, "--topology=4x4"], "needs 3 sizes"),
    ([*GKE, "--action=create"], "has no --action=create"),
    ([*GKE, "--zone=z"], "is a --recipe=tpu_vm flag"),
    ([*GKE[:5], "--config=c.py"], "needs --workdir, --data_dir"),
    ([*SLURM, "--image=x"], "is a --recipe=gke flag"),
    ([*SLURM, "--nodes=0"], "--nodes must be >= 1"),
    ([*SLURM, "--time=tomorrow"], "--time"),
    ([*SLURM, "--workdir=gs://bucket/w"], "shared filesystem"),
    ([*SLURM, "--time=10", "--grace_s=600"], "--grace_s 600 is not shorter than --time 10"),
    ([*SLURM, "--grace_s=100000"], "sbatch --signal takes at most 65535 s"),
    ([*GKE, "--nodes=4"], "--nodes is a --recipe=slurm flag"),  # flags with a default, given to another recipe
    ([*SLURM, "--num_slices=4"], "--num_slices is a --recipe=gke flag"),
    ([*SLURM, "--spot"], "--spot is a --recipe=tpu_vm or gke flag"),
    # musenet-train's flags are checked here, not on the cluster after the slice was made.
    ([*TPU, "--action=run", "--", "--heartbeat_timeout=600"], "musenet-train has no --heartbeat_timeout"),
    ([*SLURM, "--", "--dry_run"], "musenet-train has no --dry_run"),
])
def test_bad_flags_are_one_line_errors(args, message):
    result = run_pod("--dry_run", *args)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == ""
