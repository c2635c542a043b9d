"""IMAP mailbox commands: folders, SELECT/EXAMINE, FETCH, STORE, SEARCH, COPY/MOVE, EXPUNGE,
APPEND, CLOSE/UNSELECT, and keeping a session's view (sequence numbers) in step with the store.

Owns the protocol side of every mailbox command (arguments, responses, UIDPLUS/MOVE/CONDSTORE
response codes, QRESYNC's VANISHED and resynchronising SELECT, ESEARCH answers and the SEARCHRES
"$" kept per selected mailbox, LIST-EXTENDED selection and return options with LIST-STATUS,
MULTIAPPEND, BINARY literal8, UTF-8 mailbox names after UTF8=ACCEPT, SORT, THREAD); core.mailboxes decides
and stores.  Store calls run in the store's threads; MIME parsing and SEARCH over bodies run in
a worker thread, in chunks, so the reactor stays responsive and memory stays bounded.  Mixed
into imap.IMAPServer.
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
from .imaprender import (_flags_bytes, _needs_content, needs_parse, render_fetch, render_threads,
                         search_chunk, sort_chunk, structure_cached, thread_chunk, thread_orderedsubject,
                         thread_references)
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
        self.saved: list[int] = []  # UIDs of the SEARCHRES "$" (RFC 5182); expunged ones drop out

    def seq_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def targets(self, ss: SeqSet, by_uid: bool) -> list[tuple[int, int]]:
        """[(seq, uid)] addressed by a sequence set."""
        if ss.saved:
            return [(s, u) for u in self.saved if (s := self.seq_of(u))]
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


def name_in(raw: bytes, utf8: bool) -> str:
    """A mailbox name or pattern as a client sends it: UTF-8 once it enabled UTF8=ACCEPT
    (RFC 6855), modified UTF-7 before."""
    if not utf8:
        return mutf7_decode(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("mailbox name is not UTF-8") from None


def name_out(name: str, utf8: bool) -> bytes:
    """A mailbox name for a response: a quoted UTF-8 string after UTF8=ACCEPT (folder names hold
    no control characters), else modified UTF-7."""
    if utf8:
        return b'"' + name.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return mime.string(mutf7_encode(name))


def folder_arg(tok, utf8: bool) -> str:
    try:
        return mailboxes.folder_name(name_in(astring(tok), utf8))
    except ParseError as exc:
        raise No(b"[CANNOT] " + str(exc).encode()) from None
    except InputError as exc:
        raise No(b"[CANNOT] " + exc.message.encode("utf-8", "replace")) from None


def _absent(uids: list[int], ranges: list[tuple[int, int]]) -> bytes:
    """The UIDs within `ranges` that are not in the sorted `uids`, as a compact set ("" if none);
    by gaps, so 1:4294967295 costs no more than the UIDs present."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:  # overlaps what is already reported
            lo = out[-1][1] + 1
        i = bisect.bisect_left(uids, lo)
        while lo <= hi:
            if i < len(uids) and uids[i] <= hi:
                if uids[i] > lo:
                    out.append((lo, uids[i] - 1))
                lo = uids[i] + 1
                i += 1
            else:
                out.append((lo, hi))
                break
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in out)


def _select_params(tok) -> tuple[bool, tuple | None]:
    """SELECT/EXAMINE parameters: CONDSTORE, and QRESYNC (uidvalidity modseq [known-uids]
    [(seqs uids)]) as (uidvalidity, modseq, known UIDs or None) (RFC 7162)."""
    if not isinstance(tok, list):
        raise Bad(b"SELECT parameters must be a list")
    condstore, qresync, i = False, None, 0
    while i < len(tok):
        word = tok[i].upper() if isinstance(tok[i], Atom) else b""
        if word == b"CONDSTORE":
            condstore, i = True, i + 1
        elif word == b"QRESYNC" and i + 1 < len(tok) and isinstance(tok[i + 1], list):
            p = tok[i + 1]
            if not 2 <= len(p) <= 4:
                raise Bad(b"Invalid QRESYNC parameters")
            known = None
            rest = p[2:]
            if rest and not isinstance(rest[0], list):
                known = seqset(rest[0])
                rest = rest[1:]
            if rest and not (isinstance(rest[0], list) and len(rest[0]) == 2 and len(rest) == 1):
                raise Bad(b"Invalid QRESYNC parameters")
            for s in rest[0] if rest else ():  # sequence match data: a hint we do not need
                seqset(s)
            if known is not None and known.saved:
                raise Bad(b"Invalid QRESYNC parameters")
            qresync, i = (number(p[0], 1, 2**32 - 1), number(p[1]), known), i + 2
        else:
            raise Bad(b"Unknown SELECT parameter")
    return condstore, qresync


def _fetch_modifiers(tok, uid: bool, qresync: bool) -> tuple[int | None, bool]:
    """FETCH modifiers: (CHANGEDSINCE modseq) (RFC 7162 3.1.4) and VANISHED (3.2.6)."""
    if not isinstance(tok, list):
        raise Bad(b"FETCH modifiers must be a list")
    changedsince, vanished, i = None, False, 0
    while i < len(tok):
        word = tok[i].upper() if isinstance(tok[i], Atom) else b""
        if word == b"CHANGEDSINCE" and i + 1 < len(tok):
            changedsince, i = number(tok[i + 1]), i + 2
        elif word == b"VANISHED":
            vanished, i = True, i + 1
        else:
            raise Bad(b"Unknown FETCH modifier")
    if vanished and not (uid and qresync and changedsince is not None):
        raise Bad(b"VANISHED needs UID FETCH, CHANGEDSINCE and ENABLE QRESYNC")
    return changedsince, vanished


_SORT_KEYS = (b"ARRIVAL", b"CC", b"DATE", b"FROM", b"SIZE", b"SUBJECT", b"TO", b"DISPLAYFROM", b"DISPLAYTO")


def _sort_criteria(tok) -> list[tuple[str, bool]]:
    """[(criterion, reversed)] of a SORT command."""
    if not isinstance(tok, list) or not tok:
        raise Bad(b"SORT needs a list of criteria")
    out, reverse = [], False
    for t in tok:
        word = t.upper() if isinstance(t, Atom) else b""
        if word == b"REVERSE" and not reverse:
            reverse = True
        elif word in _SORT_KEYS:
            out.append((word.decode(), reverse))
            reverse = False
        else:
            raise Bad(b"Unknown SORT criterion")
    if reverse:
        raise Bad(b"REVERSE needs a criterion after it")
    return out


def _is_literal(tok) -> bool:
    return hasattr(tok, "read") or isinstance(tok, Literal)


def _append_tokens(toks: list, utf8: bool) -> list:
    """APPEND arguments with each message's wrapping taken off: the literal8 mark "~" before it
    and, once UTF8=ACCEPT is enabled, UTF8 (...) around it."""
    out, i = [], 0
    while i < len(toks):
        tok, nxt = toks[i], toks[i + 1] if i + 1 < len(toks) else None
        if isinstance(tok, Atom) and tok == b"~" and _is_literal(nxt):
            i += 1
        elif (utf8 and isinstance(tok, Atom) and tok.upper() == b"UTF8" and isinstance(nxt, list)
              and len(nxt) == 2 and nxt[0] == b"~" and _is_literal(nxt[1])):
            out.append(nxt[1])
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


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


class _UidSet:
    """"$" inside a SEARCH program: membership by UID (sequence numbers map to the same messages)."""

    def __init__(self, uids: list[int]):
        self.uids = frozenset(uids)

    def contains(self, n: int, largest: int) -> bool:
        return n in self.uids


def _with_saved(key, saved: list[int]):
    """The SEARCH program with every "$" replaced by the saved messages' UIDs."""
    op = key[0]
    if op in ("SEQ", "UID") and key[1].saved:
        return ("UID", _UidSet(saved))
    if op == "AND":
        return ("AND", [_with_saved(k, saved) for k in key[1]])
    if op in ("OR", "NOT"):
        return (op,) + tuple(_with_saved(k, saved) for k in key[1:])
    return key


_RETURN_OPTS = (b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE")


def _return_options(tok) -> set[bytes]:
    """SEARCH RETURN (...) options (RFC 4731, SAVE from RFC 5182); () means ALL."""
    if not isinstance(tok, list):
        raise Bad(b"RETURN needs a list of options")
    opts = set()
    for t in tok:
        if not isinstance(t, Atom) or t.upper() not in _RETURN_OPTS:
            raise Bad(b"Unknown SEARCH RETURN option")
        opts.add(bytes(t.upper()))
    return opts or {b"ALL"}


def _match(pattern: str, name: str) -> bool:
    rx = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.S) is not None


def _list_match(pattern: str, name: str) -> bool:
    """LIST pattern matching, with INBOX (and what lies under it) matched in any case."""
    if (name == "INBOX" or name.startswith("INBOX/")) and pattern[:5].upper() == "INBOX":
        pattern = "INBOX" + pattern[5:]
    return _match(pattern, name)


_LIST_SELECT = (b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE")
_LIST_RETURN = (b"SUBSCRIBED", b"CHILDREN", b"SPECIAL-USE")


def _options(tok, known: tuple[bytes, ...]) -> set[bytes]:
    if not isinstance(tok, list) or not all(isinstance(t, Atom) and t.upper() in known for t in tok):
        raise Bad(b"Unknown LIST option")
    return {bytes(t.upper()) for t in tok}


def _list_return(tok) -> tuple[set[bytes], list[bytes] | None]:
    """LIST ... RETURN (...) (RFC 5258; STATUS from RFC 5819, SPECIAL-USE from RFC 6154):
    the options and the STATUS items asked for (None when STATUS is not)."""
    if not isinstance(tok, list):
        raise Bad(b"RETURN needs a list of options")
    plain, status_keys = [], None
    i = 0
    while i < len(tok):
        t = tok[i]
        if isinstance(t, Atom) and t.upper() == b"STATUS":
            if i + 1 >= len(tok) or status_keys is not None:
                raise Bad(b"RETURN STATUS needs one list of items")
            status_keys = _status_keys(tok[i + 1])
            i += 2
            continue
        plain.append(t)
        i += 1
    return _options(plain, _LIST_RETURN), status_keys


_STATUS_ITEMS = (b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"HIGHESTMODSEQ", b"SIZE")


def _status_keys(tok) -> list[bytes]:
    if not isinstance(tok, list) or not tok:
        raise Bad(b"STATUS needs a list of items")
    if not all(isinstance(t, Atom) and t.upper() in _STATUS_ITEMS for t in tok):
        raise Bad(b"Unknown STATUS item")
    return [bytes(t.upper()) for t in tok]


def _status_line(name: str, status, keys: list[bytes], utf8: bool) -> bytes:
    info, count, unseen, size = status
    values = {b"MESSAGES": count, b"RECENT": 0, b"UIDNEXT": info.uidnext, b"UIDVALIDITY": info.uidvalidity,
              b"UNSEEN": unseen, b"HIGHESTMODSEQ": info.highestmodseq, b"SIZE": size}
    return (b"* STATUS " + name_out(name, utf8) + b" ("
            + b" ".join(k + b" %d" % values[k] for k in keys) + b")")


def _statuses_sync(mbid: int, names: list[str]) -> dict:
    """STATUS of several folders in one store read; folders gone meanwhile are left out."""
    out = {}
    for name in names:
        try:
            out[name] = mailboxes.status_sync(mbid, name)
        except NotFound:
            pass
    return out


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

    @property
    def utf8(self) -> bool:
        """UTF8=ACCEPT enabled: mailbox names travel as UTF-8 (RFC 6855)."""
        return "UTF8=ACCEPT" in self.enabled

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
            self._expunged([u for u in sel.uids if u not in present])
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
        """CREATE name [(USE (attribute))] (CREATE-SPECIAL-USE, RFC 6154: one of ours per folder)."""
        if len(args) not in (1, 2):
            raise Bad(b"CREATE needs a mailbox name")
        use = ""
        if len(args) == 2:
            opts = args[1]
            if not (isinstance(opts, list) and len(opts) == 2 and isinstance(opts[0], Atom)
                    and opts[0].upper() == b"USE" and isinstance(opts[1], list)):
                raise Bad(b"Unknown CREATE parameter")
            if len(opts[1]) != 1 or not isinstance(opts[1][0], Atom):
                raise No(b"[USEATTR] One special-use attribute per mailbox")
            use = next((u for _, u in mailboxes.SPECIAL_FOLDERS if u.upper() == opts[1][0].decode("ascii").upper()), "")
            if not use:
                raise No(b"[USEATTR] Unsupported special-use attribute")
        raw = astring(args[0]).rstrip(b"/")
        await self._folder_write(mailboxes.create_folder_sync, folder_arg(Literal(raw), self.utf8), use)
        return b"CREATE completed"

    async def c_delete(self, tag, args):
        if len(args) != 1:
            raise Bad(b"DELETE needs a mailbox name")
        name = folder_arg(args[0], self.utf8)
        fid = await self._folder_write(mailboxes.delete_folder_sync, name)
        mailboxes.changed(fid)
        return b"DELETE completed"

    async def c_rename(self, tag, args):
        if len(args) != 2:
            raise Bad(b"RENAME needs two mailbox names")
        emptied = await self._folder_write(mailboxes.rename_folder_sync, folder_arg(args[0], self.utf8),
                                           folder_arg(args[1], self.utf8))
        if emptied is not None:  # RENAME INBOX moved its messages away
            mailboxes.changed(emptied)
            await self.refresh()
        return b"RENAME completed"

    async def c_subscribe(self, tag, args, on=True):
        if len(args) != 1:
            raise Bad(b"mailbox name expected")
        await self._folder_write(mailboxes.subscribe_sync, folder_arg(args[0], self.utf8), on)
        return b"completed"

    async def c_unsubscribe(self, tag, args):
        return await self.c_subscribe(tag, args, False)

    async def c_list(self, tag, args, lsub=False):
        word = b"LSUB" if lsub else b"LIST"
        select: set[bytes] = set()
        ret: set[bytes] = set()
        status_keys = None
        if not lsub and args and isinstance(args[0], list):  # RFC 5258 selection options
            select = _options(args[0], _LIST_SELECT)
            if b"RECURSIVEMATCH" in select and not select - {b"RECURSIVEMATCH", b"REMOTE"}:
                raise Bad(b"RECURSIVEMATCH needs another selection option")
            args = args[1:]
        if not lsub and len(args) == 4 and isinstance(args[2], Atom) and args[2].upper() == b"RETURN":
            ret, status_keys = _list_return(args[3])
            args = args[:2]
        if len(args) != 2:
            raise Bad(b"LIST needs a reference and a pattern")
        ref = astring(args[0])
        pats = [astring(p) for p in args[1]] if isinstance(args[1], list) and not lsub else [astring(args[1])]
        if not pats:
            raise Bad(b"LIST needs a pattern")
        if pats == [b""]:
            self.send(b'* ' + word + b' (\\Noselect) "/" ""')
            return word + b" completed"
        try:
            patterns = [name_in(ref + p, self.utf8) for p in pats]
        except ParseError as exc:
            raise No(b"[CANNOT] " + str(exc).encode()) from None
        subscribed_only = lsub or b"SUBSCRIBED" in select
        show_subscribed = not lsub and (b"SUBSCRIBED" in select or b"SUBSCRIBED" in ret)
        folders = await self.ctx.store.read(mailboxes.list_folders_sync, self.mbid)
        subscribed = [f.name for f in folders if f.subscribed]
        listed = []
        for f in folders:
            if not any(_list_match(p, f.name) for p in patterns):
                continue
            # RFC 5258 RECURSIVEMATCH: a parent with subscribed descendants, whatever their names
            childinfo = (b"RECURSIVEMATCH" in select and b"SUBSCRIBED" in select
                         and any(n.startswith(f.name + "/") for n in subscribed))
            if subscribed_only and not f.subscribed and not childinfo:
                continue
            if b"SPECIAL-USE" in select and not f.special_use:
                continue
            attrs = [b"\\HasChildren" if f.has_children else b"\\HasNoChildren"]
            if f.special_use:
                attrs.append(f.special_use.encode())
            if show_subscribed and f.subscribed:
                attrs.append(b"\\Subscribed")
            line = b"* " + word + b" (" + b" ".join(attrs) + b') "/" ' + name_out(f.name, self.utf8)
            if childinfo:
                line += b' ("CHILDINFO" ("SUBSCRIBED"))'
            listed.append((f.name, line))
        statuses = {}
        if status_keys is not None and listed:  # RFC 5819: each mailbox's STATUS after its LIST
            statuses = await self.ctx.store.read(_statuses_sync, self.mbid, [n for n, _ in listed])
        for name, line in listed:
            self.send(line)
            if name in statuses:
                self.send(_status_line(name, statuses[name], status_keys, self.utf8))
        return word + b" completed"

    async def c_lsub(self, tag, args):
        return await self.c_list(tag, args, lsub=True)

    async def c_status(self, tag, args):
        if len(args) != 2 or not isinstance(args[1], list):
            raise Bad(b"STATUS needs a mailbox and a list of items")
        name = folder_arg(args[0], self.utf8)
        keys = _status_keys(args[1])
        try:
            status = await self.ctx.store.read(mailboxes.status_sync, self.mbid, name)
        except NotFound:
            raise No(b"[NONEXISTENT] No such mailbox") from None
        self.send(_status_line(name, status, keys, self.utf8))
        return b"STATUS completed"

    # -- selection -------------------------------------------------------------------------------
    async def c_select(self, tag, args, readonly=False):
        if not args or len(args) > 2:
            raise Bad(b"SELECT needs a mailbox name")
        condstore, qresync = _select_params(args[1]) if len(args) == 2 else (False, None)
        if qresync is not None and "QRESYNC" not in self.enabled:
            raise Bad(b"QRESYNC needs ENABLE QRESYNC first")
        name = folder_arg(args[0], self.utf8)
        if self.sel is not None:
            self.send(b"* OK [CLOSED] Previous mailbox closed")
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
        if qresync is not None and qresync[0] == st.info.uidvalidity:
            await self._resync(qresync[1], qresync[2], st.info.uidnext)
        return (b"[READ-ONLY] EXAMINE" if readonly else b"[READ-WRITE] SELECT") + b" completed"

    async def _resync(self, modseq: int, known: SeqSet | None, uidnext: int) -> None:
        """SELECT ... (QRESYNC ...) (RFC 7162 3.2.5): VANISHED (EARLIER) and the FETCHes of what
        changed since the client's modseq, within the UIDs it knows.  Expunges leave no trace
        here, so VANISHED names every absent UID of those (also ones gone before `modseq`, which
        clients ignore); nothing at all when the mailbox has not changed since `modseq`."""
        sel = self.sel
        if modseq >= sel.modseq:
            return
        ranges = known.resolve(sel.uids[-1] if sel.uids else 0) if known else [(1, uidnext - 1)]
        gone = _absent(sel.uids, ranges)
        if gone:
            self.send(b"* VANISHED (EARLIER) " + gone)
        _, rows, _ = await self.ctx.store.read(
            mailboxes.changes_since_sync, sel.folder_id, modseq, len(sel.uids), sel.uids[-1] if sel.uids else 0)
        for r in rows:
            seq = sel.seq_of(r.uid)
            if seq is not None and (known is None or known.contains(r.uid, sel.uids[-1])):
                self.send(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))" % (seq, r.uid, _flags_bytes(r.flags), r.modseq))

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
        if "QRESYNC" in self.enabled:
            return b"[HIGHESTMODSEQ %d] EXPUNGE completed" % sel.modseq
        return b"EXPUNGE completed"

    def _expunged(self, uids: list[int]) -> None:
        sel = self.sel
        if "QRESYNC" in self.enabled:  # RFC 7162: one VANISHED instead of an EXPUNGE each
            gone = {u for u in uids if sel.seq_of(u) is not None}
            if gone:
                sel.uids[:] = [u for u in sel.uids if u not in gone]
                self.send(b"* VANISHED " + _set(sorted(gone)))
            return
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
        if len(args) > 3:
            raise Bad(b"Too many FETCH arguments")
        changedsince, vanished = _fetch_modifiers(args[2], uid, "QRESYNC" in self.enabled) \
            if len(args) == 3 else (None, False)
        if changedsince is not None:
            self.enabled.add("CONDSTORE")
        await self.refresh(allow_expunge=uid)
        targets = sel.targets(ss, uid)
        if vanished:  # RFC 7162 3.2.6: the UIDs asked for that are gone; "*" reaches UIDNEXT-1 here
            info = await self.ctx.store.read(mailboxes.folder_info_sync, sel.folder_id)
            gone = _absent(sel.uids, [(u, u) for u in sel.saved] if ss.saved else ss.resolve(
                max(info.uidnext - 1 if info else 0, sel.uids[-1] if sel.uids else 0)))
            if gone:
                self.send(b"* VANISHED (EARLIER) " + gone)
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
        ret = None
        if toks and isinstance(toks[0], Atom) and toks[0].upper() == b"RETURN":
            ret = _return_options(toks[1] if len(toks) > 1 else None)
            toks = toks[2:]
        try:
            found, with_modseq = await self._search(toks, uid)
        except (No, Bad, ParseError):
            if ret is not None and b"SAVE" in ret:
                sel.saved = []  # RFC 5182: a failed SEARCH ... SAVE leaves "$" empty
            raise
        if ret is None:
            nums = [u if uid else s for s, u, _ in found]
            line = b"* SEARCH" + b"".join(b" %d" % n for n in nums)
            if found and with_modseq:
                line += b" (MODSEQ %d)" % max(m for _, _, m in found)
            self.send(line)
            return b"SEARCH completed"
        # ESEARCH (RFC 4731): MIN and MAX alone return (and SAVE) only those two messages
        picked = found if ret & {b"ALL", b"COUNT"} or not ret & {b"MIN", b"MAX"} else \
            (found[:1] if b"MIN" in ret else []) + (found[-1:] if b"MAX" in ret else [])
        if b"SAVE" in ret:
            sel.saved = sorted({u for _, u, _ in picked})
        if ret == {b"SAVE"}:
            return b"SEARCH completed"
        nums = [u if uid else s for s, u, _ in found]
        line = b'* ESEARCH (TAG "' + tag + b'")' + (b" UID" if uid else b"")
        if nums and b"MIN" in ret:
            line += b" MIN %d" % nums[0]
        if nums and b"MAX" in ret:
            line += b" MAX %d" % nums[-1]
        if nums and b"ALL" in ret:
            line += b" ALL " + _set(nums)
        if b"COUNT" in ret:
            line += b" COUNT %d" % len(nums)
        if picked and with_modseq:
            line += b" MODSEQ %d" % max(m for _, _, m in picked)
        self.send(line)
        return b"SEARCH completed"

    async def _search(self, toks: list, uid: bool) -> tuple[list[tuple[int, int, int]], bool]:
        """[(seq, uid, modseq)] of the messages a SEARCH program matches, in order, and whether
        the program tests MODSEQ."""
        sel = self.sel
        if len(toks) >= 2 and isinstance(toks[0], Atom) and toks[0].upper() == b"CHARSET":
            if self.utf8:
                raise Bad(b"No CHARSET after ENABLE UTF8=ACCEPT: searches are in UTF-8")
            cs = astring(toks[1]).upper()
            if cs not in (b"UTF-8", b"US-ASCII"):
                raise No(b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
            toks = toks[2:]
        key = _with_saved(search_keys(toks), sel.saved)
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
        return found, "MODSEQ" in repr(key)

    async def c_sort(self, tag, args, uid=False):
        """SORT (criteria) charset search-keys (RFC 5256; DISPLAYFROM/DISPLAYTO, RFC 5957)."""
        if len(args) < 3:
            raise Bad(b"SORT needs sort criteria, a charset and search keys")
        criteria = _sort_criteria(args[0])
        if astring(args[1]).upper() not in (b"UTF-8", b"US-ASCII"):
            raise No(b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        found, _ = await self._search(list(args[2:]), uid)
        content = any(name not in ("ARRIVAL", "SIZE") for name, _ in criteria)
        keyed = await self._per_message(found, content, lambda chunk, blobs: sort_chunk(criteria, chunk, blobs))
        # stable sorts, last criterion first; the sequence number breaks the remaining ties
        for n in range(len(criteria) - 1, -1, -1):
            keyed.sort(key=lambda k, n=n: k[2][n], reverse=criteria[n][1])
        self.send(b"* SORT" + b"".join(b" %d" % (u if uid else s) for s, u, _ in keyed))
        return b"SORT completed"

    async def c_thread(self, tag, args, uid=False):
        """THREAD ORDEREDSUBJECT|REFERENCES charset search-keys (RFC 5256)."""
        if len(args) < 3 or not isinstance(args[0], Atom):
            raise Bad(b"THREAD needs an algorithm, a charset and search keys")
        build = {b"ORDEREDSUBJECT": thread_orderedsubject, b"REFERENCES": thread_references}.get(args[0].upper())
        if build is None:
            raise Bad(b"Unknown THREAD algorithm")
        if astring(args[1]).upper() not in (b"UTF-8", b"US-ASCII"):
            raise No(b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        found, _ = await self._search(list(args[2:]), uid)
        msgs = await self._per_message(found, True, thread_chunk)
        self.send(render_threads(await asyncio.to_thread(build, msgs), uid))
        return b"THREAD completed"

    async def _per_message(self, found: list, content: bool, fn) -> list:
        """fn(chunk, blobs) over the found messages, in a worker thread, chunk by chunk, with
        their bodies when `content` (blobs is None otherwise)."""
        sel = self.sel
        rows = await self.ctx.store.read(mailboxes.message_rows_sync, sel.folder_id, [u for _, u, _ in found])
        by_uid = {r.uid: r for r in rows}
        items = [(s, by_uid[u]) for s, u, _ in found if u in by_uid]
        step = CHUNK if content else 100_000
        out: list = []
        for i in range(0, len(items), step):
            chunk = items[i:i + step]
            blobs = None
            if content:
                blobs = await self.ctx.store.read(mailboxes.blob_bytes_sync, list({r.blob for _, r in chunk}))
            out += await asyncio.to_thread(fn, chunk, blobs)
        return out

    async def c_copy(self, tag, args, uid=False, move=False):
        sel = self.sel
        if len(args) != 2:
            raise Bad(b"COPY needs a sequence set and a mailbox")
        if move and sel.readonly:
            raise No(b"[READ-ONLY] Mailbox is read-only")
        ss = seqset(args[0])
        dest = folder_arg(args[1], self.utf8)
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
        """APPEND, and MULTIAPPEND (RFC 3502): several [flags] [date] message groups, all filed or
        none; a message may come as a literal8 (~{n}, BINARY, RFC 3516) or, after UTF8=ACCEPT,
        as UTF8 (~{n}) (RFC 6855)."""
        if len(args) < 2:
            raise Bad(b"APPEND needs a mailbox and a message")
        name = folder_arg(args[0], self.utf8)
        messages = []
        flags = date = None
        for tok in _append_tokens(args[1:], self.utf8):
            if _is_literal(tok):
                data = tok.read() if hasattr(tok, "read") else bytes(tok)
                if not data:
                    raise No(b"Cannot save an empty message")
                messages.append((data, flags or [], time.time() if date is None else date))
                flags = date = None
            elif isinstance(tok, list) and flags is None and date is None:
                try:
                    flags = mailboxes.clean_flags([bytes(f) for f in tok])
                except InputError as exc:
                    raise Bad(exc.message.encode()) from None
            elif isinstance(tok, bytes) and date is None:
                date = _parse_idate(bytes(tok))
            else:
                raise Bad(b"Invalid APPEND argument")
        if flags is not None or date is not None:
            raise Bad(b"APPEND needs the message as a literal")
        try:
            fid, validity, uids, modseq = await self.ctx.store.write(mailboxes.append_sync, self.mbid, name, messages)
        except NotFound:
            raise No(b"[TRYCREATE] No such mailbox") from None
        except mailboxes.OverQuota:
            raise No(b"[OVERQUOTA] Mailbox is over its quota") from None
        sel = self.sel
        if sel is None or sel.folder_id != fid:
            mailboxes.changed(fid)
        elif self._wrote(modseq):
            sel.uids.extend(uids)
            self.send(b"* %d EXISTS" % len(sel.uids))
        await self.refresh()
        return b"[APPENDUID %d %s] APPEND completed" % (validity, _set(uids))

    # -- QUOTA (RFC 2087/9208): one root "" per mailbox, STORAGE in KiB -------------------------
    async def _send_quota(self) -> None:
        used, limit = await self.ctx.store.read(mailboxes.quota_sync, self.mbid)
        self.send(b'* QUOTA "" (STORAGE %d %d)' % ((used + 1023) // 1024, limit // 1024))

    async def c_getquotaroot(self, tag, args):
        if len(args) != 1:
            raise Bad(b"GETQUOTAROOT needs a mailbox name")
        name = folder_arg(args[0], self.utf8)
        try:
            await self.ctx.store.read(mailboxes.status_sync, self.mbid, name)
        except NotFound:
            raise No(b"[NONEXISTENT] No such mailbox") from None
        self.send(b"* QUOTAROOT " + name_out(name, self.utf8) + b' ""')
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
        if sub not in (b"FETCH", b"STORE", b"SEARCH", b"SORT", b"THREAD", b"COPY", b"MOVE", b"EXPUNGE"):
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
    b"STORE": SEL, b"SEARCH": SEL, b"SORT": SEL, b"THREAD": SEL, b"COPY": SEL, b"MOVE": SEL, b"UID": SEL,
    b"GETQUOTAROOT": AUTH, b"GETQUOTA": AUTH, b"SETQUOTA": AUTH, b"COMPRESS": AUTH,
}


def build_commands(cls) -> dict:
    return {name: (getattr(cls, "c_" + name.decode().lower()), states) for name, states in _STATES.items()}
