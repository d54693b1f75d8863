r"""musenet-pod: start musenet-train on a TPU VM slice, a GKE TPU JobSet or a SLURM GPU cluster.

    # Cloud TPU VM: create the slice, install the code on every worker and start training; then
    # follow worker 0's log.
    musenet-pod --recipe=tpu_vm --action=all --name=mn --zone=us-east5-a --accelerator_type=v5p-64 \
        --repo_url=https://github.com/ORG/musenet-jax --git_ref=main --config=configs/small.py \
        --workdir=gs://BUCKET/runs/small --data_dir=gs://BUCKET/data -- --config.train.total_steps=20000
    musenet-pod --recipe=tpu_vm --action=logs --name=mn --zone=us-east5-a

    # GKE: a JobSet on two v5p slices with topology 2x2x4 (4 hosts each), applied with kubectl.
    musenet-pod --recipe=gke --name=mn --image=REGISTRY/musenet-jax:TAG --tpu_type=v5p --topology=2x2x4 \
        --num_slices=2 --config=configs/small.py --workdir=gs://BUCKET/runs/small --data_dir=gs://BUCKET/data

    # SLURM: 4 nodes x 8 GPUs, submitted with sbatch.
    musenet-pod --recipe=slurm --nodes=4 --gpus_per_node=8 --time=24:00:00 --venv=/shared/musenet/.venv \
        --config=configs/small.py --workdir=/shared/runs/small --data_dir=/shared/data

--dry_run prints what would run instead of running it: a shell script, one command per line, with a
manifest or batch script passed on stdin as a quoted here-document, so `musenet-pod ... --dry_run | bash`
does exactly what the same call without --dry_run does. Without --dry_run the commands run one after
another with their output streamed, and the first failing command ends musenet-pod with its exit code.
Arguments after `--` (and any `--config.*` argument) are passed on to musenet-train unchanged. Templates
live in launch/recipes/ (see its README.md for each recipe's how-to and for preemption).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import string
import subprocess
import sys

from absl import flags

from launch import cli

RECIPES = ("tpu_vm", "gke", "slurm")
ACTIONS = ("create", "setup", "run", "logs", "delete", "all")
# Actions each recipe knows, the first being its default; tpu_vm has no default: creating or deleting a
# slice must be asked for.
RECIPE_ACTIONS = {"tpu_vm": (None, "create", "setup", "run", "logs", "delete", "all"),
                  "gke": ("run", "logs", "delete"),
                  "slurm": ("run",)}
# musenet-train flags that a recipe sets itself; passing them through after `--` would contradict it.
MANAGED_TRAIN_FLAGS = ("config", "workdir", "data_dir", "distributed")

_RECIPE = flags.DEFINE_enum("recipe", None, RECIPES, "Where to run musenet-train.")
_ACTION = flags.DEFINE_enum("action", None, ACTIONS, "tpu_vm: create|setup|run|logs|delete|all (all = create, "
                            "setup, run); gke: run (default; apply the JobSet)|logs|delete; slurm: run (sbatch).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands (and manifest/script) instead of running them.")
_NAME = flags.DEFINE_string("name", None, "TPU VM / JobSet name (lowercase letters, digits, '-'); "
                            "slurm: job name (default musenet).")
_CONFIG = flags.DEFINE_string("config", None, "musenet-train --config: a path in the checkout (tpu_vm with "
                              "--repo_url), a local file copied to the workers (tpu_vm with --wheel), a path "
                              "in the image (gke) or on the cluster (slurm).")
_WORKDIR = flags.DEFINE_string("workdir", None, "musenet-train --workdir: gs://... for tpu_vm and gke; a path on "
                               "the shared filesystem for slurm.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "musenet-train --data_dir (gs://... for tpu_vm and gke).")
_GRACE_S = flags.DEFINE_integer("grace_s", 120, "Seconds between SIGTERM and the kill: slurm --signal lead time "
                                "before the time limit, gke terminationGracePeriodSeconds.")
# tpu_vm
_ZONE = flags.DEFINE_string("zone", None, "tpu_vm: Cloud zone.")
_PROJECT = flags.DEFINE_string("project", None, "tpu_vm: Cloud project (default: gcloud's).")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None, "tpu_vm: e.g. v5p-64, v4-32, v5litepod-16.")
_RUNTIME_VERSION = flags.DEFINE_string("runtime_version", None, "tpu_vm: TPU VM software version (default "
                                       "from --accelerator_type, e.g. v2-alpha-tpuv5 for v5p).")
_REPO_URL = flags.DEFINE_string("repo_url", None, "tpu_vm: git URL cloned on every worker by setup.")
_GIT_REF = flags.DEFINE_string("git_ref", "main", "tpu_vm: branch, tag or commit checked out by setup.")
_WHEEL = flags.DEFINE_string("wheel", None, "tpu_vm: a local musenet-jax wheel copied to and installed on "
                             "every worker (instead of --repo_url).")
_PYTHON = flags.DEFINE_string("python", "python3.11", "tpu_vm: Python on the workers (apt-installed if missing).")
_SPOT = flags.DEFINE_bool("spot", False, "tpu_vm: create a Spot TPU VM; gke: schedule on Spot TPU nodes.")
_RESERVED = flags.DEFINE_bool("reserved", False, "tpu_vm: create the TPU VM from a reservation.")
# gke
_IMAGE = flags.DEFINE_string("image", None, "gke: container image with musenet-jax and jax[tpu] installed.")
_TPU_TYPE = flags.DEFINE_string("tpu_type", None, "gke: v4, v5p, v5e, v6e, or the node label value "
                                "(tpu-v4-podslice, tpu-v5p-slice, tpu-v5-lite-podslice, tpu-v6e-slice).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "gke: slice topology, e.g. 2x2x4 (v4, v5p) or 4x4 (v5e, v6e).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "gke: number of TPU slices (JobSet replicas).")
_HOSTS_PER_SLICE = flags.DEFINE_integer("hosts_per_slice", None, "gke: hosts (pods) per slice; default and "
                                        "checked: from --tpu_type and --topology.")
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 10, "gke: JobSet restarts after failures or preemptions.")
# slurm
_NODES = flags.DEFINE_integer("nodes", 1, "slurm: nodes.")
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node (= tasks per node).")
_TIME = flags.DEFINE_string("time", None, "slurm: time limit, e.g. 24:00:00 or 2-00:00:00 (default: the "
                            "partition's).")
_PARTITION = flags.DEFINE_string("partition", None, "slurm: partition.")
_ACCOUNT = flags.DEFINE_string("account", None, "slurm: account.")
_VENV = flags.DEFINE_string("venv", None, "slurm: virtualenv (on the shared filesystem) to activate on the nodes; "
                            "default: musenet-train from PATH.")
_MAX_REQUEUES = flags.DEFINE_integer("max_requeues", 20, "slurm: requeues after time-limit stops.")

# Flags (without a default value) that only one recipe reads; giving them to another one is a mistake.
_RECIPE_ONLY_FLAGS = {"tpu_vm": ("zone", "project", "accelerator_type", "runtime_version", "repo_url", "wheel",
                                 "reserved", "spot"),
                      "gke": ("image", "tpu_type", "topology", "hosts_per_slice"),
                      "slurm": ("time", "partition", "account", "venv")}
_HEREDOC_END = "MUSENET_POD_EOF"
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Remote locations on every TPU VM worker ("$HOME" expands there, not here).
_REMOTE_VENV = '"$HOME/musenet-venv"'
_REMOTE_CHECKOUT = '"$HOME/musenet-jax"'
_REMOTE_RUN_DIR = '"$HOME/musenet-run"'
# Default TPU VM software versions for each TPU generation (Cloud TPU docs, "TPU software versions").
_TPU_VM_RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v6e": "v2-alpha-tpuv6e"}


@dataclasses.dataclass(frozen=True)
class GkeTpu:
    """A GKE TPU generation: node label value, topology rank and chips per host of multi-host slices."""
    accelerator: str
    rank: int
    chips_per_host: int
    max_single_host_chips: int  # slices up to this many chips run on one host (v5e/v6e: 1, 4 or 8 chips)


_GKE_TPUS = {
    "v4": GkeTpu("tpu-v4-podslice", 3, 4, 4),
    "v5p": GkeTpu("tpu-v5p-slice", 3, 4, 4),
    "v5e": GkeTpu("tpu-v5-lite-podslice", 2, 4, 8),
    "v6e": GkeTpu("tpu-v6e-slice", 2, 4, 8),
}


@dataclasses.dataclass(frozen=True)
class Step:
    """One command: argv, and the text fed to its stdin (a manifest, a batch script) or None."""
    argv: tuple[str, ...]
    stdin: str | None = None

    def __post_init__(self):
        if self.stdin is not None:  # exactly one final newline, as a here-document passes it
            object.__setattr__(self, "stdin", self.stdin.rstrip("\n") + "\n")

    def shell(self) -> str:
        """The command as shell text; stdin becomes a quoted here-document (no expansion inside)."""
        line = shlex.join(self.argv)
        if self.stdin is None:
            return line
        if _HEREDOC_END in self.stdin.splitlines():
            raise ValueError(f"the text for {self.argv[0]} contains the line {_HEREDOC_END}")
        return f"{line} <<'{_HEREDOC_END}'\n{self.stdin}{_HEREDOC_END}"


class _Template(string.Template):
    # '@' instead of '$': shell scripts and Kubernetes manifests use '$' themselves.
    delimiter = "@"


def render(template_name: str, **values) -> str:
    """launch/recipes/<template_name> with every @placeholder filled (a missing one is a KeyError)."""
    text = importlib.resources.files("launch").joinpath("recipes", template_name).read_text()
    return _Template(text).substitute({k: str(v) for k, v in values.items()})


def one_line(script: str) -> str:
    """A rendered script as one `; `-joined line: comment and blank lines dropped (see the templates)."""
    lines = [line.strip() for line in script.splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith("#"))


def script_body(script: str) -> str:
    """A rendered script without its comment lines (they are for readers of the template)."""
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#")).strip() + "\n"


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a recipe needs: the flag values (tests build these directly)."""
    recipe: str
    action: str | None = None
    name: str | None = None
    config: str | None = None
    workdir: str | None = None
    data_dir: str | None = None
    train_args: tuple[str, ...] = ()
    grace_s: int = 120
    zone: str | None = None
    project: str | None = None
    accelerator_type: str | None = None
    runtime_version: str | None = None
    repo_url: str | None = None
    git_ref: str = "main"
    wheel: str | None = None
    python: str = "python3.11"
    spot: bool = False
    reserved: bool = False
    image: str | None = None
    tpu_type: str | None = None
    topology: str | None = None
    num_slices: int = 1
    hosts_per_slice: int | None = None
    max_restarts: int = 10
    nodes: int = 1
    gpus_per_node: int = 8
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    venv: str | None = None
    max_requeues: int = 20


def _require(opts: Options, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(opts, n) in (None, "")]
    if missing:
        action = f" --action={opts.action}" if opts.action else ""
        raise cli.UsageError(f"--recipe={opts.recipe}{action} needs {', '.join(missing)}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise cli.UsageError(f"--{name} must be >= 1, got {value}")


def _check_dns_name(name: str, max_len: int) -> None:
    if not _DNS_LABEL.fullmatch(name) or len(name) > max_len:
        raise cli.UsageError(f"--name {name!r}: use at most {max_len} lowercase letters, digits and '-', "
                             "starting with a letter")


def train_flag_names() -> set[str]:
    """The flags musenet-train accepts: its module's own (read from its source: importing it here would define
    flags that clash with ours) and absl's common ones (-v, --logtostderr, ...)."""
    source = pathlib.Path(importlib.util.find_spec("launch.train").origin).read_text()
    ours = {flag.name for flag in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__])}
    return set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source)) | (set(flags.FLAGS) - ours)


def train_command(opts: Options, config: str | None = None) -> list[str]:
    """The musenet-train argv every process runs (distributed set-up detected by musenet-train itself)."""
    _require(opts, "config", "workdir", "data_dir")
    known = train_flag_names()
    for arg in opts.train_args:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if not name:
            raise cli.UsageError(f"unexpected argument {arg!r}: only --flags pass through to musenet-train")
        if name in MANAGED_TRAIN_FLAGS or name.removeprefix("no") == "distributed":
            raise cli.UsageError(f"{arg}: musenet-pod sets --{name} itself; use musenet-pod's own flag")
        # A typo would otherwise surface on the cluster, after the slice was created and set up.
        if not (name.startswith("config.") or name in known or name.removeprefix("no") in known):
            raise cli.UsageError(f"{arg}: musenet-train has no --{name} (see musenet-train --help)")
    return ["musenet-train", f"--config={config or opts.config}", f"--workdir={opts.workdir}",
            f"--data_dir={opts.data_dir}", "--distributed=auto", *opts.train_args]


def _check_cloud_paths(opts: Options) -> None:
    # The workers share no filesystem: checkpoints and data must live in Cloud Storage.
    for flag in ("workdir", "data_dir"):
        if not getattr(opts, flag).startswith("gs://"):
            raise cli.UsageError(f"--{flag} must be a gs:// path for --recipe={opts.recipe} (the hosts share "
                                 f"no filesystem), got {getattr(opts, flag)!r}")


# --- Cloud TPU VM -------------------------------------------------------------------------------------------

def _gcloud_tpu(opts: Options, verb: str, *args: str) -> Step:
    project = (f"--project={opts.project}",) if opts.project else ()
    return Step(("gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={opts.zone}", *project))


def _runtime_version(opts: Options) -> str:
    if opts.runtime_version:
        return opts.runtime_version
    generation = opts.accelerator_type.split("-")[0]
    if generation not in _TPU_VM_RUNTIMES:
        raise cli.UsageError(f"no default --runtime_version for --accelerator_type={opts.accelerator_type}; "
                             "pass one (see the Cloud TPU docs, TPU software versions)")
    return _TPU_VM_RUNTIMES[generation]


def _tpu_vm_create(opts: Options) -> list[Step]:
    _require(opts, "accelerator_type")
    if not re.fullmatch(r"[a-z0-9]+-[0-9]+", opts.accelerator_type):
        raise cli.UsageError(f"--accelerator_type {opts.accelerator_type!r}: expected e.g. v5p-64 or v4-32")
    capacity = ("--spot",) if opts.spot else ("--reserved",) if opts.reserved else ()
    return [_gcloud_tpu(opts, "create", opts.name, f"--accelerator-type={opts.accelerator_type}",
                        f"--version={_runtime_version(opts)}", *capacity)]


def _tpu_vm_setup(opts: Options) -> list[Step]:
    if bool(opts.repo_url) == bool(opts.wheel):
        raise cli.UsageError("--action=setup needs exactly one of --repo_url (git checkout on every worker) "
                             "and --wheel (copy a built wheel)")
    pip = f"{_REMOTE_VENV}/bin/python -m pip install -q"
    jax_tpu = shlex.quote(f"jax[tpu]=={importlib.metadata.version('jax')}")  # the jax this code is tested with
    steps = []
    if opts.repo_url:
        git, url, ref = f"git -C {_REMOTE_CHECKOUT}", shlex.quote(opts.repo_url), shlex.quote(opts.git_ref)
        get_code = (f"if [ -d {_REMOTE_CHECKOUT}/.git ]; then {git} remote set-url origin {url}; "
                    f"else git clone -q {url} {_REMOTE_CHECKOUT}; fi; "
                    f"{git} fetch -q --depth=1 origin {ref}; {git} checkout -q --force FETCH_HEAD")
        # [gcs]: the workdir and data live on gs:// (the run's small files go through gcsfs).
        install = f"{pip} -e {_REMOTE_CHECKOUT}'[gcs]' {jax_tpu}"
    else:
        if not os.path.isfile(opts.wheel) or not opts.wheel.endswith(".whl"):
            raise FileNotFoundError(f"--wheel {opts.wheel}: no such .whl file")
        remote_wheel = f"{_REMOTE_RUN_DIR}/{shlex.quote(os.path.basename(opts.wheel))}"
        get_code = f"test -f {remote_wheel}"
        # --force-reinstall --no-deps: a rebuilt wheel keeps its version number but must replace the old one.
        install = (f"{pip} {remote_wheel}'[gcs]' {jax_tpu}; "
                   f"{pip} --force-reinstall --no-deps {remote_wheel}")
        steps += [_gcloud_tpu(opts, "ssh", opts.name, "--worker=all", f"--command=mkdir -p {_REMOTE_RUN_DIR}"),
                  _gcloud_tpu(opts, "scp", opts.wheel, f"{opts.name}:musenet-run/", "--worker=all")]
    script = render("tpu_vm_setup.sh", python=shlex.quote(opts.python), venv=_REMOTE_VENV,
                    get_code=get_code, install=install)
    return [*steps, _gcloud_tpu(opts, "ssh", opts.name, "--worker=all", f"--command={one_line(script)}")]


def _tpu_vm_run(opts: Options) -> list[Step]:
    _require(opts, "config", "workdir", "data_dir")
    _check_cloud_paths(opts)
    steps = []
    if opts.wheel:  # no checkout on the workers: copy the config file next to the logs
        if not os.path.isfile(opts.config):
            raise FileNotFoundError(f"--config {opts.config}: no such file (with --wheel it is copied to the "
                                    "workers)")
        steps.append(_gcloud_tpu(opts, "scp", opts.config, f"{opts.name}:musenet-run/", "--worker=all"))
        code_dir, config = _REMOTE_RUN_DIR, os.path.basename(opts.config)
    else:
        if os.path.isabs(opts.config):
            raise cli.UsageError(f"--config {opts.config}: give a path inside the repository checked out on "
                                 "the workers (e.g. configs/small.py), or use --wheel to copy a local file")
        code_dir, config = _REMOTE_CHECKOUT, opts.config
    script = render("tpu_vm_run.sh", code_dir=code_dir, venv=_REMOTE_VENV,
                    train_command=shlex.join(train_command(opts, config)))
    return [*steps, _gcloud_tpu(opts, "ssh", opts.name, "--worker=all", f"--command={one_line(script)}")]


def tpu_vm_steps(opts: Options) -> list[Step]:
    """gcloud commands for a TPU VM slice: create, setup, run, logs (worker 0), delete, or all."""
    if opts.action is None:
        raise cli.UsageError("--recipe=tpu_vm needs --action=create|setup|run|logs|delete|all")
    _require(opts, "name", "zone")
    _check_dns_name(opts.name, 63)
    if opts.spot and opts.reserved:
        raise cli.UsageError("--spot and --reserved exclude each other")
    if opts.action == "all":  # every step is built (and checked) before the first one runs
        return [*_tpu_vm_create(opts), *_tpu_vm_setup(opts), *_tpu_vm_run(opts)]
    if opts.action == "create":
        return _tpu_vm_create(opts)
    if opts.action == "setup":
        return _tpu_vm_setup(opts)
    if opts.action == "run":
        return _tpu_vm_run(opts)
    if opts.action == "logs":
        return [_gcloud_tpu(opts, "ssh", opts.name, "--worker=0",
                            f"--command=tail -n 200 -F {_REMOTE_RUN_DIR}/train.log")]
    return [_gcloud_tpu(opts, "delete", opts.name)]  # gcloud asks for confirmation


# --- GKE JobSet ---------------------------------------------------------------------------------------------

def gke_shape(tpu_type: str, topology: str, hosts_per_slice: int | None = None) -> tuple[str, int, int]:
    """(node label value, hosts per slice, chips per host) of a GKE TPU slice."""
    by_label = {t.accelerator: t for t in _GKE_TPUS.values()}
    tpu = _GKE_TPUS.get(tpu_type) or by_label.get(tpu_type)
    if tpu is None:
        raise cli.UsageError(f"--tpu_type {tpu_type!r}: expected one of {', '.join([*_GKE_TPUS, *by_label])}")
    dims = topology.split("x")
    if len(dims) != tpu.rank or not all(d.isdigit() and int(d) > 0 for d in dims):
        example = "2x2x4" if tpu.rank == 3 else "4x4"
        raise cli.UsageError(f"--topology {topology!r}: {tpu.accelerator} needs {tpu.rank} sizes, e.g. {example}")
    chips = math.prod(int(d) for d in dims)
    multi_host = chips > tpu.max_single_host_chips
    if multi_host and chips % tpu.chips_per_host:
        raise cli.UsageError(f"--topology {topology}: {chips} chips, not a whole number of {tpu.accelerator} hosts "
                             f"of {tpu.chips_per_host} chips")
    needed = chips // tpu.chips_per_host if multi_host else 1
    if hosts_per_slice is None:
        hosts_per_slice = needed
    if hosts_per_slice != needed:  # the node pool's machines fix the chips per host: pods of other sizes never fit
        raise cli.UsageError(f"--hosts_per_slice {hosts_per_slice}: a {topology} {tpu.accelerator} slice runs on "
                             f"{needed} host{'s' if needed > 1 else ''}"
                             + (f" of {tpu.chips_per_host} chips" if multi_host else ""))
    return tpu.accelerator, hosts_per_slice, chips // hosts_per_slice


def gke_manifest(opts: Options) -> str:
    """The Service + JobSet manifest (YAML, two documents)."""
    _require(opts, "name", "image", "tpu_type", "topology")
    _check_dns_name(opts.name, 40)  # pod host names <name>-slice-<i>-<j> must stay within 63 characters
    _check_positive(num_slices=opts.num_slices, grace_s=opts.grace_s)
    if opts.max_restarts < 0:
        raise cli.UsageError(f"--max_restarts must be >= 0, got {opts.max_restarts}")
    command = train_command(opts)
    _check_cloud_paths(opts)
    accelerator, hosts, chips_per_host = gke_shape(opts.tpu_type, opts.topology, opts.hosts_per_slice)
    env = ""
    if opts.num_slices > 1:
        # The first pod of slice 0 coordinates; the slice id is the index of the pod's child Job.
        env_vars = [("MEGASCALE_COORDINATOR_ADDRESS", f"value: {opts.name}-slice-0-0.{opts.name}"),
                    ("MEGASCALE_NUM_SLICES", f'value: "{opts.num_slices}"'),
                    ("MEGASCALE_SLICE_ID", "valueFrom:\n                  fieldRef:\n                    "
                                           "fieldPath: metadata.annotations['jobset.sigs.k8s.io/job-index']")]
        env = "".join(f"\n              - name: {k}\n                {v}" for k, v in env_vars)
    script = script_body(render("gke_entrypoint.sh", train_command=shlex.join(command)))
    script = script.replace("$(", "$$(")  # Kubernetes would expand $(NAME) in args; $$( is a literal $(
    return render("gke_jobset.yaml", name=opts.name, image=json.dumps(opts.image), accelerator=accelerator,
                  topology=opts.topology, num_slices=opts.num_slices, hosts_per_slice=hosts,
                  chips_per_host=chips_per_host, max_restarts=opts.max_restarts, grace_s=opts.grace_s,
                  spot_selector='\n              cloud.google.com/gke-spot: "true"' if opts.spot else "",
                  multislice_env=env, script="".join(f"                {line}\n" for line in script.splitlines()))


def gke_steps(opts: Options) -> list[Step]:
    """kubectl commands: apply the manifest (run), follow the first pod's log (logs), delete."""
    _require(opts, "name")
    if opts.action == "run":
        return [Step(("kubectl", "apply", "-f", "-"), stdin=gke_manifest(opts))]
    _check_dns_name(opts.name, 40)
    if opts.action == "logs":
        first_pod = (f"jobset.sigs.k8s.io/jobset-name={opts.name},jobset.sigs.k8s.io/job-index=0,"
                     "batch.kubernetes.io/job-completion-index=0")
        return [Step(("kubectl", "logs", "-f", "--tail=200", "-l", first_pod))]
    return [Step(("kubectl", "delete", f"jobset/{opts.name}", f"service/{opts.name}", "--ignore-not-found"))]


# --- SLURM --------------------------------------------------------------------------------------------------

SLURM_MAX_SIGNAL_S = 65535  # sbatch --signal=SIG@T: T in 0..65535 s


def slurm_seconds(time: str) -> int:
    """An sbatch --time value in seconds: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # after a day count the first field is hours
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
    else:
        h, m, sec = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def slurm_script(opts: Options) -> str:
    """The sbatch batch script."""
    _check_positive(nodes=opts.nodes, gpus_per_node=opts.gpus_per_node, grace_s=opts.grace_s)
    if opts.max_requeues < 0:
        raise cli.UsageError(f"--max_requeues must be >= 0, got {opts.max_requeues}")
    command = train_command(opts)
    if "://" in opts.workdir:
        raise cli.UsageError("--workdir must be a path on the cluster's shared filesystem for --recipe=slurm (the "
                             "batch script looks for final_metrics.json there to decide whether to requeue)")
    job_name = opts.name or "musenet"
    if not re.fullmatch(r"[\w.-]+", job_name):
        raise cli.UsageError(f"--name {job_name!r}: use letters, digits, '.', '_' and '-'")
    if opts.time and not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", opts.time):
        raise cli.UsageError(f"--time {opts.time!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    if opts.grace_s > SLURM_MAX_SIGNAL_S:
        raise cli.UsageError(f"--grace_s {opts.grace_s}: sbatch --signal takes at most {SLURM_MAX_SIGNAL_S} s")
    if opts.time and opts.grace_s >= slurm_seconds(opts.time):
        raise cli.UsageError(f"--grace_s {opts.grace_s} is not shorter than --time {opts.time}: every job would be "
                             "told to stop as it starts")
    optional = {"time": opts.time, "partition": opts.partition, "account": opts.account}
    for key, value in optional.items():
        if value and not re.fullmatch(r"[\w.,:-]+", value):
            raise cli.UsageError(f"--{key} {value!r}: unexpected characters")
    directives = [f"#SBATCH --{key}={value}" for key, value in optional.items() if value]
    activate = (f". {shlex.quote(os.path.join(opts.venv, 'bin', 'activate'))}" if opts.venv
                else "# musenet-train from PATH (no --venv)")
    return render("slurm_sbatch.sh", job_name=job_name, nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
                  grace_s=opts.grace_s, optional_directives="\n".join(directives), activate=activate,
                  train_command=shlex.join(command), max_requeues=opts.max_requeues,
                  done_marker=shlex.quote(os.path.join(opts.workdir, "final_metrics.json")))


def slurm_steps(opts: Options) -> list[Step]:
    """sbatch with the batch script on stdin."""
    return [Step(("sbatch",), stdin=slurm_script(opts))]


def steps_for(opts: Options) -> list[Step]:
    """The commands a recipe and action stand for, checked but not run."""
    if opts.recipe not in RECIPES:
        raise cli.UsageError(f"--recipe must be one of {'|'.join(RECIPES)}")
    allowed = RECIPE_ACTIONS[opts.recipe]
    opts = dataclasses.replace(opts, action=opts.action or allowed[0])
    if opts.action not in allowed:
        raise cli.UsageError(f"--recipe={opts.recipe} has no --action={opts.action} (one of "
                             f"{'|'.join(a for a in allowed if a)})")
    for recipe, names in _RECIPE_ONLY_FLAGS.items():
        misplaced = [n for n in names if getattr(opts, n) and recipe != opts.recipe]
        if misplaced and not (misplaced == ["spot"] and opts.recipe in ("tpu_vm", "gke")):
            owner = "tpu_vm or gke" if misplaced[0] == "spot" else recipe
            raise cli.UsageError(f"--{misplaced[0]} is a --recipe={owner} flag")
    return {"tpu_vm": tpu_vm_steps, "gke": gke_steps, "slurm": slurm_steps}[opts.recipe](opts)


def execute(steps: list[Step]) -> None:
    """Runs the steps in order, output streamed; exits with the first failing step's code."""
    for step in steps:
        if shutil.which(step.argv[0]) is None:
            cli.fail(f"{step.argv[0]} not found on PATH (install it, or see the commands with --dry_run)")
    for i, step in enumerate(steps, 1):
        print(f"+ {shlex.join(step.argv)}", file=sys.stderr, flush=True)
        try:
            code = subprocess.run(step.argv, input=step.stdin, text=True, check=False).returncode
        except KeyboardInterrupt:  # e.g. leaving `--action=logs`; training runs on regardless
            cli.fail(f"interrupted: {shlex.join(step.argv[:5])} ...", code=130)
        if code:
            code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
            cli.fail(f"command {i}/{len(steps)} ({shlex.join(step.argv[:5])} ...) failed with exit code {code}",
                     code=code)


def options_from_flags(train_args: list[str]) -> Options:
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Options) if f.name in flags.FLAGS}
    if values["recipe"] is None:
        raise cli.UsageError(f"--recipe is required (one of {'|'.join(RECIPES)})")
    return Options(**values, train_args=tuple(train_args))


# Flags with a default that only one recipe reads: given explicitly to another, they would be ignored.
_RECIPE_ONLY_DEFAULTED = {"gke": ("num_slices", "max_restarts"), "slurm": ("nodes", "gpus_per_node", "max_requeues")}


def main(argv):
    for recipe, names in _RECIPE_ONLY_DEFAULTED.items():
        given = [n for n in names if flags.FLAGS[n].present and _RECIPE.value not in (None, recipe)]
        if given:
            raise cli.UsageError(f"--{given[0]} is a --recipe={recipe} flag")
    steps = steps_for(options_from_flags(argv[1:]))
    if _DRY_RUN.value:
        print("\n".join(step.shell() for step in steps))
    else:
        execute(steps)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors; `--config.*` arguments go to musenet-train even before `--`."""
    ours, passed = [argv[0]], []
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            passed_after = argv[i + 1:]
            break
        (passed if arg.startswith("--config.") else ours).append(arg)
    else:
        passed_after = []
    return [*cli.parse_flags(ours), *passed, *passed_after]


def run():
    cli.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
