"""Bad settings and unsupported models stop startup with one sentence, before allocation;
settings that would go unread are named in a warning.

Each case builds vLLM's engine config exactly as ``LLM(...)`` and ``vllm serve`` do
(``EngineArgs.create_engine_config``), which is where KVQ validates: no engine starts and no
weight is read, so a refusal here is a refusal before weights load. One case goes through
``LLM(...)`` itself, and the command line is run as a user runs it.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from vllm_kvq.assets import smollm2_path
from vllm_kvq.config import KVQConfigError

LLAMA_8B = {"architecture": "LlamaForCausalLM", "num_layers": 32, "head_size": 128,
            "num_kv_heads": 8}


def _config(model=None, backend="KVQ", **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model or smollm2_path(), attention_backend=backend,
                      enforce_eager=True, **kwargs).create_engine_config()


def _assert_sentence(err, needle):
    msg = str(err.value)
    assert isinstance(err.value, KVQConfigError), type(err.value)
    assert "\n" not in msg and msg.endswith("."), msg
    assert needle in msg, msg


def _foreign_policy(tmp_path):
    path = tmp_path / "llama8b.json"
    path.write_text(json.dumps({"kvq": {"preset": "k2v2", "model": LLAMA_8B}}))
    return str(path)


@pytest.mark.parametrize("kvq, needle", [
    ({"preset": "k3v3"}, "Unknown KVQ preset 'k3v3'; allowed presets are"),
    ({"value_bits": 5}, "value_bits=5 is invalid; allowed values are 1, 2, 3, 4, 8 and 16"),
    ({"group_size": 128}, "group_size=128"),
    ({"layers": {"40": "k4v4"}}, "names layer 40, but the model has layers 0-29"),
    ({"compression": 5}, "Unknown KVQ setting 'compression'"),
    ({"prefill_exact": "yes"}, "prefill_exact='yes' is invalid"),
    ({"preset": "kivi2"}, "need window >= 32 (got 0)"),
    ({"model": LLAMA_8B}, "made for LlamaForCausalLM with 32 layers, head size 128 and 8 KV "
                          "heads, but this model is LlamaForCausalLM with 30 layers"),
])
def test_bad_kvq_setting_is_refused_at_startup(kvq, needle):
    with pytest.raises(KVQConfigError) as err:
        _config(additional_config={"kvq": kvq})
    _assert_sentence(err, needle)


def test_a_policy_allocated_for_another_model_is_refused(tmp_path):
    with pytest.raises(KVQConfigError) as err:
        _config(additional_config={"kvq": {"policy_file": _foreign_policy(tmp_path)}})
    _assert_sentence(err, "this model is LlamaForCausalLM with 30 layers, head size 64 and 3 KV "
                          "heads")


def test_offline_llm_raises_the_same_sentence():
    from vllm import LLM

    with pytest.raises(KVQConfigError) as err:
        LLM(model=smollm2_path(), attention_backend="KVQ", enforce_eager=True,
            additional_config={"kvq": {"preset": "k3v3"}})
    _assert_sentence(err, "Unknown KVQ preset 'k3v3'")


def test_quantized_kv_cache_dtype_is_refused():
    with pytest.raises(KVQConfigError) as err:
        _config(kv_cache_dtype="fp8")
    _assert_sentence(err, "--kv-cache-dtype fp8 cannot be combined with --attention-backend KVQ")


def test_an_exact_window_as_long_as_the_sliding_window_is_refused(tmp_path):
    src = smollm2_path()
    config = json.loads(open(f"{src}/config.json").read())
    config.update(sliding_window=256, use_sliding_window=True, layer_types=None)
    model = tmp_path / "sliding"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes(open(f"{src}/{name}", "rb").read())
    _config(str(model))  # sliding-window layers are served (tests/e2e/test_sliding_window.py)
    with pytest.raises(KVQConfigError) as err:
        _config(str(model), additional_config={"kvq": {"window": 256}})
    _assert_sentence(err, "window=256 must be smaller than the model's sliding window (256 "
                          "tokens); choose window 0-255")


def test_speculative_decoding_with_a_draft_model_is_refused():
    _config(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    with pytest.raises(KVQConfigError) as err:
        _config(speculative_config={"model": smollm2_path(), "num_speculative_tokens": 3})
    _assert_sentence(err, "KVQ supports speculative decoding with n-gram proposals only")


@pytest.fixture
def kvq_warnings(caplog):
    caplog.set_level(logging.WARNING)
    logging.getLogger("vllm").addHandler(caplog.handler)  # vLLM's loggers do not propagate
    yield lambda: [r.getMessage() for r in caplog.records if "KVQ" in r.getMessage()]
    logging.getLogger("vllm").removeHandler(caplog.handler)


def test_a_mistyped_kvq_key_is_named(kvq_warnings):
    _config(additional_config={"kvg": {"preset": "k2v2"}})
    (msg,) = kvq_warnings()
    assert "no \"kvq\" key (it has 'kvg')" in msg and "did you mean \"kvq\"" in msg, msg


def test_kvq_settings_without_the_kvq_backend_are_named(kvq_warnings):
    _config(backend="CPU_ATTN", additional_config={"kvq": {"preset": "k2v2"}})
    (msg,) = kvq_warnings()
    assert "the attention backend is not KVQ, so they are ignored" in msg, msg


def _cli(*args, env=None):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "vllm-kvq"), *args],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


def test_the_command_line_ends_a_refusal_with_its_sentence(tmp_path):
    run = _cli("serve", smollm2_path(), "--attention-backend", "KVQ", "--additional-config",
               json.dumps({"kvq": {"policy_file": _foreign_policy(tmp_path)}}))
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-kvq: error: The KVQ policy was made for") and \
        last.endswith("."), last
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    debug = _cli("serve", smollm2_path(), "--attention-backend", "KVQ", "--additional-config",
                 '{"kvq": {"preset": "k3v3"}}', env={"VLLM_KVQ_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "KVQConfigError: Unknown KVQ preset 'k3v3'" in debug.stderr


def test_help_and_version_say_what_the_plugin_adds():
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("vllm-kvq 0.")
    assert "vLLM 0.32" in version.stdout
    helped = _cli("serve", "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    kvq_part, _, vllm_part = helped.stdout.partition("vLLM's own help follows.")
    for needle in ("--attention-backend KVQ", "prefill_exact", "policy_file", "k4v2",
                   "kivi2", "VLLM_KVQ_KERNELS"):
        assert needle in kvq_part, needle
    assert "usage: vllm serve" in vllm_part  # vLLM's own serve help follows
