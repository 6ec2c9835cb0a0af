"""Delivery: outbound SMTP sessions from an egress source to a site.

client.py is the session API the dispatcher uses (SmtpClient, its results
and errors); connect.py opens the source-bound socket under it. The
protocol itself is native (mta._native.wire.ClientCore).
"""
from mta.delivery.client import RemoteReply, SessionError, SmtpClient, Timeouts, TransactionResult

__all__ = ["RemoteReply", "SessionError", "SmtpClient", "Timeouts", "TransactionResult"]
