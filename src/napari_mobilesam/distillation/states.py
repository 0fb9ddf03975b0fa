"""Training states of a distillation run: written atomically, read safely, damaged ones set aside.

A run keeps its states in ``<output>.distill/<run>/state-e<epoch>-s<step>.pt`` (``epoch``: completed
epochs, ``step``: steps done in the next one). Each holds the student's weights, the optimiser,
scheduler and gradient-scaler states, the validation history, and only tensors and plain values
(read back with ``torch.load(weights_only=True)``).

Writes are atomic (:func:`napari_mobilesam.files.atomic_write`), so a killed run never leaves a
half-written state under a state name. A state can still be damaged later (a full disk, a copy cut
short, a file system that lost data): :func:`newest_readable_state` then moves it aside as
``NAME.damaged`` and falls back to the one before, so a rerun resumes by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DistillError
from ..files import atomic_write

__all__ = ["STATE_FORMAT", "save_state", "latest_state", "load_state", "newest_readable_state", "Resume"]

STATE_FORMAT = "napari-mobilesam-distill-state/1"
_PATTERN = "state-e*-s*.pt"


def save_state(run_dir: Path, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write a training state atomically as ``state-e<epoch>-s<step>.pt``; keep the newest ``keep``.

    ``state`` holds ``epoch`` (completed epochs), ``step_in_epoch``, tensors and plain values only
    (it is read back with ``weights_only=True``). Older state files of the same run are removed
    only after the new one is complete.
    """
    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"state-e{int(state['epoch']):04d}-s{int(state['step_in_epoch']):07d}.pt"
    path = run_dir / name
    atomic_write(path, lambda tmp: torch.save({"format": STATE_FORMAT, **state}, tmp))
    for old in sorted(run_dir.glob(_PATTERN))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _states(run_dir: Path) -> list[Path]:
    """State files of ``run_dir``, oldest first (the names sort by epoch, then step)."""
    return sorted(Path(run_dir).glob(_PATTERN)) if Path(run_dir).is_dir() else []


def latest_state(run_dir: Path) -> Path | None:
    """The newest training state file in ``run_dir`` (None when there is none); not read."""
    files = _states(run_dir)
    return files[-1] if files else None


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state (``weights_only=True``, tensors on the CPU).

    Raises
    ------
    DistillError
        When the file is unreadable (truncated, damaged) or not a distillation training state.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means a damaged file
        raise DistillError(
            f"training state {path} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "a rerun moves it aside and resumes from the state before"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DistillError(f"{path} is not a distillation training state")
    return state


def _set_aside(path: Path) -> Path:
    """Rename a damaged state to ``NAME.damaged`` (``NAME.damaged-2``... if taken); returns the new path."""
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    path.replace(target)
    return target


@dataclass
class Resume:
    """What :func:`newest_readable_state` found.

    ``path``/``state``: the newest state that reads (None: none, start afresh); ``set_aside``: the
    damaged files moved aside, as ``(original, new path, reason)``, newest first.
    """

    path: Path | None = None
    state: dict[str, Any] | None = None
    set_aside: list[tuple[Path, Path, str]] = field(default_factory=list)

    def messages(self) -> list[str]:
        """One line per damaged state, naming the file, where it went and what the run does now."""
        lines = []
        for original, moved, reason in self.set_aside:
            then = f"resuming from {self.path.name}" if self.path is not None else "starting afresh"
            lines.append(f"training state {original} is damaged ({reason}); moved it aside to "
                         f"{moved.name} and {then}")
        return lines


def newest_readable_state(run_dir: Path, *, set_aside: bool = True) -> Resume:
    """The newest training state of ``run_dir`` that reads; damaged newer ones are moved aside.

    Every state file newer than the one returned failed to load (truncated, not a state); with
    ``set_aside`` each is renamed to ``NAME.damaged`` so later runs skip it and the file stays for
    inspection. ``set_aside=False`` (processes other than the first under torchrun) only skips them.
    """
    found = Resume()
    for path in reversed(_states(run_dir)):
        try:
            found.state = load_state(path)
        except DistillError as exc:
            reason = str(exc.__cause__ or exc).splitlines()[0] if str(exc.__cause__ or exc) else "unreadable"
            moved = _set_aside(path) if set_aside else path
            found.set_aside.append((path, moved, reason[:200]))
            continue
        found.path = path
        break
    return found
