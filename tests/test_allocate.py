"""Automatic bit allocation: candidates, the knapsack, the sensitivity probe, the policy file."""

import itertools
import json
import random

import pytest
import torch

from vllm_kvq.allocate import (BF16, Candidate, allocate, candidates, main,
                                ring_charged_target)
from vllm_kvq.config import PRESETS, KVQConfig
from vllm_kvq.formats import SLOT_ALIGN
from vllm_kvq.sensitivity import fake_quant_attention, round_trip


def test_candidates_are_undominated_and_padded_honestly():
    found = candidates(64)
    names = {c.name() for c in found}
    # 8-byte slots: at head size 64 no candidate pads, so none is beaten; the 56-byte 3/3 and
    # 4/2-bit slots in 64-channel groups sit between 3/2 bits (48) and 4/3 bits (64)
    assert len(found) == 32 and {"k3v3g64", "k4v2g64", "k1v1g64", "k4v4g32"} <= names
    sizes = {c.name(): c.fmt.slot_bytes(64) for c in found}
    assert sizes["k3v3g64"] == sizes["k4v2g64"] == 56 and sizes["k3v2g64"] == 48
    for c in found:
        assert c.fmt.slot_bytes(64) % SLOT_ALIGN == 0
    # head size 32: 1-bit keys + 2-bit values (20 bytes) pad to the 24 of 2/2 bits
    small = {c.name() for c in candidates(32)}
    assert "k2v2g32" in small and "k1v2g32" not in small
    assert all(c.group_size == 32 for c in candidates(32))


def test_knapsack_matches_brute_force():
    rng = random.Random()
    for _ in range(20):
        layers, sizes = rng.randint(1, 5), [16 * rng.randint(1, 6) for _ in range(4)]
        costs = [[rng.random() for _ in sizes] for _ in range(layers)]
        budget = rng.uniform(min(sizes) * layers, max(sizes) * layers)
        best = min((sum(costs[i][o] for i, o in enumerate(pick)), pick)
                   for pick in itertools.product(range(len(sizes)), repeat=layers)
                   if sum(sizes[o] for o in pick) <= budget)
        chosen = allocate(costs, sizes, budget)
        assert sum(sizes[o] for o in chosen) <= budget
        assert sum(costs[i][o] for i, o in enumerate(chosen)) == pytest.approx(best[0])
    with pytest.raises(ValueError, match="lower the target"):
        allocate([[0.0, 1.0]], [64, 32], 16)


def _causal(q, k, v, scale):
    """Exact attention of the last q.shape[1] positions to all k.shape[1] keys: [Tq, Hq, D]."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = (q @ k.transpose(1, 2)) * scale
    tq, tk = q.shape[1], k.shape[1]
    s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1 + tk - tq), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(0, 1)


@pytest.mark.parametrize("head_size, gqa", [(64, 3), (128, 1)])
def test_fake_quant_attention_reads_old_tokens_through_the_codecs(head_size, gqa):
    h, t = 2, random.randint(20, 40)
    # bf16-representable inputs: bf16 storage is then lossless
    q, k, v = (torch.randn(n, t, head_size).bfloat16().float() for n in (h * gqa, h, h))
    scale = head_size ** -0.5
    exact = _causal(q, k, v, scale)
    fmt = PRESETS["k2v2"]
    # bf16 storage, or a window covering everything: exact attention
    assert torch.allclose(fake_quant_attention(q, k, v, BF16, 0, 0, 0, scale), exact, atol=1e-5)
    assert torch.allclose(fake_quant_attention(q, k, v, fmt, 0, t, 0, scale), exact, atol=1e-5)
    # past-only: the diagonal exact, every older token through the codecs
    from vllm_kvq.formats import build_codecs

    kc, vc = build_codecs(fmt, head_size, torch.bfloat16, 0, 3, list(range(h)))
    k_hat, v_hat = round_trip(k, kc), round_trip(v, vc)
    got = fake_quant_attention(q, k, v, fmt, 3, 0, 0, scale)
    for i in random.sample(range(t), 5):
        k_i, v_i = k_hat.clone(), v_hat.clone()
        k_i[:, i], v_i[:, i] = k[:, i], v[:, i]
        want = _causal(q[:, i:i + 1], k_i[:, :i + 1], v_i[:, :i + 1], scale)
        assert torch.allclose(got[i], want[0], atol=1e-4)
    assert not torch.allclose(got, exact, atol=1e-2)


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy") / "policy.json"
    # 1- and 4-bit codes only (8 candidate formats per layer, not 32: a quarter of the measuring)
    # still give 6.4x and 5x mixes and the 1/1 vs 4/4 comparison below.
    result = main(["--target", "6.4", "--out", str(out), "--windows", "1", "--tokens", "96",
                   "--bits", "1", "4", "--probes", "1", "--probe-tokens", "128"])
    return out, result


def test_allocation_meets_the_target_and_loads(small_policy):
    path, result = small_policy
    record = result["allocation"]
    assert record["compression"] >= 6.4
    costs = record["costs"]
    assert len(costs) == 30 and all(row[0] == 0.0 for row in costs)  # bf16 costs nothing
    # fewer bits cost more, layer by layer (1/1 bits vs 4/4 bits)
    lo, hi = record["options"].index("k1v1g32"), record["options"].index("k4v4g32")
    assert sum(row[lo] > row[hi] for row in costs) >= 28
    cfg = KVQConfig.from_dict({"policy_file": str(path)})
    slots = [cfg.layer_format(i).slot_bytes(64) for i in range(30)]
    assert 256 * 30 / sum(slots) == pytest.approx(record["compression"])
    assert json.loads(path.read_text())["kvq"]["layers"].keys() == {str(i) for i in range(30)}


def test_costs_add_the_retrieval_probe(small_policy, tmp_path):
    path, result = small_policy
    record = result["allocation"]
    text, retrieval = record["cost_tables"]["text"], record["cost_tables"]["retrieval"]
    assert record["probe_weight"] == 1.0
    for c_row, t_row, r_row in zip(record["costs"], text, retrieval):
        assert c_row == pytest.approx([t + r for t, r in zip(t_row, r_row)])
    lo = record["options"].index("k1v1g32")
    assert sum(row[lo] > 0 for row in retrieval) == 30  # the answer tokens feel every layer
    # re-weighting the recorded tables needs no new measurement
    text_only = main(["--target", "6.4", "--out", str(tmp_path / "t.json"), "--costs", str(path),
                      "--probe-weight", "0"])
    assert text_only["allocation"]["costs"] == text


def test_retrieval_probes_score_only_the_answer():
    from transformers import AutoTokenizer

    from vllm_kvq.assets import essays_text, smollm2_path
    from vllm_kvq.retrieval_probe import probe_sequences

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    text = tok(essays_text()[:20000], add_special_tokens=False)["input_ids"]
    tokens = random.randint(200, 400)
    for ids, scored in probe_sequences(tok, text, 3, tokens, seed=random.randrange(100)):
        assert len(ids) == tokens and len(scored) == tokens and not scored[-1]
        answer = tok.decode([ids[p + 1] for p in range(tokens) if scored[p]])
        prompt = tok.decode(ids[:tokens - sum(scored)])
        assert prompt.rstrip().endswith("assistant")  # the reply follows the template
        # the answer's fact (a name or a code) was planted in the document, far back
        fact = answer.split(" is in charge")[0] if "in charge" in answer else \
            answer.rsplit(" ", 1)[-1].rstrip(".")
        assert fact in prompt and prompt.index(fact) < len(prompt) * 0.6


def test_reused_costs_give_the_same_policy(small_policy, tmp_path):
    path, result = small_policy
    again = main(["--target", "6.4", "--out", str(tmp_path / "p.json"), "--costs", str(path)])
    assert again["kvq"] == result["kvq"]
    five = main(["--target", "5", "--out", str(tmp_path / "p5.json"), "--costs", str(path)])
    assert 5 <= five["allocation"]["compression"] < result["allocation"]["compression"]
    assert five["allocation"]["predicted_kl"] <= result["allocation"]["predicted_kl"]


def test_only_restricts_the_menu_and_keeps_each_column(small_policy, tmp_path):
    path, result = small_policy
    record = result["allocation"]
    only = ["k1v1g32", "k4v4g32"]
    narrow = main(["--target", "5", "--out", str(tmp_path / "n.json"), "--costs", str(path),
                   "--only", *only])["allocation"]
    assert narrow["options"] == ["bf16", *only]
    for name, table in narrow["cost_tables"].items():
        for row, full in zip(table, record["cost_tables"][name]):
            assert row == [full[record["options"].index(o)] for o in narrow["options"]]
    allowed = ["bf16", *(Candidate.parse(n).settings() for n in only)]
    assert all(entry in allowed
               for entry in json.loads((tmp_path / "n.json").read_text())["kvq"]["layers"].values())
    with pytest.raises(SystemExit):
        main(["--target", "5", "--out", str(tmp_path / "x.json"), "--costs", str(path),
              "--only", "k3v3g64"])  # not among the file's candidates


def test_ring_charged_target_counts_tokens_at_the_total_budget():
    from argparse import Namespace

    from transformers import AutoConfig

    from vllm_kvq.assets import smollm2_path

    cfg = AutoConfig.from_pretrained(smollm2_path())
    args = Namespace(target=5.0, budget_mib=256.0, window=64, max_num_seqs=16)
    # ring: K and V, 64 tokens x (16 request slots + 1 spare) x 30 layers x 3 KV heads x 64
    # channels, bf16 = 23.90625 MiB
    assert ring_charged_target(args, cfg, 64) == pytest.approx(5.0 * 256 / (256 - 23.90625))
    with pytest.raises(SystemExit, match="smaller than the window's ring"):
        ring_charged_target(Namespace(target=5.0, budget_mib=16.0, window=64, max_num_seqs=16),
                            cfg, 64)


def test_budget_without_window_is_refused_before_measuring(tmp_path):
    with pytest.raises(SystemExit):
        main(["--target", "5", "--out", str(tmp_path / "p.json"), "--budget-mib", "256"])
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("target, needle", [("100", "allowed targets are up to 10.67"),
                                             ("0.5", "asks for no compression")])
def test_impossible_targets_are_refused_before_measuring(tmp_path, capsys, target, needle):
    with pytest.raises(SystemExit):
        main(["--target", target, "--out", str(tmp_path / "p.json")])
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_fake_quant_attention_of_one_head_leaves_the_others_exact():
    h, gqa, t, d = 3, 2, 33, 64
    q, k, v = (torch.randn(n, t, d).bfloat16().float() for n in (h * gqa, h, h))
    scale = d ** -0.5
    fmt = PRESETS["k2v2"]
    exact = _causal(q, k, v, scale)
    every = fake_quant_attention(q, k, v, fmt, 5, 0, 0, scale)
    one = fake_quant_attention(q, k, v, fmt, 5, 0, 0, scale, head=1)
    mine = slice(gqa, 2 * gqa)  # the query heads reading KV head 1
    assert torch.allclose(one[:, mine], every[:, mine], atol=1e-6)
    others = torch.ones(h * gqa, dtype=torch.bool)
    others[mine] = False
    assert torch.allclose(one[:, others], exact[:, others], atol=1e-5)
    assert not torch.allclose(one[:, mine], exact[:, mine], atol=1e-2)


def test_per_head_allocation_gives_heads_their_own_formats(tmp_path):
    """On a tiny 2-layer model with 2 KV heads: one cost row per (layer, head), a policy that
    loads (layers whose heads differ as {"heads": [...]}) and meets the target counting the
    per-head pages as the cache sizes them; its tables cannot be re-targeted per layer."""
    from vllm_kvq.allocate import policy_page_bytes
    from vllm_kvq.assets import tiny_llama_path

    model = tiny_llama_path(num_kv_heads=2, num_heads=4)
    out = tmp_path / "heads.json"
    result = main(["--target", "5", "--per-head", "--model", model, "--out", str(out),
                   "--windows", "1", "--tokens", "64", "--bits", "1", "2", "4",
                   "--probes", "1", "--probe-tokens", "160"])
    record, settings = result["allocation"], result["kvq"]
    assert record["per_head"] and len(record["costs"]) == 2 * 2
    assert record["compression"] >= 5
    assert record["compression"] == pytest.approx(256 / policy_page_bytes(settings, 2, 64))
    cfg = KVQConfig.from_dict({"policy_file": str(out)})
    cfg.validate_model(64, 2, 16, num_kv_heads=2)
    for layer, entry in settings["layers"].items():
        assert ("heads" in entry) == (int(layer) in cfg.per_head)
        if "heads" in entry:
            assert len(entry["heads"]) == 2 and entry["heads"][0] != entry["heads"][1]
    # the same tables re-targeted give the same policy; per layer they do not fit
    again = main(["--target", "5", "--per-head", "--model", model, "--out",
                  str(tmp_path / "again.json"), "--costs", str(out)])
    assert again["kvq"] == settings
    with pytest.raises(SystemExit, match="pass --per-head"):
        main(["--target", "5", "--model", model, "--out", str(tmp_path / "x.json"),
              "--costs", str(out)])

    # --extend measures only the candidates the file lacks: the 3-bit ones here, whose columns
    # equal a measurement of them alone; the earlier columns are kept as they were
    common = ["--per-head", "--model", model, "--windows", "1", "--tokens", "64",
              "--probes", "1", "--probe-tokens", "160"]
    wider = main(["--target", "5", "--out", str(tmp_path / "wider.json"), "--costs", str(out),
                  "--extend", "--bits", "1", "2", "3", "4", *common])["allocation"]
    alone = main(["--target", "4", "--out", str(tmp_path / "three.json"), "--bits", "3",
                  *common])["allocation"]
    assert wider["options"][:len(record["options"])] == record["options"]
    assert len(wider["options"]) == 1 + len(candidates(64, (1, 2, 3, 4)))
    for name, table in wider["cost_tables"].items():
        rows = zip(table, record["cost_tables"][name], alone["cost_tables"][name])
        for row, old_row, own in rows:
            assert row[:len(old_row)] == old_row
            for option in alone["options"][1:]:
                assert row[wider["options"].index(option)] == pytest.approx(
                    own[alone["options"].index(option)], rel=1e-6)
    with pytest.raises(SystemExit, match="--extend needs the same"):
        main(["--target", "5", "--out", str(tmp_path / "y.json"), "--costs", str(out),
              "--extend", *common[:-1], "200"])


def test_per_head_knapsack_matches_brute_force():
    """Pages as the cache sizes them: per layer, heads x the heads' mean slot rounded up."""
    from vllm_kvq.allocate import allocate_heads

    rng = random.Random()
    for _ in range(20):
        layers, heads = rng.randint(1, 2), rng.randint(2, 3)
        sizes = [16 * rng.randint(1, 6) for _ in range(3)]
        costs = [[rng.random() for _ in sizes] for _ in range(layers * heads)]
        budget = rng.uniform(min(sizes) * layers * heads, max(sizes) * layers * heads)

        def pages(pick):
            return sum(heads * -(-sum(sizes[o] for o in pick[l * heads:(l + 1) * heads]) // heads)
                       for l in range(layers))

        best = min(sum(costs[i][o] for i, o in enumerate(pick))
                   for pick in itertools.product(range(len(sizes)), repeat=layers * heads)
                   if pages(pick) <= budget)
        chosen = allocate_heads(costs, sizes, heads, budget)
        assert pages(chosen) <= budget
        assert sum(costs[i][o] for i, o in enumerate(chosen)) == pytest.approx(best)
