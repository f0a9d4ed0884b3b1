"""Named target groups of the directed worker: membership, changes, resolution. Pure.

A group is a name and an ordered set of target names. A change returns the new membership
for the store (``None``: the group is gone, its last member removed); a request's groups are
resolved once, when it is accepted, into its target list. A refused change or resolution is
a :class:`~bridge.errors.WireError` whose code goes into the reply (or the dead letter).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from bridge.errors import WireError


class Groups:
    def __init__(self, groups: Mapping[str, Sequence[str]] | None = None, *, max_size: int) -> None:
        self.max_size = max_size
        self._groups: dict[str, dict[str, None]] = {
            name: dict.fromkeys(members) for name, members in (groups or {}).items()
        }

    def get(self, name: str) -> list[str] | None:
        members = self._groups.get(name)
        return None if members is None else list(members)

    def set(self, name: str, targets: Iterable[str]) -> list[str] | None:
        return self._store(name, dict.fromkeys(targets))

    def add(self, name: str, targets: Iterable[str]) -> list[str] | None:
        members = dict(self._groups.get(name, {}))
        members.update(dict.fromkeys(targets))
        return self._store(name, members)

    def remove(self, name: str, targets: Iterable[str]) -> list[str] | None:
        members = dict(self._groups.get(name, {}))
        for target in targets:
            members.pop(target, None)
        return self._store(name, members)

    def resolve(self, targets: Sequence[str], names: Sequence[str]) -> list[str]:
        """``targets`` then every member of the named groups, duplicates removed."""
        out = dict.fromkeys(targets)
        for name in names:
            members = self._groups.get(name)
            if members is None:
                raise WireError("unknown_group", f"no target group {name!r}")
            out.update(members)
            if len(out) > self.max_size:
                raise WireError(
                    "too_many_targets",
                    f"the groups resolve to more than the limit of {self.max_size} targets",
                )
        if not out:
            raise WireError("empty_targets", "the named groups have no members")
        return list(out)

    def __len__(self) -> int:
        return len(self._groups)

    def _store(self, name: str, members: dict[str, None]) -> list[str] | None:
        if len(members) > self.max_size:
            raise WireError(
                "too_many_targets",
                f"group {name!r} would have {len(members)} members, more than {self.max_size}",
            )
        if not members:
            self._groups.pop(name, None)
            return None
        self._groups[name] = members
        return list(members)
