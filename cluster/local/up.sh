#!/usr/bin/env bash
# Start a local "cluster" on 127.0.0.1: a Ray head (dashboard + job API, token auth) and an
# MLflow tracking server (sqlite backend, artifacts in the project folder), then write
# .cluster/env for `make submit-*` and `mmdist preflight` to source.
#
#   cluster/local/up.sh [--num-cpus N] [--mlflow-auth]
#
# Environment (all optional): MMDIST_CLUSTER_DIR (state folder, default .cluster),
# MMDIST_RAY_PORT (6379), MMDIST_DASHBOARD_PORT (8265), MMDIST_MLFLOW_PORT (5000),
# MMDIST_CLUSTER_CPUS (logical CPUs of the head, default: all cores),
# MMDIST_MLFLOW_AUTH=1 (same as --mlflow-auth), MMDIST_BIN (folder with ray/mlflow/python).
#
# Running it again while the cluster is up changes nothing and prints the addresses.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NUM_CPUS="${MMDIST_CLUSTER_CPUS:-$(nproc)}"
MLFLOW_AUTH="${MMDIST_MLFLOW_AUTH:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-cpus) NUM_CPUS="${2:?--num-cpus needs a number}"; shift 2 ;;
    --mlflow-auth) MLFLOW_AUTH=1; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done

for exe in "$RAY" "$MLFLOW" "$PYTHON"; do
  [[ -x "$exe" ]] || die "$exe not found: run 'make setup' first (or set MMDIST_BIN)"
done

if [[ "$MLFLOW_AUTH" == 1 ]] && ! "$PYTHON" -c "import flask_wtf" 2>/dev/null; then
  die "MLflow basic auth needs the mlflow[auth] extra (Flask-WTF), which this environment lacks; \
install it (uv pip install 'mlflow[auth]') or start without --mlflow-auth"
fi

umask 077  # tokens, passwords and the env file are for this user only
mkdir -p "$CLUSTER_DIR" "$LOG_DIR" "$CLUSTER_DIR/artifacts"
chmod 700 "$CLUSTER_DIR"

port_free() {  # port_free PORT -> 0 when nothing listens on 127.0.0.1:PORT
  "$PYTHON" - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
need_port() {  # need_PORT NAME PORT VAR
  port_free "$2" || die "port $2 on $HOST ($1) is already in use by another program; \
stop it or pick another port with $3=..."
}
wait_http() {  # wait_http NAME URL PIDFILE LOG SECONDS [curl args...]
  local name="$1" url="$2" pidfile="$3" log="$4" secs="$5"; shift 5
  local t0=$SECONDS
  until curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; do
    if ! alive "$pidfile"; then
      echo "---- last lines of $log ----" >&2; tail -n 30 "$log" >&2 || true
      die "$name exited during start-up (log: $log)"
    fi
    (( SECONDS - t0 < secs )) || die "$name did not answer $url within ${secs}s (log: $log)"
    sleep 0.5
  done
}

# ---- Ray token: one per cluster folder, never the shared ~/.ray/auth_token ------------------
TOKEN_FILE="$CLUSTER_DIR/ray_token"
if [[ ! -s "$TOKEN_FILE" ]]; then
  "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE"
fi
chmod 600 "$TOKEN_FILE"
AUTH_HEADER="Authorization: Bearer $(cat "$TOKEN_FILE")"

# ---- Ray head ---------------------------------------------------------------------------------
t0=$SECONDS
if alive "$RAY_PID"; then
  say "Ray head already running (pid $(cat "$RAY_PID"))"
else
  rm -f "$RAY_PID"
  need_port "Ray GCS" "$RAY_GCS_PORT" MMDIST_RAY_PORT
  need_port "Ray dashboard" "$DASHBOARD_PORT" MMDIST_DASHBOARD_PORT
  # --block keeps `ray start` in the foreground as the parent of every Ray process of this head:
  # SIGTERM to it (down.sh) stops exactly this head, unlike `ray stop`, which stops every Ray
  # process of the machine. --temp-dir keeps this head's address out of /tmp/ray, so a plain
  # ray.init() elsewhere on the machine does not silently join it.
  # PATH: the `python` of a job's entrypoint is the project's environment.
  # One-host settings from mmdist.ray_env.one_host_env, the same as the local Ray mmdist starts
  # (a value already in this environment wins); every Ray process of this head, a job's driver
  # and Ray Train's controller included, inherits them:
  # - RAY_worker_niceness=0: workers at the driver's priority; a job cannot set it (Ray's job
  #   supervisor drops it).
  # - RAY_num_workers_soft_limit, max(8, 4 x CPUs) idle workers: with Ray's default (the CPU
  #   count) the raylet killed the Ray Data task processes between a run's epochs and
  #   evaluations and started them again, each importing Ray Data: the demo took 92 s here
  #   instead of 67 s.
  # - RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: the watcher reports nodes being drained, and a drain
  #   of this one host ends the whole cluster; it cost every run one more process.
  #   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5: a finished run's controller notices sooner.
  # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: on SIGTERM `ray start --block` drains the node for up
  # to 30 s (for Serve proxies behind a load balancer) and, once a job has run, Ray Data's
  # detached actors keep it busy for all 30: `make cluster-down` took 27-31 s. 3 s here.
  HEAD_ENV=()
  while IFS='=' read -r key value; do
    HEAD_ENV+=("$key=${!key:-$value}")
  done < <("$PYTHON" -m mmdist.ray_env "$NUM_CPUS")
  [[ ${#HEAD_ENV[@]} -gt 0 ]] || die "could not read mmdist's Ray settings (run 'make setup')"
  env "${HEAD_ENV[@]}" \
  PATH="$BIN:$PATH" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
  RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true \
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-3}" \
    setsid "$RAY" start --head --block \
      --node-ip-address "$HOST" --port "$RAY_GCS_PORT" \
      --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
      --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$(free_port)" \
      --num-cpus "$NUM_CPUS" --temp-dir "$CLUSTER_DIR/ray" --disable-usage-stats \
      > "$LOG_DIR/ray.log" 2>&1 < /dev/null &
  echo $! > "$RAY_PID"
  wait_http "Ray head" "http://$HOST:$DASHBOARD_PORT/api/version" "$RAY_PID" "$LOG_DIR/ray.log" 90 \
    -H "$AUTH_HEADER"
  # The dashboard answers before the job agent of the head node is registered; wait for both.
  wait_http "Ray job API" "http://$HOST:$DASHBOARD_PORT/api/jobs/" "$RAY_PID" "$LOG_DIR/ray.log" 60 \
    -H "$AUTH_HEADER"
  say "Ray head up in $((SECONDS - t0)) s (pid $(cat "$RAY_PID"), $NUM_CPUS CPUs)"
fi

# ---- MLflow tracking server --------------------------------------------------------------------
t0=$SECONDS
MLFLOW_URI="http://$HOST:$MLFLOW_PORT"
PASSWORD_FILE="$CLUSTER_DIR/mlflow_admin_password"
if alive "$MLFLOW_PID"; then
  say "MLflow server already running (pid $(cat "$MLFLOW_PID"))"
  # The running server keeps the mode it was started in; the env file follows it.
  running_auth=0
  [[ -f "$CLUSTER_DIR/mlflow_auth" ]] && running_auth=1
  if [[ "$MLFLOW_AUTH" == 1 && "$running_auth" == 0 ]]; then
    say "note: it runs without basic auth; to turn auth on, stop the cluster" \
      "(cluster/local/down.sh) and start it again with --mlflow-auth"
  fi
  MLFLOW_AUTH=$running_auth
else
  rm -f "$MLFLOW_PID" "$CLUSTER_DIR/mlflow_auth"
  need_port "MLflow" "$MLFLOW_PORT" MMDIST_MLFLOW_PORT
  auth_args=()
  # MLflow reads MLFLOW_AUTH_CONFIG_PATH even without the auth app: every run search imports
  # mlflow.server.auth, which parses that file, and a path to a missing file makes each search
  # an HTTP 500 (KeyError: 'mlflow'). So the server gets it only with auth, never from the
  # caller's shell (nor a mlflow_auth.ini left by an earlier start with auth); nor the
  # MLFLOW_AUTH_ADMIN_* overrides, which would replace the admin user and password written
  # below, those of the env file, when the auth app creates the admin.
  unset MLFLOW_AUTH_CONFIG_PATH MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD \
    MLFLOW_FLASK_SERVER_SECRET_KEY
  if [[ "$MLFLOW_AUTH" == 1 ]]; then
    # A generated admin password (MLflow ships none); kept in a 0600 file beside the env file.
    [[ -s "$PASSWORD_FILE" ]] || \
      "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24), end="")' > "$PASSWORD_FILE"
    chmod 600 "$PASSWORD_FILE"
    cat > "$CLUSTER_DIR/mlflow_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$CLUSTER_DIR/mlflow_auth.db
admin_username = admin
admin_password = $(cat "$PASSWORD_FILE")
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Each request's password check is a deliberately slow hash (PBKDF2): without this cache a
# training run's requests kept the server's one worker busy for ~25 s. One worker, so a
# password changed through the API takes effect at once; a change made in the database
# directly, within 60 s.
auth_cache_ttl_seconds = 60
INI
    auth_args=(--app-name basic-auth)
    touch "$CLUSTER_DIR/mlflow_auth"
    # The auth app signs its CSRF tokens with this key and refuses to start without one.
    SECRET_FILE="$CLUSTER_DIR/mlflow_flask_secret"
    [[ -s "$SECRET_FILE" ]] || \
      "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32), end="")' > "$SECRET_FILE"
    chmod 600 "$SECRET_FILE"
    export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$SECRET_FILE")"
    export MLFLOW_AUTH_CONFIG_PATH="$CLUSTER_DIR/mlflow_auth.ini"
  fi
  # MLflow 3's server also starts a job runner and 8 huey consumer processes for its GenAI
  # jobs (prompt optimisation, trace roll-ups), which mmdist never submits: 18 CPU-s and
  # 1.8 GB of memory more at every start (23.6 vs 5.2 CPU-s, 2354 vs 501 MB RSS, 2 cores,
  # 2026-12-04). Off unless the caller's environment turns them on.
  MLFLOW_DISABLE_TELEMETRY=true \
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    setsid "$MLFLOW" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "sqlite:///$CLUSTER_DIR/mlflow.db" \
      --artifacts-destination "$CLUSTER_DIR/artifacts" "${auth_args[@]}" \
      > "$LOG_DIR/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$MLFLOW_PID"
  wait_http "MLflow server" "$MLFLOW_URI/health" "$MLFLOW_PID" "$LOG_DIR/mlflow.log" 120
  say "MLflow server up in $((SECONDS - t0)) s (pid $(cat "$MLFLOW_PID"))"
fi

# ---- the env file later commands source ----------------------------------------------------------
{
  echo "# Written by cluster/local/up.sh. Use: set -a; . $ENV_FILE; set +a"
  echo "RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT"
  echo "MMDIST_RAY_GCS_ADDRESS=$HOST:$RAY_GCS_PORT"
  echo "RAY_AUTH_MODE=token"
  echo "RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
  echo "MLFLOW_TRACKING_URI=$MLFLOW_URI"
  if [[ "$MLFLOW_AUTH" == 1 ]]; then
    echo "MLFLOW_TRACKING_USERNAME=admin"
    echo "MLFLOW_TRACKING_PASSWORD=$(cat "$PASSWORD_FILE")"
  fi
} > "$ENV_FILE"
chmod 600 "$ENV_FILE"

say "Ray dashboard + job API  http://$HOST:$DASHBOARD_PORT  (token: $TOKEN_FILE)"
say "Ray GCS                  $HOST:$RAY_GCS_PORT"
say "MLflow tracking server   $MLFLOW_URI$([[ "$MLFLOW_AUTH" == 1 ]] && echo "  (basic auth: admin / $PASSWORD_FILE)")"
say "env file                 $ENV_FILE   (set -a; . $ENV_FILE; set +a)"
say "stop with                cluster/local/down.sh"
