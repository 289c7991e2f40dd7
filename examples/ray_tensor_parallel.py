"""KVQ with tensor parallelism over vLLM's Ray executor: several GPUs, one node or several.

Install vllm-kvq on every node (``pip install -e '.[cuda,ray]'`` in a checkout), start Ray,
then serve:

    ray start --head                        # head node
    ray start --address HEAD_IP:6379        # every other node
    vllm serve MODEL --tensor-parallel-size 4 --distributed-executor-backend ray \\
        --attention-backend KVQ --additional-config '{"kvq": {"preset": "k4v2"}}'

or offline, as this script does:

    LLM(model=MODEL, tensor_parallel_size=4, distributed_executor_backend="ray",
        attention_backend="KVQ", additional_config={"kvq": {"preset": "k4v2"}})

The policy travels inside vLLM's config to every worker; ``VLLM_*`` variables set where the
engine starts (e.g. ``VLLM_KVQ_KERNELS``) are forwarded to the Ray workers by vLLM.

    python examples/ray_tensor_parallel.py --model MODEL --tp 4

``--test`` runs on a CPU instead: vLLM refuses Ray on its CPU platform, so it turns on the
test-only patch (``VLLM_KVQ_ALLOW_RAY_ON_CPU=1``, ``patches/ray_on_cpu.py``), starts a small
local Ray cluster, runs the tiny generated Llama with 6 KV heads at TP=2 (``--tp 2 3`` for
both) under Ray and under the mp executor, and checks both give the same tokens.

    python examples/ray_tensor_parallel.py --test
"""

import argparse
import os
import shlex

from tensor_parallel import generate  # examples/tensor_parallel.py

PRESET = "k4v2"


def serve_command(model: str, tp: int) -> str:
    config = '{"kvq": {"preset": "%s"}}' % PRESET
    return (f"vllm serve {shlex.quote(model)} --tensor-parallel-size {tp} "
            f"--distributed-executor-backend ray --attention-backend KVQ "
            f"--additional-config {shlex.quote(config)}")


def run_on_cpu(model: str, sizes: list[int], prompts: list[str]) -> None:
    import ray

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # ranks share a NUMA node
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as Ray's actors: same numerics as mp
    os.environ["VLLM_KVQ_ALLOW_RAY_ON_CPU"] = "1"  # test-only: Ray on the CPU platform
    # One logical CPU per rank: each rank's placement-group bundle reserves one.
    context = ray.init(num_cpus=max(sizes), include_dashboard=False)
    os.environ["RAY_ADDRESS"] = context.address_info["gcs_address"]  # for the engine core
    try:
        on_ray = {tp: generate(model, tp, "ray", prompts) for tp in sizes}
    finally:
        ray.shutdown()
        del os.environ["RAY_ADDRESS"], os.environ["VLLM_KVQ_ALLOW_RAY_ON_CPU"]
    on_mp = {tp: generate(model, tp, "mp", prompts) for tp in sizes}
    for tp in sizes:
        same = on_ray[tp] == on_mp[tp]
        print(f"TP={tp}: Ray {'gives the same tokens as' if same else 'DIFFERS from'} mp")
    assert on_ray == on_mp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--tp", type=int, nargs="+", default=None,
                        help="tensor-parallel sizes (default: 2 with --test, else 4)")
    parser.add_argument("--test", action="store_true",
                        help="tiny generated model on CPU, Ray vs mp executor")
    args = parser.parse_args()
    prompts = ["The capital of France is", "Tensor parallelism splits attention heads"]
    if args.test:
        from vllm_kvq.assets import tiny_llama_path

        model, sizes = tiny_llama_path(num_kv_heads=6, num_heads=12), args.tp or [2]
    else:
        if not args.model:
            parser.error("--model is required without --test")
        model, sizes = args.model, args.tp or [4]
    for tp in sizes:
        print("Served with:", serve_command(model, tp))
    if args.test:
        run_on_cpu(model, sizes, prompts)
        return
    for tp in sizes:
        tokens = generate(model, tp, "ray", prompts)
        print(f"TP={tp} (Ray): {[len(t) for t in tokens]} tokens per prompt")


if __name__ == "__main__":
    main()
