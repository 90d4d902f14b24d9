"""The thinking context as the members write it, for an encoder that shows it live (Chat's `reasoning_content`
stream): each member's pieces are held until a line or a sentence ends, so that members' parts meet only between
sentences, never within one; each part is labelled with its member, in the order the parts come (so the member
that started writing first comes first). A member's part ends with its status, as its whole block would; a member
that streamed nothing (it failed, was skipped, or was cut off before its first piece) gets its whole block."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mom_service.engine.events import MemberDelta, MemberFinished, StageDone
from mom_service.engine.synthesis import ThinkingBlocks, block_end, member_label

# Where a part may end: after a line, or after a sentence's end (with its closing quotes and brackets) when a space
# follows it (so "3.14" and "e.g." at a piece's end wait for what comes next; the space stays with the next part), or
# after a full-width sentence end (U+3002, U+FF01, U+FF1F).
_BOUNDARY = re.compile("\n|[.!?][\"'\u201d\u2019)\\]]*(?=\\s)|[\u3002\uff01\uff1f]")
# Text held with no boundary in it: past this many characters a part ends at its last space anyway (a member
# writing one endless line must not be held back for ever).
MAX_HELD = 1024


def part_end(text: str, start: int = 0) -> int:
    """Where the part that can be shown now ends in `text` (0: nothing yet): after its last boundary; `start` is
    where the new text begins (what is before it had none)."""
    end = 0
    for match in _BOUNDARY.finditer(text, max(start - 4, 0)):
        end = match.end()
    if end == 0 and len(text) > MAX_HELD:
        space = text.rfind(" ")
        end = space + 1 if space > 0 else len(text)
    return end


class _Member:
    __slots__ = ("held", "label", "shown")

    def __init__(self, label: str) -> None:
        self.label = label
        self.held = ""  # received, not shown yet: the sentence it is writing
        self.shown = False  # its first part has been shown


class LiveThinking:
    """One answer's thinking context, live: `delta` and `finished` return the text to send now (often "")."""

    __slots__ = ("_blocks", "_line_open", "_members", "_speaker")

    def __init__(self, notices: Sequence[str] = ()) -> None:
        self._blocks = ThinkingBlocks(notices)  # the notices go before whatever comes first
        self._members: dict[str, _Member] = {}  # the members writing, by name
        self._speaker: _Member | None = None  # whose part was shown last, while it is open
        self._line_open = False  # what was shown last does not end with a newline

    def delta(self, event: MemberDelta) -> str:
        report = event.report
        member = self._members.get(report.name)
        if member is None:
            member = self._members[report.name] = _Member(member_label(report))
        held = member.held + event.text
        end = part_end(held, len(member.held))
        if not end:
            member.held = held
            return ""
        member.held = held[end:]
        return self._say(member, held[:end])

    def finished(self, event: MemberFinished | StageDone) -> str:
        """A member settled (the rest of its text, then its status), or a strategy stage's summary."""
        if isinstance(event, StageDone):
            return self._close() + self._blocks.of(event.summary)
        report = event.report
        member = self._members.pop(report.name, None)
        if member is None:  # it streamed nothing: its whole block
            return self._close() + self._blocks.of(report)
        out = self._say(member, member.held)
        return out + self._close() + block_end(report)

    def _say(self, member: _Member, text: str) -> str:
        """A member's text, labelled when the part shown before it is another's (or none)."""
        out = ""
        if self._speaker is not member:
            out = self._close()
            if member.shown:
                out += f"Model: {member.label} (continued)\n"
            else:
                out += self._blocks.of(f"Model: {member.label}\nContent: ")
                member.shown = True
            self._speaker = member
            text = text.lstrip(" \t")  # (the space between its sentences, when it goes on after another's)
        out += text
        if out:
            self._line_open = not out.endswith("\n")
        return out

    def _close(self) -> str:
        """End the part shown last: on a line of its own, the next part starts with its label."""
        out = "\n" if self._line_open else ""
        self._speaker, self._line_open = None, False
        return out
