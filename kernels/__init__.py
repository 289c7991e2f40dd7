"""Triton kernels for the KVQ packed formats (installed as ``vllm_kvq.kernels``).

``api``      drop-in replacements for ``vllm_kvq.paged_attention``'s store_slots /
             decode_attention / prefill_attention (+ prefill_attention_varlen, batched)
``store``    quantize + pack every slot of a step in one launch
``context``  split-K attention of query tiles over the packed paged context
``merge``    LSE merge of the splits, one un-rotation, the window and fresh tokens exactly
``decode``   / ``prefill``: the launchers (grids, tile maps, scratch)
``formats``  one module per storage format (device functions mirroring the torch reference
             in ``vllm_kvq/formats/<format>.py``), and the dispatch on named kinds
``bits``     device helpers every format uses (bit unpacking, fp16 fields, aligned windows)
``layout``   the compile-time slot layout of a format pair, from the registered formats
``launch``   launch tuning: tiles, warps, stages, register caps, split counts

Dependencies run one way: these modules import ``vllm_kvq.formats`` (the registered formats
and their kernel facts) and never the backend. The installed package registers the kernels
with ``vllm_kvq.dispatch`` through the ``vllm_kvq.kernels`` entry point (``register``); a
plain checkout imports them as ``kernels`` with only torch and triton installed.

On CUDA these compile normally; on CPU they run under ``TRITON_INTERPRET=1`` (tests).
``benchmarks/compile_report.py`` compiles every launch configuration for sm_80 / sm_90.
"""


def register() -> None:
    """Entry point: offer these kernels to ``vllm_kvq.dispatch``."""
    from vllm_kvq.dispatch import Kernels, register_kernels

    from . import api, layout

    register_kernels(Kernels(ops=api, gap=layout.kernel_gap))
