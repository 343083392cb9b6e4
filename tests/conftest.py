"""Test environment: 8 fake CPU devices and no hub access, set before JAX or transformers start."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fusion_jax's caches (content hashes, vocab maps, lengths, downloaded objects) go to a temporary directory, not ~/.cache.
os.environ.setdefault("FUSION_JAX_CACHE", __import__("tempfile").mkdtemp(prefix="fusion_jax_test_cache_"))

import pytest  # noqa: E402

SHARED = Path(os.environ.get("FUSION_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (real tokenizers, FuseLLM goldens): present for developers and CI, absent for users."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared assets at {SHARED} (set FUSION_JAX_SHARED); users' checkouts do not have them")
    return SHARED
