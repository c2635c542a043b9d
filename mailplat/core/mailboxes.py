"""Mailboxes: the accounts people read with IMAP and POP3, and everything filed in them.

Owns: the Mailboxes API's meaning (create, list with real sizes, change password, delete; the
mailbox given as local part or full address; argon2 hashes only), the mailbox login source for
core.auth (so mailbox credentials also log in to SMTP submission, IMAP and POP3), folder rules
(names are database keys: Unicode, "/" as delimiter, no `..` segment, no leading `/` or `~`, no
control characters; INBOX and the SPECIAL-USE folders made with the mailbox), and the folder
operations IMAP and POP3 need (state, changes since a modseq, append, flags, expunge, copy,
move), each a sync function run inside `store.read`/`store.write`.  Bodies are content-addressed
Blobs, byte-exact.  In-process listeners (`watch`) are told when a folder changes so an IDLE
session hears about a delivery at once; sessions in other processes poll.
The api views, core.receive (delivery into INBOX) and mailaccess (imap.py, pop3.py) call this.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from peewee import fn

from ..errors import Conflict, InputError, NotFound, TooLarge
from ..store import blobs
from ..store.db import IntegrityError, insert_rows, run_cached
from ..store.mailbox_models import MailFolder, Mailbox, MailMessage
from ..store.models import Blob, Domain
from . import auth
from .timefmt import rfc2822

PASSWORD_MIN, PASSWORD_MAX = 5, 128
SPECIAL_FOLDERS = (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                   ("Junk", "\\Junk"), ("Archive", "\\Archive"))
MAX_FOLDER_NAME = 255
MAX_FOLDER_DEPTH = 32
MAX_FOLDERS = 1000
MAX_FLAGS_LEN = 1000
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
_FLAG = re.compile(r"^\\?[!#$&'+,./0-9:;<=>?@A-Z^_`a-z|}~-]{1,64}$")


class OverQuota(TooLarge):
    """Mailbox is over its quota"""
    http_status = 507
    smtp_reply = "452 4.2.2 Mailbox full, try again later"


# -- blobs ----------------------------------------------------------------------------------
def put_blob_sync(data: bytes) -> str:
    """Store bytes once, keyed by their SHA-256 (inside a store.write)."""
    return blobs.put_sync(data)  # one INSERT that ignores a duplicate: no lookup first


def blobs_present_sync(shas: list[str]) -> list[str]:
    """Which of these blobs are stored (without reading their bytes)."""
    out: list[str] = []
    for i in range(0, len(shas), 500):
        out.extend(t[0] for t in Blob.select(Blob.sha256).where(Blob.sha256.in_(shas[i:i + 500])).tuples())
    return out


def blob_bytes_sync(shas: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for i in range(0, len(shas), 200):
        chunk = shas[i:i + 200]
        cur = run_cached(("mailboxes.blobs", len(chunk)),
                         lambda: Blob.select(Blob.sha256, Blob.data).where(Blob.sha256.in_(chunk)), chunk)
        for sha, data in cur:
            out[sha] = bytes(data)
    return out


# -- input ----------------------------------------------------------------------------------
def _domains():
    from . import domains  # late: domains imports mailauth, which is heavy
    return domains


def mailbox_address(domain: str, mailbox: Any) -> str:
    """The full lower-case address for a local part or an address in `domain`."""
    if not isinstance(mailbox, str) or not mailbox.strip():
        raise InputError("'mailbox' parameter is missing")
    text = mailbox.strip().lower()
    local, at, dom = text.rpartition("@") if "@" in text else (text, "", "")
    if at:
        try:
            dom = _domains().normalize_name(dom)
        except InputError:
            raise InputError("'mailbox' parameter is not a valid address") from None
        if dom != domain:
            raise InputError(f"'mailbox' must be an address in {domain}")
    if not local or len(local) > 64 or not _LOCAL.match(local):
        raise InputError("'mailbox' parameter is not a valid address")
    return f"{local}@{domain}"


def check_password(value: Any) -> str:
    if value is None or value == "":
        raise InputError("'password' parameter is missing")
    if not isinstance(value, str):
        raise InputError("'password' parameter should be a string")
    if not PASSWORD_MIN <= len(value) <= PASSWORD_MAX:
        raise InputError(f"Password length must be between {PASSWORD_MIN} and {PASSWORD_MAX} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
        raise InputError("Password must not contain control characters")
    return value


def folder_name(name: Any) -> str:
    """A valid folder name (Unicode, already decoded from modified UTF-7), or InputError.
    INBOX in any case is INBOX."""
    if not isinstance(name, str) or not name:
        raise InputError("Invalid folder name: empty")
    if len(name) > MAX_FOLDER_NAME:
        raise InputError("Invalid folder name: too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in name):
        raise InputError("Invalid folder name: control characters")
    if name[0] in "/~" or name.endswith("/"):
        raise InputError("Invalid folder name: must not start with / or ~ or end with /")
    if "*" in name or "%" in name:
        raise InputError("Invalid folder name: wildcards")
    parts = name.split("/")
    if len(parts) > MAX_FOLDER_DEPTH:
        raise InputError("Invalid folder name: too deep")
    for part in parts:
        if part in ("", ".", "..") or part.strip() != part:
            raise InputError("Invalid folder name: empty, '.' or '..' segment")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return "/".join(parts)


def clean_flags(flags) -> list[str]:
    out: list[str] = []
    for f in flags:
        f = f.decode("ascii", "replace") if isinstance(f, bytes) else str(f)
        if not _FLAG.match(f):
            raise InputError(f"Invalid flag {f[:40]!r}")
        if f.startswith("\\"):
            canon = {"\\seen": "\\Seen", "\\answered": "\\Answered", "\\flagged": "\\Flagged",
                     "\\deleted": "\\Deleted", "\\draft": "\\Draft"}.get(f.lower())
            if canon is None:
                if f.lower() == "\\recent":
                    continue
                raise InputError(f"Invalid system flag {f[:40]!r}")
            f = canon
        if f not in out:
            out.append(f)
    if len(" ".join(out)) > MAX_FLAGS_LEN:
        raise InputError("Too many flags")
    return out


def _uidvalidity() -> int:
    return max(1, int((time.time() - 1_600_000_000) * 10) % 0xFFFFFFFF)


# -- in-process change listeners ------------------------------------------------------------
_watchers: dict[int, set[Callable[[], None]]] = {}
_versions: dict[int, int] = {}


def version(folder_id: int) -> int:
    """Bumped by changed(): lets a session skip a store read when nothing happened here."""
    return _versions.get(folder_id, 0)


def watch(folder_id: int, callback: Callable[[], None]) -> None:
    _watchers.setdefault(folder_id, set()).add(callback)


def unwatch(folder_id: int, callback: Callable[[], None]) -> None:
    cbs = _watchers.get(folder_id)
    if cbs:
        cbs.discard(callback)
        if not cbs:
            _watchers.pop(folder_id, None)


def changed(*folder_ids: int) -> None:
    """Tell in-process sessions watching these folders (call on the event loop, after commit)."""
    for fid in folder_ids:
        _versions[fid] = _versions.get(fid, 0) + 1
        for cb in list(_watchers.get(fid, ())):
            try:
                cb()
            except Exception:  # noqa: BLE001 - one broken session must not stop the others
                pass


# -- accounts (API) -------------------------------------------------------------------------
def _mailbox_row(address: str) -> Mailbox:
    row = Mailbox.get_or_none(Mailbox.address == address)
    if row is None:
        raise NotFound("Mailbox not found")
    return row


def create_mailbox_sync(domain: str, address: str, password_hash: str, quota: int, now: float) -> Mailbox:
    _domains()._get_sync(domain)
    try:
        mb = Mailbox.create(domain=domain, address=address, password_hash=password_hash,
                            quota_bytes=quota, created_at=now)
    except IntegrityError:
        raise Conflict("Mailbox already exists") from None
    vals = _uidvalidity()
    MailFolder.create(mailbox=mb, name="INBOX", uidvalidity=vals, created_at=now)
    for name, use in SPECIAL_FOLDERS:
        MailFolder.create(mailbox=mb, name=name, special_use=use, uidvalidity=vals, created_at=now)
    return mb


async def create_mailbox(ctx, domain: str, mailbox: Any, password: Any) -> dict:
    domain = _domains()._existing_name(domain)
    address = mailbox_address(domain, mailbox)
    password = check_password(password)
    await ctx.store.read(_domains()._get_sync, domain)
    password_hash = await auth.hash_password_async(password)
    await ctx.store.write(create_mailbox_sync, domain, address, password_hash,
                          ctx.config.mailaccess.quota_bytes, ctx.clock())
    return {"message": "Created 1 mailboxes"}


async def list_mailboxes(ctx, domain: str, limit: int = 100, skip: int = 0) -> dict:
    domain = _domains()._existing_name(domain)

    def read():
        _domains()._get_sync(domain)
        q = Mailbox.select().where(Mailbox.domain == domain)
        return q.count(), list(q.order_by(Mailbox.created_at, Mailbox.address).offset(skip).limit(limit))

    total, rows = await ctx.store.read(read)
    return {"total_count": total,
            "items": [{"size_bytes": r.size_bytes, "created_at": rfc2822(r.created_at),
                       "mailbox": r.address} for r in rows]}


async def change_password(ctx, domain: str, mailbox: Any, password: Any) -> dict:
    domain = _domains()._existing_name(domain)
    address = mailbox_address(domain, mailbox)
    password = check_password(password)
    await ctx.store.read(_mailbox_row, address)
    password_hash = await auth.hash_password_async(password)

    def write():
        n = Mailbox.update(password_hash=password_hash).where(Mailbox.address == address).execute()
        if not n:
            raise NotFound("Mailbox not found")

    await ctx.store.write(write)
    return {"message": "Password changed"}


def delete_mailbox_sync(address: str) -> list[int]:
    mb = _mailbox_row(address)
    folder_ids = [f.id for f in MailFolder.select(MailFolder.id).where(MailFolder.mailbox == mb.id)]
    if folder_ids:
        MailMessage.delete().where(MailMessage.folder.in_(folder_ids)).execute()
        MailFolder.delete().where(MailFolder.id.in_(folder_ids)).execute()
    mb.delete_instance()
    return folder_ids


async def delete_mailbox(ctx, domain: str, mailbox: Any) -> dict:
    domain = _domains()._existing_name(domain)
    address = mailbox_address(domain, mailbox)

    def write():
        _domains()._get_sync(domain)
        return delete_mailbox_sync(address)

    folder_ids = await ctx.store.write(write)
    changed(*folder_ids)
    return {"message": "Mailbox has been deleted", "spec": address}


def _delete_domain_hook(domain: str) -> None:
    for mb in list(Mailbox.select(Mailbox.address).where(Mailbox.domain == domain)):
        delete_mailbox_sync(mb.address)


def _login_source(login: str):
    row = (Mailbox.select(Mailbox.password_hash, Mailbox.domain)
           .where(Mailbox.address == login).tuples().first())
    return tuple(row) if row else None


auth.register_login_source(_login_source)


def quota_sync(mbid: int) -> tuple[int, int]:
    """(bytes stored, quota in bytes) of a mailbox."""
    mb = Mailbox.get_by_id(mbid)
    return mb.size_bytes, mb.quota_bytes


def login_row_sync(address: str) -> tuple[str, int] | None:
    """(password hash, mailbox id) for IMAP/POP3 logins."""
    row = (Mailbox.select(Mailbox.password_hash, Mailbox.id)
           .where(Mailbox.address == address).tuples().first())
    return tuple(row) if row else None


def register_domain_hook() -> None:
    hooks = _domains().DELETE_HOOKS
    if _delete_domain_hook not in hooks:
        hooks.append(_delete_domain_hook)


def mailbox_exists_sync(address: str) -> bool:
    return Mailbox.select().where(Mailbox.address == address).exists()


def domain_row_sync(domain: str):
    return Domain.get_or_none(Domain.name == domain)


# -- folders (IMAP/POP3) --------------------------------------------------------------------
@dataclass
class FolderInfo:
    id: int
    name: str
    special_use: str
    subscribed: bool
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    has_children: bool = False
    mailbox_id: int = 0


def account_id_sync(address: str) -> int:
    return _mailbox_row(address).id


def _folder(mbid: int, name: str) -> MailFolder:
    f = MailFolder.get_or_none((MailFolder.mailbox == mbid) & (MailFolder.name == name))
    if f is None:
        raise NotFound("No such mailbox")
    return f


def _info(f: MailFolder) -> FolderInfo:
    return FolderInfo(f.id, f.name, f.special_use, f.subscribed, f.uidvalidity, f.uidnext,
                      f.highestmodseq)


# The hot paths below (every IMAP command runs one or more) read and write through SQL text kept
# by store.db.run_cached and plain tuples: building a peewee query costs ~0.15 ms each time,
# running the kept text a few microseconds.
_INFO_COLS = (MailFolder.id, MailFolder.name, MailFolder.special_use, MailFolder.subscribed,
              MailFolder.uidvalidity, MailFolder.uidnext, MailFolder.highestmodseq, MailFolder.mailbox)


def _info_row(t) -> FolderInfo:
    return FolderInfo(t[0], t[1], t[2], bool(t[3]), t[4], t[5], t[6], mailbox_id=t[7])


def _folder_info(mbid: int, name: str) -> FolderInfo:
    t = run_cached("mailboxes.folder", lambda: MailFolder.select(*_INFO_COLS).where(
        (MailFolder.mailbox == mbid) & (MailFolder.name == name)), [mbid, name]).fetchone()
    if t is None:
        raise NotFound("No such mailbox")
    return _info_row(t)


def list_folders_sync(mbid: int) -> list[FolderInfo]:
    rows = [_info(f) for f in MailFolder.select().where(MailFolder.mailbox == mbid).order_by(MailFolder.name)]
    names = {r.name for r in rows}
    for r in rows:
        r.has_children = any(n.startswith(r.name + "/") for n in names)
    return rows


def create_folder_sync(mbid: int, name: str, special_use: str = "") -> None:
    """Create a folder (and its missing parents); `special_use` marks the folder itself."""
    if special_use and special_use not in {use for _, use in SPECIAL_FOLDERS}:
        raise InputError(f"Unsupported special use {special_use[:40]!r}")
    if MailFolder.select().where(MailFolder.mailbox == mbid).count() >= MAX_FOLDERS:
        raise InputError("Too many folders")
    parts = name.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        exists = MailFolder.select().where((MailFolder.mailbox == mbid) & (MailFolder.name == sub)).exists()
        if exists:
            if i == len(parts):
                raise Conflict("Mailbox already exists")
            continue
        MailFolder.create(mailbox=mbid, name=sub, uidvalidity=_uidvalidity(),
                          special_use=special_use if i == len(parts) else "")


def delete_folder_sync(mbid: int, name: str) -> int:
    if name == "INBOX":
        raise InputError("INBOX cannot be deleted")
    f = _folder(mbid, name)
    if MailFolder.select().where((MailFolder.mailbox == mbid) & MailFolder.name.startswith(name + "/")).exists():
        raise InputError("Mailbox has children; delete them first")
    size = sum(r.size for r in MailMessage.select(MailMessage.size).where(MailMessage.folder == f.id))
    MailMessage.delete().where(MailMessage.folder == f.id).execute()
    Mailbox.update(size_bytes=Mailbox.size_bytes - size).where(Mailbox.id == mbid).execute()
    f.delete_instance()
    return f.id


def rename_folder_sync(mbid: int, old: str, new: str) -> int | None:
    """Rename a folder and those under it.  INBOX is special (RFC 3501): its messages move to a
    new folder `new` and INBOX stays, empty, its folders under it untouched; then the INBOX id
    is returned, for sessions to hear of the expunges."""
    if new == "INBOX":
        raise InputError("Nothing can be renamed to INBOX")
    if old == "INBOX":
        return _rename_inbox_sync(mbid, new)
    f = _folder(mbid, old)
    if MailFolder.select().where((MailFolder.mailbox == mbid) & (MailFolder.name == new)).exists():
        raise Conflict("Mailbox already exists")
    kids = list(MailFolder.select().where((MailFolder.mailbox == mbid) & MailFolder.name.startswith(old + "/")))
    parent = new.rpartition("/")[0]
    if parent and not MailFolder.select().where((MailFolder.mailbox == mbid) & (MailFolder.name == parent)).exists():
        create_folder_sync(mbid, parent)
    f.name = new
    f.save()
    for k in kids:
        k.name = new + k.name[len(old):]
        k.save()
    return None


def _rename_inbox_sync(mbid: int, new: str) -> int:
    inbox = _folder(mbid, "INBOX")
    create_folder_sync(mbid, new)
    dest = _folder(mbid, new)
    # the messages keep their UIDs: the new folder has its own UIDVALIDITY and INBOX's UIDNEXT
    MailFolder.update(uidnext=inbox.uidnext).where(MailFolder.id == dest.id).execute()
    _, modseq = _bump(dest)
    MailMessage.update(folder=dest.id, modseq=modseq).where(MailMessage.folder == inbox.id).execute()
    _bump(inbox)
    return inbox.id


def subscribe_sync(mbid: int, name: str, on: bool) -> None:
    f = _folder(mbid, name)
    f.subscribed = on
    f.save()


@dataclass
class FolderState:
    info: FolderInfo
    uids: list[int]
    unseen: int
    first_unseen_uid: int | None
    deleted: int = 0
    size: int = 0
    rows: list = field(default_factory=list)


# The parameters peewee gives `MailMessage.flags.contains("\\Seen")` (a LIKE with an ESCAPE
# character), the same on SQLite and PostgreSQL.
_SEEN_LIKE = ["%\\\\Seen%", "\\"]


def _uids(folder_id: int) -> list[int]:
    return [t[0] for t in run_cached("mailboxes.uids", lambda: MailMessage.select(MailMessage.uid).where(
        MailMessage.folder == folder_id).order_by(MailMessage.uid), [folder_id])]


def folder_state_sync(mbid: int, name: str, with_rows: bool = False) -> FolderState:
    info = _folder_info(mbid, name)
    rows = message_rows_sync(info.id, None) if with_rows else []
    uids = [r.uid for r in rows] if with_rows else _uids(info.id)
    unseen, first = run_cached("mailboxes.unseen", lambda: MailMessage.select(
        fn.COUNT(MailMessage.id), fn.MIN(MailMessage.uid)).where(
        (MailMessage.folder == info.id) & ~(MailMessage.flags.contains("\\Seen"))), [info.id, *_SEEN_LIKE]).fetchone()
    return FolderState(info, uids, unseen, first, rows=rows)


def status_sync(mbid: int, name: str) -> tuple[FolderInfo, int, int, int]:
    """(info, message count, unseen count, total size) without loading the UID list."""
    f = _folder(mbid, name)
    base = MailMessage.select().where(MailMessage.folder == f.id)
    unseen = base.where(~(MailMessage.flags.contains("\\Seen"))).count()
    size = MailMessage.select(MailMessage.size).where(MailMessage.folder == f.id).tuples()
    return _info(f), base.count(), unseen, sum(t[0] for t in size)


def folder_info_sync(folder_id: int) -> FolderInfo | None:
    t = run_cached("mailboxes.folder_by_id", lambda: MailFolder.select(*_INFO_COLS).where(
        MailFolder.id == folder_id), [folder_id]).fetchone()
    return _info_row(t) if t else None


@dataclass
class Row:
    uid: int
    size: int
    internal_date: float
    flags: list[str]
    modseq: int
    blob: str


def _row(t) -> Row:
    return Row(t[0], t[1], t[2], t[3].split() if t[3] else [], t[4], t[5])


_ROW_COLS = (MailMessage.uid, MailMessage.size, MailMessage.internal_date, MailMessage.flags,
             MailMessage.modseq, MailMessage.blob)


def message_rows_sync(folder_id: int, uids: list[int] | None) -> list[Row]:
    base = MailMessage.select(*_ROW_COLS).where(MailMessage.folder == folder_id)
    if uids is None:
        return [_row(t) for t in run_cached("mailboxes.rows", lambda: base.order_by(MailMessage.uid),
                                            [folder_id])]
    if not uids:
        return []
    lo, hi = min(uids), max(uids)
    if hi - lo + 1 <= 2 * len(uids):  # dense: one range scan on the (folder, uid) index
        wanted = set(uids)
        cur = run_cached("mailboxes.rows_range", lambda: base.where(
            (MailMessage.uid >= lo) & (MailMessage.uid <= hi)).order_by(MailMessage.uid), [folder_id, lo, hi])
        return [_row(t) for t in cur if t[0] in wanted]
    out: list[Row] = []
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        out.extend(_row(t) for t in run_cached(("mailboxes.rows_in", len(chunk)), lambda: base.where(
            MailMessage.uid.in_(chunk)), [folder_id, *chunk]))
    out.sort(key=lambda r: r.uid)
    return out


def changes_since_sync(folder_id: int, modseq: int, known_count: int,
                       known_max_uid: int) -> tuple[FolderInfo | None, list[Row], list[int] | None]:
    """Rows changed or added after `modseq`; the full UID list too, but only when some messages
    were expunged (the folder holds fewer than the session knows plus the new ones)."""
    info = folder_info_sync(folder_id)
    if info is None or info.highestmodseq <= modseq:
        return info, [], None
    rows = [_row(t) for t in run_cached("mailboxes.changed_rows", lambda: MailMessage.select(*_ROW_COLS).where(
        (MailMessage.folder == folder_id) & (MailMessage.modseq > modseq)).order_by(MailMessage.uid),
        [folder_id, modseq])]
    count = run_cached("mailboxes.count", lambda: MailMessage.select(fn.COUNT(MailMessage.id)).where(
        MailMessage.folder == folder_id), [folder_id]).fetchone()[0]
    new = sum(1 for r in rows if r.uid > known_max_uid)
    all_uids = None
    if count != known_count + new:
        all_uids = _uids(folder_id)
    return info, rows, all_uids


def _bump(folder: MailFolder | FolderInfo, uids_needed: int = 0) -> tuple[int, int]:
    """Reserve UIDs and a modseq on a folder row (inside the write transaction)."""
    first_uid = folder.uidnext
    modseq = folder.highestmodseq + 1
    run_cached("mailboxes.bump", lambda: MailFolder.update(
        uidnext=MailFolder.uidnext + uids_needed, highestmodseq=modseq).where(MailFolder.id == folder.id),
        [uids_needed, modseq, folder.id])
    folder.uidnext += uids_needed
    folder.highestmodseq = modseq
    return first_uid, modseq


def _charge(mbid: int, size: int, enforce: bool = True) -> None:
    if enforce and size > 0:
        used, quota = run_cached("mailboxes.usage", lambda: Mailbox.select(
            Mailbox.size_bytes, Mailbox.quota_bytes).where(Mailbox.id == mbid), [mbid]).fetchone()
        if used + size > quota:
            raise OverQuota("Mailbox is over its quota")
    _add_size(mbid, size)


def _add_size(mbid: int, size: int) -> None:
    run_cached("mailboxes.add_size", lambda: Mailbox.update(size_bytes=Mailbox.size_bytes + size).where(
        Mailbox.id == mbid), [size, mbid])


def append_sync(mbid: int, name: str, messages: list[tuple[bytes, list[str], float]]) -> tuple[int, int, list[int], int]:
    """File messages (data, flags, internal date) into a folder, all or none (IMAP APPEND and
    MULTIAPPEND); returns (folder id, uidvalidity, their UIDs, the folder's new modseq)."""
    f = _folder_info(mbid, name)
    _charge(mbid, sum(len(data) for data, _, _ in messages))
    first, modseq = _bump(f, len(messages))
    rows = [{"folder": f.id, "uid": uid, "blob": put_blob_sync(data), "size": len(data), "internal_date": date,
             "flags": " ".join(flags), "modseq": modseq} for uid, (data, flags, date) in enumerate(messages, first)]
    for i in range(0, len(rows), 500):  # well under every driver's bound-parameter limit
        insert_rows(MailMessage, rows[i:i + 500])
    return f.id, f.uidvalidity, list(range(first, first + len(messages))), modseq


class InboxBatch:
    """Files many messages into INBOXes inside one write transaction (the inbound worker's
    pass): each mailbox and its INBOX are read once, and at `flush()` (before the transaction
    ends) each folder gets one UPDATE for its UIDs and modseq, each mailbox one for its size,
    and the message rows one multi-row INSERT.  The quota is checked message by message."""

    def __init__(self):
        self._boxes: dict[str, list] = {}  # address -> [mbid, used, quota, fid, next uid, modseq]
        self._added: dict[int, list] = {}  # fid -> that same list, for folders that got mail
        self._rows: list[dict] = []

    def _box(self, address: str) -> list | None:
        box = self._boxes.get(address)
        if box is None:  # an absent mailbox is looked up again: the batch may create it
            row = (Mailbox.select(Mailbox.id, Mailbox.size_bytes, Mailbox.quota_bytes, MailFolder.id,
                                  MailFolder.uidnext, MailFolder.highestmodseq)
                   .join(MailFolder, on=((MailFolder.mailbox == Mailbox.id) & (MailFolder.name == "INBOX")))
                   .where(Mailbox.address == address).tuples().first())
            if row is not None:
                box = self._boxes[address] = [row[0], row[1], row[2], row[3], row[4], row[5] + 1, 0]
        return box

    def exists(self, address: str) -> bool:
        """Is there a mailbox `address` (read once per batch)?"""
        return self._box(address) is not None

    def deliver(self, address: str, sha: str, size: int, date: float) -> int | None:
        """File into the INBOX of `address`; returns the folder id, None when there is no such
        mailbox; OverQuota when this message does not fit."""
        box = self._box(address)
        if box is None:
            return None
        mbid, used, quota, fid, uid, modseq, _ = box
        if size > 0 and used + size > quota:
            raise OverQuota("Mailbox is over its quota")
        self._rows.append({"folder": fid, "uid": uid, "blob": sha, "size": size, "internal_date": date,
                           "flags": "", "modseq": modseq})
        box[1] += size
        box[4] += 1
        box[6] += size
        self._added[fid] = box
        return fid

    def flush(self) -> None:
        for fid, box in self._added.items():
            mbid, _, _, _, uid, modseq, charged = box
            MailFolder.update(uidnext=uid, highestmodseq=modseq).where(MailFolder.id == fid).execute()
            Mailbox.update(size_bytes=Mailbox.size_bytes + charged).where(Mailbox.id == mbid).execute()
            box[5] += 1  # a later delivery in this batch object gets a newer modseq
            box[6] = 0
        for i in range(0, len(self._rows), 100):  # SQL text kept per row count (store.db)
            insert_rows(MailMessage, self._rows[i:i + 100])
        self._added.clear()
        self._rows.clear()


def deliver_sync(address: str, sha: str, size: int, date: float) -> int | None:
    """File into the INBOX of `address`; None when there is no such mailbox."""
    batch = InboxBatch()
    fid = batch.deliver(address, sha, size, date)
    batch.flush()
    return fid


def store_flags_sync(folder_id: int, uids: list[int], flags: list[str], mode: int,
                     unchangedsince: int | None = None) -> tuple[list[Row], list[int], list[int]]:
    """mode 0 replace, 1 add, -1 remove.  Returns (all rows as they now are, uids changed,
    uids that failed the UNCHANGEDSINCE test)."""
    rows = message_rows_sync(folder_id, uids)
    changed_rows, failed = [], []
    by_flags: dict[str, list[int]] = {}  # new flags -> uids: one UPDATE per distinct value
    modseq = None
    for r in rows:
        if unchangedsince is not None and r.modseq > unchangedsince:
            failed.append(r.uid)
            continue
        if mode == 0:
            new = list(flags)
        elif mode > 0:
            new = r.flags + [x for x in flags if x not in r.flags]
        else:
            new = [x for x in r.flags if x not in flags]
        if new == r.flags:
            continue
        if modseq is None:
            _, modseq = _bump(folder_info_sync(folder_id))
        by_flags.setdefault(" ".join(new), []).append(r.uid)
        r.flags, r.modseq = new, modseq
        changed_rows.append(r.uid)
    for text, group in by_flags.items():
        for i in range(0, len(group), 500):
            chunk = group[i:i + 500]
            run_cached(("mailboxes.set_flags", len(chunk)), lambda: MailMessage.update(
                flags=text, modseq=modseq).where((MailMessage.folder == folder_id) & MailMessage.uid.in_(chunk)),
                [text, modseq, folder_id, *chunk])
    return rows, changed_rows, failed


def _delete_uids(folder_id: int, uids: list[int]) -> None:
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        run_cached(("mailboxes.delete", len(chunk)), lambda: MailMessage.delete().where(
            (MailMessage.folder == folder_id) & MailMessage.uid.in_(chunk)), [folder_id, *chunk])


def expunge_sync(folder_id: int, uids: list[int] | None = None) -> tuple[list[int], int | None]:
    """Remove messages flagged \\Deleted (only among `uids` when given); returns their UIDs and
    the folder's new modseq (None when nothing was removed)."""
    cur = run_cached("mailboxes.deleted", lambda: MailMessage.select(
        MailMessage.uid, MailMessage.size, MailMessage.flags).where(
        (MailMessage.folder == folder_id) & MailMessage.flags.contains("Deleted")), [folder_id, "%Deleted%"])
    wanted = None if uids is None else set(uids)
    # LIKE is only the coarse filter (a keyword such as $NotDeleted matches it too): the exact
    # flag decides what is removed.
    gone = [(u, s) for u, s, fl in cur
            if "\\Deleted" in fl.split() and (wanted is None or u in wanted)]
    if not gone:
        return [], None
    gone_uids = sorted(u for u, _ in gone)
    _delete_uids(folder_id, gone_uids)
    f = folder_info_sync(folder_id)
    _, modseq = _bump(f)
    _add_size(f.mailbox_id, -sum(s for _, s in gone))
    return gone_uids, modseq


def delete_uids_sync(folder_id: int, uids: list[int]) -> int:
    """POP3 QUIT: remove these messages outright, in one transaction."""
    f = MailFolder.get_by_id(folder_id)
    size = 0
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        sel = MailMessage.select(MailMessage.size).where(
            (MailMessage.folder == folder_id) & MailMessage.uid.in_(chunk))
        size += sum(r[0] for r in sel.tuples())
        MailMessage.delete().where((MailMessage.folder == folder_id) & MailMessage.uid.in_(chunk)).execute()
    if uids:
        _bump(f)
        Mailbox.update(size_bytes=Mailbox.size_bytes - size).where(Mailbox.id == f.mailbox_id).execute()
    return size


def copy_sync(mbid: int, folder_id: int, uids: list[int], dest: str, move: bool) -> tuple[int, list[int], list[int], int]:
    """COPY/MOVE: returns (dest uidvalidity, source uids, new uids, dest folder id)."""
    d = _folder(mbid, dest)
    rows = message_rows_sync(folder_id, uids)
    if not rows:
        return d.uidvalidity, [], [], d.id
    if d.id == folder_id and move:
        return d.uidvalidity, [], [], d.id
    if not move:
        _charge(mbid, sum(r.size for r in rows))
    first, modseq = _bump(d, len(rows))
    new = list(range(first, first + len(rows)))
    for r, nu in zip(rows, new):
        MailMessage.create(folder=d.id, uid=nu, blob=r.blob, size=r.size,
                           internal_date=r.internal_date, flags=" ".join(r.flags), modseq=modseq)
    if move:
        src = MailFolder.get_by_id(folder_id)
        _delete_uids(folder_id, [r.uid for r in rows])
        _bump(src)
    return d.uidvalidity, [r.uid for r in rows], new, d.id
