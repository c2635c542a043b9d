"""Inbound jobs whose stored message already carries our Received: trace header (added when
the MX accepts it), so mailbox delivery and routes link the accepted body as it is instead of
storing a second copy with the header prepended.  Rows from before this are False."""
from peewee import *


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('inbound_job', 'traced', BooleanField(default=False)),
        migrator.add_column('route_job', 'traced', BooleanField(default=False)))


def down(migrator, db):
    migrator.migrate(
        migrator.drop_column('inbound_job', 'traced'),
        migrator.drop_column('route_job', 'traced'))
