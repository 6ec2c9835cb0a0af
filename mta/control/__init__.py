"""Control: the operator's hands on the running daemon, the HTTP admin API
(admin.py), the typed views it serves and the CLI reads (views.py: queue
summary, one message, shaping rows) and the actions it runs on the delivery
engine (actions.py: suspend, resume, rebind).
"""
