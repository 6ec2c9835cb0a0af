"""Ingest, the first stage: listening sockets (listener.py), SMTP sessions
(session.py, settings.py), the DATA memory governor (governor.py) and the
reception policy that spools a message before its 250 (reception.py), and local
submission for messages made in the process: Server.inject() and DSNs (local.py).
"""
