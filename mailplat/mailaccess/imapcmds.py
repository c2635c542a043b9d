"""IMAP mailbox commands: folders, SELECT/EXAMINE, FETCH, STORE, SEARCH, COPY/MOVE, EXPUNGE,
APPEND, CLOSE/UNSELECT, and keeping a session's view (sequence numbers) in step with the store.

Owns the protocol side of every mailbox command (arguments, responses, UIDPLUS/MOVE/CONDSTORE
response codes); core.mailboxes decides and stores.  Store calls run in the store's threads;
MIME parsing and SEARCH over bodies run in a worker thread, in chunks, so the reactor stays
responsive and memory stays bounded.  Mixed into imap.IMAPServer.
"""
from __future__ import annotations

import asyncio
import bisect
import calendar
import re
import time

from ..core import mailboxes
from ..errors import Conflict, InputError, NotFound
from . import mime
from .imaprender import (_flags_bytes, _needs_content, needs_parse, render_fetch, search_chunk,
                         structure_cached)
from .imapparse import (Atom, Literal, ParseError, SeqSet, astring, fetch_items, mutf7_decode,
                        mutf7_encode, number, search_keys, seqset)

SENT = object()  # the handler has already sent the tagged response
CHUNK = 200
META_CHUNK = 5000  # FETCH without bodies: rows per store read
INLINE_BYTES = 256 * 1024  # bodies up to this much per chunk, needing no MIME parse, render on the loop
INLINE_SEARCH = 2000  # SEARCH without content keys over this few messages runs on the loop
SYSTEM_FLAGS = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"


class No(Exception):
    def __init__(self, text: bytes):
        self.text = text


class Bad(Exception):
    def __init__(self, text: bytes):
        self.text = text


class Selected:
    def __init__(self, info, uids: list[int], readonly: bool):
        self.folder_id = info.id
        self.name = info.name
        self.uidvalidity = info.uidvalidity
        self.modseq = info.highestmodseq
        self.uids = uids
        self.readonly = readonly
        self.version = mailboxes.version(info.id)

    def seq_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def targets(self, ss: SeqSet, by_uid: bool) -> list[tuple[int, int]]:
        """[(seq, uid)] addressed by a sequence set."""
        out: dict[int, int] = {}
        n = len(self.uids)
        if not n:
            return []
        if by_uid:
            top = self.uids[-1]
            for lo, hi in ss.resolve(top):
                i = bisect.bisect_left(self.uids, lo)
                j = bisect.bisect_right(self.uids, hi)
                for k in range(i, j):
                    out[k + 1] = self.uids[k]
        else:
            for lo, hi in ss.resolve(n):
                if lo < 1 or hi > n:
                    raise Bad(b"Invalid message sequence number")
                for k in range(lo, hi + 1):
                    out[k] = self.uids[k - 1]
        return sorted(out.items())


def folder_arg(tok) -> str:
    try:
        return mailboxes.folder_name(mutf7_decode(astring(tok)))
    except ParseError as exc:
        raise No(b"[CANNOT] " + str(exc).encode()) from None
    except InputError as exc:
        raise No(b"[CANNOT] " + exc.message.encode("utf-8", "replace")) from None


def _parse_idate(b: bytes) -> float:
    m = re.fullmatch(rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", b)
    months = [b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC"]
    if not m or m.group(2).upper() not in months:
        raise Bad(b"Invalid date-time")
    t = (int(m.group(3)), months.index(m.group(2).upper()) + 1, int(m.group(1)),
         int(m.group(4)), int(m.group(5)), int(m.group(6)))
    try:
        ts = calendar.timegm(t + (0, 0, 0))
    except (ValueError, OverflowError):
        raise Bad(b"Invalid date-time") from None
    off = (int(m.group(8)) * 3600 + int(m.group(9)) * 60) * (1 if m.group(7) == b"+" else -1)
    return float(ts - off)


def _set(uids: list[int]) -> bytes:
    """Compact UID set: 1:3,7."""
    out, i = [], 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(b"%d" % uids[i] if i == j else b"%d:%d" % (uids[i], uids[j]))
        i = j + 1
    return b",".join(out)


def _match(pattern: str, name: str) -> bool:
    rx = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.S) is not None


def _fetch_rows_sync(folder_id: int, uids: list[int], rows: list | None, items, changedsince: int | None):
    """In one store read: the rows (unless given) changed after `changedsince`, and the bodies
    the FETCH items need (none when they ask only for cached structure)."""
    if rows is None:
        rows = mailboxes.message_rows_sync(folder_id, uids)
    if changedsince is not None:
        rows = [r for r in rows if r.modseq > changedsince]
    blobs = None
    if items.needs_body and rows and not structure_cached(items, rows):
        blobs = mailboxes.blob_bytes_sync(list({r.blob for r in rows}))
    return rows, blobs


class Commands:
    """Mailbox commands, mixed into IMAPServer (which provides send(), ctx, state, ...)."""

    # -- view sync -------------------------------------------------------------------------------
    async def refresh(self, force: bool = False, allow_expunge: bool = True) -> None:
        sel = self.sel
        if sel is None:
            return
        if not force and mailboxes.version(sel.folder_id) == sel.version:
            return
        sel.version = mailboxes.version(sel.folder_id)
        info, rows, all_uids = await self.ctx.store.read(
            mailboxes.changes_since_sync, sel.folder_id, sel.modseq, len(sel.uids),
            sel.uids[-1] if sel.uids else 0)
        if self.sel is not sel:
            return
        if info is None:  # the folder is gone (mailbox or folder deleted)
            self.close(b"Mailbox has been deleted")
            return
        if all_uids is not None:
            if not allow_expunge:
                sel.version = -1  # report later, when EXPUNGE responses are allowed
                return
            present = set(all_uids)
            for i in range(len(sel.uids) - 1, -1, -1):
                if sel.uids[i] not in present:
                    self.send(b"* %d EXPUNGE" % (i + 1))
                    del sel.uids[i]
        top = sel.uids[-1] if sel.uids else 0
        new = [r.uid for r in rows if r.uid > top]
        if new:
            sel.uids.extend(new)
            self.send(b"* %d EXISTS" % len(sel.uids))
        for r in rows:
            if r.uid <= top:
                seq = sel.seq_of(r.uid)
                if seq is not None:
                    extra = b" MODSEQ (%d)" % r.modseq if "CONDSTORE" in self.enabled else b""
                    self.send(b"* %d FETCH (UID %d FLAGS %s%s)" % (seq, r.uid, _flags_bytes(r.flags), extra))
        sel.modseq = max(sel.modseq, info.highestmodseq)

    def _wrote(self, modseq: int | None) -> bool:
        """After this session changed its selected folder (`modseq`: the change's, None when
        nothing changed): other sessions are told.  When the folder was exactly as this session
        last saw it (the change took the very next modseq), the view stays exact without being
        read back: True, and the caller applies its own change to the view."""
        sel = self.sel
        if modseq is None:
            return False
        mailboxes.changed(sel.folder_id)
        if modseq != sel.modseq + 1:
            return False  # something else happened too: the next refresh reads it
        sel.modseq = modseq
        sel.version = mailboxes.version(sel.folder_id)
        return True

    def deselect(self) -> None:
        self.sel = None
        if self.state == "select":
            self.state = "auth"

    # -- folders ---------------------------------------------------------------------------------
    async def _folder_write(self, fn, *args):
        try:
            return await self.ctx.store.write(fn, self.mbid, *args)
        except NotFound:
            raise No(b"[NONEXISTENT] No such mailbox") from None
        except Conflict:
            raise No(b"[ALREADYEXISTS] Mailbox already exists") from None
        except InputError as exc:
            raise No(b"[CANNOT] " + exc.message.encode("utf-8", "replace")) from None

    async def c_create(self, tag, args):
        if len(args) != 1:
            raise Bad(b"CREATE needs a mailbox name")
        raw = astring(args[0]).rstrip(b"/")
        await self._folder_write(mailboxes.create_folder_sync, folder_arg(Literal(raw)))
        return b"CREATE completed"

    async def c_delete(self, tag, args):
        if len(args) != 1:
            raise Bad(b"DELETE needs a mailbox name")
        name = folder_arg(args[0])
        fid = await self._folder_write(mailboxes.delete_folder_sync, name)
        mailboxes.changed(fid)
        return b"DELETE completed"

    async def c_rename(self, tag, args):
        if len(args) != 2:
            raise Bad(b"RENAME needs two mailbox names")
        await self._folder_write(mailboxes.rename_folder_sync, folder_arg(args[0]), folder_arg(args[1]))
        return b"RENAME completed"

    async def c_subscribe(self, tag, args, on=True):
        if len(args) != 1:
            raise Bad(b"mailbox name expected")
        await self._folder_write(mailboxes.subscribe_sync, folder_arg(args[0]), on)
        return b"completed"

    async def c_unsubscribe(self, tag, args):
        return await self.c_subscribe(tag, args, False)

    async def c_list(self, tag, args, lsub=False):
        word = b"LSUB" if lsub else b"LIST"
        only_special = subscribed_only = False
        if args and isinstance(args[0], list):  # RFC 6154/5258 selection options
            opts = {bytes(a).upper() for a in args[0] if isinstance(a, Atom)}
            only_special = b"SPECIAL-USE" in opts
            subscribed_only = b"SUBSCRIBED" in opts
            args = args[1:]
        if len(args) >= 4 and isinstance(args[2], Atom) and args[2].upper() == b"RETURN":
            args = args[:2]
        if len(args) != 2:
            raise Bad(b"LIST needs a reference and a pattern")
        ref, pat = astring(args[0]), astring(args[1])
        try:
            pattern = mutf7_decode(ref + pat) if ref + pat else ""
        except ParseError as exc:
            raise No(b"[CANNOT] " + str(exc).encode()) from None
        if not pat:
            self.send(b'* ' + word + b' (\\Noselect) "/" ""')
            return word + b" completed"
        folders = await self.ctx.store.read(mailboxes.list_folders_sync, self.mbid)
        for f in folders:
            match_name = f.name
            if pattern.upper().startswith("INBOX") and f.name == "INBOX":
                match_name = "INBOX"
                pattern = "INBOX" + pattern[5:]
            if not _match(pattern, match_name) or ((lsub or subscribed_only) and not f.subscribed):
                continue
            if only_special and not f.special_use:
                continue
            attrs = [b"\\HasChildren" if f.has_children else b"\\HasNoChildren"]
            if f.special_use:
                attrs.append(f.special_use.encode())
            self.send(b"* " + word + b" (" + b" ".join(attrs) + b') "/" ' + mime.string(mutf7_encode(f.name)))
        return word + b" completed"

    async def c_lsub(self, tag, args):
        return await self.c_list(tag, args, lsub=True)

    async def c_status(self, tag, args):
        if len(args) != 2 or not isinstance(args[1], list):
            raise Bad(b"STATUS needs a mailbox and a list of items")
        name = folder_arg(args[0])
        try:
            info, count, unseen, size = await self.ctx.store.read(mailboxes.status_sync, self.mbid, name)
        except NotFound:
            raise No(b"[NONEXISTENT] No such mailbox") from None
        values = {b"MESSAGES": count, b"RECENT": 0, b"UIDNEXT": info.uidnext, b"UIDVALIDITY": info.uidvalidity,
                  b"UNSEEN": unseen, b"HIGHESTMODSEQ": info.highestmodseq, b"SIZE": size}
        out = []
        for item in args[1]:
            key = bytes(item).upper() if isinstance(item, Atom) else b""
            if key not in values:
                raise Bad(b"Unknown STATUS item")
            out.append(key + b" %d" % values[key])
        self.send(b"* STATUS " + mime.string(mutf7_encode(name)) + b" (" + b" ".join(out) + b")")
        return b"STATUS completed"

    # -- selection -------------------------------------------------------------------------------
    async def c_select(self, tag, args, readonly=False):
        if not args or len(args) > 2:
            raise Bad(b"SELECT needs a mailbox name")
        condstore = len(args) == 2 and isinstance(args[1], list) and any(
            isinstance(a, Atom) and a.upper() == b"CONDSTORE" for a in args[1])
        name = folder_arg(args[0])
        self.deselect()
        try:
            st = await self.ctx.store.read(mailboxes.folder_state_sync, self.mbid, name)
        except NotFound:
            raise No(b"[NONEXISTENT] No such mailbox") from None
        if condstore:
            self.enabled.add("CONDSTORE")
        self.sel = Selected(st.info, st.uids, readonly)
        self.state = "select"
        self.send(b"* FLAGS (" + SYSTEM_FLAGS + b")")
        self.send(b"* OK [PERMANENTFLAGS (" + SYSTEM_FLAGS + b" \\*)] Flags permitted")
        self.send(b"* %d EXISTS" % len(st.uids))
        self.send(b"* 0 RECENT")
        if st.first_unseen_uid is not None:
            seq = self.sel.seq_of(st.first_unseen_uid)
            if seq:
                self.send(b"* OK [UNSEEN %d] First unseen" % seq)
        self.send(b"* OK [UIDVALIDITY %d] UIDs valid" % st.info.uidvalidity)
        self.send(b"* OK [UIDNEXT %d] Predicted next UID" % st.info.uidnext)
        self.send(b"* OK [HIGHESTMODSEQ %d] Highest" % st.info.highestmodseq)
        return (b"[READ-ONLY] EXAMINE" if readonly else b"[READ-WRITE] SELECT") + b" completed"

    async def c_examine(self, tag, args):
        return await self.c_select(tag, args, readonly=True)

    async def c_close(self, tag, args):
        sel = self.sel
        if not sel.readonly:
            uids, _ = await self.ctx.store.write(mailboxes.expunge_sync, sel.folder_id)
            if uids:
                mailboxes.changed(sel.folder_id)
        self.deselect()
        return b"CLOSE completed"

    async def c_unselect(self, tag, args):
        self.deselect()
        return b"UNSELECT completed"

    async def c_check(self, tag, args):
        await self.refresh(force=True)
        return b"CHECK completed"

    # -- messages --------------------------------------------------------------------------------
    async def c_expunge(self, tag, args, uid=False):
        sel = self.sel
        if sel.readonly:
            raise No(b"[READ-ONLY] Mailbox is read-only")
        only = None
        if uid:
            if len(args) != 1:
                raise Bad(b"UID EXPUNGE needs a UID set")
            only = [u for _, u in sel.targets(seqset(args[0]), True)]
        elif args:
            raise Bad(b"EXPUNGE takes no arguments")
        await self.refresh()
        gone, modseq = await self.ctx.store.write(mailboxes.expunge_sync, sel.folder_id, only)
        self._expunged(gone)
        self._wrote(modseq)
        await self.refresh()
        return b"EXPUNGE completed"

    def _expunged(self, uids: list[int]) -> None:
        sel = self.sel
        for u in sorted(uids, reverse=True):
            seq = sel.seq_of(u)
            if seq is not None:
                self.send(b"* %d EXPUNGE" % seq)
                del sel.uids[seq - 1]

    async def c_fetch(self, tag, args, uid=False):
        sel = self.sel
        if len(args) < 2:
            raise Bad(b"FETCH needs a sequence set and items")
        ss = seqset(args[0])
        items = fetch_items(args[1])
        changedsince = None
        if len(args) == 3 and isinstance(args[2], list) and len(args[2]) == 2 and \
                isinstance(args[2][0], Atom) and args[2][0].upper() == b"CHANGEDSINCE":
            changedsince = number(args[2][1])
            self.enabled.add("CONDSTORE")
        elif len(args) != 2:
            raise Bad(b"Too many FETCH arguments")
        await self.refresh(allow_expunge=uid)
        targets = sel.targets(ss, uid)
        set_seen = not sel.readonly and (any(not s.peek for s in items.sections)
                                          or any(n in ("RFC822", "RFC822.TEXT") for n in items.names))
        with_modseq = "CONDSTORE" in self.enabled and (changedsince is not None or "MODSEQ" in items.names)
        step = CHUNK if items.needs_body else META_CHUNK
        for i in range(0, len(targets), step):
            chunk = targets[i:i + step]
            uids = [u for _, u in chunk]
            rows = None
            if set_seen:
                rows, changed, _ = await self.ctx.store.write(
                    mailboxes.store_flags_sync, sel.folder_id, uids, ["\\Seen"], 1)
                if changed:
                    self._wrote(max(r.modseq for r in rows))
                    if "FLAGS" not in items.names:
                        items.names.append("FLAGS")
            rows, blobs = await self.ctx.store.read(_fetch_rows_sync, sel.folder_id, uids, rows, items, changedsince)
            by_uid = {r.uid: r for r in rows}
            work = [(seq, by_uid[u]) for seq, u in chunk if u in by_uid]
            if not work:
                continue
            if blobs is not None and (needs_parse(items) or sum(map(len, blobs.values())) > INLINE_BYTES):
                out = await asyncio.to_thread(
                    lambda: [render_fetch(s, r, blobs.get(r.blob, b""), items, uid, with_modseq) for s, r in work])
            else:  # cached structure, or a few small bodies sent as they are: no thread hop
                out = [render_fetch(s, r, None if blobs is None else blobs.get(r.blob, b""), items, uid, with_modseq)
                       for s, r in work]
            if self._closed:
                return SENT
            self.transport.write(b"".join(out))
            await self._drain()
        return b"FETCH completed"

    async def _drain(self) -> None:
        # Back-pressure on big FETCHes: wait while the transport holds much unsent data.
        for _ in range(6000):
            t = self.transport
            pending = 0
            for obj in (t, getattr(t, "transport", None)):
                if obj is not None:
                    pending += len(getattr(obj, "dataBuffer", b"") or b"") + int(getattr(obj, "_tempDataLen", 0) or 0)
            if pending < 4 * 1024 * 1024 or self._closed:
                return
            await asyncio.sleep(0.01)

    async def c_store(self, tag, args, uid=False):
        sel = self.sel
        if sel.readonly:
            raise No(b"[READ-ONLY] Mailbox is read-only")
        if len(args) < 3:
            raise Bad(b"STORE needs a sequence set, an item and flags")
        ss = seqset(args[0])
        rest = args[1:]
        unchangedsince = None
        if isinstance(rest[0], list):
            mod = rest[0]
            if len(mod) != 2 or not isinstance(mod[0], Atom) or mod[0].upper() != b"UNCHANGEDSINCE":
                raise Bad(b"Unknown STORE modifier")
            unchangedsince = number(mod[1])
            self.enabled.add("CONDSTORE")
            rest = rest[1:]
        if len(rest) < 2 or not isinstance(rest[0], Atom):
            raise Bad(b"STORE needs an item and flags")
        item = rest[0].upper()
        m = re.fullmatch(rb"([+-]?)FLAGS(\.SILENT)?", item)
        if not m:
            raise Bad(b"Unknown STORE item")
        mode = {b"": 0, b"+": 1, b"-": -1}[m.group(1)]
        raw_flags = rest[1] if isinstance(rest[1], list) and len(rest) == 2 else rest[1:]
        try:
            flags = mailboxes.clean_flags([bytes(f) for f in raw_flags if isinstance(f, (bytes,))])
        except InputError as exc:
            raise Bad(exc.message.encode()) from None
        await self.refresh(allow_expunge=uid)
        targets = sel.targets(ss, uid)
        uids = [u for _, u in targets]
        rows, changed, failed = await self.ctx.store.write(
            mailboxes.store_flags_sync, sel.folder_id, uids, flags, mode, unchangedsince)
        if changed:
            self._wrote(max(r.modseq for r in rows))
        show_modseq = "CONDSTORE" in self.enabled
        if not m.group(2) or show_modseq:
            for r in rows:
                if r.uid in failed:
                    continue
                if m.group(2) and r.uid not in changed:
                    continue
                seq = sel.seq_of(r.uid)
                if seq is None:
                    continue
                extra = (b" UID %d" % r.uid if uid else b"")
                extra += b" MODSEQ (%d)" % r.modseq if show_modseq else b""
                flags_part = b"" if m.group(2) else b" FLAGS " + _flags_bytes(r.flags)
                self.send(b"* %d FETCH (%s)" % (seq, (flags_part + extra).strip()))
        if failed:
            ids = failed if uid else [sel.seq_of(u) for u in failed if sel.seq_of(u)]
            return b"[MODIFIED " + _set(sorted(ids)) + b"] Conditional STORE failed"
        return b"STORE completed"

    async def c_search(self, tag, args, uid=False):
        sel = self.sel
        toks = list(args)
        if toks and isinstance(toks[0], Atom) and toks[0].upper() == b"RETURN":
            raise Bad(b"ESEARCH is not supported")
        if len(toks) >= 2 and isinstance(toks[0], Atom) and toks[0].upper() == b"CHARSET":
            cs = astring(toks[1]).upper()
            if cs not in (b"UTF-8", b"US-ASCII"):
                raise No(b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
            toks = toks[2:]
        key = search_keys(toks)
        await self.refresh(allow_expunge=uid)
        rows = await self.ctx.store.read(mailboxes.message_rows_sync, sel.folder_id, None)
        by_uid = {r.uid: r for r in rows}
        items = [(i + 1, by_uid[u]) for i, u in enumerate(sel.uids) if u in by_uid]
        max_seq, max_uid = len(sel.uids), (sel.uids[-1] if sel.uids else 0)
        found: list = []
        content = _needs_content(key)
        for i in range(0, len(items), CHUNK if content else 100_000):
            chunk = items[i:i + (CHUNK if content else 100_000)]
            if content:
                blobs = await self.ctx.store.read(mailboxes.blob_bytes_sync, list({r.blob for _, r in chunk}))
                found += await asyncio.to_thread(search_chunk, key, chunk, blobs, max_seq, max_uid)
            elif len(chunk) > INLINE_SEARCH:
                found += await asyncio.to_thread(search_chunk, key, chunk, None, max_seq, max_uid)
            else:  # flags, sizes, dates of a few messages: no thread hop
                found += search_chunk(key, chunk, None, max_seq, max_uid)
        nums = [u if uid else s for s, u, _ in found]
        line = b"* SEARCH" + b"".join(b" %d" % n for n in nums)
        if found and "MODSEQ" in repr(key):
            line += b" (MODSEQ %d)" % max(m for _, _, m in found)
        self.send(line)
        return b"SEARCH completed"

    async def c_copy(self, tag, args, uid=False, move=False):
        sel = self.sel
        if len(args) != 2:
            raise Bad(b"COPY needs a sequence set and a mailbox")
        if move and sel.readonly:
            raise No(b"[READ-ONLY] Mailbox is read-only")
        ss = seqset(args[0])
        dest = folder_arg(args[1])
        await self.refresh(allow_expunge=uid)
        uids = [u for _, u in sel.targets(ss, uid)]
        try:
            validity, src, new, dest_id = await self.ctx.store.write(
                mailboxes.copy_sync, self.mbid, sel.folder_id, uids, dest, move)
        except NotFound:
            raise No(b"[TRYCREATE] No such mailbox") from None
        except mailboxes.OverQuota:
            raise No(b"[OVERQUOTA] Mailbox is over its quota") from None
        code = b""
        if src:
            code = b"[COPYUID %d %s %s] " % (validity, _set(src), _set(new))
            mailboxes.changed(dest_id)
        if move:
            if code:
                self.send(b"* OK " + code + b"Moved")
            self._expunged(src)
            if src:
                mailboxes.changed(sel.folder_id)
                sel.version = mailboxes.version(sel.folder_id)
            return b"MOVE completed"
        return code + b"COPY completed"

    async def c_move(self, tag, args, uid=False):
        return await self.c_copy(tag, args, uid=uid, move=True)

    async def c_append(self, tag, args):
        if len(args) < 2:
            raise Bad(b"APPEND needs a mailbox and a message")
        name = folder_arg(args[0])
        msg = args[-1]
        if hasattr(msg, "read"):
            data = msg.read()
        elif isinstance(msg, Literal):
            data = bytes(msg)
        else:
            raise Bad(b"APPEND needs the message as a literal")
        flags, date = [], time.time()
        for extra in args[1:-1]:
            if isinstance(extra, list):
                try:
                    flags = mailboxes.clean_flags([bytes(f) for f in extra])
                except InputError as exc:
                    raise Bad(exc.message.encode()) from None
            elif isinstance(extra, bytes):
                date = _parse_idate(bytes(extra))
            else:
                raise Bad(b"Invalid APPEND argument")
        if not data:
            raise No(b"Cannot save an empty message")
        try:
            fid, validity, new_uid, modseq = await self.ctx.store.write(
                mailboxes.append_sync, self.mbid, name, data, flags, date)
        except NotFound:
            raise No(b"[TRYCREATE] No such mailbox") from None
        except mailboxes.OverQuota:
            raise No(b"[OVERQUOTA] Mailbox is over its quota") from None
        sel = self.sel
        if sel is None or sel.folder_id != fid:
            mailboxes.changed(fid)
        elif self._wrote(modseq):
            sel.uids.append(new_uid)
            self.send(b"* %d EXISTS" % len(sel.uids))
        await self.refresh()
        return b"[APPENDUID %d %d] APPEND completed" % (validity, new_uid)

    # -- QUOTA (RFC 2087/9208): one root "" per mailbox, STORAGE in KiB -------------------------
    async def _send_quota(self) -> None:
        used, limit = await self.ctx.store.read(mailboxes.quota_sync, self.mbid)
        self.send(b'* QUOTA "" (STORAGE %d %d)' % ((used + 1023) // 1024, limit // 1024))

    async def c_getquotaroot(self, tag, args):
        if len(args) != 1:
            raise Bad(b"GETQUOTAROOT needs a mailbox name")
        name = folder_arg(args[0])
        try:
            await self.ctx.store.read(mailboxes.status_sync, self.mbid, name)
        except NotFound:
            raise No(b"[NONEXISTENT] No such mailbox") from None
        self.send(b"* QUOTAROOT " + mime.string(mutf7_encode(name)) + b' ""')
        await self._send_quota()
        return b"GETQUOTAROOT completed"

    async def c_getquota(self, tag, args):
        if len(args) != 1 or astring(args[0]) != b"":
            raise No(b"[NONEXISTENT] No such quota root")
        await self._send_quota()
        return b"GETQUOTA completed"

    async def c_setquota(self, tag, args):
        raise No(b"[NOPERM] Quotas are set by the administrator")

    async def c_uid(self, tag, args):
        if not args or not isinstance(args[0], Atom):
            raise Bad(b"UID needs a command")
        sub = args[0].upper()
        if sub not in (b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE"):
            raise Bad(b"Unknown UID command")
        fn = getattr(self, "c_" + sub.decode().lower())
        return await fn(tag, args[1:], uid=True)


ANY = ("unauth", "auth", "select")
AUTH = ("auth", "select")
SEL = ("select",)
_STATES = {
    b"CAPABILITY": ANY, b"NOOP": ANY, b"LOGOUT": ANY, b"ID": ANY,
    b"STARTTLS": ("unauth",), b"LOGIN": ("unauth",), b"AUTHENTICATE": ("unauth",),
    b"NAMESPACE": AUTH, b"ENABLE": AUTH, b"IDLE": AUTH, b"CREATE": AUTH, b"DELETE": AUTH,
    b"RENAME": AUTH, b"SUBSCRIBE": AUTH, b"UNSUBSCRIBE": AUTH, b"LIST": AUTH, b"LSUB": AUTH,
    b"STATUS": AUTH, b"SELECT": AUTH, b"EXAMINE": AUTH, b"APPEND": AUTH,
    b"CLOSE": SEL, b"UNSELECT": SEL, b"CHECK": SEL, b"EXPUNGE": SEL, b"FETCH": SEL,
    b"STORE": SEL, b"SEARCH": SEL, b"COPY": SEL, b"MOVE": SEL, b"UID": SEL,
    b"GETQUOTAROOT": AUTH, b"GETQUOTA": AUTH, b"SETQUOTA": AUTH,
}


def build_commands(cls) -> dict:
    return {name: (getattr(cls, "c_" + name.decode().lower()), states) for name, states in _STATES.items()}
