"""Tables of routes, mailing lists, stored inbound messages, the hooks outbox and the account's
HTTP signing key.

Owned here: Route (priority, expression, actions), MailingList and ListMember (address, name,
JSON vars, subscribed), StoredMessage (a message kept by a route's store() action, with its
expiry), RouteJob (one inbound message handed from core.receive's worker to the route/list
worker, with the steps already done so a retry never repeats one), SpamVerdict (spamd's answer
for one inbound job), OutboxItem (one HTTP POST the hooks service owes: url, body bytes,
content type, headers, attempts, next attempt, lease) and SigningKey.
Migration 0006_routes_lists builds them; importing this module adds them to models.ALL_MODELS.
"""
from __future__ import annotations

import time

import peewee as pw

from .models import BaseModel, JSONField


class Route(BaseModel):
    id = pw.CharField(max_length=32, primary_key=True)
    priority = pw.IntegerField(default=0)
    description = pw.TextField(default="")
    expression = pw.TextField()
    actions = JSONField(default=list)
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("priority", "created_at"), False),)


class MailingList(BaseModel):
    address = pw.CharField(max_length=320, unique=True)  # lower case
    domain = pw.CharField(max_length=253, index=True)
    name = pw.CharField(max_length=255, default="")
    description = pw.TextField(default="")
    access_level = pw.CharField(max_length=16, default="readonly")  # readonly | members | everyone
    reply_preference = pw.CharField(max_length=16, default="list")  # list | sender
    created_at = pw.FloatField(default=time.time)


class ListMember(BaseModel):
    mlist = pw.ForeignKeyField(MailingList, backref="members", on_delete="CASCADE")
    address = pw.CharField(max_length=320)  # lower case
    name = pw.CharField(max_length=255, default="")
    vars = JSONField(default=dict)
    subscribed = pw.BooleanField(default=True)
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("mlist", "address"), True),)


class StoredMessage(BaseModel):
    key = pw.CharField(max_length=64, primary_key=True)
    domain = pw.CharField(max_length=253, index=True)
    blob = pw.CharField(max_length=64)
    size = pw.BigIntegerField()
    sender = pw.CharField(max_length=320, default="")
    recipient = pw.CharField(max_length=320, default="")
    created_at = pw.FloatField(default=time.time)
    expires_at = pw.FloatField(index=True)


class RouteJob(BaseModel):
    inbound_job = pw.BigIntegerField(unique=True)
    blob = pw.CharField(max_length=64)
    size = pw.BigIntegerField()
    mail_from = pw.CharField(max_length=320, default="")
    rcpt_tos = JSONField(default=list)
    peer = pw.CharField(max_length=64, default="")
    received_at = pw.FloatField(default=time.time)
    state = pw.CharField(max_length=16, default="queued")  # queued | done | failed
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.FloatField(default=time.time)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.FloatField(null=True)
    last_error = pw.TextField(default="")
    done_steps = JSONField(default=list)
    traced = pw.BooleanField(default=False)  # as InboundJob.traced

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


class SpamVerdict(BaseModel):
    inbound_job = pw.BigIntegerField(unique=True)
    checked = pw.BooleanField(default=False)  # False: spamd could not be asked
    is_spam = pw.BooleanField(default=False)
    score = pw.FloatField(default=0.0)
    spf = pw.CharField(max_length=32, default="")
    created_at = pw.FloatField(default=time.time)


class OutboxItem(BaseModel):
    kind = pw.CharField(max_length=16)  # route | notify | webhook
    domain = pw.CharField(max_length=253, default="")
    url = pw.TextField()
    body = pw.BlobField()
    content_type = pw.CharField(max_length=255)
    headers = JSONField(default=dict)
    state = pw.CharField(max_length=16, default="queued")  # queued | delivered | rejected | failed
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.FloatField(default=time.time)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.FloatField(null=True)
    last_status = pw.IntegerField(null=True)
    last_error = pw.TextField(default="")
    created_at = pw.FloatField(default=time.time)
    updated_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("state", "next_attempt_at"), False),)


class SigningKey(BaseModel):
    id = pw.CharField(max_length=32, primary_key=True)  # "account": one key per installation
    key = pw.CharField(max_length=128)
    created_at = pw.FloatField(default=time.time)


ROUTE_MODELS = [Route, MailingList, ListMember, StoredMessage, RouteJob, SpamVerdict, OutboxItem,
                SigningKey]

from . import models as _models  # noqa: E402 - listed with every table (tests/test_store.py)

_models.ALL_MODELS.extend(m for m in ROUTE_MODELS if m not in _models.ALL_MODELS)
