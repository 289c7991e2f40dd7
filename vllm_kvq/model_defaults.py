"""Per-model defaults: a policy allocated for one model configuration, used when no format is
chosen.

The default preset (``k4v3`` with a 16-token exact window) serves every model. Where the
project has allocated a per-KV-head policy for a model with retrieval probes
(``python -m vllm_kvq.allocate --per-head --probes ...``) and measured it retrieving within
bf16's interval where the uniform preset does not, at the same 4x capacity, that policy is
the model's default instead (README, "Retrieval beside perplexity"). A shipped policy names
the configuration it was made for (``default_for.config``: Hugging Face config fields that
must all equal the model's); the settings that choose formats (any of ``CHOICES``) turn it
off, e.g. ``{"kvq": {"preset": "k4v3"}}`` for the uniform preset.
"""

import json
from pathlib import Path
from typing import Any

POLICY_DIR = Path(__file__).resolve().parent / "policies"
# Settings that choose what layers store: giving any of them means the model default is not
# used (seed, prefill_exact and canary combine with it).
CHOICES = ("preset", "key_bits", "value_bits", "group_size", "rotate", "sketch_dim", "outliers",
           "layers", "bf16_layers", "asymkv", "policy_file", "window", "smoothing", "model")


def config_fields(hf_config, text_config, head_size: int) -> dict[str, Any]:
    """The fields a shipped policy's ``default_for.config`` may name, of this model."""
    fields = {name: getattr(text_config, name, None) for name in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "max_position_embeddings")}
    fields["architecture"] = (getattr(hf_config, "architectures", None) or [None])[0]
    fields["head_dim"] = head_size
    return fields


def shipped_defaults() -> list[tuple[Path, dict[str, Any]]]:
    """(file, its ``default_for``) of every shipped policy that is some model's default."""
    found = []
    for path in sorted(POLICY_DIR.glob("*.json")):
        default_for = json.loads(path.read_text()).get("default_for")
        if default_for:
            found.append((path, default_for))
    return found


def model_default(fields: dict[str, Any]) -> tuple[Path, str] | None:
    """The shipped policy made for a model with these ``config_fields`` (and the model it was
    allocated on), or None."""
    for path, default_for in shipped_defaults():
        if all(fields.get(k) == v for k, v in default_for["config"].items()):
            return path, default_for["model"]
    return None


def chooses_formats(raw: Any) -> bool:
    """Whether KVQ settings (the ``kvq`` object, or None) choose formats themselves."""
    return not isinstance(raw, dict) or any(name in raw for name in CHOICES)
