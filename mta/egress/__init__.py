"""Egress: the way out of the MTA for a message that is ready to go.

`sites` turns a destination domain into a Site (its MX set, or a static route
or smarthost) through `dnsclient`, the only module that speaks DNS. Egress
sources and pools, and the single place that decides a message's path, join
this package later (see docs/architecture.md).
"""
