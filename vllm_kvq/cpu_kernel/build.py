"""Build (once) and load the compiled CPU kernels, ``torch.ops.kvq_cpu``.

The C++ source (``csrc/kvq_cpu.cpp``) is compiled with torch's extension tooling on first
use, for the host's own instruction set (``-march=native``: AVX-512 / AVX2 / NEON as the
machine has them), and cached: under the checkout's ``build/cpu_kernel`` (an editable
install, as ``make test`` makes), else ``~/.cache/vllm-kvq/cpu_kernel``, or where
``VLLM_KVQ_BUILD_DIR`` says. The cache key covers the source, torch's version and the CPU, so a
changed source or another machine rebuilds. Building takes about a minute on 2 cores; torch's
tooling holds a lock, so tensor-parallel workers starting together build it once.

Without a working compiler the build fails once, is logged, and every layer runs the torch
path (``vllm_kvq.dispatch``): never a crash at serving time.
"""

import hashlib
import logging
import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

LOG = logging.getLogger("vllm_kvq")
SOURCE = Path(__file__).with_name("csrc") / "kvq_cpu.cpp"
REPO_ROOT = Path(__file__).resolve().parents[2]
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def build_dir() -> Path:
    if os.environ.get("VLLM_KVQ_BUILD_DIR"):
        return Path(os.environ["VLLM_KVQ_BUILD_DIR"])
    if (REPO_ROOT / "setup.py").exists():
        return REPO_ROOT / "build" / "cpu_kernel"
    return Path.home() / ".cache" / "vllm-kvq" / "cpu_kernel"


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags",
                                                                   "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_key() -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(CFLAGS).encode(),
                 _cpu_identity().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def load() -> str | None:
    """Load the ops (building them if needed). Returns None, or why they are unavailable."""
    if hasattr(torch.ops, "kvq_cpu") and hasattr(torch.ops.kvq_cpu, "attend"):
        return None
    from torch.utils import cpp_extension

    name = f"kvq_cpu_{_cache_key()}"
    folder = build_dir() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(folder),
                           is_python_module=False,
                           verbose=False)
    except Exception as exc:  # no compiler, no headers, a read-only cache...
        reason = f"the CPU kernels could not be built ({type(exc).__name__}: {exc})"
        LOG.warning("KVQ: %s; layers run the torch path.", reason.splitlines()[0])
        return reason.splitlines()[0]
    return None
