"""Native extension modules (built from native/ by setup.py)."""
