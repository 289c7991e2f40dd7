"""The storage-format registry: every way of storing K or V is one registered class.

A format class (a frozen dataclass of its parameters) owns everything about its bytes:
    nbytes(head_size)        bytes per token and KV head, side information included
    check(role, ...)         whether it can store this role of this model (one sentence if not)
    codec(...)               its torch reference (encode / decode / scores), bound to a layer
    describe(), tag()        how it is named to users and in kernel reports
and the facts the Triton kernels need (``kernel_kind``, ``kernel_fields``, ``kernel_gap``);
its device functions live in the mirrored module ``kernels/formats/<module>.py``. Config,
validation, the kernel layout, dispatch and the compile report ask these methods; adding a
format is adding its module here (and its kernel pieces) and decorating the class with
``@register``.
"""

from typing import Any, ClassVar

FORMATS: dict[str, type["StorageFormat"]] = {}


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class StorageFormat:
    """Base of every registered format (subclasses are frozen dataclasses)."""

    kind: ClassVar[str]  # the registry name
    kernel_kind: ClassVar[int]  # the kernels' constexpr name for it (kernels/formats/)
    roles: ClassVar[tuple[str, ...]] = ("key", "value")
    settings: ClassVar[tuple[str, ...]] = ()  # KVQ settings that override its fields
    bits: int = 16

    @property
    def token_group(self) -> int:
        """Tokens quantized together (0: every token on its own). A grouped format packs a
        group when its last token arrives, reading the others from the exact window."""
        return 0

    def nbytes(self, head_size: int) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def tag(self) -> str:
        """A short name for kernel reports, e.g. ``rint4g32``."""
        raise NotImplementedError

    def check(self, role: str, head_size: int, window: int, block_size: int | None,
              where: str) -> str | None:
        """Why this format cannot store ``role`` ("key" / "value") of a model with this head
        size, exact window and block size (None: not known yet): one sentence naming the
        setting and what is allowed, or None. ``where`` names the layer, e.g. "layer 3"."""
        if role not in self.roles:
            allowed = [f.kind for f in FORMATS.values() if role in f.roles]
            return (f"KVQ {self.describe()} codes are {' and '.join(self.roles)} codes, but "
                    f"{where} asks for them for {role}s; allowed {role} formats are "
                    f"{', '.join(allowed)}.")
        return None

    def codec(self, head_size: int, dtype, seed: int, layer: int, global_heads: list[int]):
        """The torch reference of this format for one layer's local KV heads."""
        raise NotImplementedError

    # -- what the Triton kernels need (kernels/layout.py) -----------------------------------
    def kernel_gap(self, role: str, head_size: int) -> str | None:
        """Why the Triton kernels cannot read this format at this head size, or None."""
        return None

    def kernel_fields(self, head_size: int) -> dict[str, Any]:
        """The layout constexprs of this field: KIND, BITS, GROUP (channels, or tokens, per
        scale), CB (bytes of the bulk stream: codes, sign bits or raw halves), ROT, and
        ``extra`` constexprs only this format's kernel pieces read."""
        raise NotImplementedError

    def query_width(self, head_size: int) -> int:
        """Width of the prepared query the kernels score these keys with."""
        return head_size


def register(cls: type[StorageFormat]) -> type[StorageFormat]:
    """Class decorator (above ``@dataclass(frozen=True)``): add a format to the registry;
    names and kernel kinds are unique."""
    if cls.kind in FORMATS or cls.kernel_kind in {c.kernel_kind for c in FORMATS.values()}:
        raise ValueError(f"format {cls.kind!r} (kernel kind {cls.kernel_kind}) is registered "
                         "twice")
    FORMATS[cls.kind] = cls
    return cls


def storage_format(kind: str, *args, **params) -> StorageFormat:
    """A format by registry name, e.g. ``storage_format("int", bits=4, rotate=True)``."""
    if kind not in FORMATS:
        raise ValueError(f"unknown storage format {kind!r}; registered: {', '.join(FORMATS)}")
    return FORMATS[kind](*args, **params)
