# musenet-pod --recipe=tpu_vm --action=run: runs on every worker of the TPU VM slice (gcloud ... ssh
# --worker=all) and starts musenet-train in the background, detached from the ssh session (setsid nohup), so
# it keeps running after gcloud returns. Output is appended to ~/musenet-run/train.log on each worker.
# musenet-train finds its peers itself (--distributed=auto reads the TPU VM metadata) and resumes from
# the newest checkpoint in --workdir, so running this again after a preemption continues the run.
# Rendered by launch/pod.py with string.Template using '@@' as the delimiter; lines starting with '#' are
# dropped and the rest joined with '; ' into one --command (every line a complete statement).
set -eu
mkdir -p "$HOME/musenet-run"
if [ -f "$HOME/musenet-run/train.pid" ] && grep -qs musenet-train "/proc/$(cat "$HOME/musenet-run/train.pid")/cmdline"; then echo "musenet-train is already running on $(hostname) (pid $(cat "$HOME/musenet-run/train.pid")); see --action=logs" >&2; exit 1; fi
cd @code_dir
. @venv/bin/activate
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) musenet-pod run" >> "$HOME/musenet-run/train.log"
{ setsid nohup @train_command >> "$HOME/musenet-run/train.log" 2>&1 < /dev/null & }
echo "$!" > "$HOME/musenet-run/train.pid"
echo "musenet-train started on $(hostname) (pid $(cat "$HOME/musenet-run/train.pid")), log: ~/musenet-run/train.log"
