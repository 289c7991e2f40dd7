"""Per-layer sensitivity of a model to its KV cache format, measured on real text.

For a layer l and a candidate format c, the model runs with only layer l's keys and values
passed through c's codecs (``encode`` then ``decode``, the torch reference of the stored
bytes) and every other layer exact. The cost of (l, c) is the mean KL divergence of the
next-token distribution from the exact model's, over the calibration tokens:

    cost(l, c) = mean_t KL(p_exact(. | x_<t) || p_{l<-c}(. | x_<t))

KL is never negative and, unlike a loss difference, does not drown in the noise of which
tokens happen to be predicted, so small formats and small layers compare reliably. A window
may score only some positions (``scored``): the retrieval probes (``retrieval_probe``) score
the positions that predict an answer copied from far back, and each named set of windows
gets its own mean (``costs``).

Attention reads quantized keys and values as the backend does: a query sees its own token and
the ``window`` tokens before it exactly (past-only quantization plus the exact recent window),
never across a multiple of the exact span (``vllm_kvq/exactness.py``), and every older token
through the codec.

Per KV head: the same with only head h of layer l through c (``head``), the cost of
(l, h, c); the allocator's ``--per-head`` mode gives bits to heads, not whole layers.

Only the layers from l on depend on (l, c): the exact run records each decoder layer's input,
so a measurement re-runs layers l..L-1 and the head, not the whole model.
"""

from dataclasses import dataclass

import torch

from .exactness import exact_span
from .formats import LayerFormat, build_codecs

ATTENTION_NAME = "kvq_sensitivity"
# The span is measured as on vLLM's CPU blocks; any window of 16 tokens or more (a multiple
# of 16) has the same span on its 16-token GPU blocks.
BLOCK_SIZE = 128


@dataclass
class Probe:
    """Which layer is quantized, and how (None: every layer exact)."""

    layer: int | None = None
    fmt: LayerFormat | None = None
    window: int = 0
    seed: int = 0
    head: int | None = None  # only this KV head of the layer (None: all of them)


def round_trip(x: torch.Tensor, fmt_codec) -> torch.Tensor:
    """``[H, T, D]`` -> what attention reads back from the stored bytes, in model space."""
    packed = fmt_codec.encode(x.transpose(0, 1))  # [T, H, C]
    return fmt_codec.finish_output(fmt_codec.decode(packed.transpose(0, 1)))


def fake_quant_attention(q, k, v, fmt: LayerFormat, layer: int, window: int, seed: int,
                         scaling: float, head: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence, q ``[Hq, T, D]``, k/v ``[H, T, D]``, with keys and
    values older than ``window`` tokens read through the layer's codecs (of KV head ``head``
    only, when given; the others exact). Returns ``[T, Hq, D]``."""
    hq, t, d = q.shape
    h = k.shape[0]
    key_codec, value_codec = build_codecs(fmt, d, torch.bfloat16, seed, layer, list(range(h)))
    k_hat, v_hat = round_trip(k.float(), key_codec), round_trip(v.float(), value_codec)
    if head is not None:
        others = torch.arange(h, device=k.device) != head
        k_hat[others], v_hat[others] = k.float()[others], v.float()[others]
    g = hq // h
    qf = q.float().reshape(h, g * t, d)  # query heads of a KV head grouped, as the backend does
    pos = torch.arange(t)
    age = pos[:, None] - pos[None, :]  # query position - key position
    # exact: itself and the window before it, within its span (L(p) of exactness.py)
    near = (age <= torch.clamp(pos % exact_span(window, BLOCK_SIZE), max=window)[:, None])
    near = near.repeat(g, 1)
    causal = (age >= 0).repeat(g, 1)
    scores = torch.where(near, qf @ k.float().transpose(1, 2), qf @ k_hat.transpose(1, 2))
    p = torch.softmax(torch.where(causal, scores * scaling, float("-inf")), -1)
    out = torch.where(near, p, 0) @ v.float() + torch.where(near, 0, p) @ v_hat
    return out.view(hq, t, d).transpose(0, 1).to(q.dtype)


class SensitivityModel:
    """A Hugging Face causal LM prepared for (layer, format) probes on fixed token windows."""

    def __init__(self, model_path: str, windows: list[list[int]],
                 scored: list[list[bool]] | None = None, sets: list[str] | None = None):
        from transformers import AutoModelForCausalLM
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, self._attention)
        # float32: fastest on CPU, and the probe measures the cache, not the model's dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.layers = self.model.model.layers
        self.probe = Probe()
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_size = getattr(cfg, "head_dim", None) or \
            cfg.hidden_size // cfg.num_attention_heads
        self.windows = [torch.tensor([w]) for w in windows]
        # per window: the positions whose next-token distribution counts, and its set's name
        self.scored = [torch.tensor(m) if m is not None else torch.ones(len(w), dtype=torch.bool)
                       for w, m in zip(windows, scored or [None] * len(windows), strict=True)]
        self.sets = sets or ["text"] * len(windows)
        self.inputs: list[list[tuple]] = []  # per window, per layer: (args, kwargs)
        self.reference: list[torch.Tensor] = []  # per window: exact log-probs, scored rows
        self._record()

    def _attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        probe = self.probe
        if probe.fmt is not None and module.layer_idx == probe.layer:
            out = fake_quant_attention(query[0], key[0], value[0], probe.fmt, probe.layer,
                                       probe.window, probe.seed, scaling, probe.head)
            return out.unsqueeze(0), None
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None

    @torch.no_grad()
    def _record(self) -> None:
        """The exact run: every layer's inputs and the reference distribution."""
        self.model.config._attn_implementation = ATTENTION_NAME
        for ids, scored in zip(self.windows, self.scored):
            seen: list[tuple] = []
            hooks = [layer.register_forward_pre_hook(
                lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
                for layer in self.layers]
            try:
                logits = self.model(ids, use_cache=False).logits[0]
            finally:
                for hook in hooks:
                    hook.remove()
            self.inputs.append(seen)
            self.reference.append(torch.log_softmax(logits[scored].float(), -1))

    @torch.no_grad()
    def costs(self, layer: int, fmt: LayerFormat, window: int = 0, seed: int = 0,
              head: int | None = None) -> dict[str, float]:
        """Mean KL (nats per scored token) of each set of windows, with only ``layer`` (only
        its KV head ``head``, when given) stored as ``fmt``."""
        totals = {name: [0.0, 0] for name in self.sets}
        if fmt.is_raw:
            return {name: 0.0 for name in totals}
        self.probe = Probe(layer, fmt, window, seed, head)
        try:
            for inputs, ref, scored, name in zip(self.inputs, self.reference, self.scored,
                                                 self.sets):
                args, kwargs = inputs[layer]
                hidden = args[0] if args else kwargs["hidden_states"]
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                for later in self.layers[layer:]:
                    hidden = later(hidden, *args[1:], **kwargs)
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                # the head only where a distribution is scored (a probe: its answer tokens)
                logits = self.model.lm_head(self.model.model.norm(hidden[0, scored]))
                logp = torch.log_softmax(logits.float(), -1)
                totals[name][0] += torch.sum(ref.exp() * (ref - logp)).item()
                totals[name][1] += int(scored.sum())
            return {name: total / max(1, count) for name, (total, count) in totals.items()}
        finally:
            self.probe = Probe()
