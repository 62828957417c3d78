"""The training stack must not need vLLM (the GPU training image does not install it)."""

from __future__ import annotations

import subprocess
import sys


def test_training_and_tiny_models_do_not_import_vllm():
    code = (
        "import sys\n"
        "import cpl.training, cpl.training.cli, cpl.training.jobs, cpl.models.tiny, cpl.models.value_head\n"
        "loaded = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
