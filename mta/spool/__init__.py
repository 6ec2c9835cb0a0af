"""The durable spool: store, load, remove, enumerate; recovery at start.

See segments.py (the Spool), records.py (the on-disk format) and
recovery.py (the start-up scan).
"""
from mta.spool.segments import Spool, SpoolError

__all__ = ["Spool", "SpoolError"]
