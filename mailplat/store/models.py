"""Table definitions: the schema of the one store.

Owned here: tenants (domains, DKIM keys, SMTP credentials, API keys), the mail itself
(content-addressed blobs, messages, per-recipient queue rows), events and bounce suppressions.
Schema changes are migrations in store/migrations/ (each with a frozen copy of its tables);
these classes must stay equal to the schema the migrations build (tests/test_store.py checks).
Times are Unix epoch floats (UTC); structured values are JSON text.
"""
from __future__ import annotations

import json
import time

import peewee as pw

database = pw.DatabaseProxy()


_EMPTY_JSON = {dict: "{}", list: "[]"}


class JSONField(pw.TextField):
    def db_value(self, value):
        if value is None:
            return None
        if not value and type(value) in _EMPTY_JSON:  # most tags, variables...: no encoder call
            return _EMPTY_JSON[type(value)]
        return json.dumps(value, separators=(",", ":"), sort_keys=True)

    def python_value(self, value):
        if value is None:
            return None
        if value == "{}":  # most of a message's fields: a new empty one without the decoder
            return {}
        if value == "[]":
            return []
        return json.loads(value)


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class Domain(BaseModel):
    id = pw.CharField(max_length=32, primary_key=True)
    name = pw.CharField(max_length=253, unique=True)
    state = pw.CharField(max_length=16, default="unverified")  # unverified | active | disabled
    type = pw.CharField(max_length=16, default="custom")
    created_at = pw.FloatField(default=time.time)
    smtp_login = pw.CharField(max_length=320)
    spam_action = pw.CharField(max_length=16, default="disabled")  # disabled | block | tag
    wildcard = pw.BooleanField(default=False)
    force_dkim_authority = pw.BooleanField(default=False)
    dkim_authority = pw.CharField(max_length=253, null=True)  # domain whose key signs; None = self
    dkim_selector = pw.CharField(max_length=63, default="mailo")
    dkim_key_size = pw.IntegerField(default=2048)
    web_scheme = pw.CharField(max_length=8, default="http")
    web_prefix = pw.CharField(max_length=63, default="email")
    ips = JSONField(default=list)
    pool_id = pw.CharField(max_length=64, null=True)
    require_tls = pw.BooleanField(default=False)
    skip_verification = pw.BooleanField(default=False)
    tracking_open = pw.BooleanField(default=False)
    tracking_click = pw.BooleanField(default=False)
    tracking_unsubscribe = pw.BooleanField(default=False)
    unsubscribe_html_footer = pw.TextField(default="")
    unsubscribe_text_footer = pw.TextField(default="")
    is_disabled = pw.BooleanField(default=False)
    # Last verification result: {"<record id>": {"valid": "valid"|"unknown"|"invalid", "cached": [...]}}
    dns_checks = JSONField(default=dict)


class DkimKey(BaseModel):
    domain = pw.ForeignKeyField(Domain, backref="dkim_keys", on_delete="CASCADE")
    selector = pw.CharField(max_length=63)
    key_size = pw.IntegerField()
    private_key_pem = pw.TextField()
    public_key_b64 = pw.TextField()
    created_at = pw.FloatField(default=time.time)
    active = pw.BooleanField(default=True)

    class Meta:
        indexes = ((("domain", "selector"), True),)


class SmtpCredential(BaseModel):
    domain = pw.ForeignKeyField(Domain, backref="credentials", on_delete="CASCADE")
    login = pw.CharField(max_length=320, unique=True)  # full address, lower case
    password_hash = pw.CharField(max_length=255)
    created_at = pw.FloatField(default=time.time)


class ApiKey(BaseModel):
    # Public part of the key, used to find the row; the whole key is only stored as a hash.
    key_id = pw.CharField(max_length=32, unique=True)
    key_hash = pw.CharField(max_length=64)  # sha256 hex of the whole key
    role = pw.CharField(max_length=16)  # admin | sending
    domain = pw.CharField(max_length=253, null=True)  # for sending keys
    description = pw.CharField(max_length=255, default="")
    created_at = pw.FloatField(default=time.time)
    revoked_at = pw.FloatField(null=True)
    is_primary = pw.BooleanField(default=False)


class Blob(BaseModel):
    """Message bodies, content-addressed: a body is stored once however many rows point at it."""
    sha256 = pw.CharField(max_length=64, primary_key=True)
    size = pw.IntegerField()
    data = pw.BlobField()
    created_at = pw.FloatField(default=time.time)


class Message(BaseModel):
    """One accepted message (one API call, one SMTP transaction, one forwarded copy)."""
    message_id = pw.CharField(max_length=255, index=True)  # without angle brackets
    domain = pw.CharField(max_length=253, index=True)
    source = pw.CharField(max_length=16)  # api | smtp | route | list
    sender = pw.CharField(max_length=320)  # envelope MAIL FROM
    from_header = pw.TextField(default="")
    subject = pw.TextField(default="")
    blob = pw.CharField(max_length=64)  # Blob.sha256 of the composed MIME
    size = pw.IntegerField()
    headers = JSONField(default=dict)  # message-id, from, to, subject: for events
    attachments = JSONField(default=list)  # [{filename, content-type, size}]
    tags = JSONField(default=list)
    campaigns = JSONField(default=list)
    user_variables = JSONField(default=dict)
    recipient_variables = JSONField(default=dict)
    # Delivery options: testmode, dkim, tracking, tracking_clicks, tracking_opens,
    # require_tls, skip_verification, deliver_by
    options = JSONField(default=dict)
    created_at = pw.FloatField(default=time.time)


class QueueItem(BaseModel):
    """One recipient of one message: the unit the relay claims, delivers and retries."""
    message = pw.ForeignKeyField(Message, backref="queue", on_delete="CASCADE")
    recipient = pw.CharField(max_length=320)
    rcpt_domain = pw.CharField(max_length=253)
    # queued | held | delivered | failed
    state = pw.CharField(max_length=16, default="queued")
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.FloatField(default=time.time)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.FloatField(null=True)
    last_code = pw.IntegerField(null=True)
    last_error = pw.TextField(default="")
    created_at = pw.FloatField(default=time.time)
    updated_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


class Event(BaseModel):
    """Everything that happened to mail, in Mailgun's event shape (`data`)."""
    event_id = pw.CharField(max_length=32, unique=True)
    domain = pw.CharField(max_length=253)
    event = pw.CharField(max_length=32)
    timestamp = pw.FloatField()
    recipient = pw.CharField(max_length=320, default="")
    message_id = pw.CharField(max_length=255, default="")
    severity = pw.CharField(max_length=16, default="")
    data = JSONField()

    class Meta:
        indexes = (
            (("domain", "timestamp"), False),
            (("domain", "event", "timestamp"), False),
            (("domain", "recipient", "timestamp"), False),
            (("domain", "message_id"), False),
        )


class EventText(BaseModel):
    """The text the events API's subject/from/attachment filters search, lower-cased as
    core.eventquery matches it (`search_text`), one row per event, gone with it (cascade).
    The To header is left out: a send to 1,000 addresses would copy and index that whole list
    once per event; the `to` filter is matched on the event JSON during the walk.
    Its substring index is not a model: migration 0009 adds the FTS5 trigram table `event_fts`
    (external content over this table, kept in step by triggers) on SQLite and the pg_trgm GIN
    index `event_text_trgm` on PostgreSQL."""
    event = pw.ForeignKeyField(Event, primary_key=True, column_name="event_row", on_delete="CASCADE")
    subject = pw.TextField(default="")
    from_text = pw.TextField(default="")
    attachment = pw.TextField(default="")


# Indexes migrations add that models cannot describe (the schema test expects exactly these).
EXTRA_INDEXES = {"postgres": {"event_text_trgm"}, "sqlite": set()}


class Bounce(BaseModel):
    domain = pw.CharField(max_length=253)
    address = pw.CharField(max_length=320)
    code = pw.CharField(max_length=16, default="550")
    error = pw.TextField(default="")
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("domain", "address"), True),)


ALL_MODELS = [Domain, DkimKey, SmtpCredential, ApiKey, Blob, Message, QueueItem, Event, EventText, Bounce]
