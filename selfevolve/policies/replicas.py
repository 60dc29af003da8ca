"""All or nothing across replicas: an adapter load on every replica that serves a policy (a
fleet's `replicas`, else the policy itself), each checked, and every one put back when one
fails. It lives with the policies (FleetPolicy loads through it; sync's publish does too), so
neither imports the other's layer back (docs/architecture.md, "Layers")."""

from __future__ import annotations

from pathlib import Path

from ..errors import SyncError
from ..types import AdapterServing


def load_everywhere(policy: AdapterServing, path: str | Path, name: str, check=None) -> None:
    """Load adapter `name` from `path` on every replica that serves `policy` (a fleet's
    `replicas`, else the policy itself) and run `check(replica)` on each — all or nothing.

    A replica that fails (the load is refused, the server is unreachable, `check` raises) is
    put back as it was; then either the fleet drops it (`FleetPolicy.should_drop`: with
    `on_sync_error=drop`, or when it is unreachable) and the others go on, or every replica
    already updated is rolled back too and SyncError names the replica: no replica ever
    serves a different model from the others, and a failed sync leaves the previous adapter
    serving."""
    replicas = list(getattr(policy, "replicas", [policy]))
    done = []
    for replica in replicas:
        before = (replica.active_adapter, replica.adapters.get(name))
        try:
            replica.load_adapter(str(path), name)
            if check is not None:
                check(replica)
        except Exception as e:  # noqa: BLE001 - whatever failed, the replica must be put back
            why = f"{type(e).__name__}: {str(e)[:300]}"
            _roll_back(replica, name, *before)
            where = getattr(replica, "url", None)
            if hasattr(policy, "should_drop") and policy.should_drop(e):
                policy.drop(replica, f"adapter {name!r} did not sync: {why}")
                continue
            for other, *was in done:
                _roll_back(other, name, *was)
            rolled = f"; the other {len(done)} replica(s) were rolled back to {before[0]!r}" if done else ""
            raise SyncError(f"{'replica ' + where if where else 'the policy'} did not take adapter {name!r} "
                            f"({why}){rolled}") from None
        done.append((replica, *before))


def _roll_back(replica: AdapterServing, name: str, active: str | None, old_path: str | None) -> None:
    """Undo `replica.load_adapter(..., name)`: the old version of `name` (or none), and the
    adapter that was active. Best effort: an unreachable replica cannot be put back, and the
    error that brought us here is the one to report."""
    try:
        if old_path is not None:
            if replica.adapters.get(name) != old_path:
                replica.load_adapter(old_path, name)
        elif name in replica.adapters:
            replica.unload_adapter(name)
        replica.set_adapter(active)
    except Exception:  # noqa: BLE001
        pass
