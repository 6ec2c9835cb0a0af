"""JSONL logs (orjson): record types in records.py, the writer in writer.py."""
