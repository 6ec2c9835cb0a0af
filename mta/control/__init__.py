"""Control: the operator's hands on the running daemon, the HTTP admin API
(admin.py) and the actions it runs on the delivery engine (actions.py:
suspend, resume, rebind).
"""
