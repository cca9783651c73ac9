"""Conversations -> one training text plus the character spans that carry loss.

Two record forms are read: ApolloMoE's `{"conversations": [{"value": q}, {"value": a}, ...]}` (turns
alternate user/assistant unless a `from` field says otherwise) and the common
`{"messages": [{"role": ..., "content": ...}]}`.

Two templates render them:
- `apollo` (the spec's, default): `User:{q}\nAssistant:{a}<|endoftext|>`, further turns continuing with
  `\nUser:{q}\nAssistant:{a}<|endoftext|>`. Loss on every answer and its end-of-text. (The released code
  leaves the end-of-text of earlier turns out of the input and only puts it in the labels; here each
  answer is followed by it in the text too, so training sees what inference produces.)
- `tokenizer`: the chat template of the tokenizer directory; loss on what the template adds for each
  assistant turn (its content and end-of-turn marker).
Tokenizing the whole text with character offsets then gives the per-token loss mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from .tokenizer import END_OF_TEXT
_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
            "bot": "assistant", "model": "assistant"}
TEMPLATES = ("apollo", "tokenizer")
CONVERSATION_FIELDS = ("conversations", "messages")  # the record fields conversation_turns reads


class ChatRecordError(ValueError):
    """A conversation that cannot be trained on; the message is the reason (the caller adds file:line)."""


@dataclass(frozen=True)
class Turn:
    role: str  # user | assistant | system
    content: str


def conversation_turns(record: dict) -> List[Turn]:
    # null counts as absent: a Parquet file that holds both forms has nulls where a row has the other one
    if record.get("conversations") is not None:
        items, turns = record["conversations"], []
        if not isinstance(items, list):
            raise ChatRecordError('"conversations" must be a list of {"value": ...} turns')
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("value"), str):
                raise ChatRecordError(f'conversation turn {i} has no string "value"')
            speaker = item.get("from")
            role = _ROLE_OF.get(str(speaker).lower()) if speaker is not None else ("user" if i % 2 == 0 else "assistant")
            if role is None:
                raise ChatRecordError(f"conversation turn {i}: unknown speaker {speaker!r}")
            turns.append(Turn(role, item["value"]))
    elif record.get("messages") is not None:
        items, turns = record["messages"], []
        if not isinstance(items, list):
            raise ChatRecordError('"messages" must be a list of {"role": ..., "content": ...}')
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("content"), str):
                raise ChatRecordError(f'message {i} has no string "content"')
            role = _ROLE_OF.get(str(item.get("role")).lower())
            if role is None:
                raise ChatRecordError(f"message {i}: unknown role {item.get('role')!r}")
            turns.append(Turn(role, item["content"]))
    else:
        raise ChatRecordError('missing field "conversations" (or "messages")')
    if not any(t.role == "assistant" and t.content.strip() for t in turns):
        raise ChatRecordError("conversation has no answer")
    if turns[-1].role != "assistant":
        raise ChatRecordError("conversation ends with a question that has no answer")
    if any(not t.content.strip() for t in turns):
        raise ChatRecordError("conversation has an empty turn")
    return turns


def render_apollo(turns: Sequence[Turn], end_of_text: str = END_OF_TEXT) -> Tuple[str, List[Tuple[int, int]]]:
    """(text, loss spans as [start, end) character ranges)."""
    parts: List[str] = []
    spans: List[Tuple[int, int]] = []
    length = 0

    def add(piece: str, loss: bool):
        nonlocal length
        if loss:
            spans.append((length, length + len(piece)))
        parts.append(piece)
        length += len(piece)

    for turn in turns:
        if turn.role == "system":
            add(turn.content + "\n", False)
        elif turn.role == "user":
            add(("\n" if length and not parts[-1].endswith("\n") else "") + "User:" + turn.content, False)
        else:
            add("\nAssistant:", False)
            add(turn.content + end_of_text, True)
    return "".join(parts), spans


def render_with_tokenizer_template(turns: Sequence[Turn], tokenizer) -> Tuple[str, List[Tuple[int, int]]]:
    """The tokenizer's own chat template; an assistant turn's span is what its message adds to the
    rendering of the conversation before it (with the generation prompt)."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or not through.startswith(before):
            raise ChatRecordError("the tokenizer's chat template does not render conversations incrementally, "
                                  "so answer spans cannot be found: use --chat-template apollo")
        spans.append((len(before), len(through)))
    return full, spans


def loss_mask_from_offsets(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> List[int]:
    """1 for every token that starts inside a loss span."""
    mask, s = [], 0
    for start, _ in offsets:
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        mask.append(1 if s < len(spans) and spans[s][0] <= start < spans[s][1] else 0)
    return mask
