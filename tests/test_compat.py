"""The vLLM releases KVQ supports: every patch check, the backend-interface check, one
engine-free backend step and a startup refusal, against the installed vLLM 0.32 (CPU build)
and vLLM 0.33's Python layer (GPU build, unpacked from its wheel); and what an untested
release gets: one sentence when KVQ is selected, nothing changed otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvq import compat
from vllm_kvq.patches import ALLOW_UNTESTED_ENV, VLLMChangedError

ROOT = Path(__file__).resolve().parents[1]


def _failures(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in compat.INFO
            and v != "ok" and not str(v).startswith("not applicable")}


def test_installed_vllm_passes_every_check():
    results = compat.run_checks()
    assert results["supported"] and not _failures(results), results
    assert len(results["backend_step"]) == 16, results["backend_step"]


def test_vllm_033_python_layer_passes_every_check_and_steps_bit_for_bit_alike():
    results = compat.run_against("0.33.0", ROOT / "build")
    assert results["vllm"] == "0.33.0" and results["build"] == "gpu", results
    assert results["vllm_file"].startswith(str(ROOT / "build" / "vllm-0.33.0")), results
    assert results["supported"] and not _failures(results), results
    assert results["ray_on_cpu"].startswith("not applicable")  # test-only, CPU build only
    assert results["backend_step"] == compat.backend_step()


def test_interface_check_fails_loudly_when_a_declaration_changes(monkeypatch):
    from vllm.v1.attention import backend as vllm_backend

    def changed(cls, spec, something_new):
        return spec

    monkeypatch.setattr(vllm_backend.AttentionBackend, "customize_spec", classmethod(changed))
    with pytest.raises(VLLMChangedError, match="customize_spec is declared by vLLM as"):
        compat.check_interface()


def test_interface_check_fails_loudly_when_metadata_loses_a_field(monkeypatch):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    fields = dict(CommonAttentionMetadata.__dataclass_fields__)
    fields.pop("seq_lens_cpu_upper_bound")
    monkeypatch.setattr(CommonAttentionMetadata, "__dataclass_fields__", fields)
    with pytest.raises(VLLMChangedError, match="seq_lens_cpu_upper_bound"):
        compat.check_interface()


UNTESTED = """
import vllm
vllm.__version__ = "0.34.0"  # as if a newer release were installed
import torch
from vllm.config import AttentionConfig, ModelConfig, VllmConfig
from vllm.platforms.cpu import CpuPlatform
from vllm_kvq.assets import tiny_llama_path
from vllm_kvq.config import KVQConfigError
from vllm_kvq.plugin import register

register()  # vLLM 0.33 calls plugins without catching their errors: this must not raise
routed = getattr(CpuPlatform.get_attn_backend_cls, "_kvq_patched", False)
path = tiny_llama_path()
model = lambda: ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True,
                            dtype=torch.bfloat16, max_model_len=512)
VllmConfig(model_config=model())  # other backends: untouched
try:
    VllmConfig(model_config=model(), attention_config=AttentionConfig(backend="KVQ"))
    print("REFUSED: no")
except KVQConfigError as e:
    print("REFUSED:", e)
print("ROUTED:", routed)
"""


def _run_untested(allow: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ALLOW_UNTESTED_ENV}
    if allow:
        env[ALLOW_UNTESTED_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", UNTESTED], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)


def test_untested_vllm_refuses_kvq_in_one_sentence_and_changes_nothing_else():
    out = _run_untested(allow=False)
    assert out["ROUTED"] == "False"  # no patch applied but the config check
    assert out["REFUSED"] == ("vllm-kvq was tested with vLLM 0.32.x and 0.33.x, but vLLM "
                              "0.34.0 is installed; install a tested vLLM, or set "
                              f"{ALLOW_UNTESTED_ENV}=1 to try this one (every vLLM function "
                              "KVQ patches is then checked at startup).")


def test_untested_vllm_can_be_tried_on_request():
    out = _run_untested(allow=True)
    assert out["ROUTED"] == "True" and out["REFUSED"] == "no"
