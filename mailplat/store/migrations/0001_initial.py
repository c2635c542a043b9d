"""Initial schema: tenants, mail, queue, events, bounces."""
from peewee import *

import time

def up(migrator, db):
    class ApiKey(Model):
        key_id = CharField(unique=True, max_length=32)
        key_hash = CharField(max_length=64)
        role = CharField(max_length=16)
        domain = CharField(null=True, max_length=253)
        description = CharField(default='')
        created_at = FloatField(default=time.time)
        revoked_at = FloatField(null=True)
        is_primary = BooleanField(default=False)
        class Meta:
            database = db
            table_name = 'api_key'
    db.create_tables([ApiKey])

    class Blob(Model):
        sha256 = CharField(primary_key=True, max_length=64)
        size = IntegerField()
        data = BlobField()
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'blob'
    db.create_tables([Blob])

    class Bounce(Model):
        domain = CharField(max_length=253)
        address = CharField(max_length=320)
        code = CharField(max_length=16, default='550')
        error = TextField(default='')
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'bounce'
            indexes = ((('domain', 'address'), True),)
    db.create_tables([Bounce])

    class Domain(Model):
        id = CharField(primary_key=True, max_length=32)
        name = CharField(unique=True, max_length=253)
        state = CharField(max_length=16, default='unverified')
        type = CharField(max_length=16, default='custom')
        created_at = FloatField(default=time.time)
        smtp_login = CharField(max_length=320)
        spam_action = CharField(max_length=16, default='disabled')
        wildcard = BooleanField(default=False)
        force_dkim_authority = BooleanField(default=False)
        dkim_authority = CharField(null=True, max_length=253)
        dkim_selector = CharField(max_length=63, default='mailo')
        dkim_key_size = IntegerField(default=2048)
        web_scheme = CharField(max_length=8, default='http')
        web_prefix = CharField(max_length=63, default='email')
        ips = TextField(default="[]")
        pool_id = CharField(null=True, max_length=64)
        require_tls = BooleanField(default=False)
        skip_verification = BooleanField(default=False)
        tracking_open = BooleanField(default=False)
        tracking_click = BooleanField(default=False)
        tracking_unsubscribe = BooleanField(default=False)
        unsubscribe_html_footer = TextField(default='')
        unsubscribe_text_footer = TextField(default='')
        is_disabled = BooleanField(default=False)
        dns_checks = TextField(default="{}")
        class Meta:
            database = db
            table_name = 'domain'
    db.create_tables([Domain])

    class DkimKey(Model):
        domain = ForeignKeyField(Domain, on_delete='CASCADE')
        selector = CharField(max_length=63)
        key_size = IntegerField()
        private_key_pem = TextField()
        public_key_b64 = TextField()
        created_at = FloatField(default=time.time)
        active = BooleanField(default=True)
        class Meta:
            database = db
            table_name = 'dkim_key'
            indexes = ((('domain', 'selector'), True),)
    db.create_tables([DkimKey])

    class Event(Model):
        event_id = CharField(unique=True, max_length=32)
        domain = CharField(max_length=253)
        event = CharField(max_length=32)
        timestamp = FloatField()
        recipient = CharField(max_length=320, default='')
        message_id = CharField(default='')
        severity = CharField(max_length=16, default='')
        data = TextField()
        class Meta:
            database = db
            table_name = 'event'
            indexes = ((('domain', 'timestamp'), False), (('domain', 'event', 'timestamp'), False), (('domain', 'recipient', 'timestamp'), False), (('domain', 'message_id'), False))
    db.create_tables([Event])

    class Message(Model):
        message_id = CharField(index=True)
        domain = CharField(index=True, max_length=253)
        source = CharField(max_length=16)
        sender = CharField(max_length=320)
        from_header = TextField(default='')
        subject = TextField(default='')
        blob = CharField(max_length=64)
        size = IntegerField()
        headers = TextField(default="{}")
        attachments = TextField(default="[]")
        tags = TextField(default="[]")
        campaigns = TextField(default="[]")
        user_variables = TextField(default="{}")
        recipient_variables = TextField(default="{}")
        options = TextField(default="{}")
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'message'
    db.create_tables([Message])

    class QueueItem(Model):
        message = ForeignKeyField(Message, on_delete='CASCADE')
        recipient = CharField(max_length=320)
        rcpt_domain = CharField(max_length=253)
        state = CharField(max_length=16, default='queued')
        attempts = IntegerField(default=0)
        next_attempt_at = FloatField(default=time.time)
        lease_owner = CharField(null=True, max_length=64)
        lease_until = FloatField(null=True)
        last_code = IntegerField(null=True)
        last_error = TextField(default='')
        created_at = FloatField(default=time.time)
        updated_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'queue_item'
            indexes = ((('state', 'next_attempt_at'), False),)
    db.create_tables([QueueItem])

    class SmtpCredential(Model):
        domain = ForeignKeyField(Domain, on_delete='CASCADE')
        login = CharField(unique=True, max_length=320)
        password_hash = CharField()
        created_at = FloatField(default=time.time)
        class Meta:
            database = db
            table_name = 'smtp_credential'
    db.create_tables([SmtpCredential])


def down(migrator, db):
    migrator.migrate(migrator.drop_table('smtp_credential'))
    migrator.migrate(migrator.drop_table('queue_item'))
    migrator.migrate(migrator.drop_table('message'))
    migrator.migrate(migrator.drop_table('event'))
    migrator.migrate(migrator.drop_table('dkim_key'))
    migrator.migrate(migrator.drop_table('domain'))
    migrator.migrate(migrator.drop_table('bounce'))
    migrator.migrate(migrator.drop_table('blob'))
    migrator.migrate(migrator.drop_table('api_key'))
