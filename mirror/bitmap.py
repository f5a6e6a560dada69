"""Little-endian bitmaps as the kernel's dirty log keeps them (``test_bit_le`` order).

Region *r* is bit ``r % 8`` of byte ``r // 8`` (drivers/md/dm-log.c uses the ``*_bit_le`` helpers, so
the order is the same on every host). The byte length is a multiple of 8 (one ``unsigned long`` on a
64-bit kernel), as dm-log.c sizes its bitsets with ``dm_round_up(region_count, BITS_PER_LONG)``.
"""

from __future__ import annotations

import re

#: dm-log.c rounds its bitsets up to whole ``unsigned long`` words; the kernels we target are 64-bit.
BITS_PER_LONG = 64

_NOT_FULL = re.compile(rb"[^\xff]")


def bitmap_bytes(nbits: int) -> int:
    """Bytes the kernel uses for a bitset of ``nbits`` bits: ``round_up(nbits, BITS_PER_LONG) / 8``."""
    return -(-nbits // BITS_PER_LONG) * BITS_PER_LONG // 8


class Bitmap:
    """A fixed-size bitmap of ``nbits`` meaningful bits over a bytearray of ``bitmap_bytes(nbits)``.

    Bits past ``nbits`` (the padding up to a whole word) are stored but ignored by ``count`` and the
    searches.
    """

    __slots__ = ("nbits", "data")

    def __init__(self, nbits: int, fill: bool = False, data: bytes | bytearray | memoryview | None = None) -> None:
        self.nbits = nbits
        size = bitmap_bytes(nbits)
        if data is not None:
            if len(data) < size:
                raise ValueError(f"bitmap needs {size} bytes, got {len(data)}")
            self.data = bytearray(data[:size])
        else:
            self.data = bytearray(b"\xff" * size if fill else size)

    def __len__(self) -> int:
        return self.nbits

    def test(self, bit: int) -> bool:
        """True when ``bit`` is set."""
        return bool((self.data[bit >> 3] >> (bit & 7)) & 1)

    def set(self, bit: int) -> None:
        """Set ``bit``."""
        self.data[bit >> 3] |= 1 << (bit & 7)

    def clear(self, bit: int) -> None:
        """Clear ``bit``."""
        self.data[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF

    def assign(self, bit: int, value: bool) -> None:
        """Set or clear ``bit``."""
        if value:
            self.set(bit)
        else:
            self.clear(bit)

    def fill(self, value: bool) -> None:
        """Set (``True``) or clear every meaningful bit; padding bits are cleared."""
        for i in range(len(self.data)):
            self.data[i] = 0xFF if value else 0
        if value:
            self.clear_padding()

    def clear_padding(self) -> None:
        """Clear the bits past ``nbits`` (dm-log.c does this on every disk resume)."""
        end = len(self.data) * 8
        bit = self.nbits
        while bit < end and bit & 7:
            self.clear(bit)
            bit += 1
        for i in range(bit >> 3, len(self.data)):
            self.data[i] = 0

    def count(self) -> int:
        """Number of set bits among the first ``nbits``."""
        total = int.from_bytes(self.data, "little")
        return (total & ((1 << self.nbits) - 1)).bit_count()

    def find_next_zero(self, start: int = 0) -> int:
        """First clear bit at or after ``start`` below ``nbits``; ``nbits`` when there is none."""
        bit = max(start, 0)
        while bit < self.nbits:
            if bit & 7 == 0:
                m = _NOT_FULL.search(self.data, bit >> 3)
                if m is None:
                    return self.nbits
                byte = self.data[m.start()]
                return min(m.start() * 8 + ((~byte & (byte + 1)).bit_length() - 1), self.nbits)
            if not self.test(bit):
                return bit
            bit += 1
        return self.nbits

    def iter_zero(self) -> "list[int]":
        """Indices of every clear bit below ``nbits``, in order."""
        out = []
        bit = self.find_next_zero(0)
        while bit < self.nbits:
            out.append(bit)
            bit = self.find_next_zero(bit + 1)
        return out

    def copy(self) -> "Bitmap":
        """An independent copy."""
        return Bitmap(self.nbits, data=self.data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and other.nbits == self.nbits and other.data == self.data

    def __repr__(self) -> str:
        return f"Bitmap({self.nbits} bits, {self.count()} set)"
