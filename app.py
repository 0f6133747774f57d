"""Hugging Face Space entry: load the model once, build the page, serve it.

Env: CDC_CHECKPOINT (pipeline folder, default checkpoints/cdc), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
On a ZeroGPU Space (SPACES_ZERO_GPU set) ``spaces`` is imported before torch and the model goes to CUDA;
the handlers then run under ``@spaces.GPU`` (app.ui.on_gpu).
"""

import importlib
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))
if ZERO_GPU:
    try:
        importlib.import_module("spaces")  # before torch: ZeroGPU's CUDA emulation
    except ImportError:
        ZERO_GPU = False

import torch  # noqa: E402

from app.pipeline import DEFAULT_CHECKPOINT, CheckpointError, load_pipeline  # noqa: E402
from app.ui import MAX_SESSIONS, build_demo  # noqa: E402

if __name__ == "__main__":
    checkpoint = os.environ.get("CDC_CHECKPOINT") or DEFAULT_CHECKPOINT
    try:
        pipe = load_pipeline(checkpoint, device="cuda" if ZERO_GPU or torch.cuda.is_available() else "cpu")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    build_demo(pipe, checkpoint).launch(ssr_mode=False, max_file_size="50mb", state_session_capacity=MAX_SESSIONS)
