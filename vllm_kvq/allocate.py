"""Automatic per-layer bit allocation: the smallest measured loss at a target compression.

    python -m vllm_kvq.allocate --target 5 --out policy_5x.json
    vllm serve MODEL --attention-backend KVQ \\
        --additional-config '{"kvq": {"policy_file": "policy_5x.json"}}'

1. Candidates: rotated per-token integer codes, keys and values at 1/2/3/4(/8) bits with 32- or
   64-channel groups, minus every candidate another one beats on all counts (no more bytes, no
   fewer bits on either side, no larger groups), plus bf16. Page slots are padded to 8 bytes
   and the allocator sees the padded size, as the cache does (at head size 32, 1-bit keys +
   2-bit values fill the same 24 bytes as 2/2 bits and drop out; at 64 and up no candidate
   pads).
2. Sensitivity: for every layer and candidate, the mean KL divergence of the model's
   next-token distribution when only that layer uses the candidate
   (``vllm_kvq.sensitivity``), on calibration text (by default the middle of the packaged
   essays: the perplexity benchmark reads their end), plus, times ``--probe-weight``, the
   same KL on retrieval probes (``vllm_kvq.retrieval_probe``: chat prompts whose answer is
   a fact planted hundreds of tokens back, scored on the answer tokens only). Text KL alone
   hands 1-bit values to layers whose loss shows only when a fact must be copied.
3. Allocation: per-layer costs are taken as additive (as AsymKV and mixed-precision work do);
   a multiple-choice knapsack over the layers picks one candidate per layer minimizing the
   summed cost with the average slot size within ``4 * head_size / target`` bytes (bf16 is
   ``4 * head_size``). Exact, by dynamic programming over ``SLOT_ALIGN``-byte units.
4. The policy file holds the KVQ settings (every layer named) and an ``allocation`` record:
   the target, the measured cost table, and how it was made.

``--per-head`` does all of it per (layer, KV head): each head of each layer is measured alone
with each candidate and the knapsack runs over heads, so a layer's heads may store different
formats (``{"heads": [...]}`` entries, ``vllm_kvq/formats/head_layout.py``). Retrieval is
carried by a few heads (retrieval heads: DuoAttention, RazorAttention); per-layer choices must
give a whole layer the bits one head of it needs. The pages are sized for one rank; under
tensor parallelism a rank whose heads need fewer bytes than another's leaves the rest of its
page unused.

With a window, ``--budget-mib B --max-num-seqs N`` makes the target count tokens at a total
KV budget of B MiB, as vLLM's capacity report does: the window's ring (R bf16 tokens per
request slot, every layer) comes out of B first, so the packed format must compress by
``target * B / (B - ring)``.

KIVI keys are not among the candidates: their per-channel groups need the exact recent window
in the engine and are measured separately (``benchmarks/perplexity.py``).
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from itertools import product

from .config import PRESETS, _int, model_facts
from .formats import SLOT_ALIGN, LayerFormat

BF16 = PRESETS["bf16"]


@dataclass(frozen=True)
class Candidate:
    key_bits: int
    value_bits: int
    group_size: int

    @property
    def fmt(self) -> LayerFormat:
        return LayerFormat(_int(self.key_bits, True, self.group_size),
                           _int(self.value_bits, True, self.group_size))

    def name(self) -> str:
        return f"k{self.key_bits}v{self.value_bits}g{self.group_size}"

    def settings(self) -> dict:
        return {"key_bits": self.key_bits, "value_bits": self.value_bits,
                "group_size": self.group_size}

    @classmethod
    def parse(cls, name: str) -> "Candidate":
        """The candidate ``name()`` names, e.g. ``k4v3g64``."""
        keys, rest = name[1:].split("v")
        values, group = rest.split("g")
        return cls(int(keys), int(values), int(group))


def candidates(head_size: int, bits=(1, 2, 3, 4), groups=(32, 64)) -> list[Candidate]:
    """Integer-code candidates no other candidate beats on every count."""
    options = [Candidate(k, v, g) for k, v, g in product(bits, bits, groups)
               if g <= head_size and head_size % g == 0]

    def size(c):
        return c.fmt.slot_bytes(head_size)

    def beats(a, b):
        return (a != b and size(a) <= size(b) and a.key_bits >= b.key_bits
                and a.value_bits >= b.value_bits and a.group_size <= b.group_size)

    return sorted((c for c in options if not any(beats(o, c) for o in options)),
                  key=lambda c: (size(c), c.name()))


def allocate(costs: list[list[float]], sizes: list[int], budget_bytes: float) -> list[int]:
    """One option per layer minimizing the summed cost with total size <= budget_bytes.
    costs[layer][option]; sizes[option] in bytes (multiples of SLOT_ALIGN). Returns the chosen
    option of each layer; raises if even the smallest options do not fit."""
    units = [s // SLOT_ALIGN for s in sizes]
    cap = int(budget_bytes // SLOT_ALIGN)
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[u]: least cost of the layers so far using exactly u units
    choices = []
    for layer_costs in costs:
        nxt, pick = [inf] * (cap + 1), [-1] * (cap + 1)
        for u, base in enumerate(best):
            if base == inf:
                continue
            for i, (n, c) in enumerate(zip(units, layer_costs)):
                if u + n <= cap and base + c < nxt[u + n]:
                    nxt[u + n], pick[u + n] = base + c, i
        best = nxt
        choices.append(pick)
    end = min(range(cap + 1), key=lambda u: best[u])
    if best[end] == inf:
        raise ValueError(f"no allocation fits {budget_bytes:.0f} bytes per token-head summed "
                         "over layers; lower the target compression")
    chosen = []
    for pick in reversed(choices):
        i = pick[end]
        chosen.append(i)
        end -= units[i]
    return chosen[::-1]


def allocate_heads(costs: list[list[float]], sizes: list[int], heads: int,
                   budget_bytes: float) -> list[int]:
    """``allocate`` per (layer, KV head), item ``layer * heads + head``, with each layer's
    page sized as the cache sizes it: ``heads`` x its heads' mean slot rounded up to whole
    bytes (``formats.head_layout``, one rank). Exact: per layer, the cheapest head assignment
    for every summed slot size (a knapsack over its heads), then a knapsack over the layers'
    page sizes in bytes."""
    import numpy as np

    units = [s // SLOT_ALIGN for s in sizes]
    layer_choices = []  # per layer: {page bytes: (cost, option per head)}
    for layer in range(len(costs) // heads):
        best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
        for h in range(heads):
            row, nxt = costs[layer * heads + h], {}
            for u, (c, picks) in best.items():
                for i, n in enumerate(units):
                    if u + n not in nxt or c + row[i] < nxt[u + n][0]:
                        nxt[u + n] = (c + row[i], picks + (i,))
            best = nxt
        pages: dict[int, tuple[float, tuple[int, ...]]] = {}
        for u, entry in best.items():
            page = heads * -(-u * SLOT_ALIGN // heads)
            if page not in pages or entry[0] < pages[page][0]:
                pages[page] = entry
        layer_choices.append(pages)
    cap = int(budget_bytes)
    total = np.full(cap + 1, np.inf)  # total[b]: least cost of the layers so far in b bytes
    total[0] = 0.0
    back = []
    for pages in layer_choices:
        nxt, pick = np.full(cap + 1, np.inf), np.full(cap + 1, -1)
        for page, (c, _) in pages.items():
            if page > cap:
                continue
            cand = total[:cap + 1 - page] + c
            better = cand < nxt[page:]
            nxt[page:][better], pick[page:][better] = cand[better], page
        total = nxt
        back.append(pick)
    end = int(np.argmin(total))
    if not np.isfinite(total[end]):
        raise ValueError(f"no allocation fits {budget_bytes:.0f} bytes per token summed over "
                         "layers and heads; lower the target compression")
    chosen: list[tuple[int, ...]] = []
    for pages, pick in zip(reversed(layer_choices), reversed(back)):
        page = int(pick[end])
        chosen.append(pages[page][1])
        end -= page
    return [i for picks in reversed(chosen) for i in picks]


def measure(model_path: str, windows: list[list[int]], probes, options: list[LayerFormat],
            window: int, seed: int, per_head: bool = False) -> dict[str, list[list[float]]]:
    """{"text": cost, "retrieval": cost}, cost[item][option] the mean KL in nats per scored
    token of the calibration windows / of the probes' answer tokens (probes: (ids, scored)).
    An item is a layer, or with ``per_head`` a (layer, KV head) pair, item
    ``layer * num_kv_heads + head``."""
    from tqdm import tqdm

    from .sensitivity import SensitivityModel

    model = SensitivityModel(model_path, windows + [ids for ids, _ in probes],
                             scored=[None] * len(windows) + [m for _, m in probes],
                             sets=["text"] * len(windows) + ["retrieval"] * len(probes))
    heads: list[int | None] = list(range(model.num_kv_heads)) if per_head else [None]
    items = list(product(range(model.num_layers), heads))
    tables = {name: [[0.0] * len(options) for _ in items] for name in dict.fromkeys(model.sets)}
    jobs = list(product(enumerate(items), range(len(options))))
    desc = "layer x head x format" if per_head else "layer x format"
    for (item, (layer, head)), i in tqdm(jobs, desc=f"{desc} sensitivity"):
        for name, value in model.costs(layer, options[i], window, seed, head).items():
            tables[name][item][i] = value
    return tables


def combine(tables: dict[str, list[list[float]]], probe_weight: float) -> list[list[float]]:
    """The knapsack's cost: text KL + probe_weight x retrieval KL, per layer and option."""
    text, retrieval = tables["text"], tables.get("retrieval")
    if retrieval is None or probe_weight == 0:
        return text
    return [[t + probe_weight * r for t, r in zip(tr, rr)] for tr, rr in zip(text, retrieval)]


def calibration_windows(tokenizer, text: str, count: int, tokens: int) -> list[list[int]]:
    """``count`` consecutive ``tokens``-token windows from the middle of ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = max(0, len(ids) // 2 - count * tokens // 2)
    windows = [ids[start + i * tokens:start + (i + 1) * tokens] for i in range(count)]
    if any(len(w) < tokens for w in windows):
        raise ValueError(f"the calibration text has {len(ids)} tokens; need {count * tokens}")
    return windows


def probe_text(tokenizer, text: str, count: int, tokens: int) -> list[int]:
    """The calibration text's tokens after the calibration windows: the probes' documents."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[max(0, len(ids) // 2 - count * tokens // 2) + count * tokens:]


def policy(chosen: list[Candidate | None], window: int, seed: int, model: dict,
           heads_per_layer: int = 1) -> dict:
    """KVQ settings naming every layer (None: bf16), for the model ``model`` (MODEL_FACTS:
    another model is refused at startup). ``chosen`` holds one candidate per layer, or per
    (layer, KV head) with ``heads_per_layer`` > 1: a layer whose heads differ is written as
    ``{"heads": [...]}``."""
    def entry(c):
        return "bf16" if c is None else c.settings()

    layers = {}
    for layer in range(len(chosen) // heads_per_layer):
        heads = chosen[layer * heads_per_layer:(layer + 1) * heads_per_layer]
        layers[str(layer)] = (entry(heads[0]) if len(set(heads)) == 1
                              else {"heads": [entry(c) for c in heads]})
    return {"preset": "k2v2", "seed": seed, "window": window, "layers": layers, "model": model}


def ring_charged_target(args, cfg, head_size: int) -> float:
    """The format compression that gives ``args.target`` x bf16's tokens once the window's
    ring (bf16, ``max_num_seqs`` slots, every layer and KV head) is taken from the budget."""
    from .window import window_ring_bytes

    budget = args.budget_mib * 2**20
    ring = window_ring_bytes(args.window, args.max_num_seqs, cfg.num_hidden_layers,
                             cfg.num_key_value_heads, head_size, 2)
    if ring >= budget:
        raise SystemExit(f"--budget-mib {args.budget_mib:g} is smaller than the window's ring "
                         f"({ring / 2**20:.1f} MiB); raise the budget or lower --window or "
                         "--max-num-seqs")
    target = args.target * budget / (budget - ring)
    print(f"ring {ring / 2**20:.1f} MiB of {args.budget_mib:g} MiB: packed format target "
          f"{target:.2f}x bf16 for {args.target:g}x the tokens")
    return target


def check_target(parser, format_target: float, target: float, cands: list[Candidate],
                 head_size: int) -> None:
    """Refuse, before measuring anything, a target no policy can meet or one that needs no
    compression at all."""
    best = 4 * head_size / min(c.fmt.slot_bytes(head_size) for c in cands)
    if target <= 1:
        parser.error(f"--target {target:g} asks for no compression (bf16 is 1); allowed "
                     f"targets are above 1 and up to {best:.2f}")
    if format_target > best:
        parser.error(f"--target {target:g} needs {format_target:.2f}x bf16, more than the "
                     f"smallest candidate format gives ({best:.2f}x); allowed targets are up to "
                     f"{best:.2f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, required=True,
                        help="compression vs bf16 (e.g. 5 or 6.4), all layers together")
    parser.add_argument("--out", required=True, help="policy file to write (JSON)")
    parser.add_argument("--model", help="model path (default: the packaged SmolLM2-135M)")
    parser.add_argument("--text", help="calibration text file (default: the packaged essays)")
    parser.add_argument("--windows", type=int, default=2,
                        help="calibration windows (of --tokens tokens each)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--window", type=int, default=0,
                        help="exact recent window the policy will run with (KVQ 'window')")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4],
                        choices=[1, 2, 3, 4, 8],
                        help="code widths the candidates may use, for keys and values")
    parser.add_argument("--probes", type=int, default=2,
                        help="retrieval probes (chat prompts with a planted fact; 0: none)")
    parser.add_argument("--probe-tokens", type=int, default=512, help="tokens per probe")
    parser.add_argument("--probe-weight", type=float, default=1.0,
                        help="weight of the probes' answer-token KL beside the text KL")
    parser.add_argument("--seed", type=int, default=0,
                        help="KVQ seed of the rotations (the policy's 'seed')")
    parser.add_argument("--costs", help="reuse the cost tables (and candidates) of an earlier "
                        "policy file: re-target or re-weight without measuring again")
    parser.add_argument("--extend", action="store_true",
                        help="with --costs: measure the candidates of --bits the earlier file "
                        "lacks (same calibration, window and seed) and allocate over all")
    parser.add_argument("--only", nargs="+", metavar="CANDIDATE",
                        help="allocate over these candidates only (names as in the policy's "
                        "options, e.g. k3v2g64 k4v2g64): fewer options, less fitting to noise")
    parser.add_argument("--per-head", action="store_true",
                        help="allocate per KV head (retrieval lives in a few heads): heads of "
                        "a layer may store different formats")
    parser.add_argument("--budget-mib", type=float,
                        help="count the target as tokens at this total KV budget, the window's "
                        "ring included (needs --window)")
    parser.add_argument("--max-num-seqs", type=int, default=16,
                        help="request slots the ring holds (vLLM max_num_seqs; with --budget-mib)")
    args = parser.parse_args(argv)
    if args.budget_mib is not None and args.window <= 0:
        parser.error("--budget-mib charges the window's ring: give --window R > 0 as well")
    if args.extend and not args.costs:
        parser.error("--extend adds candidates to an earlier measurement: give --costs FILE")
    from transformers import AutoConfig, AutoTokenizer

    from .assets import essays_text, smollm2_path

    t0 = time.time()
    model = args.model or smollm2_path()
    text = open(args.text).read() if args.text else essays_text()
    tokenizer = AutoTokenizer.from_pretrained(model)
    cfg = AutoConfig.from_pretrained(model)
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    format_target = (args.target if args.budget_mib is None
                     else ring_charged_target(args, cfg, head_size))
    calibration = (f"{args.windows} x {args.tokens} tokens from the middle of "
                   + (args.text or "the packaged essays")
                   + f"; {args.probes} retrieval probes of {args.probe_tokens} tokens after them")

    def measured(formats: list[LayerFormat]) -> dict[str, list[list[float]]]:
        from .retrieval_probe import probe_sequences

        windows = calibration_windows(tokenizer, text, args.windows, args.tokens)
        probes = probe_sequences(tokenizer, probe_text(tokenizer, text, args.windows,
                                                       args.tokens),
                                 args.probes, args.probe_tokens, args.seed)
        return measure(model, windows, probes, formats, args.window, args.seed, args.per_head)

    if args.costs:  # re-target (or --extend) an earlier measurement
        earlier = json.load(open(args.costs))
        cands, tables = earlier_costs(args, earlier, calibration)
        if args.extend:
            new = [c for c in candidates(head_size, tuple(args.bits)) if c not in cands]
            if new:
                for name, rows in measured([c.fmt for c in new]).items():
                    tables[name] = [old + added for old, added in zip(tables[name], rows)]
                cands += new
        calibration = earlier["allocation"]["calibration"]
    else:
        cands = candidates(head_size, tuple(args.bits))
    if args.only:
        unknown = sorted(set(args.only) - {c.name() for c in cands})
        if unknown:
            parser.error(f"--only names {', '.join(unknown)}; allowed are the candidates "
                         + ", ".join(c.name() for c in cands))
        keep = [0] + [1 + i for i, c in enumerate(cands) if c.name() in args.only]
        cands = [c for c in cands if c.name() in args.only]
        if args.costs:
            tables = {name: [[row[j] for j in keep] for row in rows]
                      for name, rows in tables.items()}
    check_target(parser, format_target, args.target, cands, head_size)
    options: list[Candidate | None] = [None, *cands]
    names = ["bf16", *(c.name() for c in cands)]
    if not args.costs:
        tables = measured([BF16 if c is None else c.fmt for c in options])
    costs = combine(tables, args.probe_weight)
    heads = cfg.num_key_value_heads if args.per_head else 1
    if len(costs) != cfg.num_hidden_layers * heads:
        raise SystemExit(f"{args.costs} holds {len(costs)} cost rows; "
                         + ("drop --per-head" if args.per_head else "pass --per-head")
                         + " to re-target it")
    sizes = [(BF16 if c is None else c.fmt).slot_bytes(head_size) for c in options]
    budget = len(costs) * 4 * head_size / format_target
    picks = (allocate_heads(costs, sizes, heads, budget) if args.per_head
             else allocate(costs, sizes, budget))
    chosen = [options[i] for i in picks]
    settings = policy(chosen, args.window, args.seed,
                      model_facts(cfg, cfg.get_text_config(), head_size), heads)
    ratio = 4 * head_size / policy_page_bytes(settings, cfg.num_hidden_layers, head_size)
    predicted = sum(costs[item][options.index(c)] for item, c in enumerate(chosen))
    record = {"target": args.target, "format_target": format_target, "per_head": args.per_head,
              "budget_mib": args.budget_mib, "max_num_seqs": args.max_num_seqs,
              "compression": ratio, "predicted_kl": predicted,
              "head_size": head_size, "window": args.window, "options": names,
              "slot_bytes": sizes, "costs": costs, "cost_tables": tables,
              "probe_weight": args.probe_weight, "model": model, "calibration": calibration,
              "command": " ".join(["python -m vllm_kvq.allocate",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "seconds": round(time.time() - t0, 1)}
    result = {"kvq": settings, "allocation": record}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"layer{'  head' if args.per_head else ''}  format        bytes  KL (nats/token, "
          f"this {'head' if args.per_head else 'layer'} alone)")
    for item, c in enumerate(chosen):
        i = options.index(c)
        where = f"{item // heads:5d}" + (f"  {item % heads:4d}" if args.per_head else "")
        print(f"{where}  {names[i]:<12} {sizes[i]:6d}  {costs[item][i]:.5f}")
    print(f"{ratio:.2f}x bf16 (format target {format_target:.2f}x), predicted summed KL "
          f"{predicted:.4f}; wrote {args.out}")
    return result


def earlier_costs(args, earlier: dict, calibration: str
                  ) -> tuple[list[Candidate], dict[str, list[list[float]]]]:
    """The candidates and cost tables of an earlier policy file, checked against this run's
    window (and, to extend them, its calibration and seed: new columns must be comparable)."""
    record = earlier["allocation"]
    if record["window"] != args.window:
        raise SystemExit(f"{args.costs} was measured for window {record['window']}, not "
                         f"{args.window}; pass --window {record['window']}")
    if args.extend and record.get("per_head", False) != args.per_head:
        raise SystemExit(f"{args.costs} was measured " + ("per KV head: pass --per-head"
                         if record.get("per_head") else "per layer: drop --per-head"))
    if args.extend and (record["calibration"] != calibration
                        or earlier["kvq"].get("seed", 0) != args.seed):
        raise SystemExit(f"{args.costs} was measured on {record['calibration']} with seed "
                         f"{earlier['kvq'].get('seed', 0)}: --extend needs the same "
                         "--windows/--tokens/--text/--probes/--probe-tokens/--seed")
    tables = record.get("cost_tables", {"text": record["costs"]})  # older: text only
    return [Candidate.parse(n) for n in record["options"][1:]], tables


def policy_page_bytes(settings: dict, num_layers: int, head_size: int) -> float:
    """Mean bytes per token and KV head of a policy's pages on one rank, per-head pages'
    rounding included (what the cache holds, so what capacity is)."""
    from .config import KVQConfig
    from .formats.head_layout import token_head_bytes

    cfg = KVQConfig.from_dict({k: v for k, v in settings.items() if k != "model"})
    pages = [token_head_bytes(cfg.per_head[i], head_size, 1) if i in cfg.per_head
             else cfg.layer_format(i).slot_bytes(head_size) for i in range(num_layers)]
    return sum(pages) / num_layers


if __name__ == "__main__":
    main()
