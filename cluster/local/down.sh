#!/usr/bin/env bash
# Stop the Ray head and the MLflow server started by cluster/local/up.sh, by the PIDs it
# recorded (never by name: other Ray sessions on this machine are left alone). Data stays in
# the state folder (.cluster/: mlflow.db, artifacts, token); remove it by hand to start afresh.
#
# Environment: MMDIST_CLUSTER_DIR (default .cluster), MMDIST_STOP_TIMEOUT (seconds, default 30).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TIMEOUT="${MMDIST_STOP_TIMEOUT:-30}"

wait_gone() {  # wait_gone PID_OR_-PGID SECONDS
  local t0=$SECONDS
  while kill -0 -- "$1" 2>/dev/null && (( SECONDS - t0 < $2 )); do sleep 0.5; done
}

stop() {  # stop NAME PIDFILE: SIGTERM, wait, then SIGKILL what is left of its process group
  local name="$1" pidfile="$2" pid
  if [[ ! -f "$pidfile" ]]; then say "$name: not running (no $pidfile)"; return 0; fi
  pid="$(cat "$pidfile")"
  if ! kill -0 -- "-$pid" 2>/dev/null; then  # neither the leader nor any of its group
    say "$name: not running (stale pid $pid)"; rm -f "$pidfile"; return 0
  fi
  # up.sh started each service with setsid, so its pid is also its process-group id and the
  # group holds exactly the processes of this service. The leader first (`ray start --block`
  # shuts its head down in order), then the rest of the group, then SIGKILL.
  local t0=$SECONDS
  kill -TERM "$pid" 2>/dev/null || true
  wait_gone "$pid" 10
  if kill -0 -- "-$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    wait_gone "-$pid" "$TIMEOUT"
  fi
  if kill -0 -- "-$pid" 2>/dev/null; then
    say "$name: processes left in group $pid after ${TIMEOUT}s, sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  say "$name stopped (pid $pid) in $((SECONDS - t0)) s"
}

stop "Ray head" "$RAY_PID"
stop "MLflow server" "$MLFLOW_PID"
rm -f "$ENV_FILE"
