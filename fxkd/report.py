"""The per-block report of a compression run: a readable table."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxkd.lstsq import Conditioning

__all__ = ["BlockRow", "Report"]


@dataclass(frozen=True)
class BlockRow:
    """One student site: where its adapter went, what it matched, its errors, fold status.

    Errors are relative squared errors ``Σ||y_t − y_s||² / Σ||y_t||²`` at the matched point on
    the calibration samples: ``err_given`` for the student as given, ``err_after`` after.
    ``conditioning`` says how well the samples determined the solve (``.ill`` flags it)."""

    student: str
    teacher: str | None
    channels: str
    adapter: str | None = None
    err_given: float | None = None
    err_before: float | None = None
    err_after: float | None = None
    folded: bool = False
    note: str = ""
    conditioning: Conditioning | None = None


@dataclass
class Report:
    """All rows (calibrated sites first, then skipped producers) and the run's settings."""

    strategy: str
    mode: str
    num_samples: int
    rows: list[BlockRow] = field(default_factory=list)

    @property
    def calibrated(self) -> list[BlockRow]:
        return [r for r in self.rows if r.adapter is not None]

    def __str__(self) -> str:
        head = ("student point", "teacher point", "channels", "err given", "err after", "folded")
        table = [head]
        for r in self.rows:
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            status = "yes" if r.folded else ("-" if r.adapter is None else "no")
            table.append(
                (
                    r.student,
                    r.teacher or "-",
                    r.channels,
                    fmt(r.err_given),
                    fmt(r.err_after),
                    status,
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = [
            f"fxkd report: {self.mode} mode, {self.strategy} alignment, "
            f"{self.num_samples} samples, {len(self.calibrated)} sites calibrated",
        ]
        for k, row in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        notes = [f"  {r.student}: {r.note}" for r in self.rows if r.note]
        if notes:
            lines.append("notes:")
            lines.extend(notes)
        return "\n".join(lines)
