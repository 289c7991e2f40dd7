"""Throughput under memory pressure: one long-prompt workload, one small KV budget.

Every backend gets the same ``--requests`` prompts of ``--prompt-len`` essay tokens, each
generating ``--gen`` tokens (ignore_eos), and the same ``kv_cache_memory_bytes``. Reported:
end-to-end tokens/s (prompt + generated), peak running requests (vLLM's
vllm:num_requests_running, sampled after every engine step), preemptions
(vllm:num_preemptions), each as a ratio to bf16 (CPU_ATTN) from the same run.

On CPU the KVQ path is the compiled CPU kernels (vllm_kvq.cpu_kernel), still slower per
token than CPU_ATTN's; what carries over to GPU kernels is the capacity effect: more requests
running at once and fewer preemptions at the same memory.

    python benchmarks/throughput.py               # 16 x 1024-token prompts, 48 MiB budget
    python benchmarks/throughput.py --quick       # 4 x 256-token prompts, bf16 + k4v2
"""

import argparse
import time

from tqdm import tqdm

from common import (close, cpu_kernels_missing, metric_value, print_table, try_open_llm,
                    write_json)

FULL = ["k8v4", "k4v4", "k4v2", "k2v2", "qjl256v4"]


def make_prompts(tokenizer, num: int, length: int) -> list[list[int]]:
    from vllm_kvq.assets import essays_text

    ids = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    step = max(length, (len(ids) - length) // max(num, 1))
    return [ids[i * step: i * step + length] for i in range(num)]


def run_workload(llm, prompts, gen: int, desc: str = "steps") -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    pre0 = metric_value(llm, "vllm:num_preemptions")
    t0 = time.time()
    for i, p in enumerate(prompts):
        engine.add_request(f"req-{i}", TokensPrompt(prompt_token_ids=p), params)
    peak, steps, done = 0, 0, 0
    with tqdm(total=len(prompts), desc=desc, leave=False) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done += 1
                    bar.update(1)
            steps += 1
            peak = max(peak, int(metric_value(llm, "vllm:num_requests_running")))
    seconds = time.time() - t0
    tokens = sum(len(p) + gen for p in prompts)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "gen_tokens_per_s": gen * len(prompts) / seconds, "peak_running": peak,
            "preemptions": int(metric_value(llm, "vllm:num_preemptions") - pre0),
            "steps": steps}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--gen", type=int)
    parser.add_argument("--budget-mib", type=int)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    presets = args.presets or (["k4v2"] if args.quick else FULL)
    nreq = args.requests or (4 if args.quick else 16)
    plen = args.prompt_len or (256 if args.quick else 1024)
    gen = args.gen or (16 if args.quick else 64)
    budget = args.budget_mib or (12 if args.quick else 48)
    max_len = -(-(plen + gen) // 128) * 128
    rows, prompts, t0 = [], None, time.time()
    for name in tqdm(["bf16"] + presets, desc="engines"):
        gap = cpu_kernels_missing(name)
        if gap:  # its engine would time the torch reference
            rows.append({"preset": name, "error": f"not timed: {gap[:300]}"})
            continue
        llm, err = try_open_llm(name, kv_cache_memory_bytes=budget << 20, max_model_len=max_len,
                                max_num_batched_tokens=args.chunk, max_num_seqs=64,
                                disable_log_stats=False, enable_prefix_caching=False)
        if llm is None:
            rows.append({"preset": name, "error": err})
            continue
        from common import kv_capacity_tokens

        if prompts is None:
            prompts = make_prompts(llm.get_tokenizer(), nreq, plen)
        rows.append({"preset": name, "kv_tokens": kv_capacity_tokens(llm),
                     **run_workload(llm, prompts, gen, desc=name)})
        close(llm)
    base = next(r for r in rows if r["preset"] == "bf16")
    for r in rows:
        if "tokens_per_s" in r:
            r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["peak_ratio"] = r["peak_running"] / max(base["peak_running"], 1)
    print_table(f"throughput: {nreq} requests x ({plen} prompt + {gen} generated) tokens at a "
                f"{budget} MiB KV budget", rows,
                [("preset", "preset", ""), ("kv_tokens", "KV tokens", "d"),
                 ("tokens_per_s", "tok/s", ".1f"), ("speed_ratio", "vs bf16", ".2f"),
                 ("peak_running", "peak run", "d"), ("peak_ratio", "vs bf16", ".2f"),
                 ("preemptions", "preempt", "d"), ("seconds", "seconds", ".1f")])
    for r in rows:
        if "error" in r:
            print(f"{r['preset']}: {r['error']}")
    payload = {"command": "python benchmarks/throughput.py" + (" --quick" if args.quick else ""),
               "args": vars(args), "budget_mib": budget, "seconds": time.time() - t0,
               "rows": rows}
    write_json(args.out or ("throughput_quick" if args.quick else "throughput"), payload)
    return payload


if __name__ == "__main__":
    main()
