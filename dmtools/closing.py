"""``Closing``: an object that is its own context manager, closed when the ``with`` block ends."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Self

__all__ = ["Closing"]


class Closing:
    """``with obj:`` gives ``obj`` and calls ``obj.close()`` when the block ends, however it ends."""

    def close(self) -> None:
        """Release what the object holds (each class says what)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
