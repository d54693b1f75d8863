# Container entry point of the GKE JobSet (PID 1 of every pod). musenet-train saves a checkpoint and exits 0
# on SIGTERM; in a pod that would count as a successful completion and end the Job early. This wrapper
# forwards SIGTERM and then exits 143, so a preempted or evicted pod fails its Job, the JobSet restarts all
# slices (failurePolicy.maxRestarts) and the new pods resume from the newest checkpoint in --workdir.
# Rendered by launch/pod.py with string.Template using '@@' as the delimiter, then indented into the manifest.
# Kubernetes expands $(NAME) in args, so this script avoids the $( ) form.
preempted=0
trap 'preempted=1; kill -TERM "$child" 2>/dev/null' TERM
@train_command &
child=$!
wait "$child"; status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
if [ "$preempted" = 1 ]; then echo "musenet-pod: SIGTERM (preemption): checkpoint saved, exiting 143 so that the JobSet restarts" >&2; exit 143; fi
exit "$status"
