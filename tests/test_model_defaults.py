"""Per-model defaults (vllm_kvq/model_defaults.py): a shipped policy replaces the uniform
default preset only for the model configuration it names, and only when no setting chooses
formats."""

import json
from types import SimpleNamespace

import pytest

from vllm_kvq.config import DEFAULT_PRESET, PRESETS, KVQConfig
from vllm_kvq.model_defaults import (CHOICES, POLICY_DIR, chooses_formats, config_fields,
                                     model_default, shipped_defaults)
from vllm_kvq.validation import apply_model_default

# SmolLM2-135M's configuration (the bundled model's config.json)
SMOLLM2_TEXT = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=8192)


def _hf(**changes):
    text = SimpleNamespace(**{**SMOLLM2_TEXT, **changes})
    return SimpleNamespace(architectures=["LlamaForCausalLM"]), text


def _vllm_config(kvq=None, **changes):
    hf, text = _hf(**changes)
    model = SimpleNamespace(hf_config=hf, hf_text_config=text)
    return SimpleNamespace(model_config=model,
                           additional_config={} if kvq is None else {"kvq": kvq})


def test_smollm2_configuration_has_its_shipped_default():
    found = model_default(config_fields(*_hf(), 64))
    assert found is not None and found[0].parent == POLICY_DIR
    assert "SmolLM2-135M" in found[1]


@pytest.mark.parametrize("change", [dict(vocab_size=32000), dict(num_hidden_layers=32),
                                    dict(num_key_value_heads=8), dict(hidden_size=960)])
def test_other_configurations_keep_the_uniform_preset(change):
    assert model_default(config_fields(*_hf(**change), 64)) is None
    cfg = _vllm_config()
    cfg.model_config.hf_text_config = _hf(**change)[1]
    assert apply_model_default(cfg, 64) is None and cfg.additional_config == {}


def test_another_head_size_keeps_the_uniform_preset():
    assert model_default(config_fields(*_hf(), 128)) is None


def test_settings_that_choose_formats_turn_it_off():
    assert not chooses_formats({}) and not chooses_formats({"canary": False, "seed": 3})
    for name in CHOICES:
        assert chooses_formats({name: None}), name
    for kvq in ({"preset": DEFAULT_PRESET}, {"window": 32}, {"layers": {"0": "k4v4"}}):
        cfg = _vllm_config(kvq)
        assert apply_model_default(cfg, 64) is None
        assert cfg.additional_config == {"kvq": kvq}


def test_the_default_policy_merges_under_the_users_other_settings():
    cfg = _vllm_config({"canary": False, "seed": 0})
    name = apply_model_default(cfg, 64)
    assert name is not None
    settings = cfg.additional_config["kvq"]
    assert settings["canary"] is False and "policy_file" not in settings  # inlined for workers
    parsed = KVQConfig.from_dict(settings)
    assert parsed.per_head and parsed.window == 16
    parsed.check_model_record({"architecture": "LlamaForCausalLM", "num_layers": 30,
                               "head_size": 64, "num_kv_heads": 3})
    parsed.validate_model(64, 30, 128, 3)


def test_shipped_defaults_hold_the_uniform_defaults_tokens():
    """A shipped default costs no capacity: per token and KV head, on average over the
    model's layers and heads, it stores no more bytes than the uniform default preset (and
    uses the same exact window, so the same ring)."""
    assert shipped_defaults()
    uniform = PRESETS[DEFAULT_PRESET]
    for path, default_for in shipped_defaults():
        settings = json.loads(path.read_text())["kvq"]
        cfg = KVQConfig.from_dict(settings)
        layers = default_for["config"]["num_hidden_layers"]
        heads = default_for["config"]["num_key_value_heads"]
        d = default_for["config"]["head_dim"]
        slot = [f.slot_bytes(d) for i in range(layers) for f in cfg.head_formats(i, heads)]
        assert sum(slot) / len(slot) <= uniform.slot_bytes(d), path
        assert cfg.window == KVQConfig.from_dict({}).window, path
