"""Where prometheus-client keeps samples shared by all worker processes.

Kept free of any prometheus_client import: it must run before that import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set once the directory is prepared: spawned workers re-import the entry module and must
# not wipe the samples their siblings already wrote.
PREPARED_ENV = "FRAUD_PREDICTOR_METRICS_PREPARED"


def prepare_multiprocess_dir() -> None:
    """Use PROMETHEUS_MULTIPROC_DIR if set (emptied of stale samples), else a fresh one.

    Must run before prometheus_client is imported: it picks its storage at import time.
    """
    if os.environ.get(PREPARED_ENV):
        return
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="fraud-predictor-metrics-"))
        os.environ[MULTIPROC_ENV] = str(directory)
    os.environ[PREPARED_ENV] = "1"


def remove_multiprocess_dir() -> None:
    directory = os.environ.get(MULTIPROC_ENV)
    if directory and Path(directory).name.startswith("fraud-predictor-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)
