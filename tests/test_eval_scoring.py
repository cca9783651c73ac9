"""The model-independent half of the multiple-choice evaluation: answer letters from generated text,
question files, few-shot prompts and the per source -> per language -> per tier averages."""
import json
from pathlib import Path

import pytest

from conftest import REPO
from megatron_medmoe.evaluation.answers import extract_answer
from megatron_medmoe.evaluation.prompts import (answer_text, build_loglik_prompt, build_prompt, choose_shots,
                                                format_question, option_continuation)
from megatron_medmoe.evaluation.questions import Question, QuestionFileError, read_questions
from megatron_medmoe.evaluation.scoring import score
from megatron_medmoe.languages import LanguageTableError

SAMPLES = sorted((REPO / "examples" / "data" / "mcq").glob("*.jsonl"))


@pytest.mark.parametrize("text, letters, expected", [
    ("The answer is (B).", "ABCD", "B"),
    ("A and C are wrong, so the answer is (D). Not B.", "ABCD", "D"),  # the parenthesised one wins
    ("(C) or maybe (A)", "ABCD", "C"),  # first occurrence
    ("The answer is (E).", "ABCD", None),  # not an option of this question
    ("(E) is tempting, but C.", "ABCD", "C"),
    ("The answer is (E).", "ABCDE", "E"),
    ("答案是（Ｂ）。", "ABCD", "B"),  # full-width parentheses and letter
    ("答案是（C）", "ABCD", "C"),
    ("答案是C", "ABCD", "C"),  # CJK next to the letter does not make it a word
    ("الإجابة هي ب", "ABCD", "B"),
    ("الإجابة الصحيحة (ج)", "ABCD", "C"),
    ("الإجابة هي د، لأن ...", "ABCD", "D"),  # Arabic comma ends the token
    ("الإجابة هي هـ", "ABCDE", "E"),
    ("الإجابة هي هـ", "ABCD", None),
    ("بالتأكيد الدواء مفيد", "ABCD", None),  # ب and د inside words
    ("الإجابة هي ب وليس (C)", "ABCD", "C"),  # a parenthesised Latin letter beats the Arabic letter
    ("أ هي الإجابة وليس (ج)", "ABCD", "A"),  # Arabic letters are one step, first occurrence
    ("Answer: C.", "ABCD", "C"),
    ("The correct option is D because ...", "ABCD", "D"),
    ("c) metformin", "ABCD", "C"),
    ("the answer is b.", "ABCD", "B"),
    ("a patient with a fever should rest", "ABCD", None),  # lowercase words, not labels
    ("A patient with chest pain needs an ECG, so B", "ABCD", "B"),  # the article A
    ("A resposta correta é C", "ABCD", "C"),  # Portuguese article
    ("Option A is right.", "ABCD", "A"),  # mid-sentence: a letter, not the article
    ("Fever. A patient like this needs D", "ABCD", "D"),
    ("E. coli is the usual cause; answer A", "ABCDE", "A"),  # genus abbreviation
    ("e.g. aspirin, i.e. option", "ABCDE", None),
    ("Vitamin B12 and HbA1c are unrelated; DNA too", "ABCD", None),  # letters inside words and codes
    ("Décès", "ABCD", None),  # accented letters are part of the word
    ("I do not know.", "ABCD", None),
    ("", "ABCD", None),
])
def test_extract_answer(text, letters, expected):
    assert extract_answer(text, letters) == expected


def test_sample_files_all_parse():
    questions = read_questions([str(p) for p in SAMPLES])
    assert len(questions) == 65
    assert {p.stem for p in SAMPLES} == {"en", "zh", "fr", "es", "ar", "ja", "sw", "vi"}
    by_source = {}
    for q in questions:
        by_source.setdefault(q.source, []).append(q)
        assert q.lang == q.source.split("_")[1]
        assert q.answer in q.letters and q.letters in ("ABCD", "ABCDE")
    assert set(by_source) == {f"medExam_{c}" for c in ("en", "zh", "fr", "es", "ar", "ja", "sw", "vi")} | {
        "medQuiz_en", "medQuiz_zh"}
    assert min(len(qs) for qs in by_source.values()) >= 6
    assert {q.answer for q in questions} == set("ABCDE")
    assert len({q.qid for q in questions}) == len(questions)
    assert questions[0].qid == "medExam_ar:1"  # default id: source and line


def write(tmp_path: Path, lines, name="medExam_en.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return str(path)


GOOD = {"question": "Which organ produces insulin?", "options": ["Liver", "Pancreas"], "answer": "B"}


def test_defaults_from_file_and_source(tmp_path):
    path = write(tmp_path, [GOOD, "", {**GOOD, "source": "medQuiz_sw", "id": 7},
                            {**GOOD, "lang": "fr", "options": {"A": " x ", "B": "y", "C": "z"}, "answer": "C"}])
    first, second, third = read_questions([path])
    assert (first.qid, first.source, first.lang, first.options) == (
        "medExam_en:1", "medExam_en", "en", (("A", "Liver"), ("B", "Pancreas")))
    assert (second.qid, second.source, second.lang) == ("7", "medQuiz_sw", "sw")
    assert (third.qid, third.lang, third.letters, third.options[0]) == ("medExam_en:4", "fr", "ABC", ("A", "x"))


def test_language_codes_are_the_tables_whatever_their_case_or_region(tmp_path):
    """EN and pt_BR are en and pt: else the scores, which average per table language, would drop them."""
    path = write(tmp_path, [{**GOOD, "lang": "EN"}, {**GOOD, "lang": "pt_BR"}, {**GOOD, "source": "medQuiz_ZH-cn"}])
    assert [q.lang for q in read_questions([path])] == ["en", "pt", "zh"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got array"),
    ({**GOOD, "question": "  "}, 'missing or empty "question"'),
    ({k: v for k, v in GOOD.items() if k != "question"}, 'missing or empty "question"'),
    ({**GOOD, "options": ["only"]}, "at least 2"),
    ({**GOOD, "options": list("abcdefg")}, "7 options; at most 6"),
    ({**GOOD, "options": {"A": "x", "C": "y"}}, "option letters must be A, B in that order"),
    ({**GOOD, "answer": "C"}, 'must be one of the option letters A, B'),
    ({**GOOD, "answer": ""}, 'must be one of the option letters A, B'),
    ({**GOOD, "lang": "xx"}, "unknown language code 'xx'"),
    ({**GOOD, "source": "medExam"}, "has no language part"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, [GOOD, line])
    with pytest.raises(QuestionFileError) as e:
        read_questions([path])
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_missing_empty_and_duplicate(tmp_path):
    with pytest.raises(QuestionFileError, match="no such question file"):
        read_questions([str(tmp_path / "absent.jsonl")])
    empty = write(tmp_path, ["", "  "], name="medQuiz_en.jsonl")
    with pytest.raises(QuestionFileError, match=f"^{empty}: no questions"):
        read_questions([empty])
    twice = write(tmp_path, [{**GOOD, "id": "q1"}, {**GOOD, "id": "q1"}])
    with pytest.raises(QuestionFileError, match=f"^{twice}:2: id 'q1' was already used at {twice}:1"):
        read_questions([twice])


def question(qid, source, lang="en", answer="A", letters="ABCD"):
    return Question(qid, source, lang, f"Question {qid}?", tuple((x, f"option {x}") for x in letters), answer)


def test_choose_shots_same_source_never_itself_deterministic():
    questions = [question(f"a{i}", "medExam_en") for i in range(6)] + [question(f"b{i}", "medQuiz_en")
                                                                       for i in range(3)]
    shots = choose_shots(questions, k=3, seed=0)
    assert set(shots) == {q.qid for q in questions}
    for q in questions:
        assert all(s.source == q.source and s.qid != q.qid for s in shots[q.qid])
        assert len({s.qid for s in shots[q.qid]}) == len(shots[q.qid])
    assert all(len(shots[f"a{i}"]) == 3 for i in range(6))
    assert all(len(shots[f"b{i}"]) == 2 for i in range(3))  # a small source gives all the others it has
    assert choose_shots(list(reversed(questions)), k=3, seed=0) == shots
    assert any(choose_shots(questions, k=3, seed=s) != shots for s in range(1, 5))
    assert choose_shots([question("alone", "medExam_sw", "sw")], k=3) == {"alone": []}


def test_build_prompt_exact_format():
    shot = Question("s", "medExam_en", "en", "Which organ produces insulin?",
                    (("A", "Liver"), ("B", "Pancreas"), ("C", "Spleen")), "B")
    q = Question("q", "medExam_en", "en", "How many chambers does the heart have?",
                 (("A", "Two"), ("B", "Four")), "B")
    assert format_question(shot) == "Which organ produces insulin?\nA. Liver\nB. Pancreas\nC. Spleen"
    assert answer_text("B") == "The answer is (B)."
    expected = ("User:Which organ produces insulin?\nA. Liver\nB. Pancreas\nC. Spleen\n"
                "Assistant:The answer is (B).<|endoftext|>\n"
                "User:How many chambers does the heart have?\nA. Two\nB. Four\nAssistant:")
    assert build_prompt(q, [shot]) == expected
    assert build_prompt(q, []) == "User:How many chambers does the heart have?\nA. Two\nB. Four\nAssistant:"
    assert build_prompt(q, [shot], eos="</s>") == expected.replace("<|endoftext|>", "</s>")
    assert build_loglik_prompt(q, [shot]) == expected + "The answer is ("
    assert build_loglik_prompt(q, [shot]) + option_continuation("B") == expected + answer_text("B")
    with pytest.raises(ValueError, match="own few-shot"):
        build_prompt(q, [shot, q])


def test_released_fields_in_jsonl_and_our_prompt_with_a_context(tmp_path):
    """The release's shape (options string, "(B)" answer, context, class) read from JSONL too; our prompt puts the
    context on a line before the question and letters the options our way."""
    path = write(tmp_path, [{"question": "Does walking help?", "context": "Adults walked daily.",
                             "options": "(A) Yes.\n(B) No.\n(C) Maybe.", "answer": "(A)", "source": "pubmedqa",
                             "class": "major"}])
    (q,) = read_questions([path])
    assert (q.qid, q.lang, q.tier, q.answer, q.letters) == ("pubmedqa:1", "en", "major", "A", "ABC")
    assert format_question(q) == "Adults walked daily.\nDoes walking help?\nA. Yes.\nB. No.\nC. Maybe."


def test_scores_by_hand():
    questions = ([question(f"e{i}", "medExam_en") for i in range(4)]  # 3/4 correct
                 + [question(f"q{i}", "medQuiz_en") for i in range(2)]  # 0/2, one unanswered
                 + [question(f"s{i}", "medExam_sw", "sw") for i in range(5)])  # 2/5, one unanswered
    predictions = {"e0": "A", "e1": "A", "e2": "A", "e3": "B", "q0": "C", "q1": None,
                   "s0": "A", "s1": "A", "s2": None, "s3": "D", "s4": "B"}
    result = score(questions, predictions)
    d = result.to_dict()
    assert d["per_source"]["medExam_en"] == {"lang": "en", "questions": 4, "correct": 3, "unanswered": 0,
                                             "accuracy": 0.75}
    assert d["per_source"]["medQuiz_en"] == {"lang": "en", "questions": 2, "correct": 0, "unanswered": 1,
                                             "accuracy": 0.0}
    assert d["per_source"]["medExam_sw"]["accuracy"] == 0.4 and d["per_source"]["medExam_sw"]["unanswered"] == 1
    # English: mean of 75% and 0%, not 3 of 6 questions
    assert d["per_language"]["en"] == {"name": "English", "major": True, "sources": ["medExam_en", "medQuiz_en"],
                                       "accuracy": 0.375}
    assert d["per_language"]["sw"]["major"] is False
    assert d["major_average"] == 0.375 and d["minor_average"] == pytest.approx(0.4)
    assert (d["questions"], d["correct"], d["unanswered"]) == (11, 5, 2)
    assert json.loads(json.dumps(d)) == d

    table = result.table()
    assert table.splitlines()[0].split() == ["language", "source", "questions", "correct", "unanswered", "accuracy"]
    assert "en English (major)" in table and "sw Swahili (minor)" in table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.startswith(" ")}
    assert rows["medExam_en"] == ["4", "3", "0", "75.0"] and rows["medQuiz_en"] == ["2", "0", "1", "0.0"]
    assert table.index("medQuiz_en") < table.index("sw Swahili")  # a language's sources follow it
    assert table.splitlines()[-2:] == ["major average over 1 language: 37.5", "minor average over 1 language: 40.0"]


def test_averages_are_unweighted_over_languages():
    # English: 1 of 10 questions; French: 1 of 1. Weighted by questions this would be 2/11.
    questions = [question(f"e{i}", "medExam_en") for i in range(10)] + [question("f0", "medExam_fr", "fr")]
    predictions = {q.qid: None for q in questions} | {"e0": "A", "f0": "A"}
    result = score(questions, predictions)
    assert result.major_average == pytest.approx((0.1 + 1.0) / 2)
    assert result.minor_average is None and "minor average: no minor language present" in result.table()
    assert list(result.per_language) == ["en", "fr"]


def test_score_refuses_incomplete_predictions():
    questions = [question("e0", "medExam_en"), question("e1", "medExam_en")]
    with pytest.raises(ValueError, match="no prediction for 1 question"):
        score(questions, {"e0": "A"})
    with pytest.raises(ValueError, match="not among the questions"):
        score(questions, {"e0": "A", "e1": None, "x": "B"})
    with pytest.raises(LanguageTableError, match="unknown language code 'xx'"):
        score([question("x0", "medExam_xx", "xx")], {"x0": "A"})
