"""Fail closed at startup: refuse model features and settings KVQ cannot serve correctly.

Every refusal is one sentence naming the setting (or model feature) and what is allowed.
"""

import difflib

from vllm.logger import init_logger

from .backend import KVQBackend, check_model_dtype
from .config import (DEFAULT_PRESET, KVQConfigError, config_from_vllm, model_facts,
                     resolve_policy_file)
from .dispatch import check_kernel_choice, layer_gap
from .exactness import exact_span
from .model_defaults import chooses_formats, config_fields, model_default
from .window import ring_capacity, speculative_tokens, window_ring_bytes


logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log config shows it

# Proposers whose drafts KVQ verifies against the packed cache (tests/e2e: output with
# speculation equals output without it).
SPECULATIVE_METHODS = ("ngram",)
# Attention layer types KVQ stores packed (hf ``layer_types``): full and sliding-window.
LAYER_TYPES = ("full_attention", "sliding_attention")


def _refuse(message: str) -> None:
    raise KVQConfigError(message)


def cpu_capability() -> str:
    """torch's name for this host's widest vector ISA ("AVX512", "AVX2", "DEFAULT", ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def check_quantized_weights(model, device_type: str) -> None:
    """Packed 4-bit weights (compressed-tensors, as python -m vllm_kvq.wkvquant weights writes
    them) run on x86 CPUs through vLLM's CPUWNA16 kernel, which needs AVX-512."""
    if model.quantization != "compressed-tensors" or device_type != "cpu":
        return
    config = getattr(model.hf_config, "quantization_config", None) or {}
    groups = config.get("config_groups", {}) if isinstance(config, dict) else {}
    if not any((g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations")
               for g in groups.values()):
        return  # not 4-bit weights with 16-bit activations
    import platform

    if platform.machine() in ("x86_64", "AMD64") and "AVX512" not in cpu_capability():
        _refuse(f"This model's compressed-tensors weights need AVX-512 on an x86 CPU (vLLM's "
                f"CPUWNA16 kernel), but this host offers {cpu_capability()}; serve the "
                "unquantized model here, or the checkpoint on an AVX-512 host or a GPU.")


def inline_policy_file(vllm_config) -> None:
    """Replace ``policy_file`` by the settings it holds, in the config that is sent to every
    worker, so ranks on other nodes (or after the file changed) use the policy validated here."""
    additional = vllm_config.additional_config
    raw = additional.get("kvq") if isinstance(additional, dict) else None
    if isinstance(raw, dict) and "policy_file" in raw:
        additional["kvq"] = resolve_policy_file(raw)


def apply_model_default(vllm_config, head_size: int) -> str | None:
    """Where no KVQ setting chooses formats and a shipped policy was made for this model's
    configuration (``vllm_kvq.model_defaults``), put that policy's settings into the config
    every worker receives (the user's other settings win); returns its file, or None."""
    additional = vllm_config.additional_config
    raw = additional.get("kvq", {}) if isinstance(additional, dict) else None
    if chooses_formats(raw):
        return None
    model = vllm_config.model_config
    found = model_default(config_fields(model.hf_config, model.hf_text_config, head_size))
    if found is None:
        return None
    path, allocated_on = found
    additional["kvq"] = {**resolve_policy_file({"policy_file": str(path)}), **raw}
    logger.info("KVQ: no format chosen, and this model's configuration has a per-KV-head policy "
                "allocated for it (on %s), which retrieves like bf16 where the uniform %s does "
                "not: %s. Pass --additional-config '{\"kvq\": {\"preset\": \"%s\"}}' for "
                "the uniform preset.", allocated_on, DEFAULT_PRESET, path.name, DEFAULT_PRESET)
    return path.name


def warn_unread_settings(vllm_config, kvq_backend: bool) -> None:
    """Settings that would otherwise be ignored without a word: ``additional_config`` with
    other keys but no ``kvq`` (a typo such as "kvg") under KVQ, and ``kvq`` settings without
    the KVQ backend."""
    additional = vllm_config.additional_config
    if not isinstance(additional, dict):
        return
    if kvq_backend and "kvq" not in additional and additional:
        near = difflib.get_close_matches("kvq", [str(k) for k in additional], n=1, cutoff=0.5)
        logger.warning("KVQ: --additional-config has no \"kvq\" key (it has %s), so KVQ runs "
                       "its defaults%s.", ", ".join(map(repr, additional)),
                       f"; did you mean \"kvq\" instead of {near[0]!r}?" if near else "")
    if not kvq_backend and "kvq" in additional:
        logger.warning("KVQ: --additional-config has \"kvq\" settings, but the attention "
                       "backend is not KVQ, so they are ignored; add --attention-backend KVQ to "
                       "use them.")


def validate_vllm_config(vllm_config) -> None:
    model = vllm_config.model_config
    cfg = config_from_vllm(vllm_config)  # raises on bad KVQ settings
    warn_unread_settings(vllm_config, kvq_backend=True)
    raw = (vllm_config.additional_config or {}).get("kvq") or {}
    if isinstance(raw, dict) and "policy_file" in raw and cfg.model is None:
        logger.warning("KVQ: policy_file %s records no model, so it is not checked against this "
                       "one; policies written by python -m vllm_kvq.allocate record it.",
                       raw["policy_file"])
    inline_policy_file(vllm_config)
    if model is None:
        return
    head_size = model.get_head_size()
    shipped = apply_model_default(vllm_config, head_size)
    if shipped is not None:
        cfg = config_from_vllm(vllm_config)
    if vllm_config.cache_config.cache_dtype not in ("auto", "float16", "bfloat16"):
        _refuse(f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype} cannot be combined "
                "with --attention-backend KVQ; keep it 'auto' and choose the KVQ format in "
                "--additional-config '{\"kvq\": {\"preset\": ...}}'.")
    try:
        check_model_dtype(model.dtype)
    except ValueError as e:
        _refuse(str(e))
    if model.use_mla:
        _refuse("KVQ does not support MLA models (latent attention); use another "
                "--attention-backend for this model.")
    if model.is_encoder_decoder:
        _refuse("KVQ does not support encoder-decoder models (cross attention); use another "
                "--attention-backend for this model.")
    layer_types = getattr(model.hf_text_config, "layer_types", None) or []
    other = sorted(set(layer_types) - set(LAYER_TYPES))
    if other:
        _refuse(f"KVQ serves full and sliding-window attention layers, but this model also has "
                f"{', '.join(other)} layers; use another --attention-backend for it.")
    sliding = model.get_sliding_window()
    if sliding is not None and cfg.window >= sliding:
        _refuse(f"KVQ setting window={cfg.window} must be smaller than the model's sliding "
                f"window ({sliding} tokens); choose window 0-{sliding - 1}.")
    speculative = vllm_config.speculative_config
    if speculative is not None and speculative.method not in SPECULATIVE_METHODS:
        _refuse(f"KVQ supports speculative decoding with n-gram proposals only "
                f"(--speculative-config '{{\"method\": \"ngram\", ...}}'), not method "
                f"{speculative.method!r}: draft models bring attention layers of their own, "
                "which KVQ has not been tested with.")
    block_size = vllm_config.cache_config.block_size
    if block_size is not None and block_size % 16:
        _refuse(f"KVQ needs --block-size to be a multiple of 16, got {block_size}.")
    if not KVQBackend.supports_head_size(head_size):
        _refuse(f"KVQ supports head sizes {KVQBackend.get_supported_head_sizes()}, but the "
                f"model's head size is {head_size}.")
    num_layers = model.hf_text_config.num_hidden_layers
    cfg.check_model_record(model_facts(model.hf_config, model.hf_text_config, head_size))
    cfg.validate_model(head_size, num_layers, block_size, model.get_total_num_kv_heads())
    formats = [cfg.layer_formats(i) for i in range(num_layers)]
    from vllm.platforms import current_platform  # resolved lazily: plugins load first

    check_quantized_weights(model, current_platform.device_type)
    fallbacks = check_kernel_choice(current_platform.device_type, formats, head_size,
                                    model.dtype)
    policy_file = shipped or (raw.get("policy_file") if isinstance(raw, dict) else None)
    span = exact_span(cfg.window, block_size) if block_size else None
    logger.info("%s", cfg.describe(head_size, num_layers, policy_file, span))
    if cfg.prefill_exact and vllm_config.cache_config.enable_prefix_caching:
        logger.warning("KVQ prefill_exact: a request whose prompt hits the prefix cache reads "
                       "the cached part packed, which its cold run read exactly, so the same "
                       "request may answer differently; pass --no-enable-prefix-caching if "
                       "answers must not depend on the cache.")
    if speculative is not None and cfg.prefill_exact and \
            cfg.window < speculative_tokens(vllm_config):
        logger.warning("KVQ prefill_exact: draft tokens being verified attend to each other "
                       "exactly, where decoding one token at a time reads those beyond the "
                       "%d-token window packed, so speculation may change answers; drop "
                       "prefill_exact to keep them equal.", cfg.window)
    if cfg.window:
        capacity = ring_capacity(cfg.window, speculative_tokens(vllm_config))
        ring = window_ring_bytes(capacity, vllm_config.scheduler_config.max_num_seqs,
                                 num_layers, model.get_total_num_kv_heads(), head_size,
                                 model.dtype.itemsize)
        logger.info("KVQ exact recent window: %d tokens (ring of %d positions) x %d request "
                    "slots = %.1f MiB (all ranks together), outside the KV cache pool.",
                    cfg.window, capacity, vllm_config.scheduler_config.max_num_seqs,
                    ring / 2**20)
    if fallbacks:
        gap = next(g for f in formats[fallbacks[0]]
                   if (g := layer_gap(current_platform.device_type, f, head_size, model.dtype)))
        logger.warning("KVQ: layers %s run the torch path (layer %d: %s).", fallbacks,
                       fallbacks[0], gap)
