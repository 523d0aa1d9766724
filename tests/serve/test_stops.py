"""Stop strings over text that arrives in pieces: the same cut as searching the whole text so far after
every piece, with a bounded amount of searching per piece."""

from __future__ import annotations

import random

import pytest

from lcc.serve import stops
from lcc.serve.stops import StopScan


def first_stop_everywhere(text: str, stop_strings: list[str]) -> int | None:
    """Where the earliest stop string begins in the text, looked for the slow way: at every position."""
    for i in range(len(text)):
        if any(text.startswith(s, i) for s in stop_strings):
            return i
    return None


def cut_as_it_grows(parts: list[str], stop_strings: list[str]) -> tuple[str, bool]:
    """The text as a generator ends it: after each piece the whole text so far is searched; once a stop
    string is in it, the text ends where the earliest one begins."""
    text = ""
    for part in parts:
        text += part
        at = first_stop_everywhere(text, stop_strings)
        if at is not None:
            return text[:at], True
    return text, False


def pieces(rng: random.Random, text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 1, 2, 3, 7])
        out.append(text[i:i + n])
        i += n
    return out


def through_scan(parts: list[str], stop_strings: list[str]) -> tuple[str, bool, list[str]]:
    """What a StopScan hands out for these pieces (held-back text flushed at the end when no stop string
    ended it), whether one did, and each step's output."""
    scan, out, steps = StopScan(stop_strings), [], []
    for part in parts:
        text, stopped = scan.add(part)
        out.append(text)
        steps.append(text)
        if stopped:
            return "".join(out), True, steps
    out.append(scan.flush())
    return "".join(out), False, steps


@pytest.mark.parametrize("seed", range(4))
def test_the_scan_cuts_where_searching_the_whole_text_after_each_piece_does(seed):
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice("abc\u00e9 ") for _ in range(rng.randrange(0, 60)))
        stop_strings = ["".join(rng.choice("abc\u00e9 ") for _ in range(rng.randrange(1, 5)))
                        for _ in range(rng.randrange(0, 4))]
        parts = pieces(rng, text)
        got, stopped, steps = through_scan(parts, stop_strings)
        expected, expected_stop = cut_as_it_grows(parts, stop_strings)
        assert (got, stopped) == (expected, expected_stop), (parts, stop_strings)
        emitted = ""
        for step in steps:  # nothing handed out is ever taken back by a stop string found later
            emitted += step
            assert expected.startswith(emitted)


def test_each_character_is_searched_a_bounded_number_of_times(monkeypatch):
    """10,000 one-character pieces against stop strings of up to 5 characters: each search covers the new
    piece and at most the 4 characters held back before it, not the text so far."""
    searched = []
    real = stops.first_stop

    def counting(window: str, stop_strings: list[str]) -> int:
        searched.append(len(window))
        return real(window, stop_strings)

    monkeypatch.setattr(stops, "first_stop", counting)
    scan = StopScan(["xyzzy", "qq"])
    text = "".join(random.Random(0).choice("abcdxyz") for _ in range(10_000))
    assert "xyzzy" not in text and "qq" not in text
    out = "".join(scan.add(ch)[0] for ch in text) + scan.flush()
    assert out == text
    assert max(searched) <= 5 and sum(searched) <= 5 * len(text)


def test_a_stop_string_split_over_pieces_is_found_and_what_could_begin_it_is_held_back():
    scan = StopScan(["END"])
    assert scan.add("abcE") == ("ab", False)  # the last 2 characters could begin "END"
    assert scan.add("N") == ("c", False)
    assert scan.add("Dtail") == ("", True)  # the text ends before the stop string: "abc"
    assert scan.flush() == ""
