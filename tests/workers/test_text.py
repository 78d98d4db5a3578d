"""Incremental detokenisation with stop strings."""

from hypothesis import given
from hypothesis import strategies as st

from workers.engines.text import Detokenizer


def decoder(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


WORDS = {i: w.encode() for i, w in enumerate(["Hel", "lo", " wor", "ld", "!", " STOP", " more"])}


def run(detok: Detokenizer, ids: list[int]) -> str:
    return "".join(detok.push(i) for i in ids) + detok.flush()


class TestDetokenizer:
    def test_emits_everything_without_stop_strings(self):
        assert run(Detokenizer(decoder(WORDS), []), [0, 1, 2, 3, 4]) == "Hello world!"

    def test_cuts_before_a_stop_string_and_says_it_stopped(self):
        detok = Detokenizer(decoder(WORDS), [" STOP"])
        assert run(detok, [0, 1, 5, 6]) == "Hello"
        assert detok.stopped

    def test_never_emits_the_beginning_of_a_stop_string_that_then_completes(self):
        detok = Detokenizer(decoder(WORDS), ["o w"])
        emitted = [detok.push(i) for i in [0, 1]]  # "Hello" could be followed by " w"
        assert "".join(emitted) == "Hell"
        assert detok.push(2) == ""  # " wor" completes "o w"
        assert detok.stopped

    def test_held_text_is_released_when_the_stop_string_does_not_come(self):
        detok = Detokenizer(decoder(WORDS), ["o!"])
        assert run(detok, [0, 1, 2]) == "Hello wor"
        assert not detok.stopped

    def test_incomplete_utf8_is_held_until_the_character_completes(self):
        euro = "€".encode()  # three bytes
        pieces = {0: b"a", 1: euro[:1], 2: euro[1:2], 3: euro[2:]}
        detok = Detokenizer(decoder(pieces), [])
        assert [detok.push(i) for i in range(4)] == ["a", "", "", "€"]


@given(
    st.lists(st.sampled_from(sorted(WORDS)), max_size=30), st.sampled_from(["", "lo", "d!", " w"])
)
def test_streamed_text_equals_the_decoded_text_up_to_the_stop(ids, stop):
    text = decoder(WORDS)(ids)
    expected = text[: text.index(stop)] if stop and stop in text else text
    assert run(Detokenizer(decoder(WORDS), [stop]), ids) == expected
