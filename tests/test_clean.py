"""components/data/clean.py: the fast path (ASCII text, substring checks) equals the plain regex rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from components.data.clean import clean_text, clean_text_regex

ascii_heavy = st.text(" \t\n\r\x0b\x0c\x1c\x1fab.\x00\x7f", max_size=60)
anything = st.text(st.characters(blacklist_categories=()), max_size=60)
mixed = st.text(" \t\n\r\u00a0\u2003\u3000\ufb01e\u0301\u2028\x85ab", max_size=40)


@settings(max_examples=1500, deadline=None)
@given(ascii_heavy | anything | mixed, st.sampled_from(["NFKC", "NFC", "none"]))
def test_fast_path_equals_the_regex_rules(text, form):
    assert clean_text(text, form) == clean_text_regex(text, form)
