"""CUDA graphs for decode: what the builder declares, how it splits a (padded) batch, and on
a CUDA machine a captured decode step replayed on the next step's inputs against eager.

vLLM captures uniform decode batches padded to a captured size: rows past the real ones
carry no token of their own (query length 0, sequence length 0) and padding tokens fill the
batch to the captured size. The builder must then plan the padded batch as a whole (launch
shapes fixed per captured size) with every device tensor the decode path reads in its
persistent buffers.
"""

import random
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backend import AttentionCGSupport

from tests.test_backend_conformance import Harness
from vllm_kvq.backend import KVQMetadataBuilder, graph_obstacle, split_rows
from vllm_kvq.window import publish_batch

pytestmark = pytest.mark.usefixtures("one_thread", "seed")


def _rows_by_loop(query_lens: list[int]):
    """split_rows restated: decode rows / prefill rows and their tokens, in row order."""
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    decodes = [i for i, q in enumerate(query_lens) if q == 1]
    prefills = [i for i, q in enumerate(query_lens) if q > 1]
    return (decodes, prefills, [starts[i] for i in decodes],
            [starts[i] + j for i in prefills for j in range(query_lens[i])])


def _as_list(index) -> list[int]:
    return list(range(index.start, index.stop)) if isinstance(index, slice) else index.tolist()


@pytest.mark.parametrize("ordered", [True, False])
def test_split_rows_matches_the_loop(ordered):
    """Random batches of decodes, prefills and (trailing) rows without tokens: in vLLM's
    order the groups are slices, otherwise index tensors, and both name the same rows and
    tokens as the plain loop."""
    for _ in range(50):
        lens = [1] * random.randint(0, 5) + [random.randint(2, 9) for _ in range(random.randint(0, 4))]
        if not ordered:
            random.shuffle(lens)
        lens += [0] * random.randint(0, 2) if lens and lens[-1] > 1 else []
        if not lens:
            continue
        q = torch.tensor(lens)
        qsl = torch.cat([torch.zeros(1, dtype=torch.long), q.cumsum(0)])
        rows = split_rows(q, qsl, int(q.sum()))
        want = _rows_by_loop(lens)
        got = (rows.decodes, rows.prefills, rows.decode_tokens, rows.prefill_tokens)
        assert [_as_list(x) for x in got] == [list(w) for w in want], lens
        if ordered:
            assert all(isinstance(x, slice) for x in got), lens
        assert (rows.num_decodes, rows.num_prefills) == (len(want[0]), len(want[1]))


def test_a_padded_decode_batch_decodes_as_a_whole():
    """5 requests padded to a captured batch of 8: 8 decode rows (the padding ones read
    nothing: sequence length 0), tokens 0..7; without padding tokens, only the real rows."""
    q = torch.tensor([1] * 5 + [0] * 3)
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q.cumsum(0)])
    rows = split_rows(q, qsl, 8)
    assert (rows.decodes, rows.decode_tokens, rows.num_decodes) == (slice(0, 8), slice(0, 8), 8)
    assert rows.num_prefills == 0
    rows = split_rows(q, qsl, 5)
    assert _as_list(rows.decodes) == [0, 1, 2, 3, 4] and rows.num_decodes == 5


def _cuda_view(config):
    """The config as graph_obstacle would see it on a CUDA machine."""
    view = SimpleNamespace(**{k: getattr(config, k) for k in
                              ("model_config", "additional_config", "parallel_config",
                               "scheduler_config", "cache_config")})
    view.device_config = SimpleNamespace(device_type="cuda")
    return view


@pytest.mark.parametrize("kvq, head_size, kernels, obstacle", [
    ({"preset": "k4v2"}, 64, "auto", None),
    ({"preset": "k4v3"}, 128, "auto", None),  # its 16-token window: ring writes are captured
    ({"preset": "qjl256v4"}, 64, "auto", None),
    ({"preset": "k4v2", "layers": {"1": "kivi2"}, "window": 32}, 64, "auto", "KIVI keys"),
    ({"preset": "k4v2"}, 96, "auto", "torch path"),  # no Triton kernels at head size 96
    ({"preset": "k4v2"}, 64, "torch", "torch path"),
])
def test_graph_support_is_declared_where_decode_can_replay(tmp_path_factory, monkeypatch, kvq,
                                                           head_size, kernels, obstacle):
    from tests.test_backend_conformance import vllm_config_for

    monkeypatch.setenv("VLLM_KVQ_KERNELS", kernels)
    config = vllm_config_for(tmp_path_factory, head_size=head_size, num_heads=4, num_kv_heads=2,
                             num_layers=2, block_size=32, kvq=kvq)
    spec = SimpleNamespace(head_size=head_size)
    # This machine has no GPU: nothing is captured here. (vLLM may also pass a group's
    # per-layer specs, which have no head size: the model's is used.)
    for given in (spec, SimpleNamespace()):
        assert KVQMetadataBuilder.get_cudagraph_support(config, given) == \
            AttentionCGSupport.NEVER
    found = graph_obstacle(_cuda_view(config), head_size)
    if obstacle is None:
        assert found is None
    else:
        assert obstacle in found, found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["k4v2", "k4v3", "qjl256v4"])
def test_captured_decode_replays_as_eager(tmp_path_factory, preset):
    """A decode step of 5 requests padded to 8 rows (as vLLM pads them) is captured in a CUDA
    graph; the next step's inputs are copied into the same input buffers, the builder
    refills its persistent ones, and the replay must equal an eager forward of that step
    bit for bit. k4v3 reads its 16-token window from the ring the first step wrote."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    dev = torch.device("cuda")
    real, padded, width = 5, 8, 64
    h = Harness(tmp_path_factory, head_size=128, num_heads=8, num_kv_heads=2, block_size=16,
                kvq={"preset": preset, "canary": False}, num_layers=1, device=dev)
    reqs = h.make_requests([(random.randint(20, 300), 1) for _ in range(real)], spare_blocks=8)
    cache = h.junk_cache(0).to(dev)
    h.store_context(0, cache, reqs)
    impl, layer = h.impls[0], h.layer_cls(0)
    # vLLM's persistent inputs, sized for the captured batch.
    q = torch.zeros(padded, h.hq * h.d, dtype=h.dtype, device=dev)
    k = torch.zeros(padded, h.h * h.d, dtype=h.dtype, device=dev)
    v = torch.zeros_like(k)
    out = torch.zeros_like(q)
    table = torch.zeros(padded, width, dtype=torch.int32, device=dev)
    seq_lens = torch.zeros(padded, dtype=torch.int32, device=dev)
    qsl = torch.zeros(padded + 1, dtype=torch.int32, device=dev)
    slots = torch.full((padded,), -1, dtype=torch.int64, device=dev)

    def load(step_reqs):
        """Copy a step's inputs into the buffers, store its K/V; the builder's metadata."""
        n = len(step_reqs)
        q[:n] = torch.cat([r.q for r in step_reqs]).flatten(1).to(dev)
        k[:n] = torch.cat([r.k[r.context:] for r in step_reqs]).flatten(1).to(dev)
        v[:n] = torch.cat([r.v[r.context:] for r in step_reqs]).flatten(1).to(dev)
        h.set_block_table(step_reqs)
        table.zero_()
        table[:n, :h.block_table.shape[1]] = h.block_table.to(dev)
        seq_cpu = torch.tensor([r.seq for r in step_reqs] + [0] * (padded - n), dtype=torch.int32)
        qsl_cpu = torch.tensor(list(range(n + 1)) + [n] * (padded - n), dtype=torch.int32)
        seq_lens.copy_(seq_cpu)
        qsl.copy_(qsl_cpu)
        slots.fill_(-1)
        slots[:n] = torch.tensor([h.slot(r, r.context) for r in step_reqs], device=dev)
        impl.do_kv_cache_update(layer, k, v, cache, slots)
        publish_batch([f"request-{i}" for i in range(n)])  # the padding rows have none
        return h.builder.build(0, CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl_cpu, seq_lens=seq_lens,
            num_reqs=padded, num_actual_tokens=padded, max_query_len=1,
            max_seq_len=int(seq_cpu.max()), block_table_tensor=table, slot_mapping=slots,
            causal=True, seq_lens_cpu_upper_bound=seq_cpu))

    meta = load(reqs)
    impl.forward(layer, q, k, v, cache, meta, out)  # compiles the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.forward(layer, q, k, v, cache, meta, out)
    meta = load([h.next_token(r) for r in reqs])
    graph.replay()
    replayed = out[:real].clone()
    out.zero_()
    impl.forward(layer, q, k, v, cache, meta, out)
    assert torch.isfinite(replayed).all()
    assert torch.equal(replayed, out[:real])
