"""``OriginGate.snaps``: the snapshots an origin write copies for, read without the registry's
lock once the write joined the gate, kept in step with the registry's list."""

from __future__ import annotations

from dataclasses import dataclass

from snapshot.targets.origins import OriginRegistry


@dataclass(eq=False)
class Snap:
    """What the registry asks of a snapshot."""

    origin_key: str
    cow_key: str
    chunk_size: int
    active: bool = True
    merge_target: bool = False
    can_merge: bool = True


def test_the_gates_snapshots_follow_register_reregister_and_unregister() -> None:
    reg: OriginRegistry[Snap] = OriginRegistry(2048)
    gate = reg.origin_gate("o")
    assert gate is reg.gate("o") and gate.snaps == ()
    a, b, c = Snap("o", "ca", 8), Snap("o", "cb", 16), Snap("p", "cc", 8)
    reg.register(a)
    assert gate.snaps == (a,)
    reg.register(b)
    reg.register(c)
    assert gate.snaps == tuple(reg.snapshots_of_key("o")) == (b, a)  # largest chunks first
    assert reg.origin_gate("p").snaps == (c,)
    a.chunk_size = 32
    reg.reregister(a)
    assert gate.snaps == tuple(reg.snapshots_of_key("o")) == (a, b)
    before = gate.snaps
    reg.unregister(b)
    assert gate.snaps == (a,) and before == (a, b)  # a tuple replaced, never changed in place
    reg.unregister(a)
    reg.unregister(a)
    assert gate.snaps == () and reg.origin_gate("o") is gate


def test_a_gate_made_after_its_snapshots_registered_knows_them() -> None:
    reg: OriginRegistry[Snap] = OriginRegistry(2048)
    a = Snap("o", "ca", 8)
    reg.register(a)
    assert reg.origin_gate("o").snaps == (a,)
