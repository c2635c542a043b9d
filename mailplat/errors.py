"""The one error tree.

Core raises these; each adapter has one translator (api.middleware for HTTP, smtpd for SMTP
replies, mailaccess for IMAP/POP3).  Each class knows its HTTP status and its SMTP reply.
Messages are safe to show to the client; details belong in the log.
"""
from __future__ import annotations


class MailplatError(Exception):
    http_status = 500
    smtp_reply = "451 4.3.0 Temporary server error, try again later"

    def __init__(self, message: str = "", **extra):
        super().__init__(message)
        self.message = message or self.__class__.__doc__ or "error"
        self.extra = extra


class InputError(MailplatError):
    """Bad request"""
    http_status = 400
    smtp_reply = "501 5.5.4 Syntax error in parameters or arguments"


class AuthError(MailplatError):
    """Invalid private key"""
    http_status = 401
    smtp_reply = "535 5.7.8 Authentication credentials invalid"


class ForbiddenError(MailplatError):
    """Forbidden"""
    http_status = 403
    smtp_reply = "550 5.7.1 Not authorised to send for this domain"


class PaymentRequired(MailplatError):
    """Request failed: parameters were valid but the request failed"""
    http_status = 402
    smtp_reply = "554 5.7.0 Request failed"


class NotFound(MailplatError):
    """Not found"""
    http_status = 404
    smtp_reply = "550 5.1.1 Mailbox unavailable"


class Conflict(InputError):
    """Already exists"""
    http_status = 400


class TooLarge(MailplatError):
    """Request entity too large"""
    http_status = 413
    smtp_reply = "552 5.3.4 Message size exceeds fixed limit"


class RateLimited(MailplatError):
    """Too many requests"""
    http_status = 429
    smtp_reply = "421 4.7.0 Too many requests, try again later"

    def __init__(self, message: str = "", retry_seconds: int = 60):
        super().__init__(message, retry_seconds=retry_seconds)
        self.retry_seconds = retry_seconds


class TemporaryError(MailplatError):
    """Temporary failure, try again later"""
    http_status = 503
    smtp_reply = "451 4.3.0 Temporary failure, try again later"


class PermanentError(MailplatError):
    """Permanent failure"""
    http_status = 400
    smtp_reply = "554 5.0.0 Permanent failure"
