"""WKVQuant (Yue et al., 2024) on the KVQ cache.

The method has three parts: (1) past-only quantization -- a query reads its own and recent
tokens exactly and older ones quantized -- which the backend does for every format (the exact
window, ``vllm_kvq/exactness.py``); (2) two-dimensional quantization: a static per-channel
shift and scale, calibrated offline, that smooths channel outliers before the dynamic
per-token codes (``vllm_kvq/smoothing.py`` applies it; ``smoothing_fit`` calibrates it); (3)
cross-block reconstruction regularization (CRR) of 4-bit weights: learnable weight clipping
trained block by block on the output k blocks downstream (``crr``, ``lwc``); ``weights``
writes 4-bit checkpoints vLLM loads (compressed-tensors pack-quantized) by CRR, OmniQuant's
LWC, GPTQ or round to nearest.

    python -m vllm_kvq.wkvquant smooth --preset k4v2 --out smooth_k4v2.json
    python -m vllm_kvq.wkvquant weights --method crr --group-size 64 --out smollm2-w4
    vllm serve MODEL --attention-backend KVQ \
        --additional-config '{"kvq": {"policy_file": "smooth_k4v2.json"}}'
"""
