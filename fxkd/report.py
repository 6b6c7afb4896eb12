"""The per-block report of a compression run: a readable table, whatever the model's size."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fxkd.solve.normal import Conditioning

__all__ = ["BlockRow", "Report"]

MAX_NOTES = 12
"""Note lines printed under the table before the rest are counted by kind."""


@dataclass(frozen=True)
class BlockRow:
    """One student site: where its adapter went, what it matched, its errors, fold status.

    Errors are relative squared errors ``Σ||y_t − y_s||² / Σ||y_t||²`` at the matched point on
    the calibration samples: ``err_given`` for the student as given, ``err_after`` after.
    ``conditioning`` says how well the samples determined the solve (``.ill`` flags it; the
    table's ``rank`` column shows it, a ``*`` marking an ill-conditioned site). ``relaxed``:
    the clamp (lo, hi) of the nonlinearity that alone reads the point, when the solve fitted
    what it passes on (``CompressConfig.relax_rounds``); the errors are then measured after
    it. ``ridge``: the relative ridge cross-validation chose (``ridge="cv"``), else None."""

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
    relaxed: tuple[float, float] | None = None
    ridge: float | None = None


@dataclass
class Report:
    """All rows (calibrated sites first, then skipped producers) and the run's settings.

    ``capture`` names the front-end that turned the models into graphs (``"fx"``: symbolic
    tracing)."""

    strategy: str
    mode: str
    num_samples: int
    rows: list[BlockRow] = field(default_factory=list)
    capture: str = "fx"

    @property
    def calibrated(self) -> list[BlockRow]:
        return [r for r in self.rows if r.adapter is not None]

    @property
    def ill_conditioned(self) -> list[BlockRow]:
        """Calibrated rows whose features the samples did not fully determine."""
        return [r for r in self.calibrated if r.conditioning is not None and r.conditioning.ill]

    def conditioning_summary(self) -> str:
        """One sentence on the sites whose solve the ridge, not the samples, partly decided."""
        ill = self.ill_conditioned
        if not ill:
            return ""
        dead = sum(r.conditioning.dead for r in ill)
        dependent = sum(r.conditioning.dependent for r in ill)
        flat = sum(1 for r in ill if not (r.conditioning.dead or r.conditioning.dependent))
        parts = [f"{dead} dead and {dependent} dependent features in all"]
        if flat:
            parts.append(f"{flat} only badly conditioned (bound > 1e6)")
        return (
            f"{len(ill)} of {len(self.calibrated)} sites have ill-conditioned features "
            f"({'; '.join(parts)}): the ridge held those directions at the student as given "
            "(rank column; each row's .conditioning has the details)"
        )

    def _table(self) -> list[tuple[str, ...]]:
        head = ("student point", "teacher point", "channels", "rank", "err given", "err after",
                "folded")  # fmt: skip
        table = [head]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        for r in self.rows:
            status = "yes" if r.folded else ("-" if r.adapter is None else "no")
            rank = "-"
            if r.conditioning is not None:
                c = r.conditioning
                rank = f"{c.rank}/{c.features}" + ("*" if c.ill else "")
            table.append((r.student, r.teacher or "-", r.channels, rank, fmt(r.err_given),
                          fmt(r.err_after), status))  # fmt: skip
        return table

    def _notes(self) -> list[str]:
        """One line per distinct note (sites sharing a note are named on one line), at most
        ``MAX_NOTES`` lines; the rest are counted by kind."""
        by_note: dict[str, list[str]] = {}
        for r in self.rows:
            if r.note:
                by_note.setdefault(r.note, []).append(r.student)
        lines = []
        for note, sites in by_note.items():
            if len(sites) == 1:
                lines.append(f"  {sites[0]}: {note}")
            else:
                named = ", ".join(sites[:4]) + (", ..." if len(sites) > 4 else "")
                lines.append(f"  {len(sites)} sites ({named}): {note}")
        if len(lines) <= MAX_NOTES:
            return lines
        rest = list(by_note.items())[MAX_NOTES:]
        kinds = Counter()
        for note, sites in rest:
            kinds[note.split(":")[0]] += len(sites)
        summary = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        return [*lines[:MAX_NOTES], f"  ... {sum(kinds.values())} more sites ({summary}); "
                "see report.rows"]  # fmt: skip

    def __str__(self) -> str:
        table = self._table()
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = [
            f"fxkd report: {self.mode} mode, {self.strategy} alignment, {self.capture} capture, "
            f"{self.num_samples} samples, {len(self.calibrated)} sites calibrated",
        ]
        for k, row in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        relaxed = sum(r.relaxed is not None for r in self.calibrated)
        if relaxed:
            lines.append(f"{relaxed} of {len(self.calibrated)} points are read only through a "
                         "ReLU-like clamp: fitted and measured after it")  # fmt: skip
        summary = self.conditioning_summary()
        if summary:
            lines.append(summary)
        notes = self._notes()
        if notes:
            lines.append("notes:")
            lines.extend(notes)
        return "\n".join(lines)
