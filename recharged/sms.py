"""SMS segment counting as carriers bill it (GSM 03.38 default alphabet, else UCS-2)."""

from __future__ import annotations

from typing import Literal

Encoding = Literal["gsm7", "ucs2"]

# The 127 characters of the GSM 03.38 default alphabet, in table order. Position 0x1B is the escape
# to the extension table, which is not a character of its own, so it is left out.
_GSM7_BASIC: frozenset[str] = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Characters of the extension table: each is sent as escape + char, so costs two septets.
_GSM7_EXTENSION: frozenset[str] = frozenset("\x0c^{}\\[~]|€")

_GSM7_SINGLE = 160
_GSM7_MULTI = 153
_UCS2_SINGLE = 70
_UCS2_MULTI = 67


def _is_gsm7(text: str) -> bool:
    return all(ch in _GSM7_BASIC or ch in _GSM7_EXTENSION for ch in text)


def encoding_of(text: str) -> Encoding:
    """Return "gsm7" if every character is in the GSM 03.38 alphabet or its extension, else "ucs2"."""
    return "gsm7" if _is_gsm7(text) else "ucs2"


def _septets(ch: str) -> int:
    return 2 if ch in _GSM7_EXTENSION else 1


def _code_units(ch: str) -> int:
    return 2 if ord(ch) > 0xFFFF else 1


def count_segments(text: str) -> int:
    """Return how many SMS segments `text` is billed as; the empty message is one segment.

    Multi-part messages are split greedily and never split an escape pair (GSM-7) or a surrogate
    pair (UCS-2) across two segments.
    """
    if _is_gsm7(text):
        cost, single, multi = _septets, _GSM7_SINGLE, _GSM7_MULTI
    else:
        cost, single, multi = _code_units, _UCS2_SINGLE, _UCS2_MULTI

    costs = [cost(ch) for ch in text]
    if sum(costs) <= single:
        return 1

    segments = 1
    used = 0
    for c in costs:
        if used + c > multi:
            segments += 1
            used = 0
        used += c
    return segments
