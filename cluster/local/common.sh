# Shared settings for cluster/local/up.sh and down.sh (sourced, not run).
# Every knob is an environment variable so tests and users can run a second cluster beside the
# first one (other ports, another state folder).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER_DIR="${MMDIST_CLUSTER_DIR:-$ROOT/.cluster}"
RAY_GCS_PORT="${MMDIST_RAY_PORT:-6379}"            # Ray head (GCS)
DASHBOARD_PORT="${MMDIST_DASHBOARD_PORT:-8265}"     # Ray dashboard + job API
MLFLOW_PORT="${MMDIST_MLFLOW_PORT:-5000}"           # MLflow tracking server
HOST=127.0.0.1                                      # loopback only, never 0.0.0.0
BIN="${MMDIST_BIN:-$ROOT/.venv/bin}"                # where ray, mlflow and python live
RAY="$BIN/ray"
MLFLOW="$BIN/mlflow"
PYTHON="$BIN/python"
ENV_FILE="$CLUSTER_DIR/env"
LOG_DIR="$CLUSTER_DIR/logs"
RAY_PID="$CLUSTER_DIR/ray.pid"
MLFLOW_PID="$CLUSTER_DIR/mlflow.pid"

die() { echo "error: $*" >&2; exit 1; }
say() { echo "[cluster] $*"; }

# alive PIDFILE -> 0 when the process named in the file runs.
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
