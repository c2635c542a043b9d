"""The events API's substring index: event_text holds each event's lower-cased subject, from
and attachment text (core.eventquery.search_text), one row per event, deleted with it; on
SQLite an FTS5 trigram table over it (external content, kept in step by triggers), on
PostgreSQL a pg_trgm GIN index (pg_trgm ships with PostgreSQL's contrib and is a trusted
extension since 13, so the database's owner may create it).  Existing events are backfilled."""
import json

from peewee import *

from mailplat.core.eventquery import search_text

COLUMNS = ("subject", "from_text", "attachment")
BACKFILL_CHUNK = 5000


def up(migrator, db):
    class Event(Model):
        data = TextField()
        class Meta:
            database = db
            table_name = 'event'

    class EventText(Model):
        event = ForeignKeyField(Event, primary_key=True, column_name='event_row', on_delete='CASCADE')
        subject = TextField(default='')
        from_text = TextField(default='')
        attachment = TextField(default='')
        class Meta:
            database = db
            table_name = 'event_text'
    db.create_tables([EventText])

    cols = ", ".join(COLUMNS)
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        _backfill(db, Event, EventText)
        db.execute_sql("CREATE INDEX event_text_trgm ON event_text USING gin ("
                       + ", ".join(f"{c} gin_trgm_ops" for c in COLUMNS) + ")")
        return
    db.execute_sql(f"CREATE VIRTUAL TABLE event_fts USING fts5({cols}, content='event_text', "
                   "content_rowid='event_row', tokenize='trigram case_sensitive 1')")
    new = ", ".join(f"new.{c}" for c in COLUMNS)
    old = ", ".join(f"old.{c}" for c in COLUMNS)
    db.execute_sql("CREATE TRIGGER event_text_ai AFTER INSERT ON event_text BEGIN "
                   f"INSERT INTO event_fts (rowid, {cols}) VALUES (new.event_row, {new}); END")
    db.execute_sql("CREATE TRIGGER event_text_ad AFTER DELETE ON event_text BEGIN "
                   f"INSERT INTO event_fts (event_fts, rowid, {cols}) VALUES ('delete', old.event_row, {old}); END")
    _backfill(db, Event, EventText)


def _backfill(db, Event, EventText):
    last = 0
    while True:
        rows = list(Event.select(Event.id, Event.data).where(Event.id > last).order_by(Event.id)
                    .limit(BACKFILL_CHUNK).tuples())
        if not rows:
            return
        with db.atomic():
            EventText.insert_many([{"event": rid, **search_text(json.loads(data))} for rid, data in rows]).execute()
        last = rows[-1][0]


def down(migrator, db):
    if not isinstance(db, PostgresqlDatabase):
        for name in ("TRIGGER event_text_ai", "TRIGGER event_text_ad", "TABLE event_fts"):
            db.execute_sql(f"DROP {name} IF EXISTS")
    migrator.migrate(migrator.drop_table('event_text'))
