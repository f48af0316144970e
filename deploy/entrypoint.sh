#!/bin/sh
# Container entrypoint: on first start a worker fills the empty pool volume with the bundled models,
# then every role runs as `fractal ROLE ...`; the role's flags and FRACTAL_* variables do the rest.
set -eu
role="${1:-serve}"
case "$role" in broker|worker|frontend|serve) echo "$role" > /tmp/fractal-role ;; esac  # for HEALTHCHECK
pool="${FRACTAL_WORKER_MODEL_DIR:-/models}"
if [ "$role" = "worker" ] && [ -d "$pool" ] && [ -z "$(ls -A "$pool" 2>/dev/null)" ]; then
    bundled="$(python -c 'import importlib.resources as r; print(r.files("worker") / "models")')"
    cp -n "$bundled"/*.onnx "$bundled"/*.onnx.json "$pool"/ 2>/dev/null || true
    echo "fractal-entrypoint: seeded $pool with the bundled models"
fi
exec fractal "$@"
