"""Snapshots: the kernel's dm-snapshot on either engine, its COW format, merge and offline tools."""

from __future__ import annotations

from snapshot.store import ExceptionStore, PersistentStore, TransientStore, Usage

__all__ = ["ExceptionStore", "PersistentStore", "TransientStore", "Usage"]
