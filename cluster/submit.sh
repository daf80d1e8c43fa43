#!/usr/bin/env bash
# Submit a job entrypoint to the cluster described by an env file (default .cluster/env,
# written by cluster/local/up.sh), after `mmdist preflight` passes. Follows the job's logs and
# exits with the job's status (0 only when it SUCCEEDED).
#
#   cluster/submit.sh jobs/train.py --config demo train.num_workers=2
#   MMDIST_ENV_FILE=path/to/env cluster/submit.sh jobs/sweep.py --config demo
#
# The env file holds RAY_ADDRESS (dashboard URL), RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH,
# MMDIST_RAY_GCS_ADDRESS (for preflight) and MLFLOW_TRACKING_URI. Set MMDIST_SKIP_PREFLIGHT=1
# to submit without the checks (e.g. a cluster whose GCS port you cannot reach).
# Ctrl-C stops following the logs, not the job: stop it with `ray job stop <submission id>`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${MMDIST_BIN:-$ROOT/.venv/bin}"
ENV_FILE="${MMDIST_ENV_FILE:-${MMDIST_CLUSTER_DIR:-$ROOT/.cluster}/env}"
die() { echo "error: $*" >&2; exit 1; }

[[ $# -ge 1 ]] || die "usage: cluster/submit.sh jobs/ENTRYPOINT.py [--config PRESET] [KEY=VALUE ...]"
ENTRY="$1"; shift
[[ -f "$ENTRY" ]] || die "$ENTRY not found (has that job entrypoint landed yet?)"
[[ -f "$ENV_FILE" ]] || die "$ENV_FILE not found: start the local cluster with 'make cluster-up' \
or point MMDIST_ENV_FILE at the env file of your cluster"
set -a; source "$ENV_FILE"; set +a
[[ -n "${RAY_ADDRESS:-}" ]] || die "$ENV_FILE does not set RAY_ADDRESS"

# The config arguments are the entrypoint's: --config X and KEY=VALUE overrides.
# A job runs in a temporary copy of the project, so ./runs would vanish with it: on the local
# cluster, checkpoints go to the project's runs/ unless train.storage_path is given.
if [[ "$RAY_ADDRESS" == *"://127.0.0.1:"* && " $* " != *" train.storage_path="* ]]; then
  set -- "$@" "train.storage_path=$ROOT/runs"
fi
if [[ "${MMDIST_SKIP_PREFLIGHT:-0}" != 1 ]]; then
  # preflight takes the config part only: --config and KEY=VALUE overrides, not the job's own
  # flags (--space KEY=SPEC, --name, --resume, --json, ...) or their values.
  preflight_args=()
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --config) preflight_args+=(--config "${args[i + 1]:-}"); i=$((i + 1)) ;;
      --json|--*=*) ;;
      --*) i=$((i + 1)) ;;  # a job flag and its value
      *=*) preflight_args+=("${args[i]}") ;;
    esac
  done
  [[ "$(basename "$ENTRY")" == sweep.py ]] && preflight_args+=(--sweep)
  echo "[submit] mmdist preflight ${preflight_args[*]}"
  "$BIN/mmdist" preflight "${preflight_args[@]}" \
    || die "preflight failed: fix the problems above (or MMDIST_SKIP_PREFLIGHT=1 to submit anyway)"
fi

# One runtime env: cluster/runtime_env.yaml plus the tracking URI (and MLflow credentials) of
# this cluster. Written 0600 into the cluster folder, since it may hold a password.
RUNTIME_ENV="$(dirname "$ENV_FILE")/runtime_env.submit.yaml"
(umask 077; "$BIN/python" - "$ROOT/cluster/runtime_env.yaml" "$RUNTIME_ENV" "$ROOT" <<'PY'
import os, sys, yaml
src, dst, root = sys.argv[1:]
env = yaml.safe_load(open(src))
extra = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                     "MLFLOW_TRACKING_PASSWORD") if os.environ.get(k)}
if "://127.0.0.1:" in os.environ["RAY_ADDRESS"]:  # local cluster: share the project's op cache
    extra["TORCH_EXTENSIONS_DIR"] = os.path.join(root, ".cache", "torch_extensions")
env.setdefault("env_vars", {}).update(extra)
yaml.safe_dump(env, open(dst, "w"), sort_keys=False)
PY
)

echo "[submit] ray job submit to $RAY_ADDRESS: python $ENTRY $*"
exec "$BIN/ray" job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env "$RUNTIME_ENV" -- python "$ENTRY" "$@"
