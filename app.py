"""Hugging Face Space entry: load the model once, build the page, serve it.

Env: CDC_CHECKPOINT (pipeline folder, default checkpoints/cdc), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from app.pipeline import DEFAULT_CHECKPOINT, CheckpointError, load_pipeline  # noqa: E402
from app.ui import build_demo  # noqa: E402

if __name__ == "__main__":
    checkpoint = os.environ.get("CDC_CHECKPOINT") or DEFAULT_CHECKPOINT
    try:
        pipe = load_pipeline(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    build_demo(pipe, checkpoint).launch(ssr_mode=False, max_file_size="50mb")
