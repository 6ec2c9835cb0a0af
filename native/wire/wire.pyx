# cython: language_level=3
"""mta._native.wire: SMTP protocol cores (bytes in, replies and events out).

The server core is a state machine over a byte stream: the asyncio Protocol
in mta/ingest/session.py feeds it what the socket read and writes back what
it returns. It does no I/O and knows nothing of the loop (asyncpg's
coreproto/protocol split), so it can be fed from tests and fuzzers directly.

Trust: every byte is from the network. Reads are bounded (line length,
message size), only <CR><LF>.<CR><LF> ends DATA, bare CR/LF are refused or
normalised, and internal errors never reach the peer as text.
RFCs: 5321, 1870 (SIZE), 2920 (PIPELINING), 3030 (CHUNKING), 3461 (DSN),
6152 (8BITMIME), 6531 (SMTPUTF8), 2034 (ENHANCEDSTATUSCODES).
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING
from libc.string cimport memchr

include "decls.pxi"
include "address.pxi"
include "server.pxi"
include "client_codec.pxi"
include "client.pxi"

# Events returned with the output of feed() and resume().
EV_NONE = 0       # nothing for the caller to do but write the output
EV_MESSAGE = 1    # a message is complete: store transaction(), then resume()
EV_CLOSE = 2      # write the output, then close the connection

STATES = {ST_CONNECTED: "connected", ST_READY: "ready", ST_MAIL: "mail",
          ST_RCPT: "rcpt", ST_DATA: "data", ST_CHUNK: "chunk",
          ST_PENDING: "pending", ST_CLOSED: "closed"}
