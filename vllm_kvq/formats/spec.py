"""What one layer stores per token and KV head: a key codec and a value codec side by side.

A slot (one token of one KV head) is ``[key bytes | value bytes | zero padding]``, padded to a
multiple of 16 bytes so every slot starts 16-byte aligned and kernels can use 128-bit loads.
Every byte of side information (scales, minimums, norms, outlier indices) is inside the slot,
so page sizes, capacity figures and bits/element are honest.
"""

from dataclasses import dataclass

SLOT_ALIGN = 16
KINDS = ("raw", "int", "qjl", "kivi")


@dataclass(frozen=True)
class CodecSpec:
    """How one of K or V is stored.

    kind="raw": the model's 16-bit values, unchanged.
    kind="int": per-token asymmetric min/max codes of ``bits`` bits in groups of ``group_size``
        channels, fp16 scale and min per group; optionally after a seeded per-head rotation.
    kind="qjl" (keys only): sign bits of a ``sketch_dim``-row JL projection of the key plus its
        fp16 norm; the ``outliers`` largest-magnitude channels of each token are kept exactly
        (fp16 value + uint8 index) and removed from the sketched part.
    kind="kivi" (keys only): per-channel ``bits``-bit codes over groups of ``group_size``
        consecutive tokens, fp16 scale and min per channel and group (spread over the group's
        slots); needs the exact recent window (see ``formats.kivi``).
    """

    kind: str
    bits: int = 16
    group_size: int = 32
    rotate: bool = False
    sketch_dim: int = 256
    outliers: int = 0

    def nbytes(self, head_size: int) -> int:
        if self.kind == "raw":
            return 2 * head_size
        if self.kind == "int":
            groups = head_size // self.group_size
            return head_size * self.bits // 8 + 4 * groups
        if self.kind == "qjl":
            return self.sketch_dim // 8 + 2 + 3 * self.outliers
        if self.kind == "kivi":
            return head_size * self.bits // 8 + 4 * head_size // self.group_size
        raise ValueError(f"unknown codec kind {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "raw":
            return "16-bit"
        if self.kind == "int":
            rot = "rotated " if self.rotate else ""
            return f"{rot}{self.bits}-bit g{self.group_size}"
        if self.kind == "kivi":
            return f"KIVI {self.bits}-bit per channel, {self.group_size}-token groups"
        return f"QJL m={self.sketch_dim}" + (f" +{self.outliers} outliers" if self.outliers else "")


@dataclass(frozen=True)
class LayerFormat:
    key: CodecSpec
    value: CodecSpec

    def key_bytes(self, head_size: int) -> int:
        return self.key.nbytes(head_size)

    def slot_bytes(self, head_size: int) -> int:
        raw = self.key.nbytes(head_size) + self.value.nbytes(head_size)
        return -(-raw // SLOT_ALIGN) * SLOT_ALIGN

    def bits_per_element(self, head_size: int) -> float:
        """Stored bits per K or V element, side information and padding included."""
        return self.slot_bytes(head_size) * 8 / (2 * head_size)

    def compression(self, head_size: int) -> float:
        return 4 * head_size / self.slot_bytes(head_size)

    @property
    def is_raw(self) -> bool:
        return self.key.kind == "raw" and self.value.kind == "raw"

    def describe(self) -> str:
        return f"K {self.key.describe()}, V {self.value.describe()}"
