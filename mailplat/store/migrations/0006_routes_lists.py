"""Routes, mailing lists and members, stored messages, route jobs, spam verdicts, the hooks
outbox and the HTTP signing key."""
from peewee import *

import time

def up(migrator, db):
    class Route(Model):
        id = CharField(primary_key=True, max_length=32)
        priority = IntegerField(default=0)
        description = TextField(default='')
        expression = TextField()
        actions = TextField(default='[]')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'route'
            indexes = ((('priority', 'created_at'), False),)
    db.create_tables([Route])

    class MailingList(Model):
        address = CharField(unique=True, max_length=320)
        domain = CharField(max_length=253, index=True)
        name = CharField(max_length=255, default='')
        description = TextField(default='')
        access_level = CharField(max_length=16, default='readonly')
        reply_preference = CharField(max_length=16, default='list')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'mailing_list'
    db.create_tables([MailingList])

    class ListMember(Model):
        mlist = ForeignKeyField(MailingList, on_delete='CASCADE')
        address = CharField(max_length=320)
        name = CharField(max_length=255, default='')
        vars = TextField(default='{}')
        subscribed = BooleanField(default=True)
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'list_member'
            indexes = ((('mlist', 'address'), True),)
    db.create_tables([ListMember])

    class StoredMessage(Model):
        key = CharField(primary_key=True, max_length=64)
        domain = CharField(max_length=253, index=True)
        blob = CharField(max_length=64)
        size = BigIntegerField()
        sender = CharField(max_length=320, default='')
        recipient = CharField(max_length=320, default='')
        created_at = FloatField(default=time.time)
        expires_at = FloatField(index=True)
        class Meta:
            database = db
            table_name = 'stored_message'
    db.create_tables([StoredMessage])

    class RouteJob(Model):
        inbound_job = BigIntegerField(unique=True)
        blob = CharField(max_length=64)
        size = BigIntegerField()
        mail_from = CharField(max_length=320, default='')
        rcpt_tos = TextField(default='[]')
        peer = CharField(max_length=64, default='')
        received_at = FloatField(default=time.time)
        state = CharField(max_length=16, default='queued')
        attempts = IntegerField(default=0)
        next_attempt_at = FloatField(default=time.time)
        lease_owner = CharField(null=True, max_length=64)
        lease_until = FloatField(null=True)
        last_error = TextField(default='')
        done_steps = TextField(default='[]')
        class Meta:
            database = db
            table_name = 'route_job'
            indexes = ((('state', 'next_attempt_at'), False),)
    db.create_tables([RouteJob])

    class SpamVerdict(Model):
        inbound_job = BigIntegerField(unique=True)
        checked = BooleanField(default=False)
        is_spam = BooleanField(default=False)
        score = FloatField(default=0.0)
        spf = CharField(max_length=32, default='')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'spam_verdict'
    db.create_tables([SpamVerdict])

    class OutboxItem(Model):
        kind = CharField(max_length=16)
        domain = CharField(max_length=253, default='')
        url = TextField()
        body = BlobField()
        content_type = CharField(max_length=255)
        headers = TextField(default='{}')
        state = CharField(max_length=16, default='queued')
        attempts = IntegerField(default=0)
        next_attempt_at = FloatField(default=time.time)
        lease_owner = CharField(null=True, max_length=64)
        lease_until = FloatField(null=True)
        last_status = IntegerField(null=True)
        last_error = TextField(default='')
        created_at = FloatField(default=time.time)
        updated_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'outbox_item'
            indexes = ((('state', 'next_attempt_at'), False),)
    db.create_tables([OutboxItem])

    class SigningKey(Model):
        id = CharField(primary_key=True, max_length=32)
        key = CharField(max_length=128)
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'signing_key'
    db.create_tables([SigningKey])


def down(migrator, db):
    for name in ('signing_key', 'outbox_item', 'spam_verdict', 'route_job', 'stored_message',
                 'list_member', 'mailing_list', 'route'):
        migrator.migrate(migrator.drop_table(name))
