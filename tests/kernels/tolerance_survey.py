"""Measure what the kernel tests' tolerances rest on: ``python -m tests.kernels.tolerance_survey``.

Draws the kernel tests' own random cases many times (fresh seeds) and prints
- per format, how often a stored field of the store kernel differs from the reference's
  (fp32 summation order; field_checks.py bounds these), at ``--tokens`` tokens x 3 heads;
- the distribution of attention-output errors of decode and prefill against the torch
  reference, per model dtype, beside ``helpers.TOL``.
A command, not a test: it checks nothing, it prints the numbers the tolerances were set from.
Run with TRITON_INTERPRET=1 (set here); ~1 s per attention draw on 2 CPU cores.
"""

import argparse
import os
import random
from collections import defaultdict

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vllm_kvq import paged_attention as ref  # noqa: E402
from vllm_kvq.formats import bits as bitpack  # noqa: E402
from vllm_kvq.formats.int_group import IntGroupCodec  # noqa: E402
from vllm_kvq.formats.qjl import QJLKeyCodec  # noqa: E402
from vllm_kvq.kernels import api  # noqa: E402

from . import helpers, test_decode, test_prefill  # noqa: E402
from .field_checks import f16_ulps, redraw_ambiguous_rows  # noqa: E402


def field_slips(codec, got, want) -> dict[str, tuple[int, int]]:
    """{field: (entries that differ, entries)} for the fields fp32 order can move."""
    if isinstance(codec, IntGroupCodec) and codec.rot is not None:
        cb, gb = codec.code_bytes, 2 * codec.groups
        side = f16_ulps(got[:, cb:cb + 2 * gb], want[:, cb:cb + 2 * gb]) > 0
        codes = (bitpack.unpack(got[:, :cb], codec.bits)
                 != bitpack.unpack(want[:, :cb], codec.bits))
        return {"scale/min": (int(side.sum()), side.numel()),
                "codes": (int(codes.sum()), codes.numel())}
    if isinstance(codec, QJLKeyCodec):
        sb = codec.sign_bytes
        signs = bitpack.unpack(got[:, :sb], 1) != bitpack.unpack(want[:, :sb], 1)
        return {"signs": (int(signs.sum()), signs.numel())}
    return {}


def survey_store(tokens: int, draws: int) -> None:
    counts = defaultdict(lambda: [0, 0])
    for _ in tqdm(range(draws), desc="store"):
        for name in helpers.FORMAT_NAMES:
            d, h, bs = random.choice([64, 128, 256]), 3, 16
            dtype = random.choice([torch.bfloat16, torch.float16])
            fmt, kc, vc = helpers.codecs(name, d, h, dtype)
            sb, blocks = fmt.slot_bytes(d), -(-tokens // bs)
            slots = torch.randperm(blocks * bs)[:tokens]
            k = (torch.randn(tokens, h, d) * random.choice([0.5, 1.0, 4.0])).to(dtype)
            v = torch.randn(tokens, h, d).to(dtype)
            redraw_ambiguous_rows(k, kc)
            redraw_ambiguous_rows(v, vc)
            want = helpers.junk_cache(blocks, h, bs, sb)
            got = want.clone()
            ref.store_slots(k, v, want, slots, kc, vc)
            api.store_slots(k, v, got, slots, kc, vc)
            g, w = (c.permute(0, 2, 1, 3).reshape(-1, h, sb)[slots].reshape(-1, sb)
                    for c in (got, want))
            for role, codec, start in (("K", kc, 0), ("V", vc, kc.nbytes)):
                end = start + codec.nbytes
                slips = field_slips(codec, g[:, start:end], w[:, start:end])
                for field, (n, total) in slips.items():
                    counts[(name, role, field)][0] += n
                    counts[(name, role, field)][1] += total
    print(f"\nstore kernel vs reference, {draws} draws x {tokens} tokens x 3 heads per format")
    for (name, role, field), (n, total) in sorted(counts.items()):
        print(f"  {name:16s} {role} {field:9s} {n:6d} / {total:9d} = {n / total:.1e}")


def survey_attention(draws: int) -> None:
    errors = defaultdict(list)
    runs = {"decode": test_decode._run_decode, "prefill": test_prefill._run_prefill}
    for _ in tqdm(range(draws), desc="attention"):
        for kind, run in runs.items():
            seen = []

            def record(got, want, dtype, what, seen=seen):
                seen.append((str(dtype).removeprefix("torch."), (got - want).abs().max().item()))

            module = test_decode if kind == "decode" else test_prefill
            module.check_attention, original = record, module.check_attention
            try:
                run(random.choice(helpers.FORMAT_NAMES), seed=0)
            finally:
                module.check_attention = original
            for dtype, err in seen:
                errors[(kind, dtype)].append(err)
    print(f"\nattention output vs reference, {draws} draws each (max abs error per draw)")
    tol = {str(k).removeprefix("torch."): v for k, v in helpers.TOL.items()}
    for (kind, dtype), errs in sorted(errors.items()):
        errs = torch.tensor(errs)
        print(f"  {kind:8s} {dtype:9s} n={len(errs):5d} median {errs.median():.1e} "
              f"p99 {errs.quantile(0.99):.1e} max {errs.max():.1e}  TOL {tol[dtype]:.0e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200, help="attention draws per kind")
    parser.add_argument("--store-draws", type=int, default=4, help="store draws per format")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per store draw")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"seed={seed}")
    survey_store(args.tokens, args.store_draws)
    survey_attention(args.draws)


if __name__ == "__main__":
    main()
