"""One attention layer's decode step on CPU: KVQ's compiled CPU kernels vs vLLM's CPU_ATTN.

A step of one layer = store the batch's new K/V + attend every request's context. KVQ runs
``vllm_kvq.cpu_kernel.ops`` (and, with ``--torch``, the torch reference) on packed blocks;
CPU_ATTN runs vLLM's own C++ ops (``cpu_attn_reshape_and_cache`` +
``cpu_attention_with_kv_cache``, scheduler metadata built once per step as its builder does)
on bf16 blocks of the same block size. Shapes default to SmolLM2-135M (3 KV heads, GQA 3,
head size 64). Cells: batch x context; each cell is measured in ``--rounds`` interleaved
rounds (KVQ, CPU_ATTN, KVQ, ...), so drift on a shared machine hits both; reported: CPU time
per step (all threads; ``--clock wall``: elapsed time) and the ratio CPU_ATTN / KVQ (> 1: KVQ
faster) with the 2.5-97.5% range of the per-round ratios. ``--prefill T``: a prompt chunk of T tokens per request
instead (no earlier context; every token reads the earlier ones of its chunk packed, KVQ's
default semantics, but for the last ``--window`` of its block; CPU_ATTN runs its causal varlen
path).

    python benchmarks/cpu_decode.py                     # 4 batches x 4 contexts x 2 presets
    python benchmarks/cpu_decode.py --quick             # 4 cells, seconds
    python benchmarks/cpu_decode.py --prefill 512 --batches 1 4   # prompt chunks
    python benchmarks/cpu_decode.py --layers 30         # caches of a model's 30 layers
"""

import argparse
import statistics
import time

import torch

from common import print_table, write_json
from vllm_kvq.allocate import Candidate
from vllm_kvq.config import PRESETS
from vllm_kvq.exactness import packed_limits
from vllm_kvq.cpu_kernel import ops as cpu_ops
from vllm_kvq.cpu_kernel.build import load
from vllm_kvq.formats import build_codecs
from vllm_kvq import paged_attention


class KVQLayer:
    """A step of ``new`` tokens per request after ``context`` packed ones: decode (new = 1)
    or a prompt chunk (context 0, new = the prompt), every token reading the earlier ones
    packed (``vllm_kvq.exactness``) but for the last ``window`` of its block (a prompt's
    window: its own fresh tokens, read exactly)."""

    def __init__(self, preset, batch, context, heads, group, d, block_size, ops, new=1,
                 window=0):
        self.fmt = PRESETS[preset] if preset in PRESETS else Candidate.parse(preset).fmt
        self.kc, self.vc = build_codecs(self.fmt, d, torch.bfloat16, 0, 3, list(range(heads)))
        per_req = -(-(context + new) // block_size)
        self.cache = torch.zeros(batch * per_req, heads, block_size, self.fmt.slot_bytes(d),
                                 dtype=torch.uint8)
        self.table = torch.arange(batch * per_req, dtype=torch.int32).view(batch, per_req)
        pos = torch.arange(context)
        for b in range(batch):  # a real packed context: random K/V through the store
            slots = self.table[b, pos // block_size].long() * block_size + pos % block_size
            k, v = (torch.randn(context, heads, d).bfloat16() for _ in range(2))
            cpu_ops.store_slots(k, v, self.cache, slots, self.kc, self.vc)
        self.lens = torch.full((batch,), context, dtype=torch.int32)
        step = torch.arange(context, context + new)
        self.slots = torch.cat([self.table[b, step // block_size].long() * block_size
                                + step % block_size for b in range(batch)])
        self.query_start = [b * new for b in range(batch + 1)]
        self.limits = packed_limits(step.repeat(batch), torch.tensor(context), window,
                                    block_size).int()
        self.ops, self.scale, self.new = ops, d ** -0.5, new
        self.q = torch.randn(batch * new, heads * group, d).bfloat16()
        self.k, self.v = (torch.randn(batch * new, heads, d).bfloat16() for _ in range(2))
        if ops is cpu_ops:  # as the backend calls the CPU kernels: groups built once, the
            # bf16 output written in place
            self.groups = cpu_ops.KernelGroups.uniform(self.cache, self.kc, self.vc)
            self.starts = torch.tensor(self.query_start, dtype=torch.int32)
            self.out = torch.empty_like(self.q)

    def step(self):
        if self.ops is cpu_ops:
            cpu_ops.store_groups(self.k, self.v, self.cache, self.slots, self.groups)
            return cpu_ops.attend_groups(
                self.q, self.k, self.v, self.cache, self.table, self.lens, self.starts,
                self.groups, self.scale, self.out,
                packed_limits=None if self.new == 1 else self.limits)
        self.ops.store_slots(self.k, self.v, self.cache, self.slots, self.kc, self.vc)
        if self.new == 1:
            return self.ops.decode_attention(self.q, self.k, self.v, self.cache, self.table,
                                             self.lens, self.kc, self.vc, self.scale)
        return self.ops.prefill_attention_varlen(
            self.q, self.k, self.v, self.cache, self.table, self.query_start, self.lens,
            self.kc, self.vc, self.scale, packed_limits=self.limits)


class CpuAttnLayer:
    """vLLM's CPU_ATTN decode for the same shapes (its ops, as its backend calls them)."""

    def __init__(self, batch, context, heads, group, d, block_size, new=1):
        from vllm import _custom_ops as vops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.vops = vops
        self.isa = _get_attn_isa(torch.bfloat16, block_size, d)
        if self.isa == "amx":  # a process must ask Linux for AMX state before its first tile op
            torch.cpu._init_amx()
        per_req = -(-(context + new) // block_size)
        kv = torch.randn(batch * per_req, heads, 2 * block_size, d).bfloat16()
        self.key_cache, self.value_cache = kv.chunk(2, dim=2)
        self.table = torch.arange(batch * per_req, dtype=torch.int32).view(batch, per_req)
        self.seq_lens = torch.full((batch,), context + new, dtype=torch.int32)
        self.qsl = torch.arange(batch + 1, dtype=torch.int32) * new
        step = torch.arange(context, context + new)
        self.slots = torch.cat([self.table[b, step // block_size].long() * block_size
                                + step % block_size for b in range(batch)])
        self.q = torch.randn(batch * new, heads * group, d).bfloat16()
        self.k, self.v = (torch.randn(batch * new, heads, d).bfloat16() for _ in range(2))
        self.out = torch.empty_like(self.q)
        self.heads, self.group, self.d, self.scale = heads, group, d, d ** -0.5

    def step(self):
        meta = self.vops.cpu_attn_get_scheduler_metadata(
            num_reqs=self.seq_lens.shape[0], num_heads=self.heads * self.group,
            num_kv_heads=self.heads, head_dim=self.d, seq_lens=self.seq_lens,
            dtype=torch.bfloat16, query_start_loc=self.qsl, causal=True,
            sliding_window_size=-1, isa=self.isa, enable_kv_split=True)
        self.vops.cpu_attn_reshape_and_cache(self.k, self.v, self.key_cache, self.value_cache,
                                             self.slots, self.isa)
        self.vops.cpu_attention_with_kv_cache(
            query=self.q, key_cache=self.key_cache, value_cache=self.value_cache,
            output=self.out, query_start_loc=self.qsl, seq_lens=self.seq_lens,
            scale=self.scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=self.table, softcap=0.0, scheduler_metadata=meta, s_aux=None)
        return self.out


class HeadGroups:
    """A layer whose KV heads are cut into ``n`` head groups of one format each (a per-head
    policy's split layer; with one format the page is the uniform layer's). ``joint``: stored
    and attended as the backend runs the CPU kernels, one call for all groups
    (``ops.KernelGroups``) writing the model-dtype output in place; otherwise as it runs paths
    that take one group per call (torch, Triton): per group, contiguous copies of its heads'
    queries and K/V, a store and an attention call, its output slice copied into the layer's
    output."""

    def __init__(self, preset, n, batch, context, heads, group, d, block_size, ops,
                 joint=True):
        if heads % n:
            raise SystemExit(f"--head-groups {n} must divide --heads {heads}")
        self.size, self.group, self.joint = heads // n, group, joint
        self.parts = [KVQLayer(preset, batch, context, heads // n, group, d, block_size, ops)
                      for _ in range(n)]
        self.q = torch.randn(batch, heads * group, d).bfloat16()
        self.k, self.v = (torch.randn(batch, heads, d).bfloat16() for _ in range(2))
        self.out = torch.empty_like(self.q)
        if joint:  # one cache of the layer's page: group i's region holds part i's heads
            first, slot = self.parts[0], self.parts[0].fmt.slot_bytes(d)
            self.cache = torch.cat([part.cache for part in self.parts], dim=1)
            self.groups = cpu_ops.KernelGroups([
                (i * self.size, (i + 1) * self.size, i * self.size * slot, slot, part.kc,
                 part.vc) for i, part in enumerate(self.parts)])
            self.table, self.lens, self.slots = first.table, first.lens, first.slots
            self.starts, self.scale = cpu_ops.decode_starts(batch), first.scale
            for i, part in enumerate(self.parts):  # each part: its group's share of the layer
                kv = slice(i * self.size, (i + 1) * self.size)
                part.cache, part.k, part.v = self.cache[:, kv], self.k[:, kv], self.v[:, kv]
                part.q = self.q[:, kv.start * group:kv.stop * group]

    def step(self):
        if self.joint:
            cpu_ops.store_groups(self.k, self.v, self.cache, self.slots, self.groups)
            return cpu_ops.attend_groups(self.q, self.k, self.v, self.cache, self.table,
                                         self.lens, self.starts, self.groups, self.scale,
                                         self.out)
        for i, part in enumerate(self.parts):
            kv = slice(i * self.size, (i + 1) * self.size)
            qh = slice(kv.start * self.group, kv.stop * self.group)
            part.q = self.q[:, qh].contiguous()
            part.k, part.v = self.k[:, kv].contiguous(), self.v[:, kv].contiguous()
            self.out[:, qh] = part.step().to(self.out.dtype)
        return self.out


class LayerStack:
    """``n`` independent layers of one kind stepped in turn, as a model's decode step reads
    every layer's cache once: with one layer, its cache stays in the core's caches between
    steps (8k tokens of bf16 K/V for SmolLM2 are 6 MB, a tenth of the 30 layers' 190 MB), so
    the layer is timed from L2/L3, not from where a served model reads its KV cache."""

    def __init__(self, make, n: int):
        self.layers = [make() for _ in range(n)]

    def step(self):
        for layer in self.layers:
            out = layer.step()
        return out


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # --clock


def cpu_seconds(layer, calls: int) -> float:
    t0 = clock()
    for _ in range(calls):
        layer.step()
    return (clock() - t0) / calls


def measure(layers: dict, rounds: int, budget: float) -> dict:
    """Interleaved rounds; calls per round sized so a round of each takes ~budget seconds.
    Each layer runs a quarter round untimed before its timed one: the row timed right after
    CPU_ATTN had run 17-30% slower than the same layer timed later in the round (Intel Xeon
    with AMX, 2026-12-07; whatever CPU_ATTN leaves behind, caches or clocks, it passes)."""
    calls = {}
    for name, layer in layers.items():
        layer.step()
        t = cpu_seconds(layer, 3)
        calls[name] = max(1, int(budget / max(t, 1e-6)))
    samples = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            cpu_seconds(layer, max(1, calls[name] // 4))  # untimed: see below
            samples[name].append(cpu_seconds(layer, calls[name]))
    return samples


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["k4v3", "k4v2"],
                    help="presets, or the allocator's candidates by name (k3v2g64: 3-bit "
                         "keys, 2-bit values, 64-channel groups, rotated)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--budget", type=float, default=0.05, help="seconds per round (of --clock)")
    ap.add_argument("--torch", action="store_true", help="also time the torch reference")
    ap.add_argument("--prefill", type=int, default=0, metavar="T",
                    help="time a prompt chunk of T tokens per request instead (context 0; "
                         "--contexts is ignored)")
    ap.add_argument("--window", type=int, default=0, metavar="R",
                    help="with --prefill: each token reads the last R earlier tokens of its "
                         "block exactly (the exact window; the default preset's is 16)")
    ap.add_argument("--layers", type=int, default=1, metavar="L",
                    help="step L independent layers in turn (their caches evicting each "
                         "other, as in a model's decode step: SmolLM2 has 30); times are per "
                         "layer")
    ap.add_argument("--head-groups", type=int, default=0, metavar="N",
                    help="decode: also time each preset with its KV heads cut into N > 1 "
                         "head groups (a per-head policy's split layer): in one call, as the "
                         "backend runs the CPU kernels, and in a call per group")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="cpu: CPU time of all threads (the work done); wall: elapsed time "
                         "(the work done and how well it is spread over the threads)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="cpu_decode")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.contexts, args.presets, args.rounds = [1, 8], [512, 2048], ["k4v3"], 3
    assert load() is None, load()
    global clock
    clock = CLOCKS[args.clock]
    shape = (args.heads, args.group, args.head_size, args.block_size)
    rows, cells = [], []
    new = args.prefill or 1
    contexts = [0] if args.prefill else args.contexts
    group_counts = [args.head_groups] if args.head_groups > 1 and not args.prefill else []
    for batch in args.batches:
        for context in contexts:
            window = args.window if args.prefill else 0
            layers = {"CPU_ATTN": LayerStack(
                lambda: CpuAttnLayer(batch, context, *shape, new=new), args.layers)}
            for p in args.presets:
                layers[p] = LayerStack(lambda: KVQLayer(p, batch, context, *shape, cpu_ops,
                                                        new=new, window=window), args.layers)
                for n in group_counts:
                    layers[f"{p} {n} groups"] = LayerStack(
                        lambda: HeadGroups(p, n, batch, context, *shape, cpu_ops), args.layers)
                    layers[f"{p} {n} groups, a call each"] = LayerStack(
                        lambda: HeadGroups(p, n, batch, context, *shape, cpu_ops, joint=False),
                        args.layers)
                if args.torch:
                    layers[p + " torch"] = LayerStack(lambda: KVQLayer(
                        p, batch, context, *shape, paged_attention, new=new), args.layers)
            samples = measure(layers, args.rounds, args.budget * args.layers)
            samples = {n: [x / args.layers for x in s] for n, s in samples.items()}
            base = samples["CPU_ATTN"]
            cell = {"batch": batch, "context": context, "new_tokens": new,
                    "cpu_ms": {n: statistics.median(s) * 1e3 for n, s in samples.items()}}
            for name, s in samples.items():
                if name == "CPU_ATTN":
                    continue
                ratios = [b / x for b, x in zip(base, s)]
                cell.setdefault("speedup", {})[name] = {
                    "median": statistics.median(ratios), "lo": percentile(ratios, 0.025),
                    "hi": percentile(ratios, 0.975)}
                rows.append({"batch": batch, "context": context, "kvq": name,
                             "kvq_ms": cell["cpu_ms"][name], "base_ms": cell["cpu_ms"]["CPU_ATTN"],
                             "ratio": statistics.median(ratios),
                             "range": f"[{percentile(ratios, 0.025):.2f}, "
                                      f"{percentile(ratios, 0.975):.2f}]"})
                print(rows[-1], flush=True)
            cells.append(cell)
    what = f"prefill of {args.prefill} tokens per request" if args.prefill else "decode step"
    stack = f", per layer of {args.layers} stepped in turn" if args.layers > 1 else ""
    print_table(f"One layer's {what} (store + attention), {args.clock} time{stack}", rows, [
        ("batch", "batch", "d"), ("context", "context", "d"), ("kvq", "KVQ", "s"),
        ("kvq_ms", "KVQ ms", ".3f"), ("base_ms", "CPU_ATTN ms", ".3f"),
        ("ratio", "CPU_ATTN/KVQ", ".2f"), ("range", "2.5-97.5%", "s")])
    write_json(args.out, {"threads": torch.get_num_threads(), "clock": args.clock,
                          "window": args.window,
                          "layers": args.layers, "head_groups": args.head_groups, "shape": {
        "kv_heads": args.heads, "group": args.group, "head_size": args.head_size,
        "block_size": args.block_size}, "cells": cells})


if __name__ == "__main__":
    main()
