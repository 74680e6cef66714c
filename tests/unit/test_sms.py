"""SMS segment counting: GSM 03.38 / UCS-2 encoding choice and carrier-style splitting."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recharged.sms import count_segments, encoding_of

# Written out independently of the module under test, straight from the GSM 03.38 table.
GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = "\x0c^{}\\[~]|€"
NON_GSM = ["ç", "`", "\x1b", "😀", "中", "á", "\t", "\U0001f44d"]

EMOJI = "😀"  # U+1F600, outside the BMP: one surrogate pair in UTF-16


def septets(text: str) -> int:
    return sum(2 if ch in GSM_EXTENSION else 1 for ch in text)


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


gsm_chars = st.sampled_from(GSM_BASIC + GSM_EXTENSION)
gsm_text = st.text(alphabet=gsm_chars, max_size=500)
any_char = st.one_of(
    gsm_chars,
    st.sampled_from(NON_GSM),
    st.characters(exclude_categories=["Cs"]),
)
any_text = st.text(alphabet=any_char, max_size=400)


@st.composite
def ucs2_text(draw: st.DrawFn) -> str:
    """Text guaranteed to need UCS-2: arbitrary text with one non-GSM character spliced in."""
    base = draw(any_text)
    odd = draw(st.sampled_from(NON_GSM))
    at = draw(st.integers(min_value=0, max_value=len(base)))
    return base[:at] + odd + base[at:]


# --- alphabet ------------------------------------------------------------------------------------


def test_default_alphabet_has_127_characters() -> None:
    assert len(set(GSM_BASIC)) == 127


@pytest.mark.parametrize("ch", list(GSM_BASIC + GSM_EXTENSION))
def test_every_gsm_character_is_gsm7(ch: str) -> None:
    assert encoding_of(ch) == "gsm7"
    assert encoding_of("hello " + ch) == "gsm7"


@pytest.mark.parametrize("ch", ["ç", "`", "\x1b", EMOJI, "中", "á", "\t", "\x00", "Ä\u0308"])
def test_one_non_gsm_character_switches_to_ucs2(ch: str) -> None:
    assert encoding_of("Your balance is low " + ch) == "ucs2"
    # 100 GSM chars fit one GSM-7 segment, but with a non-GSM char they are 101-102 UCS-2 units: two.
    assert count_segments("a" * 100) == 1
    assert count_segments("a" * 100 + ch) == 2


def test_empty_message_is_gsm7() -> None:
    assert encoding_of("") == "gsm7"


# --- GSM-7 ---------------------------------------------------------------------------------------


def test_empty_message_is_one_segment() -> None:
    assert count_segments("") == 1


def test_160_gsm_characters_are_one_segment() -> None:
    assert count_segments("a" * 160) == 1


def test_161_gsm_characters_are_two_segments() -> None:
    assert count_segments("a" * 161) == 2


def test_306_gsm_characters_are_two_segments_and_307_are_three() -> None:
    assert count_segments("a" * 306) == 2
    assert count_segments("a" * 307) == 3


def test_459_gsm_characters_are_three_segments_and_460_are_four() -> None:
    assert count_segments("x" * 459) == 3
    assert count_segments("x" * 460) == 4


def test_extension_characters_count_two_septets() -> None:
    assert count_segments("€" * 80) == 1  # 160 septets
    assert count_segments("€" * 81) == 2  # 162 septets
    assert count_segments("a" * 158 + "{") == 1  # 160 septets
    assert count_segments("a" * 159 + "}") == 2  # 161 septets
    assert count_segments("\x0c" * 80) == 1
    assert count_segments("\x0c" * 81) == 2


def test_escape_pair_is_not_split_across_segments() -> None:
    # 152 + 2 + 152 = 306 septets would fit 2 x 153, but the euro's escape pair cannot straddle
    # the boundary: segments are 152 | € + 151 (153) | 1.
    text = "a" * 152 + "€" + "a" * 152
    assert septets(text) == 306
    assert count_segments(text) == 3
    # Moved one character earlier the pair fits whole in the first segment: 151 + 2 | 153.
    assert count_segments("a" * 151 + "€" + "a" * 153) == 2


def test_all_extension_characters_fill_76_per_segment() -> None:
    # 76 pairs = 152 septets; a 77th pair would need 154 > 153.
    assert count_segments("^" * 152) == 2
    assert count_segments("^" * 153) == 3


# --- UCS-2 ---------------------------------------------------------------------------------------


def test_70_ucs2_units_are_one_segment_and_71_are_two() -> None:
    assert count_segments("ç" * 70) == 1
    assert count_segments("ç" * 71) == 2


def test_134_ucs2_units_are_two_segments_and_135_are_three() -> None:
    assert count_segments("中" * 134) == 2
    assert count_segments("中" * 135) == 3


def test_emoji_counts_two_code_units() -> None:
    assert encoding_of(EMOJI) == "ucs2"
    assert count_segments(EMOJI * 35) == 1  # 70 units
    assert count_segments(EMOJI * 36) == 2  # 72 units
    assert count_segments("ç" * 68 + EMOJI) == 1  # 70 units
    assert count_segments("ç" * 69 + EMOJI) == 2  # 71 units


def test_surrogate_pair_is_not_split() -> None:
    # 66 + 2 + 66 = 134 units would fit 2 x 67, but the emoji cannot straddle the boundary:
    # segments are 66 | emoji + 65 (67) | 1.
    text = "a" * 66 + EMOJI + "a" * 66
    assert utf16_units(text) == 134
    assert count_segments(text) == 3
    assert count_segments("a" * 65 + EMOJI + "a" * 67) == 2


def test_all_emoji_fill_33_per_segment() -> None:
    assert count_segments(EMOJI * 66) == 2  # 33 + 33
    assert count_segments(EMOJI * 67) == 3


# --- properties ----------------------------------------------------------------------------------


@given(any_text)
def test_segments_are_at_least_one(text: str) -> None:
    assert count_segments(text) >= 1


@given(any_text, any_char)
def test_appending_a_character_never_decreases_segments(text: str, ch: str) -> None:
    assert count_segments(text + ch) >= count_segments(text)


@given(gsm_text)
def test_gsm_text_segments_follow_septet_count(text: str) -> None:
    assert encoding_of(text) == "gsm7"
    n = septets(text)
    segments = count_segments(text)
    assert (segments == 1) == (n <= 160)
    if n > 160:
        # Each full segment holds 153 septets, or 152 when an escape pair would straddle.
        assert math.ceil(n / 153) <= segments <= math.ceil(n / 152)


@given(st.text(alphabet=st.sampled_from(GSM_BASIC), min_size=161, max_size=800))
def test_gsm_text_without_extension_characters_is_exactly_ceil_153(text: str) -> None:
    assert count_segments(text) == math.ceil(len(text) / 153)


@given(ucs2_text())
def test_ucs2_text_segments_follow_code_unit_count(text: str) -> None:
    assert encoding_of(text) == "ucs2"
    n = utf16_units(text)
    segments = count_segments(text)
    assert (segments == 1) == (n <= 70)
    if n > 70:
        # Each full segment holds 67 units, or 66 when a surrogate pair would straddle.
        assert math.ceil(n / 67) <= segments <= math.ceil(n / 66)


@given(st.text(alphabet=st.sampled_from(["ç", "中", "a", "€", "`"]), min_size=71, max_size=500))
def test_bmp_only_ucs2_text_is_exactly_ceil_67(text: str) -> None:
    if encoding_of(text) != "ucs2":
        text += "ç"
    assert count_segments(text) == math.ceil(utf16_units(text) / 67)
