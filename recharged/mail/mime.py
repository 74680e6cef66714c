"""An outbox message as MIME: its stable Message-ID and its bytes (text and HTML alternatives rendered from the
message's template), fixed once, on the first claim, so that every re-send is byte-for-byte the same."""

from __future__ import annotations

import re
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime

from recharged.config import Settings
from recharged.mail.templating import render
from recharged.store.models import OutboxMessage


def message_id_for(key: str, from_address: str) -> str:
    """The stable Message-ID of the message with this key: `<recharged.receipt.R-000042@example.com>`."""
    local = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]", ".", key)).strip(".")
    domain = from_address.rpartition("@")[2]
    return f"<recharged.{local}@{domain}>"


def build_message(settings: Settings, row: OutboxMessage) -> tuple[str, str, str]:
    """Render a message and fix its bytes: (Message-ID, subject, RFC 5322 text with CRLF line ends)."""
    smtp = settings.smtp
    rendered = render(settings, row.kind, row.context)
    message = EmailMessage()
    message["Subject"] = rendered.subject
    sender_name = smtp.from_name or settings.business.name
    message["From"] = Address(sender_name, addr_spec=smtp.from_address)
    message["To"] = row.to_address
    if smtp.reply_to:
        message["Reply-To"] = smtp.reply_to
    message["Date"] = format_datetime(row.created_at)
    message_id = message_id_for(row.key, smtp.from_address)
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"
    message["X-Recharged-Kind"] = row.kind
    message.set_content(rendered.text, cte="quoted-printable")
    message.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    try:
        raw = message.as_string(policy=SMTP)
    except (UnicodeError, ValueError):  # an address that needs SMTPUTF8
        raw = message.as_string(policy=SMTPUTF8)
    return message_id, rendered.subject, raw
