"""KVQ under vLLM's Ray executor (``RayExecutorV2``) at TP=2 and TP=3, against the mp
executor at the same TP size.

vLLM refuses Ray on its CPU platform; the test-only patch ``patches/ray_on_cpu.py`` lifts that
when ``VLLM_KVQ_ALLOW_RAY_ON_CPU=1``. This process never applies it: general plugins are
loaded here *before* the variable is set, so only the engine-core process (spawned with the
variable) and the Ray worker actors (``runtime_env`` and the driver env vLLM forwards) run
patched, as a real deployment would.

One small Ray cluster (``num_cpus`` = the largest TP size, one logical CPU per rank's
placement-group bundle) serves the whole module and is shut down before the mp engines start
and before the module ends. The engine core finds it through ``RAY_ADDRESS``, like
``vllm serve`` on a node where ``ray start`` ran.

Model, KVQ policy and prompts are test_tensor_parallel.py's: a tiny generated Llama with 6 KV
heads, which TP=2 and TP=3 split evenly, with page sizes mixed per layer and per KV head.
"""

import os
import time

import pytest

from vllm_kvq.assets import tiny_llama_path

from .conftest import greedy, shutdown
from .test_tensor_parallel import _policy, _prompts, agreement

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.e2e

TP_SIZES = (2, 3)
MAX_TOKENS = 16
SENTINEL = "VLLM_KVQ_RAY_TEST_SENTINEL"  # a VLLM_* variable set only in the driver


def _probe(worker) -> dict:
    """Runs inside every worker (collective_rpc): where it runs and what it selected."""
    import os

    import torch
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        import ray

        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except ImportError:
        actor = None
    context = worker.vllm_config.compilation_config.static_forward_context
    return {
        "pid": os.getpid(),
        "rank": worker.rank,
        "local_rank": worker.local_rank,
        "ray_actor": actor,
        "configured_backend": worker.vllm_config.attention_config.backend.name,
        "kvq_member": "KVQ" in AttentionBackendEnum.__members__,
        "kvq_routed": getattr(CpuPlatform.get_attn_backend_cls, "_kvq_patched", False),
        "layer_backends": sorted({layer.attn_backend.get_name() for layer in context.values()
                                  if hasattr(layer, "attn_backend")}),
        "allow_ray_on_cpu": os.environ.get("VLLM_KVQ_ALLOW_RAY_ON_CPU"),
        "sentinel": os.environ.get(SENTINEL),
        "threads": torch.get_num_threads(),
    }


def _run(executor: str, tp: int) -> dict:
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=tiny_llama_path(num_kv_heads=6, num_heads=12), attention_backend="KVQ",
              additional_config={"kvq": _policy(6)}, tensor_parallel_size=tp,
              distributed_executor_backend=executor, enforce_eager=True, seed=0,
              max_model_len=1024, max_num_batched_tokens=128, kv_cache_memory_bytes=32 << 20)
    try:
        return {"outputs": greedy(llm, _prompts(), max_tokens=MAX_TOKENS),
                "workers": llm.collective_rpc(_probe),
                "seconds": time.perf_counter() - start}
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def runs():
    """{(executor, tp): run} for Ray then mp, one engine at a time."""
    import cloudpickle
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # before the opt-in variable: this process stays unpatched
    cloudpickle.register_pickle_by_value(__import__(__name__, fromlist=["_"]))
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # fewer NUMA nodes than ranks
        # Ray gives its zero-CPU actors one OMP thread; mp workers would take a share of the
        # host's cores. Equal thread counts make both executors compute bit for bit the same.
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(_probe)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv(SENTINEL, "forwarded")
        mp.setenv("VLLM_KVQ_ALLOW_RAY_ON_CPU", "1")
        start = time.perf_counter()
        context = ray.init(num_cpus=max(TP_SIZES), include_dashboard=False)
        print(f"Ray cluster up in {time.perf_counter() - start:.1f} s")
        try:
            mp.setenv("RAY_ADDRESS", context.address_info["gcs_address"])
            for tp in TP_SIZES:
                results["ray", tp] = _run("ray", tp)
        finally:
            ray.shutdown()
        mp.delenv("RAY_ADDRESS")
        mp.delenv("VLLM_KVQ_ALLOW_RAY_ON_CPU")
        for tp in TP_SIZES:
            results["mp", tp] = _run("mp", tp)
    for key, run in results.items():
        print(f"{key}: engine + {MAX_TOKENS} tokens x 3 prompts in {run['seconds']:.1f} s")
    return results


@pytest.mark.parametrize("tp", TP_SIZES)
def test_ray_gives_the_mp_executors_answers(runs, tp):
    match, diff = agreement(runs["mp", tp]["outputs"], runs["ray", tp]["outputs"])
    print(f"TP={tp}: Ray vs mp token match {match:.2%}, max logprob diff {diff:.2e}")
    assert match == 1.0
    assert diff <= 1e-3


@pytest.mark.parametrize("tp", TP_SIZES)
def test_every_ray_worker_is_an_actor_running_kvq(runs, tp):
    workers = runs["ray", tp]["workers"]
    for w in workers:
        print(w)
    assert sorted(w["rank"] for w in workers) == list(range(tp))
    assert sorted(w["local_rank"] for w in workers) == list(range(tp))
    assert len({w["pid"] for w in workers}) == tp
    for w in workers:
        assert w["ray_actor"] is not None, "not running in a Ray actor"
        # The KVQ member survived unpickling the config in the actor (platform-plugin hook),
        # and the general plugin's patches ran there.
        assert w["configured_backend"] == "KVQ"
        assert w["kvq_member"] and w["kvq_routed"]
        assert w["layer_backends"] == ["KVQ"]
        assert w["allow_ray_on_cpu"] == "1"  # runtime_env, present from actor start
        assert w["sentinel"] == "forwarded"  # vLLM forwards the driver's environment
    # The mp engines ran in plain processes, unpatched.
    for w in runs["mp", tp]["workers"]:
        print("mp", w)
        assert w["ray_actor"] is None and w["layer_backends"] == ["KVQ"]
        assert w["allow_ray_on_cpu"] is None


def test_this_process_was_never_patched(runs):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

    assert CpuPlatform.ray_device_key == ""
    assert not getattr(RayExecutorV2._build_runtime_env, "_kvq_patched", False)
    assert "VLLM_KVQ_ALLOW_RAY_ON_CPU" not in os.environ
    assert not ray.is_initialized()
