"""The POP3 server protocol (Twisted, on the asyncio reactor) over a mailbox's INBOX.

Owns: POP3 framing (RFC 1939, CAPA from RFC 2449, STLS from RFC 2595): USER/PASS and AUTH
PLAIN (RFC 5034; both only over TLS, or loopback in dev mode), STAT, LIST, UIDL, TOP, RETR (the
stored bytes, dot-stuffed, no other change), DELE, RSET, NOOP, QUIT (deletions committed in one
transaction at QUIT, never on a dropped connection).  One command runs at a time; reading
pauses while it does.  Logins go through realm.login; storage through core.mailboxes in the store's threads.
"""
from __future__ import annotations

import asyncio
import base64
import re

from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from .. import logs
from ..core import mailboxes
from ..errors import NotFound
from . import realm

log = logs.get("mailplat.pop3")
MAX_ERRORS = 20
_DOT = re.compile(rb"(^|\n)\.", re.S)


def dot_stuff(data: bytes) -> bytes:
    body = _DOT.sub(rb"\1..", data)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n" if not body.endswith(b"\n") else b""
    return body + b".\r\n"


def top_part(data: bytes, lines: int) -> bytes:
    m = re.search(rb"\r?\n\r?\n", data)
    if m is None:
        return data
    head, body = data[:m.end()], data[m.end():]
    if lines <= 0:
        return head
    kept = body.split(b"\n")[:lines]
    return head + b"\n".join(kept) + (b"\n" if len(body.split(b"\n")) > lines else b"")


class POP3Server(LineReceiver, TimeoutMixin):
    delimiter = b"\r\n"
    MAX_LENGTH = 1024
    timeOut = 600

    def __init__(self, factory: "POP3Factory", implicit_tls: bool):
        self.factory = factory
        self.ctx = factory.ctx
        self.implicit_tls = implicit_tls
        self.tls_started = False
        self.user_name: bytes | None = None
        self.mbid: int | None = None
        self.folder_id: int | None = None
        self.msgs: list = []  # mailboxes.Row, in UID order
        self.deleted: set[int] = set()
        self.uidvalidity = 0
        self.errors = 0
        self._closed = False
        self.paused = False
        self._cont: asyncio.Future | None = None  # AUTH waiting for the client's response line

    def connectionMade(self):
        self.peer = getattr(self.transport.getPeer(), "host", "?")
        self.counted = self.factory.limits.add(self.peer)
        if not self.counted:
            self.send(b"-ERR [SYS/TEMP] Too many connections, try again later")
            self.transport.loseConnection()
            self._closed = True
            return
        self.factory.sessions.add(self)
        self.setTimeout(self.timeOut)
        self.send(b"+OK mailplat POP3 ready")

    def connectionLost(self, reason=None):
        self._closed = True
        self.setTimeout(None)
        if self._cont is not None and not self._cont.done():
            self._cont.cancel()
        if getattr(self, "counted", False):
            self.counted = False
            self.factory.limits.remove(self.peer)
        self.factory.sessions.discard(self)

    def close(self, why: bytes) -> None:
        self.send(b"-ERR " + why)
        self.transport.loseConnection()
        self._closed = True

    def timeoutConnection(self):
        self.send(b"-ERR Idle for too long")
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.send(b"-ERR Line too long")
        self.transport.loseConnection()

    def send(self, line: bytes) -> None:
        if not self._closed:
            self.transport.write(line + b"\r\n")

    def secure(self) -> bool:
        return self.implicit_tls or self.tls_started

    # -- dispatch --------------------------------------------------------------------------------
    def lineReceived(self, line: bytes):
        self.resetTimeout()
        if self._closed:
            return
        if self._cont is not None:
            fut, self._cont = self._cont, None
            self.paused = True  # anything pipelined after it waits for AUTH to finish
            self.transport.pauseProducing()
            if not fut.done():
                fut.set_result(line)
            return
        parts = line.split(b" ")
        name = parts[0].upper()
        fn = getattr(self, "c_" + name.decode("ascii", "replace").lower(), None) if name.isalpha() else None
        if fn is None:
            self._err(b"Unknown command")
            return
        self.paused = True
        self.transport.pauseProducing()
        asyncio.get_running_loop().create_task(self._run(fn, parts[1:], line))

    async def _run(self, fn, args, line):
        try:
            await fn(args, line)
        except (ValueError, IndexError):
            self._err(b"Invalid arguments")
        except Exception:  # noqa: BLE001 - our bug ends this command only
            log.exception("pop3 command failed")
            self.send(b"-ERR [SYS/TEMP] Internal error, try again later")
        finally:
            if not self._closed:
                asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self):
        if self._closed:
            return
        self.paused = False
        self.transport.resumeProducing()
        self.dataReceived(b"")

    def _err(self, msg: bytes) -> None:
        self.errors += 1
        self.send(b"-ERR " + msg)
        if self.errors >= MAX_ERRORS:
            self.send(b"-ERR Too many errors")
            self.transport.loseConnection()
            self._closed = True

    def _need_auth(self) -> bool:
        if self.mbid is None:
            self._err(b"Log in first")
            return True
        return False

    def _msg(self, arg: bytes):
        n = int(arg)
        if n < 1 or n > len(self.msgs) or n in self.deleted:
            raise IndexError
        return n, self.msgs[n - 1]

    # -- authorization ---------------------------------------------------------------------------
    async def c_capa(self, args, line):
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"USER",
                b"IMPLEMENTATION mailplat"]
        if not self.secure() and self.mbid is None:
            caps.append(b"STLS")
        if self.mbid is None and realm.may_send_password(self.ctx, self.transport, self.secure()):
            caps.append(b"SASL PLAIN")
        self.send(b"+OK Capability list follows\r\n" + b"\r\n".join(caps) + b"\r\n.")

    async def c_stls(self, args, line):
        if self.secure() or self.mbid is not None:
            self._err(b"STLS not allowed now")
            return
        self.send(b"+OK Begin TLS negotiation")
        self.clearLineBuffer()  # plaintext pipelined after STLS is dropped
        self.transport.startTLS(self.factory.tls)
        self.tls_started = True

    def _may_log_in(self) -> bool:
        """Not logged in yet, and credentials may travel here (TLS, or loopback in dev mode)."""
        if self.mbid is not None:
            self._err(b"Already logged in")
            return False
        if not realm.may_send_password(self.ctx, self.transport, self.secure()):
            self._err(b"[SYS/PERM] Use STLS (or port 995) before sending credentials")
            return False
        return True

    async def c_user(self, args, line):
        if not self._may_log_in():
            return
        self.user_name = line[5:].strip()
        self.send(b"+OK Send PASS")

    async def c_pass(self, args, line):
        if self.mbid is not None or self.user_name is None:
            self._err(b"USER first")
            return
        password = line[5:]
        user, self.user_name = self.user_name, None
        await self._login(user, password)

    async def c_auth(self, args, line):
        """AUTH PLAIN [initial-response] (RFC 5034 with SASL PLAIN, RFC 4616)."""
        if not self._may_log_in():
            return
        if not args or len(args) > 2 or args[0].upper() != b"PLAIN":
            self._err(b"Unsupported authentication mechanism")
            return
        if len(args) == 2:
            data = args[1]
        else:
            self.send(b"+ ")
            fut = self._cont = asyncio.get_running_loop().create_future()
            self.paused = False  # read the response line (perhaps already here: pipelined)
            self.transport.resumeProducing()
            self.dataReceived(b"")
            data = (await fut).strip()
            if data == b"*":
                self._err(b"Authentication cancelled")
                return
        try:
            _authz, user, password = (b"" if data == b"=" else base64.b64decode(data, validate=True)).split(b"\0")
        except ValueError:
            self._err(b"Invalid SASL PLAIN response")
            return
        await self._login(user, password)

    async def _login(self, user: bytes, password: bytes) -> None:
        try:
            found = await realm.login(self.ctx, self.factory.throttle, self.peer,
                                      user.decode("utf-8", "replace"), password.decode("utf-8", "replace"), "pop3")
        except realm.TemporarilyRefused:
            self.send(b"-ERR [SYS/TEMP] Too many failed logins, try again later")
            return
        if found is None:
            self._err(b"[AUTH] Authentication failed")
            return
        try:
            st = await self.ctx.store.read(mailboxes.folder_state_sync, found[1], "INBOX", True)
        except NotFound:
            self._err(b"[AUTH] Authentication failed")
            return
        self.mbid = found[1]
        self.folder_id = st.info.id
        self.uidvalidity = st.info.uidvalidity
        self.msgs = st.rows
        self.send(b"+OK Logged in, %d messages" % len(self.msgs))

    # -- transaction -----------------------------------------------------------------------------
    def _live(self):
        return [(i + 1, m) for i, m in enumerate(self.msgs) if i + 1 not in self.deleted]

    async def c_stat(self, args, line):
        if self._need_auth():
            return
        live = self._live()
        self.send(b"+OK %d %d" % (len(live), sum(m.size for _, m in live)))

    async def c_list(self, args, line):
        if self._need_auth():
            return
        if args:
            n, m = self._msg(args[0])
            self.send(b"+OK %d %d" % (n, m.size))
            return
        out = [b"+OK scan listing follows"] + [b"%d %d" % (n, m.size) for n, m in self._live()] + [b"."]
        self.transport.write(b"\r\n".join(out) + b"\r\n")

    def _uidl(self, m) -> bytes:
        return b"%d.%d" % (self.uidvalidity, m.uid)

    async def c_uidl(self, args, line):
        if self._need_auth():
            return
        if args:
            n, m = self._msg(args[0])
            self.send(b"+OK %d %s" % (n, self._uidl(m)))
            return
        out = [b"+OK unique-id listing follows"] + [b"%d %s" % (n, self._uidl(m)) for n, m in self._live()] + [b"."]
        self.transport.write(b"\r\n".join(out) + b"\r\n")

    async def _body(self, m) -> bytes | None:
        blobs = await self.ctx.store.read(mailboxes.blob_bytes_sync, [m.blob])
        return blobs.get(m.blob)

    async def c_retr(self, args, line):
        if self._need_auth():
            return
        n, m = self._msg(args[0])
        data = await self._body(m)
        if data is None:
            self.send(b"-ERR Message is gone")
            return
        self.transport.write(b"+OK %d octets\r\n" % len(data) + dot_stuff(data))

    async def c_top(self, args, line):
        if self._need_auth():
            return
        n, m = self._msg(args[0])
        lines = int(args[1])
        if lines < 0:
            raise ValueError
        data = await self._body(m)
        if data is None:
            self.send(b"-ERR Message is gone")
            return
        self.transport.write(b"+OK top of message follows\r\n" + dot_stuff(top_part(data, lines)))

    async def c_dele(self, args, line):
        if self._need_auth():
            return
        n, _ = self._msg(args[0])
        self.deleted.add(n)
        self.send(b"+OK Message %d deleted" % n)

    async def c_rset(self, args, line):
        if self._need_auth():
            return
        self.deleted.clear()
        self.send(b"+OK")

    async def c_noop(self, args, line):
        if self._need_auth():
            return
        self.send(b"+OK")

    async def c_quit(self, args, line):
        if self.mbid is not None and self.deleted:
            uids = [self.msgs[n - 1].uid for n in sorted(self.deleted)]
            try:
                await self.ctx.store.write(mailboxes.delete_uids_sync, self.folder_id, uids)
            except Exception:  # noqa: BLE001 - nothing was deleted; tell the client
                log.exception("pop3 QUIT could not delete messages")
                self.send(b"-ERR [SYS/TEMP] Some deleted messages not removed")
                self.transport.loseConnection()
                self._closed = True
                return
            mailboxes.changed(self.folder_id)
        self.send(b"+OK Bye")
        self.transport.loseConnection()
        self._closed = True


class POP3Factory(protocol.Factory):
    def __init__(self, ctx, tls_options, implicit_tls: bool, throttle: realm.LoginThrottle,
                 limits: realm.ConnectionLimits):
        self.ctx = ctx
        self.tls = tls_options
        self.implicit_tls = implicit_tls
        self.throttle = throttle
        self.limits = limits
        self.sessions: set = set()

    def buildProtocol(self, addr):
        return POP3Server(self, self.implicit_tls)
