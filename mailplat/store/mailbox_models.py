"""Tables of the mailbox store and of the inbound queue.

Owned here: mailboxes (an address of one of our domains with an argon2 password hash and a
quota), their folders (IMAP mailboxes: INBOX, the SPECIAL-USE folders and user folders, each
with UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ), the messages filed in folders (UID, flags,
modseq, internal date, size, the content-addressed Blob holding the exact bytes), and
InboundJob: one row per message accepted by the MX, consumed by core.receive's worker.
Folder names are database keys (mailbox-relative, "/"-separated, Unicode), never paths.
They add themselves to models.ALL_MODELS on import; migration 0002_mailboxes builds them.
"""
from __future__ import annotations

import time

import peewee as pw

from . import models
from .models import BaseModel, JSONField


class Mailbox(BaseModel):
    domain = pw.CharField(max_length=253, index=True)
    address = pw.CharField(max_length=320, unique=True)  # full address, lower case
    password_hash = pw.CharField(max_length=255)
    quota_bytes = pw.BigIntegerField()
    size_bytes = pw.BigIntegerField(default=0)  # sum of stored message sizes, kept in step
    created_at = pw.FloatField(default=time.time)


class MailFolder(BaseModel):
    mailbox = pw.ForeignKeyField(Mailbox, backref="folders", on_delete="CASCADE")
    name = pw.CharField(max_length=512)  # Unicode name, "/" as hierarchy delimiter
    special_use = pw.CharField(max_length=16, default="")  # \Sent, \Drafts, \Trash, \Junk, \Archive
    subscribed = pw.BooleanField(default=True)
    uidvalidity = pw.BigIntegerField()
    uidnext = pw.BigIntegerField(default=1)
    highestmodseq = pw.BigIntegerField(default=1)
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("mailbox", "name"), True),)


class MailMessage(BaseModel):
    folder = pw.ForeignKeyField(MailFolder, backref="messages", on_delete="CASCADE")
    uid = pw.BigIntegerField()
    blob = pw.CharField(max_length=64)  # Blob.sha256
    size = pw.BigIntegerField()
    internal_date = pw.FloatField(default=time.time)
    flags = pw.CharField(max_length=1024, default="")  # space-separated, e.g. "\\Seen \\Flagged"
    modseq = pw.BigIntegerField(default=1)
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("folder", "uid"), True), (("folder", "modseq"), False))


class InboundJob(BaseModel):
    """One message the MX accepted: delivered into mailboxes (and later routes/lists) by the
    inbound worker. state: queued | done | failed."""
    blob = pw.CharField(max_length=64)
    size = pw.BigIntegerField()
    mail_from = pw.CharField(max_length=320, default="")
    rcpt_tos = JSONField(default=list)
    peer = pw.CharField(max_length=64, default="")
    received_at = pw.FloatField(default=time.time)
    state = pw.CharField(max_length=16, default="queued")
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.FloatField(default=time.time)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.FloatField(null=True)
    last_error = pw.TextField(default="")
    # Recipients already handled, so a retried job never files a copy twice.
    done_rcpts = JSONField(default=list)
    # The blob already starts with our Received: header (added at accept): filed as it is.
    traced = pw.BooleanField(default=False)

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


MAILBOX_MODELS = [Mailbox, MailFolder, MailMessage, InboundJob]
# Listed with the other tables (models.ALL_MODELS) as soon as this module is imported.
models.ALL_MODELS.extend(m for m in MAILBOX_MODELS if m not in models.ALL_MODELS)
