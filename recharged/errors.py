"""recharged's one error tree. Every exception recharged raises on purpose derives from RechargedError; a command
that ends with one prints its message (no traceback) and exits with its code.

RechargedError                 1  the base: something recharged refuses or cannot do
├── ConfigError               78  config.toml, the environment or a credential is wrong (EX_CONFIG)
├── InputError                 2  an argument, a CSV row or an API payload is wrong; nothing was written
│   ├── ActorError             2  a billing change was not signed with a first and last name
│   └── SignatureError         2  a webhook body is not signed with our secret, or was signed too long ago
├── NotFoundError              3  an account (or other record) that was named does not exist
├── ConflictError              4  the request contradicts what is recorded (same id, different content)
├── RejectedRowsError         65  an import recorded its good rows but rejected some (EX_DATAERR; --accept-rejects: 0)
├── DatabaseError             69  the database is missing, not migrated, or unreachable (EX_UNAVAILABLE)
├── InstanceError             75  another daemon already works on this SQLite database (EX_TEMPFAIL)
├── PaymentError               1  the processor refused a request, and not because of the card (key, bad request)
│   └── NoSuchCardError        1  the processor holds no such card for that customer (a card we were given wrong)
├── TransientPaymentError      1  the processor could not be reached or asked us to slow down; outcome unknown
│   └── ProcessorFault         1  a charge got a 5xx the processor may have stored against its key: look it up
├── RetryLater                 1  an event cannot be acted on yet (its payment is not credited yet): tried again later
├── MailError                  1  the mail server refused or could not be reached
│   ├── TransientSmtpError     1  connection trouble or a 4xx: try again later
│   └── PermanentSmtpError     1  a 5xx: this message will never be accepted as it is
└── TemplateRenderError        1  an email template could not be rendered (a broken override, a missing value)

The pure core's parsers (money, rating, clock) raise ValueError; the services catch it and raise InputError
naming what was wrong and where.
"""

from __future__ import annotations


class RechargedError(Exception):
    """Base of every error recharged raises on purpose."""

    exit_code = 1


class ConfigError(RechargedError):
    """The configuration is invalid; nothing starts."""

    exit_code = 78


class InputError(RechargedError):
    """Bad input: the message names what was wrong and where."""

    exit_code = 2


class ActorError(InputError):
    """A billing change needs a signature: the admin's first and last name."""


class SignatureError(InputError):
    """The body is not signed with our endpoint secret, or was signed too long ago."""


class NotFoundError(RechargedError):
    """A named record does not exist."""

    exit_code = 3


class ConflictError(RechargedError):
    """The input contradicts what is already recorded."""

    exit_code = 4


class RejectedRowsError(RechargedError):
    """An import recorded its good rows and rejected others: a cron job must notice the unbilled ones."""

    exit_code = 65


class DatabaseError(RechargedError):
    """The database cannot be used as it is (missing, not migrated, unreachable)."""

    exit_code = 69


class InstanceError(RechargedError):
    """Another daemon already works on this SQLite database."""

    exit_code = 75  # EX_TEMPFAIL


class PaymentError(RechargedError):
    """A permanent processor problem that is not the card's: a missing or wrong key, a bad request."""


class NoSuchCardError(PaymentError):
    """The processor holds no card with that id for that customer (no such payment method, one attached to
    another customer, or not a card): the id we were given is wrong, which is no fault of the card."""


class TransientPaymentError(RechargedError):
    """The processor could not be reached or asked us to slow down; the outcome of the request is unknown."""


class ProcessorFault(TransientPaymentError):
    """The processor answered a keyed request (a charge) with a 5xx and did not ask for a retry. Stripe may have
    stored that answer against the idempotency key and would replay it, so the key is not sent again: the payment
    is looked up by what we sent instead."""


class RetryLater(RechargedError):
    """Something an event is about is not there yet (a refund of a payment whose credit is still being posted):
    the event stays in the inbox and is handled again later."""


class MailError(RechargedError):
    """The mail server refused a message or could not be reached."""


class TransientSmtpError(MailError):
    """Worth another try later: the connection failed (`connection`) or the server answered 4xx."""

    def __init__(self, message: str, *, connection: bool) -> None:
        super().__init__(message)
        self.connection = connection


class PermanentSmtpError(MailError):
    """The server answered 5xx: this message will never be accepted as it is."""


class TemplateRenderError(RechargedError):
    """A template could not be rendered (a broken override, a missing value)."""
