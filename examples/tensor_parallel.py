"""KVQ with tensor parallelism, offline and served.

On GPUs (one node or several, Ray executor):

    vllm serve MODEL --tensor-parallel-size 4 --distributed-executor-backend ray \\
        --attention-backend KVQ --additional-config '{"kvq": {"preset": "k4v2"}}'

    LLM(model=MODEL, tensor_parallel_size=4, distributed_executor_backend="ray",
        attention_backend="KVQ", additional_config={"kvq": {"preset": "k4v2"}})

This script runs the same offline form on the current machine. ``--test`` uses a tiny
generated Llama with 6 KV heads and the mp executor, so it runs on a CPU (TP=2 and TP=3
split the heads evenly; ``VLLM_CPU_OMP_THREADS_BIND=nobind`` lets several CPU ranks share
one NUMA node) and checks that every TP size gives TP=1's tokens.

    python examples/tensor_parallel.py --test
"""

import argparse
import os

from vllm import LLM, SamplingParams


def generate(model: str, tp: int, executor: str, prompts: list[str]) -> list[list[int]]:
    llm = LLM(model=model, tensor_parallel_size=tp, distributed_executor_backend=executor,
              attention_backend="KVQ", additional_config={"kvq": {"preset": "k4v2"}},
              enforce_eager=True, max_model_len=1024, kv_cache_memory_bytes=64 << 20)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    llm.llm_engine.engine_core.shutdown()
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--tp", type=int, nargs="+", default=[2])
    parser.add_argument("--executor", default="mp", choices=["mp", "ray"])
    parser.add_argument("--test", action="store_true",
                        help="tiny generated model on CPU, TP=1/2/3, mp executor")
    args = parser.parse_args()
    prompts = ["The capital of France is", "Tensor parallelism splits attention heads"]
    if args.test:
        from vllm_kvq.assets import tiny_llama_path

        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        model, sizes = tiny_llama_path(num_kv_heads=6, num_heads=12), [1, 2, 3]
    else:
        model, sizes = args.model, args.tp
    results = {tp: generate(model, tp, args.executor, prompts) for tp in sizes}
    for tp, tokens in results.items():
        same = tokens == results[sizes[0]]
        print(f"TP={tp}: {'same tokens as' if same else 'DIFFERENT from'} TP={sizes[0]}")
    if args.test:
        assert all(t == results[1] for t in results.values())


if __name__ == "__main__":
    main()
