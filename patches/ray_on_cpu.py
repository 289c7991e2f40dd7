"""TEST-ONLY: let vLLM's Ray executor run on the CPU platform, so KVQ's Ray path can be tested
on a machine without GPUs. Never applied unless ``VLLM_KVQ_ALLOW_RAY_ON_CPU=1`` is set in the
process that builds the engine (``vllm_kvq.plugin.register``); on GPUs it is not needed.

vLLM 0.32 refuses Ray on CPU in four places, all keyed on ``current_platform.ray_device_key``
(``""`` on ``CpuPlatform``, inherited from ``platforms/interface.py``):

1. ``initialize_ray_cluster`` (``v1/executor/ray_utils.py``) raises "current platform cpu does
   not support ray"; with a key it builds one placement-group bundle ``{key: 1.0}`` per rank,
   and ``get_bundles_sorted_by_node`` keeps the bundles holding that key. The key becomes
   ``"CPU"``: one logical Ray CPU reserved per rank (so ``ray.init(num_cpus=...)`` must offer
   at least the world size).
2. ``RayExecutorV2._get_actor_resource_kwargs`` would ask ``resources={"CPU": 1}``, which Ray
   rejects (CPU must go through ``num_cpus``, and the executor already passes ``num_cpus=0``).
   On CPU it asks for nothing more: the actor runs inside its rank's bundle, which holds the
   CPU.
3. ``RayWorkerProc.get_node_and_physical_gpu_ids`` reads
   ``ray.get_runtime_context().get_accelerator_ids()[key]``; "CPU" is no accelerator. It runs
   in the actor *before* general plugins load there (``initialize_worker`` comes later), so
   patching vLLM's class in this process would not reach the actor. Instead the executor spawns
   ``CpuRayWorkerProc``, a subclass defined here: Ray pickles the class by reference, so the
   actor imports this module and gets the override without any patch of its own. A CPU rank
   has no device ids; it reports ``[]`` and takes its local rank from its place among the
   node's workers, as on GPUs.
4. Nothing else: ``dist_backend`` is already ``"gloo"``, ``worker_cls`` already ``CPUWorker``,
   ``ray_noset_device_env_vars`` is empty and ``device_control_env_var`` is only read for GPU
   id mapping. The Ray executor bypasses ``OMPProcessManager`` (that is the mp executor's), so
   set ``VLLM_CPU_OMP_THREADS_BIND=nobind`` as for mp TP on a host with fewer NUMA nodes than
   ranks.

Only ``RayExecutorV2`` (vLLM 0.32's default, ``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1``) is
covered; the legacy ``RayDistributedExecutor`` needs Ray compiled graphs and a device on the
driver node, and stays unsupported on CPU.

Environment reaching the actors (``RayExecutorV2``): the driver's whole ``os.environ`` (minus
per-worker variables) is applied with ``setdefault`` in ``initialize_worker``, i.e. after the
actor is constructed; variables needed at actor import time must be in ``runtime_env``. This
patch adds ``VLLM_KVQ_ALLOW_RAY_ON_CPU`` to the actors' ``runtime_env`` so every process of a
Ray engine reports the same patch state.
"""

import inspect
import os

from . import VLLMChangedError, check_parameters, wrap

ENV_VAR = "VLLM_KVQ_ALLOW_RAY_ON_CPU"
RAY_DEVICE_KEY = "CPU"


def _v2():
    from vllm.v1.executor import ray_executor_v2

    return ray_executor_v2


def _make_worker_class():
    v2 = _v2()

    class CpuRayWorkerProc(v2.RayWorkerProc):
        """vLLM's Ray worker actor, reporting no accelerator ids on a CPU node."""

        def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
            return v2.ray.get_runtime_context().get_node_id(), []

    CpuRayWorkerProc.__module__ = __name__
    CpuRayWorkerProc.__qualname__ = "CpuRayWorkerProc"  # pickled by reference, not by value
    return CpuRayWorkerProc


def __getattr__(name: str):
    # Built on first use so that importing this module stays cheap (the plugin imports it in
    # every process); Ray finds the class by reference through this hook in the actor.
    if name == "CpuRayWorkerProc":
        globals()[name] = cls = _make_worker_class()
        return cls
    raise AttributeError(name)


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") == "1"


def _fail(what: str) -> None:
    raise VLLMChangedError(f"{what}; patches/ray_on_cpu.py must be updated for this vLLM.")


def check() -> None:
    try:
        v2 = _v2()
    except ImportError as e:
        _fail(f"vllm.v1.executor.ray_executor_v2 no longer imports ({e})")
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_utils

    if not isinstance(getattr(CpuPlatform, "ray_device_key", None), str):
        _fail("CpuPlatform.ray_device_key is gone")
    executor = getattr(v2, "RayExecutorV2", None)
    worker = getattr(v2, "RayWorkerProc", None)
    if executor is None or worker is None:
        _fail("ray_executor_v2 no longer defines RayExecutorV2 and RayWorkerProc")
    kwargs_fn = inspect.getattr_static(executor, "_get_actor_resource_kwargs", None)
    if not isinstance(kwargs_fn, staticmethod):
        _fail("RayExecutorV2._get_actor_resource_kwargs is no longer a staticmethod")
    for name, fn in (("_build_runtime_env", getattr(executor, "_build_runtime_env", None)),
                     ("get_node_and_physical_gpu_ids",
                      getattr(worker, "get_node_and_physical_gpu_ids", None))):
        if fn is None:
            _fail(f"{name} disappeared")
        check_parameters(fn, ["self"], __name__, name)
    init_source = inspect.getsource(executor._init_executor)
    for needle in ("ray.remote(RayWorkerProc)", "num_cpus=0", "self._get_actor_resource_kwargs()",
                   "self._build_runtime_env()", "get_node_and_physical_gpu_ids.remote()",
                   "initialize_ray_cluster(self.parallel_config, require_gpu_on_driver=False)"):
        if needle not in init_source:
            _fail(f"RayExecutorV2._init_executor no longer contains {needle!r}")
    if "ray_device_key" not in inspect.getsource(ray_utils.initialize_ray_cluster):
        _fail("initialize_ray_cluster no longer keys its placement group on ray_device_key")
    if "ray_device_key" not in inspect.getsource(ray_utils.get_bundles_sorted_by_node):
        _fail("get_bundles_sorted_by_node no longer selects bundles by ray_device_key")


def apply() -> None:
    from vllm.platforms.cpu import CpuPlatform

    v2 = _v2()
    executor = v2.RayExecutorV2
    if not wrap(executor, "_build_runtime_env", _with_opt_in_env):
        return  # applied before
    CpuPlatform.ray_device_key = RAY_DEVICE_KEY
    # The executor resolves the actor class through this module global.
    v2.RayWorkerProc = __getattr__("CpuRayWorkerProc")

    def cpu_in_bundle(original):
        def _get_actor_resource_kwargs():
            if v2.current_platform.is_cpu():
                return {"num_gpus": 0}  # plus the executor's num_cpus=0; the bundle holds the CPU
            return original()

        return _get_actor_resource_kwargs

    wrap(executor, "_get_actor_resource_kwargs", cpu_in_bundle, static=True)


def _with_opt_in_env(original):
    def _build_runtime_env(self):
        runtime_env = original(self)
        runtime_env.setdefault("env_vars", {})[ENV_VAR] = "1"
        return runtime_env

    return _build_runtime_env
