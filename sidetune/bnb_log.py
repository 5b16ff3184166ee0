"""bitsandbytes' log lines, only for runs that use bitsandbytes.

transformers imports peft for its scheduler and trainer utilities, and peft imports bitsandbytes, which logs
warnings at import about CPU kernels it could not load ("Failed to load CPU gemm_4bit_forward ..."). Every command
printed them, quantized or not. The CLI calls `hold()` first: bitsandbytes' records are kept instead of printed.
`release()` prints the kept records and lets later ones through; `session.build` calls it (through
`checks.check_run`) for a run that quantizes its base or uses a bitsandbytes optimizer, where the lines may matter.
"""

from __future__ import annotations

import logging

_LOGGER = "bitsandbytes"  # the parent of every bitsandbytes module's logger (logging.getLogger(__name__))


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_kept: _Keep | None = None


def hold() -> None:
    """From now on keep bitsandbytes' log records instead of printing them (until `release`)."""
    global _kept
    if _kept is not None:
        return
    _kept = _Keep()
    logger = logging.getLogger(_LOGGER)
    logger.addHandler(_kept)
    logger.propagate = False  # records from its modules propagate up to here and stop


def release() -> None:
    """Print what was kept (as logging would have) and let bitsandbytes log normally again."""
    global _kept
    if _kept is None:
        return
    logger = logging.getLogger(_LOGGER)
    logger.removeHandler(_kept)
    logger.propagate = True
    records, _kept = _kept.records, None
    for record in records:
        logging.getLogger(record.name).handle(record)


def used_by(quantize: str | None, optimizer: str) -> bool:
    """Whether a run with this model.quantize and train.optimizer runs bitsandbytes code."""
    return quantize is not None or optimizer != "adamw"
