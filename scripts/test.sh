#!/usr/bin/env bash
# The README's test command: install (cached venv) and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/venv.sh requirements-dev.txt)
export CUDA_VISIBLE_DEVICES="" GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
