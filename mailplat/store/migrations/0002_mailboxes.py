"""Mailboxes: mailboxes, their folders and filed messages, and the inbound job queue."""
from peewee import *

import time

def up(migrator, db):
    class Mailbox(Model):
        domain = CharField(max_length=253, index=True)
        address = CharField(max_length=320, unique=True)
        password_hash = CharField(max_length=255)
        quota_bytes = BigIntegerField()
        size_bytes = BigIntegerField(default=0)
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'mailbox'
    db.create_tables([Mailbox])

    class MailFolder(Model):
        mailbox = ForeignKeyField(Mailbox, on_delete='CASCADE')
        name = CharField(max_length=512)
        special_use = CharField(max_length=16, default='')
        subscribed = BooleanField(default=True)
        uidvalidity = BigIntegerField()
        uidnext = BigIntegerField(default=1)
        highestmodseq = BigIntegerField(default=1)
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'mail_folder'
            indexes = ((('mailbox', 'name'), True),)
    db.create_tables([MailFolder])

    class MailMessage(Model):
        folder = ForeignKeyField(MailFolder, on_delete='CASCADE')
        uid = BigIntegerField()
        blob = CharField(max_length=64)
        size = BigIntegerField()
        internal_date = FloatField(default=time.time)
        flags = CharField(max_length=1024, default='')
        modseq = BigIntegerField(default=1)
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'mail_message'
            indexes = ((('folder', 'uid'), True), (('folder', 'modseq'), False))
    db.create_tables([MailMessage])

    class InboundJob(Model):
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
        done_rcpts = TextField(default='[]')
        class Meta:
            database = db
            table_name = 'inbound_job'
            indexes = ((('state', 'next_attempt_at'), False),)
    db.create_tables([InboundJob])


def down(migrator, db):
    migrator.migrate(migrator.drop_table('inbound_job'))
    migrator.migrate(migrator.drop_table('mail_message'))
    migrator.migrate(migrator.drop_table('mail_folder'))
    migrator.migrate(migrator.drop_table('mailbox'))
