"""Shared fixtures for the unit and conformance tests (tests/e2e, tests/kernels add their own)."""

import os
import random

# Before anything imports triton: its @jit decorator picks interpreter or GPU mode at import,
# and tests/kernels plus the forced-Triton e2e test need the interpreter (no effect on torch).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_model: uses tensors captured from the bundled SmolLM2 checkpoint through "
        "transformers (no vLLM engine); runs in CI, select with -m real_model")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small-tensor torch work on one thread, then restore the setting. These
    tests are latency bound (many small matmuls and QRs); a second OpenMP thread only adds
    synchronisation, and on a loaded 2-core machine it made them 4x slower (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def seed(request):
    """Seed torch and random from the OS, so every run draws new inputs; the seed is printed
    (shown with a failure) and recorded. Replay a failing draw with KVQ_TEST_SEED=<seed>."""
    forced = os.environ.get("KVQ_TEST_SEED")
    value = int(forced) if forced else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
