#!/usr/bin/env bash
# Submit a SeRA run to a Ray cluster as a Ray job. Run from the repository root:
#
#   jobs/submit.sh [http://HEAD:8265] [CONFIG] [dotted.key=value ...]
#
# The working directory (without what .gitignore lists: .venv, runs/) is uploaded to the
# cluster, so the job runs this checkout's code and reads its jobs/*.yaml. With Ray's token
# authentication on, the client sends the token only when RAY_AUTH_MODE=token; it reads it
# from RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.
set -euo pipefail

address="${1:-${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}}"
config="${2:-jobs/toy-cpu.yaml}"
shift $(( $# > 2 ? 2 : $# ))

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

overrides=("$@")
if [[ "$config" == jobs/toy-cpu.yaml ]]; then
  # The toy world lives under runs/, which is not uploaded: on a local cluster the job can
  # read it where it was built.
  world="$PWD/runs/toy-world"
  if [[ ! -d "$world/reference" ]]; then
    python -c "from sera_ray.toy.world import ToyWorldConfig, build_world; \
build_world(ToyWorldConfig.small(), '$world')"
  fi
  overrides=(
    "model.policy=$world/reference"
    "data.train=$world/offline.jsonl"
    "data.bootstrap_prompts=$world/bootstrap_prompts.jsonl"
    "run.output_dir=$PWD/runs"
    "${overrides[@]}"
  )
fi

ray job submit --address "$address" --working-dir . \
  --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1"}}' \
  -- sera-ray train --config "$config" "${overrides[@]}"
