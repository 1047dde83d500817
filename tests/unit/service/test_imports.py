"""House rule 2: the service imports neither torch nor the model/training packages."""

from __future__ import annotations

import subprocess
import sys


def test_service_never_imports_torch_model_or_training() -> None:
    code = (
        "import sys\n"
        "import service.app, service.batcher, service.inference, service.metrics\n"
        "import eat.audio, eat.contract, eat.engine, eat.predictor\n"
        "import service.server, service.settings, service.schemas, service.uploads, service.middleware\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'model', 'training'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"service imported {out.stdout.strip()}"
