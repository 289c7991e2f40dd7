"""KVQ settings: presets, overrides, the per-layer policy, and fail-closed validation.

Users pass ``--additional-config '{"kvq": {...}}'`` (or ``LLM(additional_config={"kvq": ...})``):

    {"kvq": {
        "preset": "k4v3",                 # what every layer stores by default (see PRESETS)
        "key_bits": 4, "value_bits": 2,   # overrides of the preset's integer codes
        "group_size": 32, "rotate": true, # channels per scale/min group; per-head rotation
        "sketch_dim": 256, "outliers": 4, # QJL keys: sketch rows; exact outlier channels
        "seed": 0,                        # seeds every rotation/projection (per layer, head)
        "bf16_layers": [0],               # layers kept in full precision
        "window": 64,                     # last 64 context tokens read exactly (0 = off;
                                          # default: the preset's, 16 for k4v3, else 0)
        "prefill_exact": false,           # true: a prompt's chunk attends to itself exactly
                                          # (answers then depend on prefix-cache state)
        "asymkv": [16, 8],                # AsymKV: 2-bit keys in layers 0-15, 2-bit values in
                                          # layers 0-7, 1-bit elsewhere (on the preset's codes)
        "layers": {"1-3": "k4v4", "29": {"value_bits": 4},   # per-layer preset or overrides,
                   "5": {"heads": ["k4v3", "k8v8", "k4v3"]}},  # or one per global KV head
        "policy_file": "policy.json",     # settings from a file (python -m vllm_kvq.allocate)
        "model": {"architecture": "LlamaForCausalLM", "num_layers": 30, "head_size": 64,
                  "num_kv_heads": 3},     # the model these settings were made for (policy
                                          # files record it): another model is refused
        "canary": true,                   # check each layer's packed path on the first prompt
        "smoothing": {"5": {"key_shift": [[...], ...], "key_scale": ..., "value_shift": ...,
                            "value_scale": ...}}  # WKVQuant channel smoothing per layer: one
                                          # row of head-size floats per global KV head
                                          # (vllm_kvq/smoothing.py; python -m vllm_kvq.wkvquant smooth)
    }}

Precedence, lowest first: the policy file, the preset and its overrides, ``asymkv``, ``layers``,
``bf16_layers``. A policy file holds ``{"kvq": {...settings...}}`` (plus an ``allocation``
record of how it was made); inline settings win over it, ``layers`` and ``smoothing`` entries merge.

Every mistake is reported as one sentence naming the setting and the allowed values, raised
as ``KVQConfigError`` while vLLM builds its config, before any memory is allocated.
"""

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .formats import FORMATS, LayerFormat, StorageFormat
from .formats.bits import SUPPORTED_BITS
from .formats.int_group import IntGroup
from .formats.kivi import KIVI
from .formats.qjl import QJL
from .formats.raw import Raw
from .smoothing import FIELDS as SMOOTHING_FIELDS
from .smoothing import LayerSmoothing

RAW = Raw()


def _int(bits: int, rotate: bool = True, group_size: int = 32) -> IntGroup:
    return IntGroup(bits=bits, group_size=group_size, rotate=rotate)


def _qjl(sketch_dim: int, outliers: int) -> QJL:
    return QJL(sketch_dim=sketch_dim, outliers=outliers)


def _kivi(bits: int, group_tokens: int = 32) -> KIVI:
    return KIVI(bits=bits, group_size=group_tokens)


# Named by what they store: k<key bits>v<value bits>; "qjl<m>" keys are m-bit sign sketches.
PRESETS: dict[str, LayerFormat] = {
    "bf16": LayerFormat(RAW, RAW),
    "k8v8": LayerFormat(_int(8, rotate=False), _int(8, rotate=False)),
    "k8v4": LayerFormat(_int(8, rotate=False), _int(4)),
    "k4v4": LayerFormat(_int(4), _int(4)),
    "k4v2": LayerFormat(_int(4), _int(2)),
    # 4x as well, the bits spent on values: 3-bit codes in 64-channel groups
    "k4v3": LayerFormat(_int(4, group_size=64), _int(3, group_size=64)),
    "k3v4": LayerFormat(_int(3, group_size=64), _int(4, group_size=64)),
    "k2v2": LayerFormat(_int(2), _int(2)),
    "qjl256v4": LayerFormat(_qjl(256, 4), _int(4)),
    "qjl256v2": LayerFormat(_qjl(256, 4), _int(2)),
    "qjl128v2": LayerFormat(_qjl(128, 4), _int(2)),
}
# KIVI (per-channel keys over 32-token groups, per-token values, as in the paper) packs a key
# group when it completes, so these presets need the exact recent window ("window" >= 32).
WINDOWED_PRESETS: dict[str, LayerFormat] = {
    "kivi4": LayerFormat(_kivi(4), _int(4, rotate=False)),
    "kivi2": LayerFormat(_kivi(2), _int(2, rotate=False)),
}
DEFAULT_PRESET = "k4v3"
# The exact window a preset runs with unless "window" is given: k4v3 was chosen as the default
# with 16 exact recent tokens (chunked perplexity +0.9% vs bf16 instead of +8.0% without them,
# benchmarks/results/perplexity_issue14.json), for a ring of 16 bf16 tokens per request slot.
PRESET_WINDOWS = {"k4v3": 16}

OVERRIDE_KEYS = ("key_bits", "value_bits", "group_size", "rotate", "sketch_dim", "outliers")
TOP_LEVEL_KEYS = ("preset", "seed", "bf16_layers", "layers", "window", "prefill_exact", "asymkv",
                  "policy_file", "model", "canary", "smoothing", *OVERRIDE_KEYS)
# What a policy records of the model it was allocated for, and checks at startup.
MODEL_FACTS = ("architecture", "num_layers", "head_size", "num_kv_heads")
MAX_WINDOW = 4096


# One line per setting, for ``vllm-kvq --help`` (the README's table says the same at length).
SETTINGS_HELP = {
    "preset": f"what every layer stores (default {DEFAULT_PRESET}, or the policy shipped for "
              "the model's configuration where one is: vllm_kvq/model_defaults.py; presets "
              "below)",
    "key_bits / value_bits": "integer code width for keys / values: 1, 2, 3, 4, 8 or 16 (16: exact)",
    "group_size": "channels sharing one fp16 scale and min: a power of two dividing the head",
    "rotate": "seeded per-head randomized Hadamard before quantizing: true / false",
    "sketch_dim / outliers": "QJL presets: sketch rows (multiple of 64); exact outliers (0-32)",
    "seed": "seeds every rotation and projection: integer >= 0",
    "bf16_layers": "layers kept in full precision: list of layer indices",
    "layers": "per-layer preset or overrides, e.g. {\"0-3\": \"k4v4\"}, or per KV head: "
              "{\"5\": {\"heads\": [\"k4v3\", \"k8v8\", \"k4v3\"]}}",
    "window": f"exact recent window of each running request: 0-{MAX_WINDOW} tokens (default: "
              f"{PRESET_WINDOWS[DEFAULT_PRESET]} for {DEFAULT_PRESET}, 0 for other presets)",
    "prefill_exact": "prompts attend to their own chunk exactly (cache-dependent answers)",
    "asymkv": "AsymKV split [l_k, l_v]: 2-bit keys / values in the first l_k / l_v layers",
    "policy_file": "per-layer policy written by python -m vllm_kvq.allocate",
    "model": "the model a policy was made for (recorded by the allocator; checked)",
    "canary": "check every layer's packed path on the first prompt (default true)",
    "smoothing": "per-layer channel shift and scale of keys and values (WKVQuant), as python -m "
                 "vllm_kvq.wkvquant smooth writes them",
}


class KVQConfigError(Exception):
    """A KVQ setting is invalid; the message is one sentence naming it and what is allowed.

    Not a ValueError on purpose: pydantic (vLLM's config classes) wraps a ValueError raised
    while a config is built into a ValidationError whose message buries the sentence, while
    other exceptions reach ``LLM(...)`` and the command line as they are."""


def _apply_overrides(fmt: LayerFormat, overrides: dict[str, Any], where: str) -> LayerFormat:
    key, value = fmt.key, fmt.value
    for name, v in overrides.items():
        if name not in OVERRIDE_KEYS:
            raise KVQConfigError(f"Unknown KVQ setting {where}{name!r}; allowed settings are "
                                 f"{', '.join(TOP_LEVEL_KEYS)}.")
        if name == "key_bits":
            key = _bits_codec(key, v, f"{where}key_bits")
        elif name == "value_bits":
            value = _bits_codec(value, v, f"{where}value_bits")
        else:
            _check_setting(name, v, where)
            if name in KEY_FORMAT_SETTINGS and name not in key.settings:
                owners = [f for f in FORMATS.values() if name in f.settings]
                raise KVQConfigError(
                    f"KVQ setting {where}{name} applies only to "
                    f"{' or '.join(f.kind.upper() for f in owners)} keys; choose a preset with "
                    f"such keys (e.g. {_preset_with(owners)}) to use it.")
            # A setting reaches the formats that have it (group_size: int and KIVI codes).
            key = replace(key, **{name: v}) if name in key.settings else key
            value = replace(value, **{name: v}) if name in value.settings else value
    return LayerFormat(key, value)


# Settings that only make sense for the key format of the preset: naming one for a preset
# whose keys lack it is refused (the others apply wherever a format has them).
KEY_FORMAT_SETTINGS = ("sketch_dim", "outliers")


def _preset_with(owners) -> str:
    return next(n for n, f in PRESETS.items() if any(isinstance(f.key, o) for o in owners))


def _check_setting(name: str, v: Any, where: str) -> None:
    """The values a format setting may take (what a head size allows is checked later)."""
    if name == "group_size" and (not isinstance(v, int) or v < 8 or v & (v - 1)):
        raise KVQConfigError(f"KVQ setting {where}group_size={v!r} is invalid; allowed "
                             "values are powers of two from 8 up to the head size.")
    if name == "rotate" and not isinstance(v, bool):
        raise KVQConfigError(f"KVQ setting {where}rotate={v!r} is invalid; allowed "
                             "values are true and false.")
    if name == "sketch_dim" and (not isinstance(v, int) or v < 64 or v % 64):
        raise KVQConfigError(f"KVQ setting {where}sketch_dim={v!r} is invalid; allowed "
                             "values are multiples of 64 (e.g. 128, 256, 512).")
    if name == "outliers" and (not isinstance(v, int) or not 0 <= v <= 32):
        raise KVQConfigError(f"KVQ setting {where}outliers={v!r} is invalid; allowed "
                             "values are integers from 0 to 32.")


def _bits_codec(codec: StorageFormat, bits: Any, name: str) -> StorageFormat:
    if bits == 16:
        return RAW
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise KVQConfigError(f"KVQ setting {name}={bits!r} is invalid; allowed values are "
                             "1, 2, 3, 4, 8 and 16 (16 keeps full precision).")
    base = codec if "bits" in codec.settings else _int(bits)
    return replace(base, bits=bits)


def _preset(name: Any, where: str) -> LayerFormat:
    known = {**PRESETS, **WINDOWED_PRESETS}
    if name not in known:
        raise KVQConfigError(f"Unknown KVQ {where}preset {name!r}; allowed presets are "
                             f"{', '.join(known)}.")
    return known[name]


def _layer_entry(entry: Any, default: LayerFormat, where: str) -> LayerFormat:
    """One ``layers`` entry (or one head of it): a preset name, or overrides of the default
    (or of the entry's own ``preset``)."""
    if isinstance(entry, str):
        return _preset(entry, f"{where} ")
    if isinstance(entry, dict):
        entry = dict(entry)
        base = _preset(entry.pop("preset"), f"{where}.") if "preset" in entry else default
        return _apply_overrides(base, entry, f"{where}.")
    raise KVQConfigError(f"KVQ setting {where} must be a preset name or an object of "
                         "overrides.")


def _head_formats(entry: dict, default: LayerFormat, where: str) -> tuple[LayerFormat, ...]:
    """``{"heads": [e0, e1, ...]}``: one entry per global KV head of the layer."""
    heads = entry["heads"]
    if set(entry) != {"heads"} or not isinstance(heads, list) or not heads:
        raise KVQConfigError(f"KVQ setting {where} with per-head formats must be "
                             "{\"heads\": [...]} alone: a non-empty list with one preset name "
                             "or object of overrides per KV head.")
    formats = tuple(_layer_entry(e, default, f"{where}.heads[{h}]") for h, e in enumerate(heads))
    for h, fmt in enumerate(formats):
        if fmt.key.token_group:
            raise KVQConfigError(f"KVQ setting {where}.heads[{h}] has {fmt.key.describe()} keys; "
                                 "per-head formats allow per-token keys only (integer codes, "
                                 "QJL or 16-bit), not KIVI's token groups.")
    return formats


def _layer_indices(key: Any, setting: str = "layers") -> range:
    """'5' -> [5]; '2-4' -> [2, 3, 4] (inclusive), a key of the setting ``setting``."""
    text = str(key)
    try:
        lo, _, hi = text.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if lo_i < 0 or hi_i < lo_i:
            raise ValueError
    except ValueError:
        raise KVQConfigError(f"KVQ setting {setting} has an invalid key {key!r}; allowed keys are "
                             "layer indices like \"3\" or inclusive ranges like \"0-3\".") from None
    return range(lo_i, hi_i + 1)


def resolve_policy_file(raw: dict[str, Any]) -> dict[str, Any]:
    """The settings with ``policy_file`` read and merged in (inline settings win, ``layers``
    entries merge), so a resolved dict never names a file: workers and other nodes need not
    see it."""
    raw = dict(raw)
    path = raw.pop("policy_file", None)
    if path is None:
        return raw
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, TypeError, ValueError) as e:
        raise KVQConfigError(f"KVQ setting policy_file={path!r} could not be read ({e}); "
                             "allowed values are paths to a JSON file written by python -m "
                             "vllm_kvq.allocate.") from None
    settings = data.get("kvq") if isinstance(data, dict) else None
    if not isinstance(settings, dict) or "policy_file" in settings:
        raise KVQConfigError(f"KVQ setting policy_file={path!r} must hold a JSON object "
                             "{\"kvq\": {...settings...}} without a nested policy_file.")
    merged = {**settings, **raw}
    for name in ("layers", "smoothing"):
        if isinstance(settings.get(name), dict) and isinstance(raw.get(name), dict):
            merged[name] = {**settings[name], **raw[name]}
    return merged


def _model_record(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value or set(value) - set(MODEL_FACTS):
        raise KVQConfigError(f"KVQ setting model={value!r} is invalid; allowed is an object with "
                             f"some of the keys {', '.join(MODEL_FACTS)} (as python -m "
                             "vllm_kvq.allocate records them).")
    return dict(value)


def model_facts(hf_config, text_config, head_size: int) -> dict[str, Any]:
    """MODEL_FACTS of a model from its Hugging Face config (and text config, for multimodal
    models), as policies record them."""
    return {"architecture": (getattr(hf_config, "architectures", None) or ["unknown"])[0],
            "num_layers": text_config.num_hidden_layers, "head_size": head_size,
            "num_kv_heads": getattr(text_config, "num_key_value_heads", None)
            or text_config.num_attention_heads}


def describe_model(facts: dict[str, Any]) -> str:
    """E.g. 'LlamaForCausalLM with 30 layers, head size 64 and 3 KV heads'."""
    parts = []
    if "num_layers" in facts:
        parts.append(f"{facts['num_layers']} layers")
    if "head_size" in facts:
        parts.append(f"head size {facts['head_size']}")
    if "num_kv_heads" in facts:
        parts.append(f"{facts['num_kv_heads']} KV heads")
    arch = facts.get("architecture", "a model")
    if not parts:
        return arch
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{arch} with {listed}"


def _smoothing(value: Any) -> dict[int, LayerSmoothing]:
    """``{"5": {"key_shift": [[...]], ...}}`` -> {layer: LayerSmoothing}; shapes are checked
    against the model at startup (``validate_model``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KVQConfigError("KVQ setting smoothing must be an object mapping layer indices or "
                             "ranges to {key_shift, key_scale, value_shift, value_scale}.")
    out: dict[int, LayerSmoothing] = {}
    for key, entry in value.items():
        where = f"smoothing[{key!r}]"
        if not isinstance(entry, dict) or not entry or set(entry) - set(SMOOTHING_FIELDS):
            raise KVQConfigError(f"KVQ setting {where} must be an object with some of the keys "
                                 f"{', '.join(SMOOTHING_FIELDS)}.")
        fields = {name: _smoothing_rows(rows, f"{where}.{name}", name.endswith("scale"))
                  for name, rows in entry.items()}
        for i in _layer_indices(key, "smoothing"):
            out[i] = LayerSmoothing(**fields)
    return out


def _smoothing_rows(rows: Any, where: str, scale: bool) -> torch.Tensor:
    """One smoothing vector per KV head as float32: finite, scales positive (a number that
    float32 cannot hold, 1e300 or 1e-50 for a scale, is refused too)."""
    ok = isinstance(rows, list) and rows and all(
        isinstance(r, list) and r and len(r) == len(rows[0]) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in r) for r in rows)
    t = torch.tensor(rows, dtype=torch.float32) if ok else None
    if t is None or not torch.isfinite(t).all() or (scale and not (t > 0).all()):
        allowed = "positive finite numbers" if scale else "finite numbers"
        raise KVQConfigError(f"KVQ setting {where} is invalid; allowed is a list with one row "
                             f"per KV head of head-size {allowed} (float32).")
    return t


def _asymkv_split(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise KVQConfigError(f"KVQ setting asymkv={value!r} is invalid; allowed values are "
                             "[l_k, l_v]: the number of leading layers with 2-bit keys and "
                             "with 2-bit values (the other layers get 1 bit).")
    return value[0], value[1]


def _asymkv_format(base: LayerFormat, layer: int, split: tuple[int, int]) -> LayerFormat:
    """AsymKV's layer-wise mix on the base format's codes: 2-bit keys in the first l_k layers
    and 2-bit values in the first l_v layers, 1 bit elsewhere."""
    l_k, l_v = split
    return LayerFormat(_bits_codec(base.key, 2 if layer < l_k else 1, "asymkv"),
                       _bits_codec(base.value, 2 if layer < l_v else 1, "asymkv"))


@dataclass(frozen=True)
class KVQConfig:
    """Resolved settings: a default format and per-layer exceptions."""

    default: LayerFormat
    seed: int = 0
    per_layer: dict[int, LayerFormat] = field(default_factory=dict)
    preset: str = DEFAULT_PRESET
    window: int = 0  # exact recent tokens per running request (see vllm_kvq/window.py)
    prefill_exact: bool = False  # chunk-level exactness (see vllm_kvq/exactness.py)
    asymkv: tuple[int, int] | None = None  # (l_k, l_v), for layers without an exception
    model: dict[str, Any] | None = None  # MODEL_FACTS of the model the settings were made for
    canary: bool = True  # the startup accuracy check (vllm_kvq/canary.py)
    # Layers whose KV heads store different formats: the format of each global KV head
    # (vllm_kvq/formats/head_layout.py).
    per_head: dict[int, tuple[LayerFormat, ...]] = field(default_factory=dict)
    # Layers whose keys and values are smoothed per channel (vllm_kvq/smoothing.py).
    smoothing: dict[int, LayerSmoothing] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "KVQConfig":
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise KVQConfigError(f"Unknown KVQ setting {unknown[0]!r}; allowed settings are "
                                 f"{', '.join(TOP_LEVEL_KEYS)}.")
        raw = resolve_policy_file(raw)
        preset = raw.pop("preset", DEFAULT_PRESET)
        default = _preset(preset, "")
        seed = raw.pop("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise KVQConfigError(f"KVQ setting seed={seed!r} is invalid; allowed values are "
                                 "non-negative integers.")
        bf16_layers = raw.pop("bf16_layers", [])
        window = raw.pop("window", PRESET_WINDOWS.get(preset, 0))
        if not isinstance(window, int) or isinstance(window, bool) or \
                not 0 <= window <= MAX_WINDOW:
            raise KVQConfigError(f"KVQ setting window={window!r} is invalid; allowed values are "
                                 f"integers from 0 (off) to {MAX_WINDOW}.")
        prefill_exact, canary = raw.pop("prefill_exact", False), raw.pop("canary", True)
        for name, flag in (("prefill_exact", prefill_exact), ("canary", canary)):
            if not isinstance(flag, bool):
                raise KVQConfigError(f"KVQ setting {name}={flag!r} is invalid; allowed values "
                                     "are true and false.")
        layers = raw.pop("layers", {})
        model = _model_record(raw.pop("model", None))
        asymkv = _asymkv_split(raw.pop("asymkv", None))
        smoothing = _smoothing(raw.pop("smoothing", None))
        default = _apply_overrides(default, raw, "")
        if asymkv and default.key != RAW and "bits" not in default.key.settings:
            raise KVQConfigError(f"KVQ setting asymkv applies to integer or KIVI keys, but "
                                 f"preset {preset} has {default.key.describe()} keys; choose e.g. "
                                 "k2v2 or kivi2.")
        per_layer: dict[int, LayerFormat] = {}
        if not isinstance(layers, dict):
            raise KVQConfigError("KVQ setting layers must be an object mapping layer indices or "
                                 "ranges to a preset name or to overrides.")
        per_head: dict[int, tuple[LayerFormat, ...]] = {}
        for key, entry in layers.items():
            if isinstance(entry, dict) and "heads" in entry:
                heads = _head_formats(entry, default, f"layers[{key!r}]")
                for i in _layer_indices(key):
                    per_head[i] = heads
                    per_layer.pop(i, None)
                continue
            fmt = _layer_entry(entry, default, f"layers[{key!r}]")
            for i in _layer_indices(key):
                per_layer[i] = fmt
                per_head.pop(i, None)
        if not isinstance(bf16_layers, list) or not all(
                isinstance(i, int) and i >= 0 for i in bf16_layers):
            raise KVQConfigError("KVQ setting bf16_layers must be a list of non-negative layer "
                                 "indices.")
        for i in bf16_layers:
            per_layer[i] = PRESETS["bf16"]
            per_head.pop(i, None)
        return cls(default=default, seed=seed, per_layer=per_layer, preset=preset,
                   window=window, prefill_exact=prefill_exact, asymkv=asymkv, model=model,
                   canary=canary, per_head=per_head, smoothing=smoothing)

    def layer_format(self, layer: int) -> LayerFormat:
        """The format every KV head of ``layer`` stores (see ``head_formats`` for layers with
        per-head formats, which have none)."""
        if layer in self.per_head:
            raise ValueError(f"KVQ layer {layer} stores a format per KV head; use "
                             "KVQConfig.head_formats")
        if layer in self.per_layer:
            return self.per_layer[layer]
        if self.asymkv:
            return _asymkv_format(self.default, layer, self.asymkv)
        return self.default

    def head_formats(self, layer: int, num_kv_heads: int) -> tuple[LayerFormat, ...]:
        """The format of each of the model's ``num_kv_heads`` global KV heads in ``layer``."""
        if layer in self.per_head:
            return self.per_head[layer]
        return (self.layer_format(layer),) * num_kv_heads

    def layer_formats(self, layer: int) -> tuple[LayerFormat, ...]:
        """The distinct formats ``layer`` stores (one, unless its heads differ)."""
        return tuple(dict.fromkeys(self.per_head[layer])) if layer in self.per_head else \
            (self.layer_format(layer),)

    @property
    def uniform(self) -> bool:
        """Every layer has the same format."""
        return not self.per_layer and not self.asymkv and not self.per_head

    def check_model_record(self, facts: dict[str, Any]) -> None:
        """Refuse settings recorded for another model (``facts``: MODEL_FACTS of this one)."""
        if self.model is None:
            return
        wrong = [k for k in MODEL_FACTS if k in self.model and self.model[k] != facts.get(k)]
        if wrong:
            raise KVQConfigError(
                f"The KVQ policy was made for {describe_model(self.model)}, but this model is "
                f"{describe_model(facts)}; allocate one for it with python -m vllm_kvq.allocate "
                "--model <this model>, or remove the policy's model record to use it anyway.")

    def validate_model(self, head_size: int, num_layers: int, block_size: int | None = None,
                       num_kv_heads: int | None = None) -> None:
        """Checks that need the model (and the block size, once known): layer indices, head
        counts of per-head layers, and every layer's formats (group sizes, sketch sizes,
        window, block size)."""
        for setting, layers in (("layers", (*self.per_layer, *self.per_head)),
                                ("smoothing", self.smoothing)):
            out_of_range = [i for i in layers if i >= num_layers]
            if out_of_range:
                raise KVQConfigError(f"KVQ setting {setting} names layer {out_of_range[0]}, but "
                                     f"the model has layers 0-{num_layers - 1}.")
        if self.asymkv and max(self.asymkv) > num_layers:
            raise KVQConfigError(f"KVQ setting asymkv={list(self.asymkv)} names more layers than "
                                 f"the model has; allowed values are 0 to {num_layers}.")
        for layer, heads in self.per_head.items():
            if num_kv_heads is not None and len(heads) != num_kv_heads:
                raise KVQConfigError(f"KVQ setting layers[{str(layer)!r}].heads lists "
                                     f"{len(heads)} formats, but the model has {num_kv_heads} "
                                     f"KV heads; allowed is one entry per KV head.")
        for layer, smoothing in sorted(self.smoothing.items()):
            problem = smoothing.shape_problem(num_kv_heads, head_size)
            if problem:
                raise KVQConfigError(f"KVQ setting smoothing for layer {layer}: {problem}.")
        for layer in range(num_layers):
            for fmt in self.layer_formats(layer):
                problem = fmt.check(head_size, self.window, block_size, f"layer {layer}")
                if problem:
                    raise KVQConfigError(problem)

    def mean_slot_bytes(self, layer: int, head_size: int) -> float:
        """Bytes per token and KV head of ``layer`` in the mean over its heads (the page size
        on one rank, before rounding: ``formats.head_layout``)."""
        if layer in self.per_head:
            heads = self.per_head[layer]
            return sum(f.slot_bytes(head_size) for f in heads) / len(heads)
        return self.layer_format(layer).slot_bytes(head_size)

    def describe(self, head_size: int, num_layers: int, policy_file: str | None = None,
                 span: int | None = None) -> str:
        """The startup line; ``span``: the exact span (``exactness.exact_span``) when known."""
        formats = {f for i in range(num_layers) for f in self.layer_formats(i)}
        slots = [self.mean_slot_bytes(i, head_size) for i in range(num_layers)]
        avg = sum(slots) / len(slots)
        what = (f"KVQ policy {policy_file} ({len(formats)} distinct formats"
                + (f", {len(self.per_head)} layers with per-head formats)" if self.per_head
                   else ")")
                if policy_file else f"KVQ preset {self.preset} ({self.default.describe()})")
        reads = ("prompts attend to their own chunk exactly (prefill_exact: answers depend on "
                 "the prefix cache)" if self.prefill_exact else
                 "a query reads earlier tokens packed"
                 + (f" but the last {self.window} of its own {span}-token span, prefix-cache "
                    f"hits cut to multiples of {span}" if self.window and span else
                    f" but the last {self.window} of its own span" if self.window else "")
                 + " (answers independent of the prefix cache)")
        return (f"{what}: {avg:.1f} bytes per token-head on average vs {4 * head_size} in bf16 "
                f"({4 * head_size / avg:.2f}x), {len(self.per_layer)} layer exception(s), "
                + (f"AsymKV split {list(self.asymkv)}, " if self.asymkv else "")
                + f"exact recent window {self.window} tokens; {reads}")


def config_from_vllm(vllm_config) -> KVQConfig:
    """The engine's KVQ settings, parsed once per distinct resolved settings (a policy file's
    contents included): the backend, its builder, every layer and the per-layer spec patch
    share one KVQConfig."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    raw = additional.get("kvq") if isinstance(additional, dict) else None
    resolved = resolve_policy_file(raw) if isinstance(raw, dict) else raw
    key = _frozen(resolved)
    if key not in _PARSED:
        if len(_PARSED) >= 32:  # settings change rarely; never grow without bound
            _PARSED.clear()
        _PARSED[key] = KVQConfig.from_dict(resolved)
    return _PARSED[key]


_PARSED: dict = {}


def layer_of(vllm_config, layer_name: str | None) -> tuple[int, tuple[LayerFormat, ...]]:
    """The index of one attention layer under the given engine config and the format of each
    of the model's global KV heads in it; the page size (``layer_token_head_bytes``) and the
    layer's codecs both come from here."""
    from .layers import layer_index  # vLLM's parallel state: only where an engine runs

    cfg = config_from_vllm(vllm_config)
    index = layer_index(layer_name, vllm_config, cfg.uniform)
    return index, cfg.head_formats(index, vllm_config.model_config.get_total_num_kv_heads())


def layer_token_head_bytes(vllm_config, layer_name: str | None, head_size: int) -> int:
    """vLLM's ``state_content_bytes`` of one layer: bytes per token and local KV head of its
    page, the same on every tensor-parallel rank (``formats.head_layout``)."""
    from .formats.head_layout import token_head_bytes

    return token_head_bytes(layer_of(vllm_config, layer_name)[1], head_size,
                            vllm_config.parallel_config.tensor_parallel_size)


def _frozen(value: Any):
    """A hashable image of a settings value that keeps types apart (a tuple is not a list,
    1 is not "1"), so equal keys mean settings that parse the same."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((repr(k), _frozen(v)) for k, v in value.items()),
                                     key=lambda kv: kv[0])))
    if isinstance(value, list) and all(type(v) is float for v in value):
        return ("floats", tuple(value))  # smoothing rows: thousands of numbers, kept fast
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return (type(value).__name__, repr(value))
