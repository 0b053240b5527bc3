#!/bin/bash
# Write every sample run's JSON result for each estimator into OUTDIR, so two versions of
# acctattr can be compared byte for byte:
#   git stash; bench/sample_json.sh /tmp/before; git stash pop; bench/sample_json.sh /tmp/after
#   diff -r /tmp/before /tmp/after && echo byte-identical
set -euo pipefail
out=${1:?usage: bench/sample_json.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export OMP_NUM_THREADS=1
for run in digits toxicity; do
  for est in naive frozen unrolled; do
    .venv/bin/acctattr run "sample_runs/$run/manifest.yaml" -f json -q --estimator "$est" \
      --threads 1 > "$out/$run-$est.json"
  done
done
