"""The answer letter in generated text, found the way the ApolloMoE release finds it (src/eval/eval_qwen2.py,
`extract_and_choose_answer`), quirks included; our own rules are in evaluation/answers.py.

1. Only the first non-empty line counts (the whole text when every line is empty).
2. Each parenthesised letter `(b)`, `（B）` (A-F, either case, half- or full-width parentheses) counts one vote for its
   letter. An Arabic letter next to a parenthesis, `(أ` or `أ)`, adds one vote for its letter whatever the number
   of occurrences: أ A, ب B, س or ك C, د D (the release's letters: not ج for C, no E).
3. Without any vote, the same with every uppercase A-F anywhere in the line as a vote (so "Based on" votes B).
4. Without any vote then, the line "Yes." answers A and "No." B; anything else answers nothing.
The letter with the most votes wins; a tie goes to the letter that got its first vote first (Latin letters in
the order they occur, then the Arabic ones in A-D order). The letter need not be one of the question's options.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

_PARENTHESISED = re.compile(r"[(（]([A-Fa-f])[)）]")
_LOOSE = re.compile(r"[A-F]")
# An Arabic letter counts when a parenthesis opens before it or closes after it.
_ARABIC = (("A", re.compile(r"[(（]أ|أ[)）]")), ("B", re.compile(r"[(（]ب|ب[)）]")),
           ("C", re.compile(r"[(（][سك]|[سك][)）]")), ("D", re.compile(r"[(（]د|د[)）]")))
_YES_NO = {"Yes.": "A", "No.": "B"}


def extract_release_answer(text: str) -> Optional[str]:
    """The letter the release reads in `text` (A-F, or None)."""
    line = next((part for part in text.split("\n") if part), text)
    for pattern in (_PARENTHESISED, _LOOSE):
        votes: Dict[str, int] = {}
        for letter in pattern.findall(line):
            votes[letter.upper()] = votes.get(letter.upper(), 0) + 1
        for letter, arabic in _ARABIC:
            if arabic.search(line):
                votes[letter] = votes.get(letter, 0) + 1
        if votes:
            most = max(votes.values())
            return next(letter for letter, count in votes.items() if count == most)
    return _YES_NO.get(line)
