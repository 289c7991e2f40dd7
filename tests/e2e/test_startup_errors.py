"""Bad settings and unsupported models stop startup with one sentence, before allocation."""

import json

import pytest

from vllm_kvq.assets import smollm2_path


def _start(tmp_model=None, **kwargs):
    from vllm import LLM

    return LLM(model=tmp_model or smollm2_path(), attention_backend="KVQ", enforce_eager=True,
               **kwargs)


@pytest.mark.parametrize("kvq, needle", [
    ({"preset": "k3v3"}, "Unknown KVQ preset 'k3v3'; allowed presets are"),
    ({"value_bits": 3}, "value_bits=3 is invalid; allowed values are 1, 2, 4, 8 and 16"),
    ({"group_size": 128}, "group_size=128"),
    ({"layers": {"40": "k4v4"}}, "names layer 40, but the model has layers 0-29"),
    ({"compression": 5}, "Unknown KVQ setting 'compression'"),
])
def test_bad_kvq_setting_is_refused_at_startup(kvq, needle):
    with pytest.raises(ValueError, match=None) as err:
        _start(additional_config={"kvq": kvq})
    assert needle in str(err.value)


def test_quantized_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError) as err:
        _start(kv_cache_dtype="fp8")
    assert "--kv-cache-dtype fp8 cannot be combined with --attention-backend KVQ" in str(err.value)


def test_sliding_window_model_is_refused(tmp_path):
    src = smollm2_path()
    config = json.loads(open(f"{src}/config.json").read())
    config.update(sliding_window=256, use_sliding_window=True, layer_types=None)
    model = tmp_path / "sliding"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes(open(f"{src}/{name}", "rb").read())
    with pytest.raises(ValueError) as err:
        _start(str(model))
    assert "KVQ does not support sliding-window" in str(err.value)
