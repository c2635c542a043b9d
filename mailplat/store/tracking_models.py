"""Tables of tracking, suppressions, webhooks, tags, campaigns and stats counters.

Owned here: Unsubscribe (an address unsubscribed from a domain, from all mail `*` or from some
tags), Complaint (an address that reported spam), Whitelist (addresses or domains never
bounce-suppressed), Webhook (a domain's URLs for one event kind), Tag and Campaign (with their
first/last use), StatCounter (event counts per domain, tag and hour, kept in the transaction
of each event so stats read a few hundred rows, never the events) and TrackingSecret (the key
that signs open/click/unsubscribe links).  Migration 0007_tracking builds them; they add
themselves to models.ALL_MODELS on import.  core.tracking, core.webhooks, core.stats and the
suppressions API use them.
"""
from __future__ import annotations

import time

import peewee as pw

from . import models
from .models import BaseModel, JSONField


class Unsubscribe(BaseModel):
    domain = pw.CharField(max_length=253)
    address = pw.CharField(max_length=320)  # lower case
    tags = JSONField(default=list)  # ["*"] = all mail of the domain
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("domain", "address"), True),)


class Complaint(BaseModel):
    domain = pw.CharField(max_length=253)
    address = pw.CharField(max_length=320)
    count = pw.IntegerField(default=1)
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("domain", "address"), True),)


class Whitelist(BaseModel):
    domain = pw.CharField(max_length=253)
    type = pw.CharField(max_length=16)  # address | domain
    value = pw.CharField(max_length=320)
    reason = pw.TextField(default="")
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("domain", "value"), True),)


class Webhook(BaseModel):
    domain = pw.CharField(max_length=253)
    kind = pw.CharField(max_length=32)  # accepted, delivered, opened, ... permanent_fail
    urls = JSONField(default=list)
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("domain", "kind"), True),)


class Tag(BaseModel):
    domain = pw.CharField(max_length=253)
    tag = pw.CharField(max_length=255)
    description = pw.TextField(default="")
    first_seen = pw.FloatField(default=time.time)
    last_seen = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("domain", "tag"), True),)


class Campaign(BaseModel):
    domain = pw.CharField(max_length=253)
    campaign_id = pw.CharField(max_length=64)
    name = pw.CharField(max_length=255, default="")
    created_at = pw.FloatField(default=time.time)

    class Meta:
        indexes = ((("domain", "campaign_id"), True),)


class StatCounter(BaseModel):
    domain = pw.CharField(max_length=253)
    tag = pw.CharField(max_length=255, default="")  # "" = every message of the domain
    hour = pw.BigIntegerField()  # epoch seconds of the hour's start (UTC)
    key = pw.CharField(max_length=64)  # e.g. accepted.outgoing, failed.permanent.bounce
    count = pw.BigIntegerField(default=0)

    class Meta:
        indexes = ((("domain", "tag", "hour", "key"), True),)

    @classmethod
    def bump_many(cls, rows: list[tuple]) -> None:
        """Add (domain, tag, hour, key, n) rows to the counters in ONE upsert statement (this
        runs for every event, inside its transaction, so it is kept to a single round trip)."""
        if not rows:
            return
        db = cls._meta.database
        p = db.param
        values = ", ".join([f"({p}, {p}, {p}, {p}, {p})"] * len(rows))
        sql = (f'INSERT INTO stat_counter (domain, tag, hour, "key", "count") VALUES {values} '
               'ON CONFLICT (domain, tag, hour, "key") DO UPDATE SET "count" = stat_counter."count" + excluded."count"')
        db.execute_sql(sql, [x for row in rows for x in row])


class TrackingSecret(BaseModel):
    id = pw.CharField(max_length=32, primary_key=True)  # "tracking"
    secret = pw.CharField(max_length=128)
    created_at = pw.FloatField(default=time.time)


TRACKING_MODELS = [Unsubscribe, Complaint, Whitelist, Webhook, Tag, Campaign, StatCounter,
                   TrackingSecret]
models.ALL_MODELS.extend(m for m in TRACKING_MODELS if m not in models.ALL_MODELS)
