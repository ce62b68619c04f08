#!/usr/bin/env bash
# Submit a staleflow run to a running Ray cluster (its nodes run the staleflow image).
#
#   RAY_ADDRESS=http://<head>:8265 RAY_AUTH_TOKEN=... REDIS_URL=redis://<host>:6379/0 \
#       deploy/ray/submit.sh configs/qwen2.5-math-7b.yaml [dotted.key=value ...]
#
# RAY_ADDRESS is the dashboard's HTTP address (port 8265), not the GCS's (6379). The Redis password is not
# passed here: the head's `ray start` must have STALEFLOW_REDIS_PASSWORD in its environment.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${RAY_ADDRESS:?set RAY_ADDRESS=http://<head>:8265 (the dashboard address)}"
: "${REDIS_URL:?set REDIS_URL=redis://<host>:6379/0 (the external Redis of the staleness buffer)}"
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$HOME/.ray/auth_token" ] && [ "${RAY_AUTH_MODE:-}" != disabled ]; then
  echo "no Ray auth token: export RAY_AUTH_TOKEN (the cluster's token) or put it in ~/.ray/auth_token" >&2
  exit 2
fi
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }

exec ray job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env deploy/ray/runtime_env.yaml -- \
  staleflow train "$@" "buffer.redis_url=$REDIS_URL"
