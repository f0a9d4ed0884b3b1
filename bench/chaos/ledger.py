"""What the fault suite's producers had confirmed and what its consumers saw, keyed by message id."""

from __future__ import annotations

from collections import Counter
from typing import Any


class Ledger:
    """What producers had confirmed and what consumers saw, keyed by message id."""

    def __init__(self) -> None:
        self.sent_keys: set[str] = set()
        self.expected: dict[str, tuple[str, ...]] = {}
        self.seen: dict[tuple[str, str], int] = {}
        self.duplicates: Counter[str] = Counter()
        self.allowed = 0
        self.violations = 0
        self.violation_examples: list[str] = []

    def sent(self, key: str) -> None:
        self.sent_keys.add(key)

    def acknowledged(self, key: str, destinations: list[str] | tuple[str, ...]) -> None:
        self.sent_keys.add(key)
        self.expected[key] = tuple(destinations)

    def delivered(self, key: str, destination: str, allowed_reason: str | None = None) -> bool:
        """Record one delivery; True if it is the first of ``key`` at ``destination``.

        A repeat counts as allowed only with ``allowed_reason`` (the contract clause that
        permits it); otherwise it is a violation.
        """
        pair = (key, destination)
        count = self.seen.get(pair, 0)
        self.seen[pair] = count + 1
        if count == 0:
            return True
        if allowed_reason:
            self.allowed += 1
            self.duplicates[allowed_reason] += 1
        else:
            self.violations += 1
            self.duplicates["violation: delivered again outside the contract"] += 1
            if len(self.violation_examples) < 10:
                self.violation_examples.append(f"{key} at {destination}")
        return False

    def missing(self) -> list[tuple[str, str]]:
        return [
            (key, d)
            for key, dests in self.expected.items()
            for d in dests
            if (key, d) not in self.seen
        ]

    def has(self, key: str, destination: str) -> bool:
        return (key, destination) in self.seen

    def counters(self) -> dict[str, Any]:
        expected = sum(len(d) for d in self.expected.values())
        delivered = sum(
            1 for key, dests in self.expected.items() for d in dests if (key, d) in self.seen
        )
        return {
            "sent": len(self.sent_keys),
            "acknowledged": len(self.expected),
            "expected": expected,
            "delivered": delivered,
            "lost": expected - delivered,
            "duplicated": {
                "count": self.allowed + self.violations,
                "allowed": self.allowed,
                "violations": self.violations,
                "reasons": dict(self.duplicates),
            },
        }
