"""The benchmark commands' quick paths, so CI keeps them working (< 4 minutes on 2 cores).

Two engines in all (bf16 and k4v2, shared by capacity / needle / retrieval / agreement /
throughput's measurement functions); attention_error --quick needs no engine; pareto and
report run on the committed results JSON, writing only under tmp_path.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.e2e


@pytest.fixture
def results_tmp(tmp_path, monkeypatch):
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def engines():
    """name -> (llm, capacity row); engines are closed after the module."""
    import capacity
    from common import close, open_llm

    out = {}
    for name in ("bf16", "k4v2"):
        llm = open_llm(name, max_model_len=2048, kv_cache_memory_bytes=64 << 20,
                       max_num_batched_tokens=256, enable_prefix_caching=False,
                       disable_log_stats=False)
        out[name] = (llm, capacity.measure(llm, name, 0.0))
    yield out
    for llm, _ in out.values():
        close(llm)


def test_capacity_needle_agreement_throughput_quick(engines):
    import agreement
    import capacity
    import needle
    import retrieval
    import throughput

    rows = capacity.finish([row for _, row in engines.values()])
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 3.5
    assert rows[1]["bits_per_element"] == 4.0

    bf16, kvq = engines["bf16"][0], engines["k4v2"][0]
    tok = bf16.get_tokenizer()
    cells = needle.build_prompts(tok, [1024], [0.25, 0.75], 1)
    assert all(len(c["ids"]) == 1024 for c in cells)
    row = needle.summarize("k4v2", cells, needle.run_cells(kvq, cells))
    assert 0.0 <= row["rate"] <= 1.0 and row["n"] == 2

    cells = retrieval.build_cells(tok, [1024], [0.5], len(retrieval.KINDS))
    assert [c["kind"] for c in cells] == list(retrieval.KINDS)
    assert all(len(c["ids"]) == 1024 for c in cells)
    for c in cells:  # the facts are in the document, the question after it
        text = tok.decode(c["ids"])
        assert all(k in text for k in c["keys"]) and text.rindex(c["question"]) > len(text) / 2
    row = retrieval.summarize("k4v2", cells, retrieval.run_cells(kvq, cells))
    assert row["n"] == 5 and len(row["hits"]) == 5 and row["ci95"][0] <= row["rate"]

    prompts = agreement.make_prompts(tok, 2, 128)
    refs = agreement.generate(bf16, prompts, 12)
    row = agreement.compare("k4v2", kvq, prompts, refs)
    assert row["tokens"] == 24 and row["teacher_forced_top1"] >= 0.5

    prompts = throughput.make_prompts(tok, 3, 256)
    row = throughput.run_workload(kvq, prompts, 8)
    assert row["peak_running"] >= 1 and row["tokens"] == 3 * (256 + 8)
    assert row["preemptions"] >= 0


def test_retrieval_interval_and_scoring():
    import retrieval

    # 95% Wilson intervals (textbook values).
    assert retrieval.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert retrieval.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert retrieval.answered("It is kept by TEODORA Quillfeather.", ["Teodora Quillfeather"])
    assert not retrieval.answered("Teodora and Lucan", ["Teodora Quill", "Lucan Valcourt"])


def test_attention_error_quick(results_tmp):
    import attention_error

    payload = attention_error.main(["--quick", "--presets", "k4v2"])
    rows = {r["preset"]: r for r in payload["rows"]}
    assert len(rows["k4v2"]["per_layer"]) == 30
    # 4-bit rotated keys: logits off by a few hundredths, not by whole units.
    assert 0 < rows["k4v2"]["score_rmse"] < 0.5
    assert 0 < rows["k4v2"]["output_rel_err"] < 0.5
    assert (results_tmp / "attention_error_quick.json").exists()


def test_codes_quick(results_tmp):
    """Equal-bytes comparison on captured K/V (deterministic: fixed text, seed-0 rotations).
    Measured (--quick): output error k4v3 0.170 vs k4v2 0.296 in the same 64 bytes; Lloyd-Max
    2/2 bits 0.594 in 36 bytes vs integer g32 0.735 in 48."""
    import codes

    payload = codes.main(["--quick"])
    rows = {r["row"]: r for r in payload["pairs"]}
    k4v2, k4v3 = rows["int4g32 / int2g32 (k4v2)"], rows["int4g64 / int3g64 (k4v3)"]
    assert k4v2["slot_bytes"] == k4v3["slot_bytes"] == 64
    assert k4v3["output_rel_err"] < 0.75 * k4v2["output_rel_err"]
    lloyd, ints = rows["lloyd2 / lloyd2"], rows["int2g32 / int2g32 (k2v2)"]
    assert lloyd["bytes"] < ints["bytes"] and lloyd["output_rel_err"] < ints["output_rel_err"]
    keys = {r["row"]: r for r in payload["keys"]}
    assert keys["int3g64 + QJL m=64 of the residual"]["key_bytes"] == 38
    assert all(0 < r["score_rmse"] < 3 for r in keys.values())
    assert (results_tmp / "codes_quick.json").exists()


def test_pareto_and_report_from_committed_results(tmp_path):
    import pareto
    import report

    pts = pareto.main(["--out", str(tmp_path / "p.png")])
    assert {p["preset"] for p in pts} >= {"bf16", "k4v2"}
    assert (tmp_path / "p.png").stat().st_size > 1000

    readme = tmp_path / "README.md"
    shutil.copy(report.README, readme)
    table = report.render()
    report.update_readme(table, readme)
    once = readme.read_text()
    assert report.START in once and "RESULTS_TABLE" not in once
    assert not report.update_readme(report.render(), readme)  # idempotent
    assert readme.read_text() == once
    # Every committed capacity figure is what the table shows.
    cap = json.loads((report.RESULTS / "capacity.json").read_text())
    for r in cap["rows"]:
        if "kv_tokens" in r:
            assert f"| {r['preset']} | {r['slot_bytes']} |" in table
            assert f"{r['kv_tokens']:,}" in table


@pytest.mark.parametrize("context, new", [(37, 1), (0, 45)])
def test_cpu_decode_cells_compute_what_the_reference_computes(context, new):
    """benchmarks/cpu_decode.py times what it claims: its KVQ decode step and its prefill
    chunk (--prefill) equal the torch reference on the same cache, and its CPU_ATTN layer runs
    the same shapes."""
    import torch

    import cpu_decode
    from vllm_kvq import paged_attention
    from vllm_kvq.cpu_kernel import ops as cpu_ops
    from vllm_kvq.cpu_kernel.build import load

    if load() is not None:
        pytest.skip(f"no CPU kernels here: {load()}")
    shape = (2, 3, 64, 16)  # KV heads, GQA, head size, block size
    torch.manual_seed(0)
    kernel = cpu_decode.KVQLayer("k4v2", 2, context, *shape, cpu_ops, new=new)
    torch.manual_seed(0)
    reference = cpu_decode.KVQLayer("k4v2", 2, context, *shape, paged_attention, new=new)
    got, want = kernel.step(), reference.step()
    assert got.shape == (2 * new, 6, 64)
    # the kernel writes bf16 as the backend does: the reference's float32 rounded (half an ulp)
    assert torch.allclose(got.float(), want, rtol=2 ** -8, atol=1e-4), (got - want).abs().max()
    base = cpu_decode.CpuAttnLayer(2, context, *shape, new=new).step()
    assert base.shape == (2 * new, 6, 64) and torch.isfinite(base.float()).all()
    # --layers L: L independent layers (their own caches), each stepped once per step
    stack = cpu_decode.LayerStack(
        lambda: cpu_decode.KVQLayer("k4v2", 2, context, *shape, cpu_ops, new=new), 3)
    caches = {layer.cache.data_ptr() for layer in stack.layers}
    assert len(caches) == 3 and stack.step().shape == (2 * new, 6, 64)
    if new == 1:  # --head-groups N: each group's output lands in its query heads' slice,
        # whether the groups run in one call or in a call each
        for joint in (True, False):
            split = cpu_decode.HeadGroups("k4v2", 2, 2, context, *shape, cpu_ops, joint=joint)
            out = split.step().float()
            for i, part in enumerate(split.parts):
                want = paged_attention.decode_attention(
                    part.q, part.k, part.v, part.cache, part.table, part.lens, part.kc,
                    part.vc, part.scale)
                assert torch.allclose(out[:, 3 * i:3 * i + 3], want, atol=1e-2), joint


def test_speed_rows_never_time_the_torch_fallback(monkeypatch):
    """throughput.py asks, before each KVQ engine on a machine without CUDA, whether the CPU
    kernels build: an engine whose kernel source does not compile falls back to the torch
    reference, which a speed table must not report under the kernels' name."""
    import torch

    import common
    from vllm_kvq.cpu_kernel import build

    monkeypatch.setattr(build, "load", lambda: "the compiler said no")
    monkeypatch.delenv("VLLM_KVQ_KERNELS", raising=False)
    expected = None if torch.cuda.is_available() else "the compiler said no"
    assert common.cpu_kernels_missing("k4v2") == expected
    assert common.cpu_kernels_missing("bf16") is None
    monkeypatch.setenv("VLLM_KVQ_KERNELS", "torch")  # the reference asked for: timed as such
    assert common.cpu_kernels_missing("k4v2") is None


def test_kernel_ab_times_both_sources_in_alternating_processes(results_tmp):
    """benchmarks/kernel_ab.py: a round runs A then B in fresh processes, each timing the
    source it was given; the same source twice gives ratios near 1 on tiny shapes."""
    import kernel_ab
    from vllm_kvq.cpu_kernel.build import SOURCE, load

    if load() is not None:
        pytest.skip(f"no CPU kernels here: {load()}")
    result = kernel_ab.main([str(SOURCE), str(SOURCE), "--rounds", "2", "--batch", "1",
                             "--prefill", "40", "--out", "ab"])
    assert [len(result["rounds"][v]) for v in "AB"] == [2, 2]
    for row in result["summary"]:
        assert row["A"] > 0 and row["B"] > 0 and 0 < row["lo"] <= row["ratio"] <= row["hi"]
    assert json.loads((results_tmp / "ab.json").read_text())["sources"] == [str(SOURCE)] * 2
    with pytest.raises(SystemExit):  # a missing source is refused before anything runs
        kernel_ab.main(["/nonexistent.cpp", str(SOURCE)])
