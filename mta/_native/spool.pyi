"""Type stub for mta._native.spool (native/spool/spool.pyx): the group-committing segment writer."""
import os
from types import TracebackType
from typing import TypedDict

from typing_extensions import Buffer

class _WriterStats(TypedDict):  # stub-only: stats() returns a plain dict
    batches: int  # batches completed (ok or failed)
    records: int  # records in those batches
    bytes: int  # head + body bytes in those batches
    syncs: int  # segment FDATASYNCs (one per touched segment per batch)
    dir_syncs: int  # directory FSYNCs (batches that created a segment)
    short_writes: int  # WRITEVs that came back short and were finished by pwritev
    max_batch_records: int  # largest batch seen
    failed_batches: int  # batches that failed (their tickets completed with an errno)
    segment: int  # segment the next append goes to unless it rolls over

class SegmentWriter:
    directory: str
    def __init__(
        self,
        directory: str | os.PathLike[str],
        first_segment: int,
        segment_bytes: int = 64 << 20,
        max_batch: int = 1024,
        prologue: bytes = b"",
    ) -> None: ...
    @property
    def eventfd(self) -> int: ...
    def append(self, head: bytearray, body: Buffer | None, crc_offset: int) -> tuple[int, int, int]: ...
    def completed(self) -> list[tuple[int, int]]: ...
    def flush(self) -> None: ...
    def resume(self) -> None: ...
    def roll(self) -> int: ...
    def stats(self) -> _WriterStats: ...
    def close(self) -> None: ...
    def __enter__(self) -> SegmentWriter: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
