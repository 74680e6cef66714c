"""Words for counts in what people read: "1 account", "2 accounts"."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`count` and the noun, singular for exactly one: plural(1, "account") -> "1 account"; `many` when the
    plural is not the noun plus "s" (plural(2, "entry", "entries"))."""
    word = noun if count == 1 else (many or f"{noun}s")
    return f"{count} {word}"  # plain, as the counts printed beside it
