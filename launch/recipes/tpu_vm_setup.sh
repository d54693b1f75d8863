# musenet-pod --recipe=tpu_vm --action=setup: runs on every worker of the TPU VM slice (gcloud ... ssh
# --worker=all) and installs Python, a virtualenv and musenet-jax with jax[tpu]. Idempotent: run it again
# after pushing new code.
# Rendered by launch/pod.py with string.Template using '@@' as the delimiter (so the shell's '$' stays
# literal). Lines starting with '#' are dropped and the other lines are joined with '; ' into a single
# --command, so every line must be a complete shell statement.
set -eu
command -v @python >/dev/null || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq @python @python-venv; }
test -x @venv/bin/python || @python -m venv @venv
mkdir -p "$HOME/musenet-run"
@get_code
@venv/bin/python -m pip install -q --upgrade pip
@install
echo "musenet-jax installed on $(hostname)"
