#!/usr/bin/env bash
# The README's app command: install (cached venv) and serve the Gradio demo on http://127.0.0.1:7860.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/venv.sh requirements.txt)
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
exec "$venv/bin/python" app.py "$@"
