"""Every configuration key the daemon reads: type, default, bounds and a one-line doc.

Each section of the TOML file is a frozen dataclass below; each of its fields is one key,
declared once with `key()` (Postfix `CONFIG_*_TABLE`, `mail_params.h`). The loader
(`load.py`) walks these tables to validate a file, `tools/gen_config_doc.py` renders them
into docs/config.md, and tests/test_config.py checks the two views agree. Adding a key
means adding one field here; nothing else lists keys.

Defaults, bounds and choices are written in the form an operator would type in the TOML
file ("64MiB", "5m") and go through the same parser as the file's own values, so the
documented default is exactly what runs.

The value types (size, duration, rate, host:port, ...), `Key` and the checker are in
values.py, shared with the shaping and bounce rule files.

Reads and writes nothing. Diagnostics: value parsers raise `Invalid`, which the loader
turns into a problem naming the key path; nothing here is raised to callers of the loader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta.config.values import (
    BOOL,
    CHOICE,
    CIDR_LIST,
    DURATION,
    HEADER_LIST,
    HEADER_NAME,
    HOSTNAME,
    HOSTPORT,
    HOSTPORT_LIST,
    INT,
    IP_ADDRESS,
    NAME,
    OPTIONAL_HOSTNAME,
    PERCENT,
    OPTIONAL_NAME,
    OPTIONAL_PATH,
    PATH,
    PATH_LIST,
    RATE,
    ROUTES,
    SELECTOR,
    SCHEDULE,
    SIZE,
    START_TIME,
    TEXT,
    TEXT_LIST,
    WEIGHTED,
    WORKERS,
    Invalid,
    IPNetwork,
    Key,
    ValueType,
)
from mta.model.log_records import RecordType
from mta.model.rate import Rate

# --- keys and sections -------------------------------------------------------------------


def key(value_type: ValueType, default: object, doc: str, *, lo: object = None,
        hi: object = None, choices: tuple[str, ...] = (), inherit: str | None = None,
        required: bool = False, restart: bool = False) -> Any:
    """Declare a section dataclass field as a configuration key (no dataclass default:
    the loader always passes every field). `restart`: a reload cannot change it."""
    spec = Key(value_type, default, doc, lo, hi, choices, inherit, required, restart)
    return dataclasses.field(metadata={"key": spec})


def keys_of(cls: type) -> dict[str, Key]:
    """The keys of a section dataclass, in declaration order."""
    return {f.name: f.metadata["key"] for f in dataclasses.fields(cls)}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """This node as a whole."""

    hostname: str = key(HOSTNAME, "mta.localdomain",
                        "our name in the SMTP greeting, EHLO reply and Received headers", restart=True)
    data_memory_budget: int = key(SIZE, "512MiB", "message content all SMTP sessions together "
                                  "may hold in memory before it is stored; at the budget new "
                                  "transactions get 452 4.3.1 and sessions in DATA stop being "
                                  "read; per node: with [server] workers = N each worker "
                                  "process gets 1/N (rounded up)", lo="1MiB", hi="1024GiB", restart=True)
    data_memory_wait: float = key(DURATION, "30s", "how long sessions in DATA may be held "
                                  "at the memory budget before the largest are closed with "
                                  "421 4.3.2 to free it", lo="1s", hi="1h", restart=True)
    workers: int = key(WORKERS, 1, "worker processes on this host (mta/supervisor.py): each "
                       "has its own listener sockets on the same addresses (SO_REUSEPORT), its "
                       "own spool directory <spool directory>/wN, log file mta.wN.jsonl and "
                       "admin API port (admin.listen port + N; ?node=1 on any of them answers "
                       "for the node); 1 runs one process without a supervisor; the node's "
                       "connection and memory budgets (egress and listener max_connections, "
                       "data_memory_budget, hot_cache) are split across the workers, delivery "
                       "limits are held by each worker alone unless [cluster] backend shares "
                       "them",
                       restart=True)
    node: str = key(OPTIONAL_HOSTNAME, "", "this node's name in a cluster (logs, the admin "
                    "API, shared limit keys); \"\": the host name", restart=True)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """The durable message store: append-only segment files, one fsync per batch."""

    directory: Path = key(PATH, "./var/spool", "directory holding the spool segment files", restart=True)
    segment_size: int = key(SIZE, "64MiB", "size at which a segment file is closed and "
                            "a new one started", lo="1MiB", hi="4GiB", restart=True)
    max_batch: int = key(INT, 1024, "most records written by one group commit (one fsync)",
                         lo=1, hi=65536, restart=True)
    bookkeeping_delay: float = key(DURATION, "5ms", "how long the records nobody waits on "
                                   "(a delivered message's tombstone, a deferral's schedule) may "
                                   "wait to share the fsync of the next accepted message before "
                                   "they are synced on their own; longer saves fsyncs, and widens "
                                   "the moment in which a crash would deliver a just-delivered "
                                   "message again (0: sync them at once)",
                                   lo=0, hi="1s", restart=True)
    hot_cache: int = key(SIZE, "256MiB", "recently accepted message content kept in RAM so "
                         "a prompt delivery reads nothing back from disk; per node: with "
                         "[server] workers = N each worker process gets 1/N (rounded up)", lo=0, hi="64GiB", restart=True)
    min_free_space: int = key(SIZE, "256MiB", "free space the spool's file system keeps for "
                              "tombstones: below it (or below min_free_percent) new mail gets "
                              "452 4.3.1 at MAIL FROM until space returns", lo=0, hi="64GiB", restart=True)
    min_free_percent: int = key(INT, 2, "free space to keep, in percent of the spool's file "
                                "system; the larger of this and min_free_space holds",
                                lo=0, hi=90, restart=True)
    max_queued_messages: int = key(INT, 0, "messages the spool holds at most (0: no limit); "
                                   "at the limit new mail gets 451 4.3.2 at MAIL FROM",
                                   lo=0, hi=1 << 40, restart=True)
    reserve_space: int = key(SIZE, "8MiB", "space held back in a reserve file in the spool "
                             "directory and released when the disk runs full, so finished "
                             "messages can still be marked done and free their segments; new "
                             "mail gets 452 4.3.1 until it is back (0: no reserve)",
                             lo=0, hi="1GiB", restart=True)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """JSONL log records (Reception, Delivery, Bounce, ...)."""

    directory: Path = key(PATH, "./var/log", "directory holding the JSONL log files", restart=True)
    reception_log: bool = key(BOOL, True, "write a Reception record for every message accepted", restart=True)
    max_buffer: int = key(SIZE, "64MiB", "log records kept in memory while the log file cannot "
                          "be written (full or failing disk); past it the oldest are dropped, "
                          "counted in a LogLoss record", lo="1MiB", hi="4GiB")
    mode: str = key(CHOICE, "0640", "permissions of the log files: records name senders and "
                    "recipients, so never world-readable; 0640 lets a log shipper in the "
                    "daemon's group read them", choices=("0600", "0640"))
    recipient_privacy: str = key(CHOICE, "clear", "recipient addresses in the records "
                                 "(recipient, recipients): clear, hashed (HMAC with the "
                                 "suppression key, as `mta suppress` exports them, so records "
                                 "can be joined) or domain (the part after @ only)",
                                 choices=("clear", "hashed", "domain"), restart=True)
    sender_privacy: str = key(CHOICE, "clear", "sender addresses in the records, as for "
                              "recipient_privacy", choices=("clear", "hashed", "domain"),
                              restart=True)


@dataclass(frozen=True, slots=True)
class ReceptionConfig:
    """What is taken from an accepted message into its envelope."""

    tenant_header: str = key(HEADER_NAME, "X-Tenant", "header whose value names the tenant "
                             "of the message's scheduled queue; empty disables", restart=True)
    campaign_header: str = key(HEADER_NAME, "X-Campaign", "header whose value names the "
                               "campaign of the message's scheduled queue; empty disables", restart=True)
    class_header: str = key(HEADER_NAME, "X-Queue-Class", "header whose value names the "
                            "message's queue class (an unknown class is ignored); empty disables", restart=True)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One SMTP listening socket and the limits of the sessions it accepts."""

    address: str = key(IP_ADDRESS, "127.0.0.1", "IP address to listen on", restart=True)
    port: int = key(INT, 2525, "TCP port to listen on", lo=1, hi=65535, restart=True)
    hostname: str = key(HOSTNAME, None, "name in this listener's greeting and EHLO reply",
                        inherit="server.hostname", restart=True)
    banner: str = key(TEXT, "ESMTP mta", "text after the hostname in the 220 greeting", restart=True)
    relay_cidrs: tuple[IPNetwork, ...] = key(
        CIDR_LIST, ["127.0.0.0/8", "::1/128"],
        "clients allowed to relay to any domain; others are refused at RCPT", restart=True)
    bare_newline: str = key(CHOICE, "reject", "what to do with a bare LF in DATA: refuse "
                            "the message (closes SMTP smuggling) or rewrite it as CRLF",
                            choices=("reject", "normalize"), restart=True)
    max_message_size: int = key(SIZE, "50MiB", "largest message accepted (advertised in "
                                "EHLO SIZE)", lo="1KiB", hi="2GiB", restart=True)
    max_recipients: int = key(INT, 1000, "most RCPT TO accepted per message", lo=1, hi=100000, restart=True)
    max_line_length: int = key(INT, 2048, "longest command line accepted, CRLF included",
                               lo=512, hi=65536, restart=True)
    max_errors: int = key(INT, 10, "protocol errors in a session before 421 and disconnect",
                          lo=1, hi=1000, restart=True)
    max_junk_commands: int = key(INT, 100, "NOOP, RSET, VRFY and HELP commands allowed "
                                 "before MAIL", lo=1, hi=100000, restart=True)
    max_messages_per_session: int = key(INT, 1000, "messages accepted on one connection",
                                        lo=1, hi=1000000, restart=True)
    idle_timeout: float = key(DURATION, "5m", "wait for the next command before 421 and "
                              "disconnect", lo="1s", hi="1h", restart=True)
    data_timeout: float = key(DURATION, "10m", "wait for the next chunk of DATA before 421 "
                              "and disconnect", lo="1s", hi="1h", restart=True)
    max_connections: int = key(INT, 2000, "concurrent connections to this listener; per "
                               "node: with [server] workers = N each worker process accepts "
                               "1/N (rounded up)",
                               lo=1, hi=1000000, restart=True)
    max_connections_per_ip: int = key(INT, 200, "concurrent connections from one client IP "
                                      "(per node: with [server] workers = N the workers count "
                                      "together)",
                                      lo=1, hi=1000000, restart=True)
    tls: str = key(CHOICE, "starttls", "with tls_cert: offer STARTTLS (RFC 3207), or "
                   "\"implicit\": TLS from the first byte (port 465 style, RFC 8314)",
                   choices=("starttls", "implicit"), restart=True)
    tls_cert: Path | None = key(OPTIONAL_PATH, "", "certificate chain (PEM) for STARTTLS or "
                                "implicit TLS; the file is read again on SIGHUP; empty: no TLS",
                                restart=True)
    tls_key: Path | None = key(OPTIONAL_PATH, "", "private key (PEM) for tls_cert; read again "
                               "on SIGHUP", restart=True)
    require_tls: bool = key(BOOL, False, "refuse MAIL before STARTTLS (530 5.7.0); needs "
                            "tls_cert", restart=True)
    auth_users: Path | None = key(OPTIONAL_PATH, "", "credentials file (mode 0600, written by "
                                  "`mta user`): offer AUTH PLAIN LOGIN over TLS; an "
                                  "authenticated client may relay; read again on SIGHUP; "
                                  "needs tls_cert", restart=True)
    auth_concurrency: int = key(INT, 4, "AUTH password checks (scrypt) running at once for "
                                "this listener; more wait", lo=1, hi=64, restart=True)
    auth_max_failures: int = key(INT, 5, "failed AUTH attempts from one client IP before it "
                                 "is locked out for auth_lockout (per node: the workers count together)", lo=1, hi=1000, restart=True)
    auth_lockout: float = key(DURATION, "1m", "how long a client IP with too many failed "
                              "AUTH attempts gets 454 to every AUTH", lo="1s", hi="1d",
                              restart=True)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """Outbound SMTP: routing overrides, connections, retries, expiry."""

    ehlo_name: str = key(HOSTNAME, None, "name we give in EHLO to remote servers",
                         inherit="server.hostname")
    hold: bool = key(BOOL, False, "accept and queue, but deliver nothing (maintenance, "
                     "accept-only benchmarks); held mail goes out after a restart without it", restart=True)
    smarthost: tuple[str, int] | None = key(HOSTPORT, "", "send everything to this "
                                            "host:port instead of looking up MX records", restart=True)
    routes: dict[str, tuple[str, int]] = key(ROUTES, {}, "static routes: domain -> next "
                                             "hop, bypassing MX lookups", restart=True)
    port: int = key(INT, 25, "TCP port of remote MX hosts", lo=1, hi=65535, restart=True)
    connection_limit: int = key(INT, 32, "concurrent connections per site (MX set)",
                                lo=1, hi=100000)
    max_deliveries_per_connection: int = key(INT, 1000, "messages sent over one connection "
                                             "before it is closed", lo=1, hi=1000000)
    max_recipients_per_transaction: int = key(INT, 100, "recipients of one domain sent in "
                                              "one transaction", lo=1, hi=10000)
    ready_queue_size: int = key(INT, 4096, "messages waiting per ready queue before more "
                                "are pushed back to their scheduled queue", lo=1, hi=10000000, restart=True)
    tls: str = key(CHOICE, "opportunistic", "STARTTLS towards servers that offer it "
                   "(unauthenticated, RFC 7435), opportunistic-fallback (after a failed "
                   "handshake the same host again in plaintext), verified (certificate "
                   "checked against the trust store and the MX name), or never",
                   choices=("opportunistic", "opportunistic-fallback", "verified", "off"))
    mta_sts: bool = key(BOOL, True, "honour MTA-STS policies (RFC 8461) of recipient domains "
                        "that publish one (TXT _mta-sts and an HTTPS policy; cached in the spool "
                        "directory for the policy's max_age)", restart=True)
    dane: bool = key(BOOL, True, "honour DANE TLSA records (RFC 7672) of MX hosts; applies only "
                     "when the [dns] nameservers validate DNSSEC (answers with the AD bit)",
                     restart=True)
    tls_ca_file: Path | None = key(OPTIONAL_PATH, "", "CA certificates (PEM) that verified TLS, "
                                   "MTA-STS and its HTTPS policy fetch trust; \"\": the system "
                                   "trust store (SSL_CERT_FILE / SSL_CERT_DIR)", restart=True)
    tls_reports: bool = key(BOOL, True, "count TLS sessions to domains with an MTA-STS or "
                            "DANE policy and send them SMTP TLS reports (RFC 8460) at the rua "
                            "addresses of their _smtp._tls TXT record", restart=True)
    tls_report_interval: float = key(DURATION, "1d", "how often TLS reports are sent (the "
                                     "counting window)", lo="1s", hi="31d", restart=True)
    connect_timeout: float = key(DURATION, "30s", "TCP connect to a remote host",
                                 lo="100ms", hi="10m", restart=True)
    command_timeout: float = key(DURATION, "5m", "wait for a reply to a command (RFC 5321 "
                                 "4.5.3.2 minimums)", lo="100ms", hi="1h", restart=True)
    data_timeout: float = key(DURATION, "10m", "wait for the reply to end of data",
                              lo="100ms", hi="1h", restart=True)
    idle_timeout: float = key(DURATION, "5s", "keep an idle connection open for reuse",
                              lo="0s", hi="10m")
    retry_initial: float = key(DURATION, "5m", "first retry interval after a temporary "
                               "failure; doubled each attempt, with jitter", lo="1s", hi="1d")
    retry_max: float = key(DURATION, "4h", "longest retry interval", lo="1s", hi="7d")
    max_age: float = key(DURATION, "5d", "time after which a message that still fails "
                         "temporarily expires and bounces", lo="1s", hi="30d", restart=True)
    delay_dsn_after: float = key(DURATION, "0s", "send one delay DSN once a message has "
                                 "waited this long (0s: never)", lo="0s", hi="30d", restart=True)
    strip_private_headers: bool = key(BOOL, True, "remove the reception's classification "
                                      "headers (tenant_header, campaign_header, class_header) "
                                      "before a message goes out: they name the sender's "
                                      "customers and campaigns", restart=True)
    no_dsn_tenants: tuple[str, ...] = key(TEXT_LIST, [], "tenants whose senders get no DSNs "
                                          "(they read bounces from the logs or webhooks); "
                                          "their bounces are still logged and suppress",
                                          restart=True)
    shutdown_grace: float = key(DURATION, "30s", "on SIGTERM, how long deliveries in flight "
                                "and SMTP transactions in progress may take to finish before "
                                "the daemon exits (a second SIGTERM stops at once)",
                                lo="0s", hi="1h")


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """Outbound sources as a whole: default pool and class, shaping files, connection budget."""

    default_pool: str = key(OPTIONAL_NAME, "", "pool for messages no [[egress_rule]] places; "
                            "\"\": every [[source]] with weight 1 (or the host's default "
                            "address when there is none)")
    default_class: str = key(NAME, "bulk", "queue class of messages no rule or header "
                             "classifies")
    shaping: tuple[Path, ...] = key(PATH_LIST, [], "operator traffic-shaping files layered, in "
                                    "order, over the shipped mta/egress/shaping.toml")
    max_connections: int = key(INT, 16000, "outbound connections open at once, all sources "
                               "and sites together (needs as many open files: see "
                               "RLIMIT_NOFILE); per node: with [server] workers = N each "
                               "worker process opens 1/N (rounded up)",
                               lo=1, hi=10000000, restart=True)
    pool_hook: str = key(TEXT, "", "\"module:function\" called with (Envelope, queue class) "
                         "returning a pool name (or None for the rules); empty: none")


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One egress source: a local IP address outbound connections are bound to."""

    name: str = key(NAME, None, "name pools, logs and the CLI use", required=True)
    address: str = key(IP_ADDRESS, None, "local IP address to bind (must be configured on "
                       "the host)", required=True)
    ehlo_name: str = key(HOSTNAME, None, "EHLO name for connections from this source "
                         "(should match the address's PTR)", inherit="delivery.ehlo_name")
    port: int = key(INT, 0, "remote port override for every site (test rigs); 0: the site's "
                    "port", lo=0, hi=65535)
    warmup_start: str = key(START_TIME, "", "when this IP's warm-up began: its messages per "
                            "day and hour to each provider follow the [warmup] schedules from "
                            "then on; \"\": a warm IP, no warm-up caps")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A weighted set of sources; messages spread over it by weighted round-robin."""

    name: str = key(NAME, None, "name rules and the CLI use", required=True)
    sources: tuple[tuple[str, int], ...] = key(WEIGHTED, None, "member sources and their "
                                               "weights", required=True)


@dataclass(frozen=True, slots=True)
class EgressRuleConfig:
    """Which pool and queue class a message uses; the first matching rule that sets each wins."""

    tenant: str = key(TEXT, "", "match this tenant (exact); empty: any")
    campaign: str = key(TEXT, "", "match this campaign (exact); empty: any")
    sender_domain: str = key(TEXT, "", "match the envelope sender's domain (case-insensitive); "
                             "empty: any")
    header: str = key(HEADER_NAME, "", "match a header of the message ...")
    header_value: str = key(TEXT, "", "... having this value (case-insensitive; empty: present)")
    pool: str = key(OPTIONAL_NAME, "", "pool to use when the rule matches")
    queue_class: str = key(OPTIONAL_NAME, "", "queue class to use when the rule matches")


@dataclass(frozen=True, slots=True)
class QueueClassConfig:
    """A queue class: its own scheduled queues and its share of every connection's turns."""

    name: str = key(NAME, None, "class name (transactional, bulk and admin exist built in; "
                    "a table with one of those names changes it)", required=True)
    weight: int = key(INT, 1, "turns this class gets at a (source, site) for each turn of a "
                      "weight-1 class", lo=1, hi=1000)
    max_message_rate: Rate | None = key(RATE, "", "messages of this class per "
                                                       "(source, site)")


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """The resolver used for MX and address lookups."""

    nameservers: tuple[tuple[str, int], ...] = key(HOSTPORT_LIST, [], "DNS servers to ask, "
                                                   "as \"ip:port\"; empty: /etc/resolv.conf", restart=True)
    timeout: float = key(DURATION, "5s", "time for one DNS query", lo="100ms", hi="1m", restart=True)
    ipv6: bool = key(BOOL, False, "also look up AAAA records of MX hosts", restart=True)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The HTTP admin API that `mta queue` talks to."""

    listen: tuple[str, int] | None = key(HOSTPORT, "127.0.0.1:8025", "address of the HTTP "
                                         "admin API (loopback only is advised); \"\" disables", restart=True)
    token_file: Path | None = key(OPTIONAL_PATH, "", "file holding the admin API's bearer "
                                  "token, which every request must send; the daemon creates it "
                                  "(mode 0600, 32 random bytes in hex) when missing, and `mta` "
                                  "commands read it from the same config; \"\": admin.token "
                                  "in the spool directory", restart=True)
    tokens_file: Path | None = key(OPTIONAL_PATH, "", "more admin API tokens, one `ROLE TOKEN` "
                                   "a line: read-only (may GET) or operator (may also POST); "
                                   "the file must not be readable by group or others (0600); "
                                   "the token_file token is always an operator's; \"\": none",
                                   restart=True)
    max_body: int = key(SIZE, "64KiB", "largest request body the admin API reads (413 beyond)",
                        lo="1KiB", hi="64MiB", restart=True)
    timeout: float = key(DURATION, "10s", "time an admin API request may take once its head "
                         "is in (408 beyond); also how long a connection may stay idle or "
                         "take to send its head", lo="100ms", hi="1h", restart=True)
    max_connections: int = key(INT, 64, "admin API connections at once (503 beyond)", lo=1,
                               hi=10000, restart=True)
    metrics_public: bool = key(BOOL, False, "GET /metrics without a token (a Prometheus "
                               "scraper on loopback); false: a read-only token is needed",
                               restart=True)
    metrics_top_sites: int = key(INT, 20, "sites with their own series in /metrics (the busiest "
                                 "by messages, besides configured shaping providers); the rest "
                                 "count under \"other\"", lo=0, hi=1000, restart=True)
    inject_max_size: int = key(SIZE, "32MiB", "largest POST /inject request body (413 beyond)",
                               lo="1KiB", hi="1GiB", restart=True)
    inject_max_recipients: int = key(INT, 1000, "recipients in one POST /inject request",
                                     lo=1, hi=100000, restart=True)
    inject_max_template: int = key(SIZE, "1MiB", "largest subject, text or html template of a "
                                   "structured POST /inject (and each substituted result)",
                                   lo="1KiB", hi="64MiB", restart=True)


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """DKIM signing as a whole; the keys are the [[dkim]] tables."""

    stage: str = key(CHOICE, "delivery", "sign on the way out (each attempt) or once at "
                     "reception, before the 250", choices=("delivery", "reception"), restart=True)
    on_error: str = key(CHOICE, "send_unsigned", "a message that cannot be signed "
                        "(malformed header block) goes out unsigned (and is logged) or is "
                        "deferred", choices=("send_unsigned", "defer"))
    threads: int = key(INT, 0, "signing threads; 0 = one per CPU", lo=0, hi=256, restart=True)
    policy: str = key(TEXT, "", "\"module:function\" called with (from_domain, Envelope) "
                      "returning the signing domains to use instead of the From domain; "
                      "empty: none")


@dataclass(frozen=True, slots=True)
class DkimConfig:
    """One DKIM signature to add for a domain; several per domain sign twice (RSA + Ed25519)."""

    domain: str = key(HOSTNAME, None, "signing domain (d=), matched against the From domain "
                      "and its parents", required=True)
    selector: str = key(SELECTOR, None, "selector (s=)", required=True)
    key_file: Path = key(PATH, None, "private key file (PEM)", required=True)
    algorithm: str = key(CHOICE, "auto", "signature algorithm; auto: from the key",
                         choices=("auto", "rsa-sha256", "ed25519-sha256"))
    canonicalization: str = key(CHOICE, "relaxed/relaxed", "header/body canonicalization "
                                "(RFC 6376 3.4)", choices=("relaxed/relaxed", "relaxed/simple",
                                                            "simple/relaxed", "simple/simple"))
    headers: tuple[str, ...] = key(HEADER_LIST, [], "headers to sign (h=); empty: the RFC "
                                   "6376 5.4 set mta.dkim.signer.DEFAULT_HEADERS")
    oversign: tuple[str, ...] = key(HEADER_LIST, ["from", "to", "cc", "subject", "date",
                                                  "reply-to"],
                                    "headers signed once more than present, so none can be added")
    expire_after: float = key(DURATION, "0s", "signature lifetime (x=); 0s: no x=",
                              lo="0s", hi="3650d")


# Bounce categories that are the receiving side's policy about the sender (reputation,
# content, security, a suspended account), not a fact about the address; the rest are
# graded by the classifier alone (unknown user/domain hard; full, expired, rate, size,
# system soft). Name (category or its common alias) -> classifier category.
BOUNCE_POLICY_CATEGORIES = {
    "spam_block": "spam_block", "blocked": "spam_block",
    "spam_content": "spam_content", "filtered": "spam_content", "spam": "spam_content",
    "virus": "virus",
    "policy": "policy", "security": "policy",
    "inactive_mailbox": "inactive_mailbox", "suspended": "inactive_mailbox",
}


def _parse_policy_categories(value: object, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"expected an array of category names, got {value!r}")
    bad = [v for v in value if v not in BOUNCE_POLICY_CATEGORIES]
    if bad:
        raise Invalid(f"{bad[0]!r} is not a policy category (allowed: "
                      + ", ".join(BOUNCE_POLICY_CATEGORIES) + ")")
    return tuple(sorted({BOUNCE_POLICY_CATEGORIES[v] for v in value}))


POLICY_CATEGORY_LIST = ValueType("policy categories", _parse_policy_categories,
                                 "an array of: " + ", ".join(BOUNCE_POLICY_CATEGORIES))


@dataclass(frozen=True, slots=True)
class BouncesConfig:
    """Returned mail: the bounce domain (VERP, out-of-band intake) and the reply classifier."""

    domain: str = key(OPTIONAL_HOSTNAME, "", "bounce domain: mail to it is parsed locally as DSN/ARF, "
                      "never relayed; \"\" turns out-of-band intake and VERP off", restart=True)
    verp: bool = key(BOOL, True, "send with a signed VERP return path at the bounce domain "
                     "(one recipient per transaction)", restart=True)
    verp_prefix: str = key(NAME, "b", "local-part prefix of VERP return paths (lowercase "
                           "letters, digits and inner hyphens, at most 11 characters)", restart=True)
    verp_expiry: float = key(DURATION, "35d", "how long after a message's reception its VERP "
                             "return paths prove a bounce or complaint; longer than [delivery] "
                             "max_age, plus time for late complaints", lo="1h", hi="3650d", restart=True)
    trusted_fbl_sources: tuple[IPNetwork, ...] = key(
        CIDR_LIST, [], "SMTP clients whose complaints (ARF) act without a VERP proof, on the "
        "recipient they name: your own FBL relay, never a mailbox provider's outbound range "
        "(its users could send forged reports)", restart=True)
    rules: tuple[Path, ...] = key(PATH_LIST, [], "operator classifier rule files, tried before "
                                  "the shipped mta/feedback/bounce/rules.toml; re-read when they change", restart=True)
    policy_hard: tuple[str, ...] = key(
        POLICY_CATEGORY_LIST, [], "policy categories whose permanent (5xx) failures count as hard "
        "bounces and suppress the recipient: blocked (IP/domain reputation), filtered/spam "
        "(content), virus, policy/security (SPF, DKIM, DMARC, local policy), suspended "
        "(disabled account); [] (default): all soft, since a policy block is about the sender, "
        "not the address. Unknown user/domain is always hard; mailbox full, expired, rate, "
        "size and system errors always soft", restart=True)
    parse_workers: int = key(INT, 1, "child processes parsing returned mail (off the event "
                             "loop; each holds one message at a time); per node: with [server] "
                             "workers = N each worker process gets 1/N (rounded up, at least 1)",
                             lo=1, hi=64, restart=True)
    parse_timeout: float = key(DURATION, "10s", "time one returned message may take to parse; "
                               "past it the child is killed and replaced and the message is "
                               "logged \"unparsed\" and kept under <spool>/unparsed", lo="100ms",
                               hi="10m", restart=True)
    parse_max_size: int = key(SIZE, "1MiB", "bytes of a returned message that are parsed (the "
                              "notice and status come first; a longer returned original is cut)",
                              lo="64KiB", hi="256MiB", restart=True)
    parse_memory: int = key(SIZE, "512MiB", "address space (RLIMIT_AS) of each parsing child; "
                            "a parse that needs more is \"unparsed\" (0: no limit)", lo=0,
                            hi="64GiB", restart=True)
    parse_backlog: int = key(INT, 10000, "returned messages waiting for a parser, or for their "
                             "suppression entries to be stored, at most; "
                             "beyond, new mail to the bounce domain gets 451 4.3.2 at RCPT "
                             "(nothing accepted is dropped)", lo=1, hi=10000000, restart=True)
    parse_attempts: int = key(INT, 3, "parses of one returned message cut short by daemon "
                              "crashes before it is finished \"unparsed\" without parsing again",
                              lo=1, hi=100, restart=True)


@dataclass(frozen=True, slots=True)
class SuppressionConfig:
    """The suppression list: addresses no mail is accepted for (hard bounces, complaints,
    unsubscribes, operator entries)."""

    enabled: bool = key(BOOL, True, "check recipients against the list and add hard bounces "
                        "and complaints to it", restart=True)
    store: Path = key(PATH, "./var/suppression/suppression.sqlite", "SQLite store of hashed "
                      "addresses", restart=True)
    key_file: Path = key(PATH, "./var/suppression/suppression.key", "32-byte secret for the "
                         "address hashes, VERP and unsubscribe tokens (created when missing); "
                         "nodes sharing suppression ([cluster] share_suppression) need the "
                         "same file", restart=True)
    on_match: str = key(CHOICE, "reject", "a suppressed recipient is refused at RCPT (550 "
                        "5.7.1) or accepted and dropped", choices=("reject", "drop"), restart=True)
    hard_bounce_expiry: float = key(DURATION, "0s", "how long a hard bounce suppresses "
                                    "(0s: until removed)", lo="0s", hi="3650d", restart=True)
    complaint_scope: str = key(CHOICE, "tenant", "scope of a complaint's entry: the "
                               "original's tenant (when known) or everyone",
                               choices=("tenant", "global"), restart=True)


@dataclass(frozen=True, slots=True)
class UnsubscribeConfig:
    """RFC 8058 one-click unsubscribe: the HTTP(S) endpoint and the headers."""

    listen: tuple[str, int] | None = key(HOSTPORT, "", "address of the one-click endpoint; "
                                         "\"\" disables", restart=True)
    base_url: str = key(TEXT, "", "public https URL of the endpoint, e.g. "
                        "\"https://unsub.example.com\"", restart=True)
    tls_cert: Path | None = key(OPTIONAL_PATH, "", "certificate chain (PEM) when the endpoint serves https "
                        "itself; empty: plain HTTP behind a TLS proxy", restart=True)
    tls_key: Path | None = key(OPTIONAL_PATH, "", "private key (PEM) for tls_cert", restart=True)
    add_headers: bool = key(BOOL, False, "add List-Unsubscribe and List-Unsubscribe-Post to "
                            "outgoing single-recipient messages that lack them", restart=True)


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """Sealed recipients (mta/model/sealed.py): local parts the injecting application
    encrypted; the MTA opens them in memory only, right before RCPT TO."""

    keyring: Path | None = key(OPTIONAL_PATH, "", "recipient keyring file (mode 0600, lines "
                               "`KEYID BASE64KEY`, written by `mta privacy keygen`); \"\" "
                               "turns sealed recipients off: \"e1...\" local parts are then "
                               "ordinary addresses. The file is read again at each reload "
                               "(SIGHUP), so a key rotation needs no restart (a broken file "
                               "refuses the reload); the path needs a restart", restart=True)


@dataclass(frozen=True, slots=True)
class WarmupConfig:
    """IP warm-up (mta/egress/warmup.py): a [[source]] with warmup_start sends each provider
    at most its class's cap per day (and the day's cap / hour_divisor per hour); a day's cap
    grows to the schedule's next only if the day before stayed under the thresholds below.
    A provider's class is its shaping table's warmup_class (major, small; default for any
    other destination, each site counted on its own). Shipped figures: issue 12 (about
    10,000 a day to each major provider and 1,000 to a small one from a fresh IP, never more
    than doubling a day), doubling up to the last day listed; after it, no cap."""

    day_length: float = key(DURATION, "1d", "length of a warm-up day (tests and the ISP "
                            "simulator run a day in a minute or so); an hour is 1/24 of it",
                            lo="1s", hi="7d", restart=True)
    major: tuple[int, ...] = key(SCHEDULE, [10000, 20000, 40000, 80000, 160000, 320000,
                                            640000, 1280000],
                                 "messages a day to each major provider on warm-up day 1, 2, "
                                 "...; no cap after the last")
    small: tuple[int, ...] = key(SCHEDULE, [1000, 2000, 4000, 8000, 16000, 32000],
                                 "messages a day to each small provider, as for major")
    default: tuple[int, ...] = key(SCHEDULE, [1000, 2000, 4000, 8000, 16000, 32000],
                                   "messages a day to each other site, as for major")
    hour_divisor: int = key(INT, 8, "the hour's cap is the day's cap divided by this (8: a "
                            "day's volume takes at least 8 hours)", lo=1, hi=24)
    max_bounce_rate: float = key(PERCENT, 3, "a day with more 5xx replies than this (percent "
                                 "of recipients tried at a class) does not grow the cap "
                                 "(Momentum's adaptive delivery throttles at 3 %)")
    max_complaint_rate: float = key(PERCENT, 0.2, "as max_bounce_rate for complaints (FBL "
                                    "reports) per recipient tried (Momentum: 0.2 %)")
    max_deferral_rate: float = key(PERCENT, 10, "as max_bounce_rate for deferrals about the "
                                   "sender (4.7.x enhanced status: rate, reputation, "
                                   "complaints; greylisting is not counted); our choice")
    min_volume: int = key(INT, 100, "recipients tried at a class in a day below which the "
                          "day's rates are not judged (the cap grows)", lo=1, hi=1000000)
    on_breach: str = key(CHOICE, "hold", "after a day over a threshold the cap stays (hold) "
                         "or goes back one day of the schedule (step_back)",
                         choices=("hold", "step_back"))


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    """Adaptive delivery (mta/egress/adaptive.py): the shaping files' automation rules, and
    rate rules per (source, provider) over a sliding window. Rates are per recipient tried
    (hard bounces: 5xx the classifier grades hard; deferrals: 4xx with a 4.7.x status or
    421, greylisting excluded) and per recipient delivered (complaints). Throttle and
    suspend figures for bounces and complaints are Momentum's Adaptive Delivery defaults;
    the deferral figures are our choice (a third of attempts deferred for policy or rate
    means the provider is slowing this source; three in five, that it is refusing it)."""

    enabled: bool = key(BOOL, True, "act on automation rules and rates (false: count nothing, "
                        "take no new action; actions in force run out)")
    window: float = key(DURATION, "1h", "the sliding window the rates are counted over "
                        "(one bucket per minute)", lo="1m", hi="1d")
    min_volume: int = key(INT, 100, "recipients tried in the window before a (source, "
                          "provider)'s bounce and deferral rates count", lo=1, hi=100000000)
    min_complaint_volume: int = key(INT, 1000, "recipients delivered in the window before its "
                                    "complaint rate counts", lo=1, hi=100000000)
    bounce_throttle: float = key(PERCENT, 3, "hard-bounce rate that cuts the message rate")
    bounce_suspend: float = key(PERCENT, 10, "hard-bounce rate that suspends the (source, "
                                "provider)")
    complaint_throttle: float = key(PERCENT, 0.2, "complaint rate that cuts the message rate")
    complaint_suspend: float = key(PERCENT, 0.5, "complaint rate that suspends")
    deferral_throttle: float = key(PERCENT, 30, "deferral rate that cuts the message rate")
    deferral_suspend: float = key(PERCENT, 60, "deferral rate that suspends")
    throttle_to: float = key(PERCENT, 50, "a cut message rate: this share of what the pair "
                             "sent in the window (or of its limit, if lower); at least 1/m")
    throttle_for: float = key(DURATION, "1h", "how long a cut holds before each step back",
                              lo="1m", hi="7d")
    suspend_for: float = key(DURATION, "4h", "how long a rate suspension holds",
                             lo="1m", hi="7d")
    steps: int = key(INT, 3, "steps back from a cut rate, each halving what is left of the "
                     "cut", lo=0, hi=10)
    max_pairs: int = key(INT, 100000, "(source, provider) windows and rule counters kept; the "
                         "least recently used are dropped", lo=100, hi=10000000)


def _parse_webhook_url(value: object, base: Path) -> str:
    from urllib.parse import urlsplit
    if not isinstance(value, str):
        raise Invalid(f"expected an http or https URL, got {value!r}")
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError as exc:
        raise Invalid(f"{value!r} is not a URL: {exc}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise Invalid(f"{value!r} is not an http:// or https:// URL with a host")
    if u.username is not None or u.password is not None:
        raise Invalid("credentials do not belong in the URL: put the Authorization header "
                      "value in authorization_file (mode 0600)")
    if u.fragment or any(c in value for c in " \t\r\n") or port == 0:
        raise Invalid(f"{value!r}: no fragment, whitespace or port 0 allowed")
    return value


def _parse_record_types(value: object, base: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"expected an array of record type names, got {value!r}")
    known = {t.value for t in RecordType}
    bad = [v for v in value if v not in known]
    if bad:
        raise Invalid(f"{bad[0]!r} is not a log record type (known: {', '.join(sorted(known))})")
    return tuple(dict.fromkeys(value))


WEBHOOK_URL = ValueType("url", _parse_webhook_url, "an http:// or https:// URL without "
                        "credentials")
RECORD_TYPE_LIST = ValueType("record types", _parse_record_types, "an array of log record "
                             "type names (mta/model/log_records.py), e.g. [\"Delivery\", "
                             "\"Bounce\"]")


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """One event webhook (mta/logs/hooks.py): the log records that match its filters,
    POSTed as a JSON array in batches, one batch at a time in log order, retried with
    backoff until the hook answers 2xx; its cursor (<spool directory>/webhooks/NAME.cursor)
    says how far it got, so a restart resumes there. A slow or dead hook never slows mail:
    its cursor only lags behind the log."""

    name: str = key(NAME, None, "name in logs, stats and the cursor file; unique", required=True,
                    restart=True)
    url: str = key(WEBHOOK_URL, None, "where batches are POSTed; https is verified against the "
                   "system trust store (or ca_file)", required=True, restart=True)
    record_types: tuple[str, ...] = key(RECORD_TYPE_LIST, [], "record types sent; []: all",
                                        restart=True)
    tenants: tuple[str, ...] = key(TEXT_LIST, [], "tenants whose records are sent (records "
                                   "without a tenant are then not sent); []: all", restart=True)
    batch_size: int = key(INT, 100, "most records in one POST", lo=1, hi=100000, restart=True)
    max_batch_bytes: int = key(SIZE, "1MiB", "most bytes of records in one POST (a record "
                               "larger than this goes alone)", lo="1KiB", hi="64MiB",
                               restart=True)
    batch_interval: float = key(DURATION, "1s", "how long a batch that is not full waits for "
                                "more records before it is sent", lo="10ms", hi="1h",
                                restart=True)
    timeout: float = key(DURATION, "30s", "time for one POST (connect, send, the reply)",
                         lo="100ms", hi="10m", restart=True)
    max_retry_interval: float = key(DURATION, "5m", "longest wait between two tries of a "
                                    "batch (the wait doubles from 1s, with jitter)",
                                    lo="100ms", hi="1d", restart=True)
    max_lag: int = key(SIZE, "1GiB", "how far (bytes of log) the hook may fall behind; past "
                       "it the hook skips to the end of the log, logging an error with what "
                       "it skipped; 0: no bound (the log files are the backlog)", lo=0,
                       hi="1024GiB", restart=True)
    authorization_file: Path | None = key(OPTIONAL_PATH, "", "file (mode 0600, no group or "
                                          "other access) holding the Authorization header "
                                          "value, e.g. \"Bearer ...\"; \"\": none",
                                          restart=True)
    ca_file: Path | None = key(OPTIONAL_PATH, "", "PEM certificates to trust for an https url "
                               "instead of the system trust store; \"\": the system store",
                               restart=True)


def _parse_score(value: object, base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not -1000 <= value <= 10000:
        raise Invalid(f"expected a number from -1000 to 10000, got {value!r}")
    return float(value)


SCORE = ValueType("score", _parse_score, "a number (integer or float), e.g. 5.0")


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """Egress content scanning at reception (mta/ingest/scan.py: SMTP, HTTP /inject and
    Server.inject(); not DSNs) for one tenant by one scanner (SpamAssassin's spamd or ClamAV's clamd); a tenant may have one table per
    scanner (the strictest decision wins); tables with tenant = \"\" apply to every
    tenant without tables of its own."""

    tenant: str = key(TEXT, "", "tenant (the tenant header's value) this table is for; "
                      "\"\": every tenant without its own tables", restart=True)
    scanner: str = key(CHOICE, "spamd", "the scanner: spamd (SPAMC protocol; spam by "
                       "score) or clamd (INSTREAM; a malware name found)",
                       choices=("spamd", "clamd"), restart=True)
    address: Any = key(HOSTPORT, "", "the scanner's address; \"\": 127.0.0.1:783 for "
                       "spamd, 127.0.0.1:3310 for clamd", restart=True)
    user: str = key(TEXT, "", "user name sent to spamd (its per-user preferences); "
                    "\"\": none", restart=True)
    threshold: float = key(SCORE, 5.0, "spamd: a score at or above this is spam",
                           restart=True)
    action: str = key(CHOICE, "reject", "what happens to spam: reject (550 5.7.1 at end of "
                      "data), hold (queued under an operator hold: `mta queue holds`, "
                      "`mta queue release --id`), tag (X-Spam-Flag/X-Spam-Status headers "
                      "added, on clean mail X-Spam-Status: No; clamd: X-Virus-Status), "
                      "drop (250, nothing stored, "
                      "a Scanned record), accept (logged only)",
                      choices=("reject", "hold", "tag", "drop", "accept"), restart=True)
    fail: str = key(CHOICE, "open", "when the scanner is down, times out or answers "
                    "garbage: open accepts the message unscanned (logged), closed answers "
                    "451 4.7.1", choices=("open", "closed"), restart=True)
    timeout: float = key(DURATION, "30s", "per message: the wait for a scan slot and the "
                         "scan; past it, `fail` applies", lo="100ms", hi="10m", restart=True)
    max_size: int = key(SIZE, "2MiB", "messages bigger than this are not scanned; "
                        "`oversize` says what happens", lo="1KiB", hi="1GiB", restart=True)
    oversize: str = key(CHOICE, "accept", "a message bigger than max_size: accept, hold or "
                        "reject it, unscanned", choices=("accept", "hold", "reject"),
                        restart=True)
    concurrency: int = key(INT, 16, "scans in flight at once for this table (more wait, "
                           "within timeout)", lo=1, hi=1024, restart=True)


def _parse_fraction(value: object, base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise Invalid(f"expected a number above 0 and at most 1, got {value!r}")
    return float(value)


FRACTION = ValueType("fraction", _parse_fraction, "a number above 0 and at most 1, e.g. 0.5")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Limits that hold across worker processes and nodes (mta/egress/shared): connection
    leases and GCRA message and connection rates per (source, site) and per site. local:
    each process counts alone (one worker, one node); host: the workers of this host share
    a table in shared memory under the spool directory; redis: every node and worker
    shares them through a redis-server (KumoMTA's scheme)."""

    backend: str = key(CHOICE, "auto", "where shared limits are held: local (this process "
                       "only), host (this host's workers, shared memory, no service), redis "
                       "(the whole cluster, through redis_url); auto: host when [server] "
                       "workers is above 1, else local",
                       choices=("auto", "local", "host", "redis"), restart=True)
    redis_url: str = key(TEXT, "redis://127.0.0.1:6379/0", "the redis-server of backend = "
                         "redis (redis://[:password@]host:port/db or unix:///path)", restart=True)
    key_prefix: str = key(TEXT, "mta:", "prefix of every Redis key (clusters sharing one "
                          "redis-server use different prefixes)", restart=True)
    lease_ttl: float = key(DURATION, "10s", "a connection lease lives this long unless renewed "
                           "(renewed every third of it while the connection lives): what a dead "
                           "node held is free again within it", lo="1s", hi="10m", restart=True)
    timeout: float = key(DURATION, "250ms", "longest wait for one Redis call; past it the call "
                         "counts as a failure", lo="10ms", hi="10s", restart=True)
    fallback_fraction: float = key(FRACTION, 0.5, "while Redis is unreachable each process "
                                   "holds this share of every shared limit on its own (with N "
                                   "processes in the cluster, 1/N keeps the total); in the "
                                   "outage's first lease_ttl/3 + timeout + 1 s it opens no "
                                   "more connections than it held, while the others close "
                                   "theirs above their share", restart=True)
    rate_batch: float = key(DURATION, "50ms", "a process takes this much time's worth of a "
                            "shared rate's tokens per round trip (at least one token)",
                            lo="1ms", hi="1s", restart=True)
    share_suppression: bool = key(BOOL, True, "with backend = redis, suppression entries "
                                  "(hard bounces, complaints, unsubscribes, mta suppress "
                                  "add/remove) reach every node through the stream "
                                  "<key_prefix>suppression; nodes must share [suppression] "
                                  "key_file", restart=True)
    suppression_stream_length: int = key(INT, 1_000_000, "records the suppression stream "
                                         "keeps (approximately): a node away longer than "
                                         "that many changes misses the oldest",
                                         lo=1000, hi=100_000_000, restart=True)


@dataclass(frozen=True, slots=True)
class Section:
    """One top-level TOML table and the dataclass that holds it."""

    # TOML name: [name], or [[name]] when `many`.
    name: str
    # Frozen dataclass whose fields are the section's keys.
    cls: type
    # True for an array of tables; absent means one entry with all defaults ...
    many: bool = False
    # ... unless not required: then absent means none.
    required: bool = True


SECTIONS = (
    Section("server", ServerConfig),
    Section("spool", SpoolConfig),
    Section("log", LogConfig),
    Section("reception", ReceptionConfig),
    Section("listener", ListenerConfig, many=True),
    Section("delivery", DeliveryConfig),
    Section("egress", EgressConfig),
    Section("source", SourceConfig, many=True, required=False),
    Section("pool", PoolConfig, many=True, required=False),
    Section("egress_rule", EgressRuleConfig, many=True, required=False),
    Section("queue_class", QueueClassConfig, many=True, required=False),
    Section("dns", DnsConfig),
    Section("admin", AdminConfig),
    Section("signing", SigningConfig),
    Section("dkim", DkimConfig, many=True, required=False),
    Section("bounces", BouncesConfig),
    Section("suppression", SuppressionConfig),
    Section("unsubscribe", UnsubscribeConfig),
    Section("privacy", PrivacyConfig),
    Section("warmup", WarmupConfig),
    Section("adaptive", AdaptiveConfig),
    Section("webhook", WebhookConfig, many=True, required=False),
    Section("scan", ScanConfig, many=True, required=False),
    Section("cluster", ClusterConfig),
)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; one attribute per section of SECTIONS."""

    # [server]
    server: ServerConfig
    # [spool]
    spool: SpoolConfig
    # [log]
    log: LogConfig
    # [reception]
    reception: ReceptionConfig
    # [[listener]], at least one; listener[0] is the one --listen replaces.
    listener: tuple[ListenerConfig, ...]
    # [delivery]
    delivery: DeliveryConfig
    # [egress]
    egress: EgressConfig
    # [[source]], possibly none
    source: tuple[SourceConfig, ...]
    # [[pool]], possibly none
    pool: tuple[PoolConfig, ...]
    # [[egress_rule]], in order
    egress_rule: tuple[EgressRuleConfig, ...]
    # [[queue_class]]: changes to and additions to the built-in classes
    queue_class: tuple[QueueClassConfig, ...]
    # [dns]
    dns: DnsConfig
    # [admin]
    admin: AdminConfig
    # [signing]
    signing: SigningConfig
    # [[dkim]], possibly none
    dkim: tuple[DkimConfig, ...]
    # [bounces]
    bounces: BouncesConfig
    # [suppression]
    suppression: SuppressionConfig
    # [unsubscribe]
    unsubscribe: UnsubscribeConfig
    # [privacy]
    privacy: PrivacyConfig
    # [warmup]
    warmup: WarmupConfig
    # [adaptive]
    adaptive: AdaptiveConfig
    # [[webhook]], possibly none
    webhook: tuple[WebhookConfig, ...]
    # [[scan]], possibly none: content scanning at reception
    scan: tuple[ScanConfig, ...]
    # [cluster]
    cluster: ClusterConfig
    # Where the configuration came from: a file path or "<string>".
    origin: str
