"""The IMAP4rev1 server protocol (Twisted, on the asyncio reactor): framing, states, login.

Owns: reading commands safely (lines capped at 64 KB; literals checked before any `+` is sent:
negative, non-numeric or oversized sizes are refused at once, APPEND over APPENDLIMIT (or a
MULTIAPPEND over MULTIAPPEND_LIMIT in all) gets `NO [TOOBIG]`, LITERAL+ honoured, literal bytes
spooled with a cap; nesting capped by the tokenizer), one command at a time per session (lines
wait while a command runs, and the socket is not read while they do, which is also the
back-pressure), STARTTLS with buffered plaintext dropped, COMPRESS=DEFLATE (inflating in
bounded steps), LOGINDISABLED before TLS (loopback excepted in dev mode), LOGIN and
AUTHENTICATE PLAIN or LOGIN through realm.login, and the non-mailbox commands (CAPABILITY,
NOOP, LOGOUT, ID, ENABLE, NAMESPACE, COMPRESS).  Mailbox commands live in imapcmds.py; meaning
lives in core.mailboxes; store calls run in threads via the store's async API, so the reactor
never blocks.

Built on Twisted's LineReceiver, transports and TLS rather than twisted.mail.imap4.IMAP4Server:
that class calls its mailbox synchronously in many places (CREATE/DELETE/RENAME, FETCH message
objects), rewrites headers on BODY[HEADER] (not byte-exact), parses nested lists recursively,
dispatches pipelined commands concurrently and knows no LITERAL+, so it would have been
replaced method by method anyway.
"""
from __future__ import annotations

import asyncio
import base64
import re
import tempfile
import time
import zlib

from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin

from .. import logs
from ..core import mailboxes
from . import mime, realm
from .imapcmds import SENT, Bad, Commands, No, build_commands
from .imapparse import Atom, ParseError, astring, tokenize

log = logs.get("mailplat.imap")

APPENDLIMIT = 26_214_400
MULTIAPPEND_LIMIT = 2 * APPENDLIMIT  # all the messages of one APPEND, read into memory at once
PREAUTH_LIMIT = 8 * 1024
COMMAND_LIMIT = 1024 * 1024
MAX_ERRORS = 20
MAX_SEGMENTS = 200
PREAUTH_DEADLINE = 60.0  # seconds for a whole command (lines and literals) to arrive
COMMAND_DEADLINE = 600.0
_LITERAL = re.compile(rb"\{([^{}]*)\}$")
_TAG = re.compile(rb"^[\x21-\x7e]+$")
_TAG_BAD = set(b'(){%*"\\+')


def _sasl(data: bytes) -> bytes:
    """A base64 SASL response; "=" is the empty one (RFC 4959)."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise Bad(b"Invalid SASL response") from None


class _Deflating:
    """The transport after COMPRESS DEFLATE: every write goes out as raw DEFLATE, flushed so
    the client can read it at once; anything else is the transport underneath."""

    def __init__(self, inner):
        self._inner = inner
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)

    def write(self, data: bytes) -> None:
        self._inner.write(self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH))

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Command:
    __slots__ = ("tag", "name", "segments", "literals", "size", "pending", "sink", "got", "deadline")

    def __init__(self, tag: bytes, name: bytes):
        self.tag, self.name = tag, name
        self.segments: list[bytes] = []
        self.literals: list = []
        self.size = 0
        self.pending = 0
        self.got = 0
        self.sink = None


class IMAPServer(Commands, LineReceiver, TimeoutMixin):
    delimiter = b"\r\n"
    MAX_LENGTH = 65536
    PREAUTH_TIMEOUT = 60
    POSTAUTH_TIMEOUT = 1800

    def __init__(self, factory: "IMAPFactory", implicit_tls: bool):
        self.factory = factory
        self.ctx = factory.ctx
        self.implicit_tls = implicit_tls
        self.tls_started = False
        self.state = "unauth"
        self.user: str | None = None
        self.mbid: int | None = None
        self.sel = None
        self.enabled: set[str] = set()
        self.errors = 0
        self._cmd: _Command | None = None
        self._busy = False
        self._cont: asyncio.Future | None = None
        self._idle_done: asyncio.Event | None = None
        self._closed = False
        self._reading_paused = False
        self._task: asyncio.Task | None = None
        self._inflate = None  # COMPRESS=DEFLATE (RFC 4978): the reader's inflater, once active
        self._ztail = b""  # compressed bytes not yet inflated (held while a command runs)
        self._inflating = False

    # -- connection ----------------------------------------------------------------------------
    def connectionMade(self):
        self.peer = getattr(self.transport.getPeer(), "host", "?")
        self.counted = self.factory.limits.add(self.peer)
        if not self.counted:
            self.close(b"[UNAVAILABLE] Too many connections, try again later")
            return
        self.factory.sessions.add(self)
        self.setTimeout(self.PREAUTH_TIMEOUT)
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] mailplat IMAP4rev1 ready")

    def connectionLost(self, reason=None):
        self._closed = True
        self.setTimeout(None)
        if getattr(self, "counted", False):
            self.counted = False
            self.factory.limits.remove(self.peer)
        self.factory.sessions.discard(self)
        self.deselect()
        if self._cont is not None and not self._cont.done():
            self._cont.cancel()
        if self._idle_done is not None:
            self._idle_done.set()
        if self._cmd is not None and self._cmd.sink is not None:
            self._cmd.sink.close()

    def timeoutConnection(self):
        self.send(b"* BYE Autologout; idle for too long")
        self.transport.loseConnection()

    def send(self, line: bytes) -> None:
        if not self._closed:
            self.transport.write(line + b"\r\n")

    def close(self, why: bytes) -> None:
        self.send(b"* BYE " + why)
        self.transport.loseConnection()
        self._closed = True

    def dataReceived(self, data: bytes):
        # While a command runs, received lines wait in LineReceiver's buffer (`paused`).  The
        # socket itself stops being read only when bytes arrive meanwhile (a pipelining client):
        # most clients wait for the answer, and pausing and resuming the reader around every
        # command would cost two epoll calls each time.
        if self.paused and data and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        if self._inflate is None or self._inflating:  # plain, or LineReceiver handing back inflated bytes
            return super().dataReceived(data)
        # Inflate in 64 KB steps and none while a command runs: a small compressed input cannot
        # become a large buffer.
        self._ztail += data
        while True:
            out = b""
            if self._ztail and not self.paused and not self._closed:
                tail, self._ztail = self._ztail, b""
                try:
                    out = self._inflate.decompress(tail, 65536)
                except zlib.error:
                    self.close(b"Invalid compressed data")
                    return
                self._ztail = self._inflate.unconsumed_tail + self._ztail
            self._inflating = True
            try:
                super().dataReceived(out)
            finally:
                self._inflating = False
            if not out or self._closed:
                return

    def lineLengthExceeded(self, line):
        self.close(b"Line too long")

    def secure(self) -> bool:
        return self.implicit_tls or self.tls_started

    def login_allowed(self) -> bool:
        return realm.may_send_password(self.ctx, self.transport, self.secure())

    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"LITERAL+", b"ID", b"ENABLE", b"IDLE", b"SASL-IR"]
        if self.state == "unauth":
            if not self.secure():
                caps.append(b"STARTTLS")
            if self.login_allowed():
                caps += [b"AUTH=PLAIN", b"AUTH=LOGIN"]
            else:
                caps.append(b"LOGINDISABLED")
        else:
            caps += [b"NAMESPACE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"UNSELECT", b"CHILDREN",
                     b"CONDSTORE", b"QUOTA", b"APPENDLIMIT=%d" % APPENDLIMIT, b"ESEARCH", b"SEARCHRES",
                     b"LIST-EXTENDED", b"LIST-STATUS", b"MULTIAPPEND", b"BINARY",
                     b"UTF8=ACCEPT", b"QRESYNC", b"COMPRESS=DEFLATE", b"SORT", b"SORT=DISPLAY",
                     b"CREATE-SPECIAL-USE", b"STATUS=SIZE", b"WITHIN",
                     b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES"]
        return b" ".join(caps)

    # -- framing ---------------------------------------------------------------------------------
    def lineReceived(self, line: bytes):
        self.resetTimeout()
        if self._closed:
            return
        if self._cont is not None:  # AUTHENTICATE continuation
            fut, self._cont = self._cont, None
            self._hold()  # anything pipelined after it waits for the command to finish
            if not fut.done():
                fut.set_result(line)
            return
        if self._idle_done is not None:
            if line.strip().upper() == b"DONE":
                self._hold()
                self._idle_done.set()
            else:
                self._bad(None, b"Expected DONE")
            return
        cmd = self._cmd
        if cmd is None:
            parts = line.split(b" ", 2)
            tag = parts[0]
            if not tag or not _TAG.match(tag) or any(c in _TAG_BAD for c in tag) or len(tag) > 64:
                self._bad(None, b"Invalid tag")
                return
            if len(parts) < 2 or not parts[1]:
                self._bad(tag, b"Missing command")
                return
            cmd = self._cmd = _Command(tag, parts[1].upper())
            cmd.deadline = time.monotonic() + (COMMAND_DEADLINE if self.state != "unauth" else PREAUTH_DEADLINE)
            line = parts[2] if len(parts) > 2 else b""
        elif time.monotonic() > cmd.deadline:
            self.close(b"Command took too long to arrive")
            return
        cmd.size += len(line)
        m = _LITERAL.search(line)
        if m is None:
            cmd.segments.append(line)
            self._cmd = None
            self._dispatch(cmd)
            return
        spec = m.group(1)
        plus = spec.endswith(b"+")
        digits = spec[:-1] if plus else spec
        if not digits.isdigit() or len(digits) > 10:
            self._cmd = None
            self._bad(cmd.tag, b"Invalid literal size")
            if plus:
                self.close(b"Invalid literal")
            return
        size = int(digits)
        is_append = cmd.name == b"APPEND" and self.state != "unauth"
        limit = (PREAUTH_LIMIT if self.state == "unauth" else
                 MULTIAPPEND_LIMIT if is_append else COMMAND_LIMIT)
        too_big = is_append and (size > APPENDLIMIT or cmd.size + size > limit)
        if too_big or cmd.size + size > limit or len(cmd.segments) >= MAX_SEGMENTS:
            self._cmd = None
            if too_big:
                self.send(cmd.tag + b" NO [TOOBIG] Message too large (APPENDLIMIT=%d, %d in all)"
                          % (APPENDLIMIT, MULTIAPPEND_LIMIT))
            else:
                self._bad(cmd.tag, b"Literal too large")
            if plus:
                self.close(b"Literal too large")
            return
        cmd.segments.append(line[:m.start()])
        cmd.size += size
        cmd.pending, cmd.got = size, 0
        cmd.sink = tempfile.SpooledTemporaryFile(max_size=1024 * 1024) if size > 65536 else None
        cmd.literals.append(b"" if cmd.sink is None else None)
        if not plus:
            self.send(b"+ Ready for literal data")
        if size == 0:
            return
        self.setRawMode()

    def rawDataReceived(self, data: bytes):
        self.resetTimeout()
        cmd = self._cmd
        if cmd is None:
            self.setLineMode(data)
            return
        if time.monotonic() > cmd.deadline:  # a deadline per command, not per read
            self.close(b"Command took too long to arrive")
            return
        need = cmd.pending - cmd.got
        chunk, rest = data[:need], data[need:]
        if cmd.sink is not None:
            cmd.sink.write(chunk)
        else:
            cmd.literals[-1] += chunk
        cmd.got += len(chunk)
        if cmd.got >= cmd.pending:
            if cmd.sink is not None:
                cmd.sink.seek(0)
                cmd.literals[-1] = cmd.sink
                cmd.sink = None
            self.setLineMode(rest)

    def _bad(self, tag, msg: bytes) -> None:
        self.errors += 1
        self.send((tag or b"*") + b" BAD " + msg)
        if self.errors >= MAX_ERRORS:
            self.close(b"Too many errors")

    # -- dispatch (dataReceived says how reading pauses) ---------------------------------------
    def _pause(self):
        self._busy = True
        self.paused = True

    def _hold(self):
        self.paused = True

    def _read_on(self):
        """Handle lines again (those already buffered first)."""
        self.paused = False
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self.dataReceived(b"")

    def _resume(self):
        self._busy = False
        if not self._closed:
            self._read_on()

    def _dispatch(self, cmd: _Command) -> None:
        self._pause()
        self._task = asyncio.get_running_loop().create_task(self._run(cmd))

    async def _run(self, cmd: _Command) -> None:
        tag = cmd.tag
        try:
            try:
                max_depth = 4 if self.state == "unauth" else 100
                tokens = tokenize(cmd.segments, cmd.literals, max_depth)
                text = await self.execute(tag, cmd.name, tokens)
                if text is not SENT:
                    self.send(tag + b" OK " + (text or cmd.name + b" completed"))
            finally:
                for lit in cmd.literals:
                    if hasattr(lit, "close"):
                        lit.close()
        except ParseError as exc:
            self._bad(tag, str(exc).encode()[:200])
        except Bad as exc:
            self._bad(tag, exc.text)
        except No as exc:
            self.send(tag + b" NO " + exc.text)
        except mime.UnknownCTE:
            self.send(tag + b" NO [UNKNOWN-CTE] Cannot decode that part's transfer encoding")
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - our bug ends this command, never the reactor
            log.exception("imap command failed", extra={"fields": {"command": cmd.name.decode("ascii", "replace")}})
            self.send(tag + b" NO [SERVERBUG] Internal error, try again later")
        finally:
            if not self._closed:
                asyncio.get_running_loop().call_soon(self._resume)

    async def execute(self, tag: bytes, name: bytes, args: list):
        handler = self.COMMANDS.get(name)
        if handler is None:
            raise Bad(b"Unknown command")
        fn, states = handler
        if self.state not in states:
            if self.state == "unauth":
                raise Bad(b"Log in first")
            raise Bad(b"Command not valid in this state")
        return await fn(self, tag, args)

    # -- any state -------------------------------------------------------------------------------
    async def c_capability(self, tag, args):
        self.send(b"* CAPABILITY " + self.capabilities())
        return b"CAPABILITY completed"

    async def c_noop(self, tag, args):
        if self.sel is not None:
            await self.refresh(force=True)
        return b"NOOP completed"

    async def c_logout(self, tag, args):
        self.send(b"* BYE Logging out")
        self.send(tag + b" OK LOGOUT completed")
        self.transport.loseConnection()
        self._closed = True
        return SENT

    async def c_compress(self, tag, args):
        """COMPRESS DEFLATE (RFC 4978): both directions compressed from the end of our OK on."""
        if len(args) != 1 or not isinstance(args[0], Atom) or args[0].upper() != b"DEFLATE":
            raise Bad(b"COMPRESS DEFLATE is the only mechanism")
        if self._inflate is not None:
            raise No(b"[COMPRESSIONACTIVE] Compression is already active")
        self.send(tag + b" OK DEFLATE active")
        self.clearLineBuffer()  # the client sends nothing more until it has read our OK
        self._inflate = zlib.decompressobj(-15)
        self.transport = _Deflating(self.transport)
        return SENT

    async def c_id(self, tag, args):
        self.send(b'* ID ("name" "mailplat")')
        return b"ID completed"

    # -- not authenticated -----------------------------------------------------------------------
    async def c_starttls(self, tag, args):
        if self.secure():
            raise Bad(b"TLS already active")
        if args:
            raise Bad(b"STARTTLS takes no arguments")
        self.send(tag + b" OK Begin TLS negotiation now")
        self.clearLineBuffer()  # anything pipelined after STARTTLS in plaintext is dropped
        self.transport.startTLS(self.factory.tls)
        self.tls_started = True
        return SENT

    async def _logged_in(self, found, tag) -> bytes:
        self.user, self.mbid = found
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        return b"[CAPABILITY " + self.capabilities() + b"] Logged in"

    async def _check(self, user: bytes, password: bytes):
        try:
            found = await realm.login(self.ctx, self.factory.throttle, self.peer,
                                      user.decode("utf-8", "replace"), password.decode("utf-8", "replace"), "imap")
        except realm.TemporarilyRefused:
            raise No(b"[UNAVAILABLE] Too many failed logins, try again later") from None
        if found is None:
            raise No(b"[AUTHENTICATIONFAILED] Authentication failed")
        return found

    async def c_login(self, tag, args):
        if not self.login_allowed():
            raise No(b"[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
        if len(args) != 2:
            raise Bad(b"LOGIN needs a user name and a password")
        found = await self._check(astring(args[0]), astring(args[1]))
        return await self._logged_in(found, tag)

    async def c_authenticate(self, tag, args):
        """SASL PLAIN (RFC 4616) and LOGIN (what Outlook sends), with SASL-IR (RFC 4959)."""
        if not self.login_allowed():
            raise No(b"[PRIVACYREQUIRED] Authentication is disabled before STARTTLS")
        mech = args[0].upper() if args and isinstance(args[0], Atom) and len(args) <= 2 else None
        if mech not in (b"PLAIN", b"LOGIN"):
            raise No(b"Unsupported authentication mechanism")
        first = _sasl(bytes(args[1])) if len(args) == 2 else None
        if mech == b"PLAIN":
            try:
                _authz, user, password = (await self._challenge(b"") if first is None else first).split(b"\0")
            except ValueError:
                raise Bad(b"Invalid SASL PLAIN response") from None
        else:
            user = await self._challenge(b"Username:") if first is None else first
            password = await self._challenge(b"Password:")
        found = await self._check(user, password)
        return await self._logged_in(found, tag)

    async def _challenge(self, text: bytes) -> bytes:
        """Send a SASL challenge and read the client's base64 answer ("*" cancels)."""
        self.send(b"+ " + base64.b64encode(text))
        fut = self._cont = asyncio.get_running_loop().create_future()
        self._read_on()  # read the continuation line (perhaps already here: pipelined)
        data = await fut
        if data.strip() == b"*":
            raise Bad(b"Authentication cancelled")
        return _sasl(data)

    # -- authenticated ---------------------------------------------------------------------------
    async def c_namespace(self, tag, args):
        self.send(b'* NAMESPACE (("" "/")) NIL NIL')
        return b"NAMESPACE completed"

    async def c_enable(self, tag, args):
        done = []
        for a in args:
            word = bytes(a.upper()) if isinstance(a, Atom) else b""
            if word in (b"CONDSTORE", b"QRESYNC", b"UTF8=ACCEPT") and word not in done:
                self.enabled.add(word.decode())
                done.append(word)
        if "QRESYNC" in self.enabled:
            self.enabled.add("CONDSTORE")  # QRESYNC implies it (RFC 7162 3.2.3)
        self.send(b"* ENABLED" + b"".join(b" " + d for d in done))
        return b"ENABLE completed"

    async def c_idle(self, tag, args):
        self.send(b"+ idling")
        self._idle_done = asyncio.Event()
        wake = asyncio.Event()
        fid = self.sel.folder_id if self.sel is not None else None
        if fid is not None:
            mailboxes.watch(fid, wake.set)
        self._read_on()  # read DONE while the command runs
        try:
            while not self._idle_done.is_set() and not self._closed:
                waiter = asyncio.ensure_future(wake.wait())
                done_w = asyncio.ensure_future(self._idle_done.wait())
                await asyncio.wait({waiter, done_w}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                done_w.cancel()
                wake.clear()
                if self.sel is not None and not self._idle_done.is_set():
                    await self.refresh(force=True)
        finally:
            if fid is not None:
                mailboxes.unwatch(fid, wake.set)
            self._idle_done = None
            self._hold()
        return b"IDLE terminated"


IMAPServer.COMMANDS = build_commands(IMAPServer)


class IMAPFactory(protocol.Factory):
    def __init__(self, ctx, tls_options, implicit_tls: bool, throttle: realm.LoginThrottle,
                 limits: realm.ConnectionLimits):
        self.ctx = ctx
        self.tls = tls_options
        self.implicit_tls = implicit_tls
        self.throttle = throttle
        self.limits = limits
        self.sessions: set[IMAPServer] = set()

    def buildProtocol(self, addr):
        p = IMAPServer(self, self.implicit_tls)
        p.factory = self
        return p
