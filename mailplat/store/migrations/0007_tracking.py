"""Tracking, suppressions (unsubscribes, complaints, whitelists), webhooks, tags, campaigns,
stats counters and the tracking-link secret."""
from peewee import *

import time

def up(migrator, db):
    class Unsubscribe(Model):
        domain = CharField(max_length=253)
        address = CharField(max_length=320)
        tags = TextField(default='[]')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'unsubscribe'
            indexes = ((('domain', 'address'), True),)

    class Complaint(Model):
        domain = CharField(max_length=253)
        address = CharField(max_length=320)
        count = IntegerField(default=1)
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'complaint'
            indexes = ((('domain', 'address'), True),)

    class Whitelist(Model):
        domain = CharField(max_length=253)
        type = CharField(max_length=16)
        value = CharField(max_length=320)
        reason = TextField(default='')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'whitelist'
            indexes = ((('domain', 'value'), True),)

    class Webhook(Model):
        domain = CharField(max_length=253)
        kind = CharField(max_length=32)
        urls = TextField(default='[]')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'webhook'
            indexes = ((('domain', 'kind'), True),)

    class Tag(Model):
        domain = CharField(max_length=253)
        tag = CharField(max_length=255)
        description = TextField(default='')
        first_seen = FloatField(default=time.time)
        last_seen = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'tag'
            indexes = ((('domain', 'tag'), True),)

    class Campaign(Model):
        domain = CharField(max_length=253)
        campaign_id = CharField(max_length=64)
        name = CharField(max_length=255, default='')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'campaign'
            indexes = ((('domain', 'campaign_id'), True),)

    class StatCounter(Model):
        domain = CharField(max_length=253)
        tag = CharField(max_length=255, default='')
        hour = BigIntegerField()
        key = CharField(max_length=64)
        count = BigIntegerField(default=0)
        class Meta:
            database = db
            table_name = 'stat_counter'
            indexes = ((('domain', 'tag', 'hour', 'key'), True),)

    class TrackingSecret(Model):
        id = CharField(primary_key=True, max_length=32)
        secret = CharField(max_length=128)
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'tracking_secret'

    db.create_tables([Unsubscribe, Complaint, Whitelist, Webhook, Tag, Campaign, StatCounter,
                      TrackingSecret])
    import secrets
    TrackingSecret.create(id='tracking', secret=secrets.token_hex(32), created_at=time.time())


def down(migrator, db):
    for name in ('tracking_secret', 'stat_counter', 'campaign', 'tag', 'webhook', 'whitelist',
                 'complaint', 'unsubscribe'):
        migrator.migrate(migrator.drop_table(name))
