"""Feedback: what the world tells us about our mail, and what we tell senders.

Returned mail and complaints (bounce/ parses them, intake.py takes them in,
trust.py decides what may act on them), the reply classifier's shared state
(state.py), signed return paths (verp.py), one-click unsubscribe
(unsubscribe.py), the suppression list (suppression/), the RCPT policy that
consults it (rcpt_policy.py) and the DSNs we build (dsn_builder.py, RFC 3464).
"""
