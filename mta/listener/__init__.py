"""Reception: listening sockets, SMTP sessions, reception policy."""
