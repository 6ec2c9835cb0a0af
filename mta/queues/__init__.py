"""Queues: the shared timer wheel, scheduled queues, ready queues, retry policy.

Named `queues` (not `queue`) so it never shadows the stdlib module or reads
like asyncio.Queue.
"""
