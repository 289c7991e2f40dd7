"""KVQ settings: presets, overrides, the per-layer policy, and fail-closed validation.

Every invalid setting must raise ``KVQConfigError`` whose message is one
sentence naming the setting and what is allowed.
"""

import json
from types import SimpleNamespace

import pytest

from vllm_kvq.config import (
    DEFAULT_PRESET,
    PRESETS,
    RAW,
    KVQConfig,
    KVQConfigError,
    config_from_vllm,
)
from vllm_kvq.formats import LayerFormat, storage_format


def _assert_one_sentence(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert isinstance(err.value, KVQConfigError)
    assert "\n" not in msg and msg.endswith("."), msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


# ---------------------------------------------------------------------------------------------
# Valid settings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_parses_and_validates(preset):
    cfg = KVQConfig.from_dict({"preset": preset})
    assert cfg.preset == preset and cfg.default == PRESETS[preset]
    assert cfg.per_layer == {} and cfg.seed == 0
    for head_size in (64, 128, 256):
        cfg.validate_model(head_size, 30)
        text = cfg.describe(head_size, 30)
        assert preset in text and str(PRESETS[preset].slot_bytes(head_size)) in text


def test_presets_are_named_by_what_they_store():
    for name, fmt in PRESETS.items():
        if name == "bf16":
            assert fmt.is_raw
            continue
        key, value = name[1:].split("v") if name.startswith("k") else name[3:].split("v")
        assert fmt.value.kind == "int" and fmt.value.bits == int(value)
        if name.startswith("k"):
            assert fmt.key.kind == "int" and fmt.key.bits == int(key)
        else:
            assert fmt.key.kind == "qjl" and fmt.key.sketch_dim == int(key)


@pytest.mark.parametrize("raw", [None, {}])
def test_default_preset(raw):
    cfg = KVQConfig.from_dict(raw)
    assert cfg.preset == DEFAULT_PRESET and cfg.default == PRESETS[DEFAULT_PRESET]
    assert cfg.window == 16  # the default runs with its 16 exact recent tokens


@pytest.mark.parametrize("raw, window", [
    ({"preset": "k4v3"}, 16), ({"preset": "k4v3", "window": 0}, 0),
    ({"preset": "k4v3", "window": 64}, 64), ({"preset": "k4v2"}, 0), ({"preset": "bf16"}, 0)])
def test_a_preset_brings_its_window_unless_one_is_given(raw, window):
    assert KVQConfig.from_dict(raw).window == window


def test_overrides_change_only_what_they_name():
    base = PRESETS["k4v2"]
    cfg = KVQConfig.from_dict({"preset": "k4v2", "key_bits": 8, "seed": 7})
    assert cfg.seed == 7
    assert cfg.default.key == storage_format("int", 8, base.key.group_size, base.key.rotate)
    assert cfg.default.value == base.value

    cfg = KVQConfig.from_dict({"preset": "k4v2", "value_bits": 16})
    assert cfg.default.value == RAW and cfg.default.key == base.key

    cfg = KVQConfig.from_dict({"preset": "k8v4", "group_size": 64, "rotate": True})
    assert cfg.default.key.group_size == 64 and cfg.default.value.group_size == 64
    assert cfg.default.key.rotate and cfg.default.value.rotate

    cfg = KVQConfig.from_dict({"preset": "qjl256v4", "sketch_dim": 512, "outliers": 0,
                               "value_bits": 2})
    assert cfg.default.key == storage_format("qjl", sketch_dim=512, outliers=0)
    assert cfg.default.value.bits == 2 and cfg.default.value.kind == "int"

    # group_size / rotate leave non-integer codecs alone
    cfg = KVQConfig.from_dict({"preset": "qjl256v4", "group_size": 16, "rotate": False})
    assert cfg.default.key == PRESETS["qjl256v4"].key
    assert cfg.default.value.group_size == 16 and not cfg.default.value.rotate

    # integer bits for a key that was QJL: becomes an integer key code
    cfg = KVQConfig.from_dict({"preset": "qjl256v4", "key_bits": 4})
    assert cfg.default.key.kind == "int" and cfg.default.key.bits == 4


def test_per_layer_policy():
    cfg = KVQConfig.from_dict({
        "preset": "k4v2",
        "group_size": 64,
        "layers": {
            "1-3": "k8v8",
            "5": {"value_bits": 4},
            "6": {"preset": "qjl256v4", "outliers": 0},
            "9-9": "bf16",
        },
        "bf16_layers": [0, 3],
    })
    default = cfg.default
    assert default.key.group_size == 64 == default.value.group_size
    assert cfg.layer_format(0) == PRESETS["bf16"]
    assert cfg.layer_format(1) == cfg.layer_format(2) == PRESETS["k8v8"]
    assert cfg.layer_format(3) == PRESETS["bf16"]  # bf16_layers wins over a range
    assert cfg.layer_format(4) == default == cfg.layer_format(29)
    # Per-layer overrides start from the default *with* the top-level overrides applied.
    assert cfg.layer_format(5) == LayerFormat(default.key, storage_format("int", 4, 64, True))
    assert cfg.layer_format(6).key == storage_format("qjl", sketch_dim=256, outliers=0)
    assert cfg.layer_format(6).value == PRESETS["qjl256v4"].value
    assert cfg.layer_format(9).is_raw
    assert sorted(cfg.per_layer) == [0, 1, 2, 3, 5, 6, 9]
    cfg.validate_model(64, 10)
    assert "7 layer exception(s)" in cfg.describe(64, 10)
    slots = {cfg.layer_format(i).slot_bytes(64) for i in range(10)}
    assert len(slots) > 2  # really different page sizes per layer


def test_config_from_vllm_reads_additional_config():
    vc = SimpleNamespace(additional_config={"kvq": {"preset": "k8v8", "layers": {"0": "bf16"}}})
    cfg = config_from_vllm(vc)
    assert cfg.default == PRESETS["k8v8"] and cfg.layer_format(0).is_raw
    for empty in (None, {}, {"other_plugin": {"x": 1}}):
        assert config_from_vllm(SimpleNamespace(additional_config=empty)).preset == DEFAULT_PRESET
    with pytest.raises(KVQConfigError):
        config_from_vllm(SimpleNamespace(additional_config={"kvq": {"preset": "nope"}}))


def test_config_from_vllm_parses_once_per_distinct_settings(tmp_path):
    """The backend, its builder, every layer and the per-layer page patch share one parse;
    different settings (or a policy file's contents) give a different config."""
    settings = {"preset": "k4v4", "layers": {"1": "bf16"}}
    first = config_from_vllm(SimpleNamespace(additional_config={"kvq": settings}))
    same = config_from_vllm(SimpleNamespace(additional_config={"kvq": dict(reversed(
        settings.items()))}))
    assert same is first
    other = config_from_vllm(SimpleNamespace(additional_config={"kvq": {"preset": "k8v8"}}))
    assert other is not first and other.preset == "k8v8"
    policy = tmp_path / "policy.json"
    for preset in ("k2v2", "k8v4"):  # keyed on the file's settings, not its path
        policy.write_text(json.dumps({"kvq": {"preset": preset}}))
        cfg = config_from_vllm(SimpleNamespace(additional_config={
            "kvq": {"policy_file": str(policy)}}))
        assert cfg.preset == preset


def test_from_dict_does_not_mutate_input():
    raw = {"preset": "k4v4", "layers": {"1": {"preset": "k8v8", "value_bits": 2}},
           "bf16_layers": [0]}
    snapshot = repr(raw)
    KVQConfig.from_dict(raw)
    KVQConfig.from_dict(raw)
    assert repr(raw) == snapshot


# ---------------------------------------------------------------------------------------------
# Invalid settings: one sentence naming the setting and the allowed values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, fragments", [
    ({"preset": "k3v3"}, ["preset", "'k3v3'", "k4v2", "qjl256v4"]),
    ({"preset": None}, ["preset", "allowed presets"]),
    ({"key_bits": 5}, ["key_bits=5", "1, 2, 3, 4, 8"]),
    ({"value_bits": 0}, ["value_bits=0", "1, 2, 3, 4, 8"]),
    ({"value_bits": True}, ["value_bits=True", "1, 2, 3, 4, 8"]),
    ({"group_size": 48}, ["group_size=48", "powers of two"]),
    ({"group_size": 4}, ["group_size=4", "powers of two"]),
    ({"rotate": "yes"}, ["rotate='yes'", "true and false"]),
    ({"bits": 4}, ["'bits'", "allowed settings", "key_bits", "value_bits"]),
    ({"preset": "k4v2", "sketch_dim": 256}, ["sketch_dim", "QJL", "qjl"]),
    ({"preset": "k4v2", "outliers": 2}, ["outliers", "QJL"]),
    ({"preset": "qjl256v4", "sketch_dim": 100}, ["sketch_dim=100", "multiples of 64"]),
    ({"preset": "qjl256v4", "outliers": 64}, ["outliers=64", "0 to 32"]),
    ({"seed": -1}, ["seed=-1", "non-negative"]),
    ({"seed": "1"}, ["seed='1'", "non-negative"]),
    ({"bf16_layers": "0"}, ["bf16_layers", "non-negative layer indices"]),
    ({"bf16_layers": [-1]}, ["bf16_layers", "non-negative layer indices"]),
    ({"layers": [1, 2]}, ["layers", "layer indices"]),
    ({"layers": {"a-b": "k4v4"}}, ["layers", "'a-b'", "\"0-3\""]),
    ({"layers": {"5-2": "k4v4"}}, ["layers", "'5-2'"]),
    ({"layers": {"-1": "k4v4"}}, ["layers", "'-1'"]),
    ({"layers": {"1": 4}}, ["layers['1']", "preset name"]),
    ({"layers": {"1": "k5v5"}}, ["layers['1']", "'k5v5'", "k4v2"]),
    ({"layers": {"1": {"key_bits": 5}}}, ["layers['1'].key_bits=5", "1, 2, 3, 4, 8"]),
    ({"layers": {"1": {"preset": "zz"}}}, ["layers['1'].", "'zz'"]),
    ({"layers": {"1": {"bits": 2}}}, ["layers['1'].", "'bits'"]),
    ({"layers": {"2": {"sketch_dim": 512}}}, ["layers['2'].sketch_dim", "QJL"]),
    ({"prefill_exact": 1}, ["prefill_exact=1", "true and false"]),
    ({"model": "llama"}, ["model='llama'", "architecture", "num_kv_heads"]),
    ({"model": {"layers": 30}}, ["model=", "num_layers"]),
])
def test_invalid_settings_raise_one_sentence(raw, fragments):
    with pytest.raises(KVQConfigError) as err:
        KVQConfig.from_dict(raw)
    _assert_one_sentence(err, *fragments)


@pytest.mark.parametrize("raw, head_size, num_layers, fragments", [
    ({"group_size": 64}, 96, 30, ["group_size=64", "head size 96", "divide"]),
    ({"group_size": 128}, 64, 30, ["group_size=128", "head size 64"]),
    ({"layers": {"3": {"group_size": 256}}}, 128, 30, ["group_size=256", "layer 3"]),
    ({"layers": {"40": "k8v8"}}, 64, 30, ["layer 40", "0-29"]),
    ({"layers": {"28-31": "k8v8"}}, 64, 30, ["layer 30", "0-29"]),
    ({"bf16_layers": [30]}, 64, 30, ["layer 30", "0-29"]),
    ({"preset": "qjl256v4", "outliers": 32}, 32, 4, ["outliers=32", "head size 32"]),
])
def test_validate_model_refuses(raw, head_size, num_layers, fragments):
    cfg = KVQConfig.from_dict(raw)
    with pytest.raises(KVQConfigError) as err:
        cfg.validate_model(head_size, num_layers)
    _assert_one_sentence(err, *fragments)


def test_validate_model_accepts_fitting_group_sizes():
    KVQConfig.from_dict({"group_size": 32}).validate_model(96, 30)
    KVQConfig.from_dict({"group_size": 64}).validate_model(64, 30)
    KVQConfig.from_dict({"layers": {"29": "k2v2"}, "bf16_layers": [0]}).validate_model(64, 30)


# ---------------------------------------------------------------------------------------------
# AsymKV layer-wise splits and policy files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, key_kind", [("k2v2", "int"), ("kivi2", "kivi")])
def test_asymkv_split_sets_bits_per_layer(preset, key_kind):
    import random

    num_layers = random.randint(4, 40)
    l_k, l_v = random.randint(0, num_layers), random.randint(0, num_layers)
    cfg = KVQConfig.from_dict({"preset": preset, "window": 32, "asymkv": [l_k, l_v],
                               "layers": {"0": "k4v4"}, "bf16_layers": [num_layers - 1]})
    cfg.validate_model(64, num_layers)
    for layer in range(1, num_layers - 1):
        fmt = cfg.layer_format(layer)
        assert fmt.key.kind == key_kind and fmt.value.kind == "int"
        assert fmt.key.bits == (2 if layer < l_k else 1)
        assert fmt.value.bits == (2 if layer < l_v else 1)
        # everything but the bits comes from the preset (rotation, group sizes)
        assert fmt.key.group_size == cfg.default.key.group_size
        assert fmt.value.rotate == cfg.default.value.rotate
    assert cfg.layer_format(0) == PRESETS["k4v4"]  # explicit layers win
    assert cfg.layer_format(num_layers - 1).is_raw
    assert f"AsymKV split [{l_k}, {l_v}]" in cfg.describe(64, num_layers)


@pytest.mark.parametrize("raw, fragments", [
    ({"asymkv": 3}, ["asymkv=3", "[l_k, l_v]"]),
    ({"asymkv": [1, -1]}, ["asymkv=[1, -1]", "[l_k, l_v]"]),
    ({"asymkv": [1, 2, 3]}, ["asymkv=", "[l_k, l_v]"]),
    ({"preset": "qjl256v2", "asymkv": [1, 1]}, ["asymkv", "QJL", "k2v2"]),
    ({"policy_file": "/nonexistent/policy.json"}, ["policy_file=", "could not be read",
                                                   "vllm_kvq.allocate"]),
])
def test_invalid_asymkv_and_policy_settings(raw, fragments):
    with pytest.raises(KVQConfigError) as err:
        KVQConfig.from_dict(raw)
    _assert_one_sentence(err, *fragments)


def test_asymkv_beyond_the_model_is_refused():
    with pytest.raises(KVQConfigError) as err:
        KVQConfig.from_dict({"preset": "k2v2", "asymkv": [31, 0]}).validate_model(64, 30)
    _assert_one_sentence(err, "asymkv=[31, 0]", "0 to 30")


def test_policy_file_is_merged_under_inline_settings(tmp_path):
    import json

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"kvq": {"preset": "k2v2", "window": 16,
                                        "layers": {"0-1": "k4v4", "2": "k8v4"}},
                                "allocation": {"target": 5.0}}))
    cfg = KVQConfig.from_dict({"policy_file": str(path), "window": 64,
                               "layers": {"1": "bf16"}})
    assert cfg.default == PRESETS["k2v2"] and cfg.window == 64  # inline wins
    assert cfg.layer_format(0) == PRESETS["k4v4"]  # file's layers stay ...
    assert cfg.layer_format(1).is_raw  # ... unless named inline
    assert cfg.layer_format(2) == PRESETS["k8v4"]
    path.write_text(json.dumps({"preset": "k2v2"}))
    with pytest.raises(KVQConfigError) as err:
        KVQConfig.from_dict({"policy_file": str(path)})
    _assert_one_sentence(err, "policy_file=", "{\"kvq\"")


def test_validation_inlines_the_policy_file(tmp_path):
    """Workers (and other nodes) get the policy itself, not a path they may not have."""
    import json

    from vllm_kvq.validation import inline_policy_file

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"kvq": {"preset": "k2v2", "layers": {"0": "k4v4"}}}))
    vllm_config = SimpleNamespace(additional_config={"kvq": {"policy_file": str(path)}})
    inline_policy_file(vllm_config)
    assert vllm_config.additional_config == {"kvq": {"preset": "k2v2",
                                                     "layers": {"0": "k4v4"}}}


SMOLLM2 = {"architecture": "LlamaForCausalLM", "num_layers": 30, "head_size": 64,
           "num_kv_heads": 3}


def test_a_policy_for_another_model_is_refused():
    llama8b = {"architecture": "LlamaForCausalLM", "num_layers": 32, "head_size": 128,
               "num_kv_heads": 8}
    with pytest.raises(KVQConfigError) as err:
        KVQConfig.from_dict({"model": llama8b}).check_model_record(SMOLLM2)
    _assert_one_sentence(err, "32 layers, head size 128 and 8 KV heads",
                         "30 layers, head size 64 and 3 KV heads", "vllm_kvq.allocate")
    KVQConfig.from_dict({"model": SMOLLM2}).check_model_record(SMOLLM2)
    KVQConfig.from_dict({"model": {"head_size": 64}}).check_model_record(SMOLLM2)  # partial
    KVQConfig.from_dict({}).check_model_record(SMOLLM2)  # nothing recorded, nothing checked


def test_shipped_policies_record_the_packaged_model():
    import json
    from pathlib import Path

    from vllm_kvq.model_defaults import POLICY_DIR

    policies = sorted((Path(__file__).parents[1] / "examples" / "policies").glob("*.json"))
    policies += sorted(POLICY_DIR.glob("*.json"))
    assert policies
    for path in policies:
        cfg = KVQConfig.from_dict(json.loads(path.read_text())["kvq"])
        assert cfg.model == SMOLLM2, path
