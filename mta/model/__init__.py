"""The values stages pass to each other: ids, queue names, the queued-message
record, SMTP reply texts, log record types.

A leaf: nothing here imports the rest of mta (only the compiled record type
in mta._native), so every stage, tool and log consumer can use it alone and no
stage needs another stage just to name a value. tests/test_layering.py holds it
to that.
"""
