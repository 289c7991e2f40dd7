"""What one layer stores per token and KV head: a key format and a value format side by side.

A slot (one token of one KV head) is ``[key bytes | value bytes | zero padding]``, padded to a
multiple of 8 bytes: every slot starts 8-byte aligned (64-bit loads), and at head size 64 a
3/3-bit or 4/2-bit slot in 64-channel groups costs its 56 bytes, not 64 (a 16-byte padding
made them cost as much as 4/3 bits). Kernels that read 16-byte chunks keep them inside the
slot (``kernels.layout``, ``cpu_kernel``).
Every byte of side information (scales, minimums, norms, outlier indices) is inside the slot,
so page sizes, capacity figures and bits/element are honest.
"""

from dataclasses import dataclass

from .raw import Raw
from .registry import StorageFormat

SLOT_ALIGN = 8


@dataclass(frozen=True)
class LayerFormat:
    key: StorageFormat
    value: StorageFormat

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
        return self.key == Raw() and self.value == Raw()

    def check(self, head_size: int, window: int, block_size: int | None,
              where: str) -> str | None:
        """The first reason this layer cannot be stored (one sentence), or None."""
        return (self.key.check("key", head_size, window, block_size, where)
                or self.value.check("value", head_size, window, block_size, where))

    def describe(self) -> str:
        return f"K {self.key.describe()}, V {self.value.describe()}"
