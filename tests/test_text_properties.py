"""Property tests (hypothesis) of the text pipeline: the incremental detokenizer and
the stop-string matcher, over the random token sequences of the tiny random model
(byte-level pieces that often split characters) and stop strings drawn from them.
Stop strings end a generation at the first delta after which one is complete, and the
text is cut where the earliest complete one starts: a stream cannot wait to learn
whether a stop string that starts earlier will complete later."""

from __future__ import annotations

import zse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROMPT = "Once upon a time"
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def run(engine: zse.Engine, **kw: object) -> tuple[list[str], zse.Completion]:
    stream = engine.stream(PROMPT, **kw)
    deltas = list(stream)
    whole = engine.generate(PROMPT, **kw)
    return deltas, whole


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    max_tokens=st.integers(1, 48),
    temperature=st.floats(0.3, 2.0),
)
def test_deltas_join_to_the_whole_text_without_splitting_characters(
    tiny_engine: zse.Engine, seed: int, max_tokens: int, temperature: float
) -> None:
    kw = {"seed": seed, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True}
    deltas, whole = run(tiny_engine, **kw)
    # A character split between deltas would show as replacement characters in the
    # stream where the tokens decoded all at once have the character itself.
    assert "".join(deltas) == whole.text == tiny_engine.detokenize(whole.token_ids)
    assert all(d for d in deltas)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32 - 1), max_tokens=st.integers(4, 48))
def test_stop_strings_cut_the_text_and_never_stream(
    tiny_engine: zse.Engine, data: st.DataObject, seed: int, max_tokens: int
) -> None:
    kw = {"seed": seed, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
    free_deltas = list(tiny_engine.stream(PROMPT, **kw))
    free = "".join(free_deltas)
    if len(free) < 2:
        return
    # Stop strings taken from the free text (so they do occur), plus maybe one that
    # does not occur.
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(free) - 1))
        length = data.draw(st.integers(1, min(4, len(free) - start)))
        stops.append(free[start : start + length])
    if data.draw(st.booleans()):
        stops.append("\u2603 never")
    deltas, whole = run(tiny_engine, **kw, stop=stops)
    # Generation stops at the first delta after which some stop string is complete;
    # the text is cut where the earliest of the stop strings complete by then starts.
    ends = [free.find(s) + len(s) for s in stops if s in free]
    boundary = 0
    for d in free_deltas:
        boundary += len(d)
        if boundary >= min(ends):
            break
    first = min(free.find(s) for s in stops if s in free and free.find(s) + len(s) <= boundary)
    assert whole.text == free[:first]
    assert whole.finish_reason == "stop"
    assert "".join(deltas) == whole.text
    for s in stops:
        assert all(s not in d for d in deltas)
