"""Import statistics and their display string (docs/pull.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields


def human_bytes(n: int) -> str:
    """Binary human units as upstream prints them: ``0 B``, ``1.50 MiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


@dataclass
class ImportStats:
    """Counters of one import; merge with ``+=``."""

    layers: int = 0
    layers_already_present: int = 0
    objects_copied: int = 0
    objects_reflinked: int = 0
    objects_hardlinked: int = 0
    objects_already_present: int = 0
    bytes_copied: int = 0
    bytes_reflinked: int = 0
    bytes_hardlinked: int = 0
    bytes_inlined: int = 0

    def __iadd__(self, other: ImportStats) -> ImportStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def display(self) -> str:
        """The ``objects`` line of ``oci pull`` (and varlink ``Completed.stats``)."""
        if not (self.objects_reflinked or self.objects_hardlinked):
            return (f"{self.objects_copied} new + {self.objects_already_present} already present "
                    f"objects; {human_bytes(self.bytes_copied)} stored, "
                    f"{human_bytes(self.bytes_inlined)} inlined")
        counts = []
        amounts = []
        for method in ("reflinked", "hardlinked"):
            n = getattr(self, f"objects_{method}")
            if n:
                counts.append(f"{n} {method}")
                amounts.append(f"{human_bytes(getattr(self, f'bytes_{method}'))} {method}")
        counts += [f"{self.objects_copied} copied",
                   f"{self.objects_already_present} already present"]
        amounts += [f"{human_bytes(self.bytes_copied)} copied",
                    f"{human_bytes(self.bytes_inlined)} inlined"]
        return f"{' + '.join(counts)} objects; {', '.join(amounts)}"
