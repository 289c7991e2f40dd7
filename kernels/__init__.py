"""Triton kernels for the KVQ packed formats (installed as ``vllm_kvq.kernels``).

``api``      drop-in replacements for ``vllm_kvq.paged_attention``'s store_slots /
             decode_attention / prefill_attention (+ prefill_attention_varlen, batched)
``store``    quantize + pack every slot of a step in one launch (raw / int / QJL; KIVI
             keys are zeros until their group is packed in torch)
``context``  split-K attention of query tiles over the packed paged context
``merge``    LSE merge of the splits, one un-rotation, the step's own tokens exactly
``decode``   / ``prefill``: the launchers (grids, tile maps, scratch)
``codecs``   device functions: bit unpacking, field loads, per-format scores / values
``layout``   the compile-time slot layout of a format and every launch configuration

On CUDA these compile normally; on CPU they run under ``TRITON_INTERPRET=1`` (tests).
``benchmarks/compile_report.py`` compiles every launch configuration for sm_80 / sm_90.
"""
