"""The live thinking context (api/encoders/thinking.py): members' pieces held to line or sentence boundaries,
each part labelled, a member's part ended by its status; members that streamed nothing get their whole block."""

from __future__ import annotations

import pytest

from mom_service.api.encoders.thinking import MAX_HELD, LiveThinking, part_end
from mom_service.engine.events import CallReport, MemberDelta, MemberFinished, StageDone


def member(name: str, stage: str = "answer") -> CallReport:
    return CallReport(name=name, model=f"openai/{name}", stage=stage)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("no boundary yet", ""),
        ("One sentence. And half", "One sentence."),  # the space goes with what follows
        ("A line\nand more", "A line\n"),
        ("Wait!  Then? More", "Wait!  Then?"),
        ('He said "stop." Then', 'He said "stop."'),
        ("It ends here.", ""),  # the space after it (or a newline) decides: "3.14", "e.g." would not end it
        ("Pi is 3.14 or so", ""),
        ("First. Second.\nThird", "First. Second.\n"),
        ("\u4f60\u597d\u3002\u518d", "\u4f60\u597d\u3002"),  # a full-width full stop
    ],
)
def test_a_part_ends_after_its_last_line_or_sentence(text: str, shown: str) -> None:
    assert text[: part_end(text)] == shown


def test_a_boundary_split_over_two_pieces_is_found() -> None:
    held = "Ends here."
    assert part_end(held, len(held)) == 0
    assert part_end(held + " Next", len(held)) == len(held)


def test_an_endless_line_is_shown_at_its_last_space_past_the_limit() -> None:
    text = "word " * (MAX_HELD // 5 + 1) + "half"
    assert len(text) > MAX_HELD
    assert text[: part_end(text)] == "word " * (MAX_HELD // 5 + 1)
    assert part_end("x" * (MAX_HELD + 1)) == MAX_HELD + 1  # no space at all: all of it


def feed(live: LiveThinking, *events: MemberDelta | MemberFinished | StageDone) -> list[str]:
    return [live.delta(e) if isinstance(e, MemberDelta) else live.finished(e) for e in events]


def test_one_member_alone_reads_as_its_whole_block() -> None:
    alpha = member("alpha")
    live = LiveThinking()
    sent = feed(live, MemberDelta(alpha, "Rayleigh "), MemberDelta(alpha, "scattering. It"), MemberDelta(alpha, " is."))
    assert sent == ["", "Model: alpha\nContent: Rayleigh scattering.", ""]
    alpha.answered("Rayleigh scattering. It is.")
    assert feed(live, MemberFinished(alpha)) == [" It is.\n---\n"]
    assert "".join(sent) + " It is.\n---\n" == "Model: alpha\nContent: Rayleigh scattering. It is.\n---\n"


def test_members_take_turns_between_sentences_each_part_labelled() -> None:
    alpha, gamma = member("alpha"), member("gamma")
    live = LiveThinking()
    sent = feed(
        live,
        MemberDelta(alpha, "Alpha begins"),  # held: mid-sentence
        MemberDelta(gamma, "Gamma speaks. "),
        MemberDelta(alpha, " here. "),
        MemberDelta(gamma, "Gamma "),
        MemberDelta(gamma, "ends."),
    )
    assert sent == ["", "Model: gamma\nContent: Gamma speaks.", "\nModel: alpha\nContent: Alpha begins here.", "", ""]
    gamma.answered("Gamma speaks. Gamma ends.")
    sent += feed(live, MemberFinished(gamma), MemberDelta(alpha, "Alpha ends."))
    alpha.answered("Alpha begins here. Alpha ends.")
    sent += feed(live, MemberFinished(alpha))
    assert "".join(sent) == (
        "Model: gamma\nContent: Gamma speaks.\n"
        "Model: alpha\nContent: Alpha begins here.\n"
        "Model: gamma (continued)\nGamma ends.\n---\n"
        "Model: alpha (continued)\nAlpha ends.\n---\n"
    )


def test_the_same_member_goes_on_without_a_new_label() -> None:
    alpha = member("alpha")
    live = LiveThinking()
    sent = feed(live, MemberDelta(alpha, "One.\n"), MemberDelta(alpha, "Two.\n"))
    assert sent == ["Model: alpha\nContent: One.\n", "Two.\n"]
    alpha.answered("One.\nTwo.\n")
    assert feed(live, MemberFinished(alpha)) == ["---\n"]


def test_a_member_that_streamed_nothing_gets_its_whole_block_between_parts() -> None:
    alpha, beta = member("alpha"), member("beta")
    live = LiveThinking()
    assert live.delta(MemberDelta(alpha, "Alpha first. ")) == "Model: alpha\nContent: Alpha first."
    beta.failed("http_error", "beta exploded")
    assert live.finished(MemberFinished(beta)) == "\nModel: beta\nStatus: error\nError: beta exploded\n---\n"
    assert live.delta(MemberDelta(alpha, "Then more.\n")) == "Model: alpha (continued)\nThen more.\n"


def test_a_member_cut_off_mid_sentence_shows_what_it_wrote_then_its_status() -> None:
    slow = member("slow")
    live = LiveThinking()
    assert live.delta(MemberDelta(slow, "Partial start. Half a")) == "Model: slow\nContent: Partial start."
    slow.cancelled("cut off: the quorum of 2 had answered")
    assert live.finished(MemberFinished(slow)) == (
        " Half a\nStatus: cancelled\nError: cut off: the quorum of 2 had answered\n---\n"
    )


def test_proposed_tool_calls_end_the_part_as_they_end_the_block() -> None:
    alpha = member("alpha")
    live = LiveThinking()
    live.delta(MemberDelta(alpha, "I would look it up."))
    alpha.answered(
        "I would look it up.",
        [{"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"q":"x"}'}}],
    )
    assert live.finished(MemberFinished(alpha)) == (
        'Model: alpha\nContent: I would look it up.\nTool calls: [{"name":"search","arguments":{"q":"x"}}]\n---\n'
    )


def test_notices_come_first_and_stage_summaries_close_the_part() -> None:
    alpha = member("alpha", stage="round-2")
    live = LiveThinking(["quorum: ignored."])
    assert live.delta(MemberDelta(alpha, "Again. ")) == (
        "Notices:\n- quorum: ignored.\n---\nModel: alpha (round-2)\nContent: Again."
    )
    assert live.finished(StageDone("rank", "Rankings: A first.\n---\n")) == "\nRankings: A first.\n---\n"
