"""Control flow shared by the smtpd session modules (protocol, authn): `Closed` unwinds a
session's command loop when the client has gone or the session was ended on purpose."""


class Closed(Exception):
    """The client went away or the session was ended; leave the command loop."""
