#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md, each command under its own time limit, JSON into $OUT.
# Run from the project root on the GPU machine, one part per device call (the peers' figures
# must come from the same call as prefjax's):
#
#   bash benchmarks/gpu.sh dpo       # the DPO step: prefjax with a frozen and with a precomputed
#                                    # reference, TRL DPOTrainer, torch.compile  (limits: 680 s)
#   bash benchmarks/gpu.sh rollout   # decode against the bandwidth roofline (the issue's shape and
#                                    # the peer's), Hugging Face generate        (limits: 480 s)
#   bash benchmarks/gpu.sh extra     # packed vs padded on realistic lengths, the sweep step, GAE
#                                    #                                           (limits: 330 s)
#
# A part's limits are caps, not expectations; the device call's own limit (600 s) ends a part
# that runs past it, keeping what it wrote to $OUT. Run dpo first, then rollout.
#
# The peers need .peers/ (the peer scripts and TRL's wheels: benchmarks/README.md, "On a GPU")
# carried with the checkout; without it the peer lines are skipped and say so.
set -u
part=${1:-}
export OUT=${OUT:-/tmp/prefjax-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

run() {  # run LIMIT_S NAME CMD...: one line per result, the tail of the output on failure
  local limit=$1 name=$2
  shift 2
  echo "=== $name"
  if ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "FAILED or timed out (limit $limit s):"
  fi
  grep -vE "^[IW][0-9]{4} |Warning|warn\(" "$OUT/$name.log" | tail -6
}

peers() {
  if [ -f .peers/run.sh ]; then
    bash .peers/run.sh "$@"
  else
    echo "=== peers $*: skipped (no .peers/ in the checkout)"
  fi
}

S="--preset=llama1b --vocab=32000 --tie=false"
D="$S --batch_pairs=8 --seq_len=512 --prompt_len=256 --dtype=bfloat16 --steps=10"
case "$part" in
  dpo)
    run 120 dpo_copy python -m benchmarks.dpo_step $D --attention=cudnn --chunked_logps=2048 \
      --reference=copy --json_out="$OUT/dpo_copy.json"
    run 120 dpo_precomputed python -m benchmarks.dpo_step $D --attention=cudnn \
      --chunked_logps=2048 --reference=precomputed --json_out="$OUT/dpo_precomputed.json"
    peers trl torch-compile
    ;;
  rollout)
    run 120 roofline_issue python -m benchmarks.roofline --preset=llama1b --batch=64 --held=512 \
      --slots=1024 --json_out="$OUT/roofline_issue.json"
    run 120 roofline_peer_shape python -m benchmarks.roofline $S --batch=64 --held=128 \
      --steps=254 --slots=384 --json_out="$OUT/roofline_peer_shape.json"
    peers hf-generate
    ;;
  extra)
    run 150 dpo_packed python -m benchmarks.dpo_step $D --attention=cudnn --chunked_logps=2048 \
      --lengths=hh_helpful --packing --num_batches=2 --json_out="$OUT/dpo_packed.json"
    run 120 sweep python -m benchmarks.sweep --members=1,4,16 --steps=5 --repeats=3 \
      --json_out="$OUT/sweep.json"
    run 60 gae python -m benchmarks.gae --batch=512 --seq=1024 --json_out="$OUT/gae.json"
    ;;
  *)
    echo "usage: bash benchmarks/gpu.sh dpo|rollout|extra" >&2
    exit 2
    ;;
esac
