"""Retrieval a user would believe: chat questions about facts planted in long essay text.

Five kinds of fact, each phrased for this benchmark: the keeper of an invented place's
lighthouse (a name), the password of an object, a weight (a number), two keepers asked at once
(both must be answered), and a two-hop chain (a person was born in the same town as a painter;
elsewhere, the painter's town). Every prompt is the model's chat template around a document --
essay text from the START of the corpus (perplexity uses the end), a different stretch per
cell -- with the facts at a depth, then the question. Prompts are prefilled in 512-token chunks
(``max_num_batched_tokens``), so a fact written in an earlier chunk is read back from the
packed blocks, and answered greedily; a cell counts when the answer holds every key string
(case-insensitive). bf16 (vLLM's CPU_ATTN) runs first in the same run, and every rate comes
with a 95% Wilson interval, and an exact McNemar test against bf16 on the same cells (the
paired test: a small p-value says the row retrieves differently from bf16).

    python benchmarks/retrieval.py                  # 4 lengths x 5 depths x 3 kinds = 60 cells
    python benchmarks/retrieval.py --quick          # 2 lengths x 2 depths x 5 kinds, bf16 + k4v2
    python benchmarks/retrieval.py --presets k4v4 k2v4 kivi2v4+w64 auto5x+w64
"""

import argparse
import math
import random
import sys
import time

from tqdm import tqdm

from common import close, print_table, try_open_llm, write_json

FULL = ["k4v4", "k4v3", "k4v2", "auto5x+w64"]
KINDS = ("name", "password", "number", "two_names", "two_hop")
FIRST = ["Teodora", "Anselm", "Marisol", "Idris", "Wenna", "Caspian", "Odile", "Bertram",
         "Saoirse", "Lucan", "Ysolde", "Hamish", "Perpetua", "Evander", "Zinnia", "Oswin"]
LAST = ["Quillfeather", "Marrowgate", "Penhallow", "Strickmere", "Valcourt", "Thistlewood",
        "Ambrell", "Corrigan", "Duskmoor", "Halloran", "Ivesdale", "Kettleby", "Lorrimer",
        "Nightingale", "Ormsby", "Pellinore"]
PLACES = ["Varn Island", "Port Ostrel", "Cape Mirrow", "Dunfell Point", "Skerry Vane",
          "Lowmarsh Head", "Greyhallow", "Tarn Aldis", "Brisk Harbour", "Coldwater Ness"]
OBJECTS = ["the blue filing cabinet", "the greenhouse door", "the old telescope case",
           "the chapel bell tower", "the rooftop weather station", "the archive vault"]
WORDS = ["amber", "falcon", "juniper", "copper", "lantern", "meadow", "orbit", "velvet",
         "harbor", "ember", "quartz", "willow", "cinder", "saffron", "tundra", "marble"]
THINGS = ["bronze anchor", "granite millstone", "ship's bell", "iron cauldron", "oak chest"]
TOWNS = ["Elderwick", "Frostmoor", "Gallowmere", "Hollin Cross", "Redwater", "Sorrelby",
         "Thornbury Vale", "Wickham Fen"]
PAINTERS = ["Ilse Varga", "Tomas Breck", "Nadia Osei", "Pieter Haldane", "Ruth Almqvist"]


def make_fact(kind: str, rng: random.Random):
    """(fact sentences, question, key strings that the answer must all contain)."""
    def keeper():
        place, first, last = rng.choice(PLACES), rng.choice(FIRST), rng.choice(LAST)
        return place, f"{first} {last}", f"The lighthouse on {place} is kept by {first} {last}."

    if kind == "name":
        place, name, fact = keeper()
        return [fact], f"Who keeps the lighthouse on {place}?", [name]
    if kind == "password":
        obj = rng.choice(OBJECTS)
        pw = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(10, 99)}"
        return ([f"The password for {obj} is {pw}."], f"What is the password for {obj}?",
                [pw])
    if kind == "number":
        thing, place, n = rng.choice(THINGS), rng.choice(PLACES), rng.randint(120, 9800)
        return ([f"The {thing} kept at {place} weighs exactly {n} kilograms."],
                f"How many kilograms does the {thing} kept at {place} weigh?", [str(n)])
    if kind == "two_names":
        (p1, n1, f1), (p2, n2, f2) = keeper(), keeper()
        while p2 == p1:
            p2, n2, f2 = keeper()
        return ([f1, f2], f"Who keeps the lighthouse on {p1}, and who keeps the one on {p2}?",
                [n1, n2])
    person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    painter, town = rng.choice(PAINTERS), rng.choice(TOWNS)
    return ([f"{person} was born in the same town as the painter {painter}.",
             f"The painter {painter} was born in {town}."],
            f"In which town was {person} born?", [town])


def chat_parts(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after the document."""
    marker = "\x00DOCUMENT\x00"
    user = (f"Read the document below, then answer the question after it in a few words.\n\n"
            f"<document>\n{marker}\n</document>\n\nQuestion: {question}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    return (tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def build_cells(tokenizer, lengths, depths, kinds_per_cell: int, seed: int = 0):
    """Every (length, depth) gets ``kinds_per_cell`` consecutive kinds of KINDS, starting one
    further at each length, so every kind meets every length and (across lengths) every
    depth, and each kind is asked equally often."""
    from vllm_kvq.assets import essays_text

    rng = random.Random(seed)
    hay = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    hay = hay[:len(hay) * 2 // 3]  # the start of the corpus; perplexity reads the end
    cells = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for j in range(kinds_per_cell):
                kind = KINDS[(li + di * kinds_per_cell + j) % len(KINDS)]
                facts, question, keys = make_fact(kind, rng)
                before, after = chat_parts(tokenizer, question)
                fact_ids = [tokenizer(" " + f + " ", add_special_tokens=False)["input_ids"]
                            for f in facts]
                n_hay = length - len(before) - len(after) - sum(map(len, fact_ids))
                start = rng.randrange(0, len(hay) - n_hay)
                doc = hay[start:start + n_hay]
                # The first fact at the depth; a second one (two kinds) half a document later.
                spots = [depth, (depth + 0.5) % 1.0][:len(fact_ids)]
                for spot, ids in sorted(zip(spots, fact_ids), key=lambda x: -x[0]):
                    at = int(spot * len(doc))
                    doc = doc[:at] + ids + doc[at:]
                cells.append({"kind": kind, "length": length, "depth": depth, "keys": keys,
                              "question": question, "ids": before + doc + after})
    return cells


def answered(text: str, keys: list[str]) -> bool:
    """Every key in the answer, case-insensitive (numbers also with thousands separators)."""
    text = text.lower()
    return all(key.lower() in text or key.lower() in text.replace(",", "") for key in keys)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(hits: str, base: str) -> float:
    """Exact two-sided McNemar p-value of two rows answering the same cells: the binomial
    test on the cells only one of them retrieved (1.0 when they agree everywhere)."""
    b = sum(x == "1" and y == "0" for x, y in zip(hits, base))
    c = sum(x == "0" and y == "1" for x, y in zip(hits, base))
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n if n else 0.5
    return min(1.0, 2 * tail)


def run_cells(llm, cells) -> list[str]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=c["ids"]) for c in cells],
                        SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def summarize(name: str, cells, answers) -> dict:
    hits = [answered(a, c["keys"]) for c, a in zip(cells, answers)]
    lo, hi = wilson(sum(hits), len(hits))
    row = {"preset": name, "retrieved": sum(hits), "n": len(hits), "rate": sum(hits) / len(hits),
           "ci95": [round(lo, 3), round(hi, 3)], "by_kind": {}, "by_length": {}}
    for field, out in (("kind", row["by_kind"]), ("length", row["by_length"])):
        for value in dict.fromkeys(c[field] for c in cells):
            h = [x for c, x in zip(cells, hits) if c[field] == value]
            out[str(value)] = f"{sum(h)}/{len(h)}"
    row["hits"] = "".join("1" if x else "0" for x in hits)
    row["answers"] = answers
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", help="KVQ rows (bf16 always runs first)")
    parser.add_argument("--lengths", nargs="+", type=int)
    parser.add_argument("--depths", nargs="+", type=float)
    parser.add_argument("--kinds-per-cell", type=int)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    presets = args.presets or (["k4v2"] if args.quick else FULL)
    lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096, 7936])
    depths = args.depths or ([0.25, 0.75] if args.quick else [0.05, 0.25, 0.5, 0.75, 0.95])
    per_cell = args.kinds_per_cell or (len(KINDS) if args.quick else 3)
    max_len = max(lengths) + 64
    rows, cells, t0 = [], None, time.time()
    for name in tqdm(["bf16"] + presets, desc="engines"):
        try:  # a row that fails is reported, and the rows already measured are kept
            llm, err = try_open_llm(name, max_model_len=max_len,
                                    max_num_batched_tokens=args.chunk,
                                    enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30)
        except Exception as exc:  # noqa: BLE001
            llm, err = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if llm is None:
            rows.append({"preset": name, "error": err})
            continue
        if cells is None:
            cells = build_cells(llm.get_tokenizer(), lengths, depths, per_cell)
        t = time.time()
        rows.append(summarize(name, cells, run_cells(llm, cells)))
        rows[-1]["seconds"] = round(time.time() - t, 1)
        close(llm)
    base = rows[0]
    for r in rows:
        if "ci95" in r and "ci95" in base:
            r["within_bf16_interval"] = (r["ci95"][1] >= base["ci95"][0]
                                         and r["ci95"][0] <= base["ci95"][1])
            r["interval"] = f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}"
            r["mcnemar_p_vs_bf16"] = round(mcnemar_p(r["hits"], base["hits"]), 4)
    cols = [("preset", "row", ""), ("retrieved", "retrieved", "d"), ("n", "of", "d"),
            ("rate", "rate", ".2f"), ("interval", "95% CI", ""),
            ("within_bf16_interval", "overlaps bf16", ""),
            ("mcnemar_p_vs_bf16", "McNemar p", ".3f")]
    print_table(f"retrieval ({len(cells)} cells: lengths {lengths}, depths {depths}, "
                f"{per_cell} kinds each; prefill chunks of {args.chunk})", rows, cols)
    for r in rows:
        if "by_kind" in r:
            print(f"  {r['preset']:14} by kind {r['by_kind']}  by length {r['by_length']}")
    argv = sys.argv[1:] if argv is None else argv
    payload = {"command": " ".join(["python benchmarks/retrieval.py", *argv]),
               "args": vars(args), "lengths": lengths, "depths": depths,
               "kinds_per_cell": per_cell, "seconds": round(time.time() - t0, 1),
               "cells": [{k: c[k] for k in ("kind", "length", "depth", "keys", "question")}
                         for c in cells or []], "rows": rows}
    write_json(args.out or ("retrieval_quick" if args.quick else "retrieval"), payload)
    return payload


if __name__ == "__main__":
    main()
