"""A failure in the two views it is read in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Words:
    """`user`: what the owner of the backup or restore reads, never the infrastructure (hosts,
    URIs, usernames, buckets, hypervisor names). `operator`: what an admin reads, with every
    detail that helps; None when it would say the same."""

    user: str
    operator: str | None = None

    def prefixed(self, prefix: str) -> Words:
        return Words(prefix + self.user, prefix + self.operator if self.operator else None)

    def columns(self, error: str = "error") -> dict[str, str | None]:
        """The row's columns: `error` and `error_detail` (or `verify_error`...)."""
        detail = self.operator if self.operator != self.user else None
        return {error: self.user, f"{error}_detail": detail}
