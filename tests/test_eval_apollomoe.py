"""The ApolloMoE release's benchmark and evaluation protocol: its benchmark file read as released (a JSON array,
options as one string, "(B)" answers, PubMedQA-style contexts), its prompts built exactly as its preprocessing
builds them (here: its templates applied by hand), its answer extraction and its averaging computed by hand, its
budget drops counted, malformed files refused with the file and item; end to end on a tiny random checkpoint."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from conftest import REPO, run_medmoe
from megatron_medmoe.evaluation.apollomoe.answers import extract_release_answer
from megatron_medmoe.evaluation.apollomoe.prompts import (PromptError, build_release_prompts, read_prompt_file,
                                                          write_prompt_file)
from megatron_medmoe.evaluation.apollomoe.scoring import score_release
from megatron_medmoe.evaluation.apollomoe.tables import template_table
from megatron_medmoe.evaluation.protocol import prepare_from_prompt_file
from megatron_medmoe.evaluation.questions import QuestionFileError, read_questions
from megatron_medmoe.runtime.exit_codes import EXIT_INPUT

SAMPLE = REPO / "examples" / "data" / "released" / "ApolloMoEBench-sample.json"


def released(question, options, answer, source, cls="major", context=None):
    """An item as ApolloMoEBench.json has it."""
    item = {"question": question, "options": "\n".join(f"({'ABCDEF'[i]}) {o}" for i, o in enumerate(options)),
            "answer": f"({answer})", "source": source, "class": cls}
    if context is not None:
        item["context"] = context
    return item


def write_array(path: Path, items) -> str:
    path.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


# --- reading the released format ------------------------------------------------------------------------------

def test_released_items_read_as_they_are(tmp_path):
    items = [released("Which organ produces insulin?", ["Liver", "Pancreas"], "B", "medqa-usmle"),
             released("Does walking lower blood pressure?", ["Yes.", "No.", "Maybe."], "A", "pubmedqa",
                      context="Adults walked 30 minutes a day."),
             released("胰岛素由哪个器官分泌？", ["肝脏", "胰腺"], "B", "cmb-single"),
             released("ما العضو الذي ينتج الأنسولين؟", ["الكبد", "البنكرياس"], "B", "mmlu-medical-ar"),
             released("Welches Organ bildet Insulin?", ["Leber", "Bauchspeicheldrüse"], "B", "MMLU_anatomy_de"),
             released("Kiungo gani hutoa insulini?", ["Ini", "Kongosho"], "B", "medexam-sw", "minor", "Kisukari.")]
    questions = read_questions([write_array(tmp_path / "ApolloMoEBench.json", items)])
    assert [(q.source, q.lang, q.tier) for q in questions] == [
        ("medqa-usmle", "en", "major"), ("pubmedqa", "en", "major"), ("cmb-single", "zh", "major"),
        ("mmlu-medical-ar", "ar", "major"), ("MMLU_anatomy_de", "de", "major"), ("medexam-sw", "sw", "minor")]
    first, pubmed = questions[0], questions[1]
    assert (first.qid, first.question, first.options, first.answer) == (
        "medqa-usmle:0", "Which organ produces insulin?", (("A", "Liver"), ("B", "Pancreas")), "B")
    assert pubmed.context == "Adults walked 30 minutes a day." and pubmed.letters == "ABC"
    assert dict(pubmed.release_fields) == {"question": "Does walking lower blood pressure?",
                                           "options": "(A) Yes.\n(B) No.\n(C) Maybe.", "answer": "(A)",
                                           "context": "Adults walked 30 minutes a day."}
    # the same records as JSONL read the same (ids aside: line numbers count from 1, items from 0)
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    strip = lambda q: (q.source, q.lang, q.tier, q.question, q.options, q.answer, q.context, q.release_fields)  # noqa
    assert [strip(q) for q in read_questions([str(jsonl)])] == [strip(q) for q in questions]


def test_options_string_with_a_line_break_and_a_bom(tmp_path):
    item = released("Q?", ["first", "second"], "B", "medqa-usmle")
    item["options"] = "(A) first line\nstill A\n(B)second"
    path = tmp_path / "b.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([item]).encode())
    (q,) = read_questions([str(path)])
    assert q.options == (("A", "first line\nstill A"), ("B", "second"))
    assert dict(q.release_fields)["options"] == "(A) first line\nstill A\n(B)second"  # the release formats it as is


@pytest.mark.parametrize("content, message", [
    ('{"question": "q"}', "expected a JSON array of question objects"),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)"}, 3]',
     "item 1: expected a JSON object, got number"),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)"}, {"question": "r", "answer": "(A)"}]',
     'item 1: missing "options"'),
    ('[{"question": "q", "options": "A. a\\nB. b", "answer": "(A)"}]', "item 0: \"options\" must be lettered lines"),
    ('[{"question": "q", "options": "(A) a\\n(C) b", "answer": "(A)"}]', "item 0: \"options\" must be lettered A, B"),
    ('[{"question": "q", "options": "(A) a", "answer": "(A)"}]', "item 0: 1 option(s)"),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(C)"}]',
     'item 0: "answer" must be one of the option letters A, B'),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)", "class": "major"}, {"question": ',
     "item 1: invalid JSON"),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)", "class": "big"}]', '"class" must be'),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)", "context": 7}]', '"context" must be a string'),
    ('[{"question": "q\udcff"}]', "item 0: invalid JSON (lexical error: invalid bytes in UTF8 string.)"),
    ("[]", "no questions (an empty array)"),
    ("", "no questions (the file is empty)"),
])
def test_malformed_arrays_name_file_and_item(tmp_path, content, message):
    path = tmp_path / "medqa-usmle.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))  # \udcff: the invalid byte 0xff
    with pytest.raises(QuestionFileError) as e:
        read_questions([str(path)])
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


# --- the release's prompts --------------------------------------------------------------------------------------

def two_of(source, first, second, cls="major", context=None):
    """Two questions of a source: with one shot, each gets the other as its example, whatever the draw."""
    contexts = context or (None, None)
    return [released(*first, source, cls, contexts[0]), released(*second, source, cls, contexts[1])]


def test_prompts_are_the_release_templates_applied_by_hand(tmp_path):
    items = (two_of("medqa-usmle", ("Which organ produces insulin?", ["Liver", "Pancreas"], "B"),
                    ("Which vitamin prevents scurvy?", ["Vitamin C", "Vitamin D"], "A"))
             + two_of("pubmedqa", ("Does walking lower blood pressure?", ["Yes.", "No.", "Maybe."], "A"),
                      ("Does vitamin C prevent colds?", ["Yes.", "No.", "Maybe."], "B"),
                      context=("Adults walked daily.", "Trials found no effect."))
             + two_of("cmb-single", ("胰岛素由哪个器官分泌？", ["肝脏", "胰腺"], "B"), ("人体最大的器官是什么？", ["皮肤", "心脏"], "A"))
             + two_of("mmlu-medical-ar", ("ما العضو الذي ينتج الأنسولين؟", ["الكبد", "البنكرياس"], "B"),
                      ("كم عدد حجرات القلب؟", ["أربع", "اثنتان"], "A"))
             + two_of("RuMedDaNet", ("Какой орган вырабатывает инсулин?", ["Печень", "Поджелудочная железа"], "B"),
                      ("Сколько камер в сердце?", ["Четыре", "Две"], "A"))
             + two_of("medexam-sw", ("Kiungo gani hutoa insulini?", ["Ini", "Kongosho"], "B"),
                      ("Moyo una vyumba vingapi?", ["Vinne", "Viwili"], "A"), "minor", ("Kisukari.", "Moyo.")))
    prompts = build_release_prompts(read_questions([write_array(tmp_path / "b.json", items)]), shots=1, seed=0)
    by_id = {p.qid: p for p in prompts.prompts}
    assert by_id["medqa-usmle:0"].prompt == (
        "User:You are a medical doctor answering real-world medical exam questions. Select one correct answer from "
        "A to D.\nQuestion: Which vitamin prevents scurvy?\nOptions:\n(A) Vitamin C\n(B) Vitamin D\n"
        "Assistant:The correct answer is (A).<|endoftext|>\n"
        "User:You are a medical doctor answering real-world medical exam questions. Select one correct answer from "
        "A to D.\nQuestion: Which organ produces insulin?\nOptions:\n(A) Liver\n(B) Pancreas\nAssistant:")
    # PubMedQA: a space before the first newline in the example, none in the question; a space after the context
    assert by_id["pubmedqa:2"].prompt == (
        "User:You are a medical doctor answering real-world medical exam questions. \nContext: Trials found no "
        "effect. \nQuestion: Does vitamin C prevent colds?\nOptions:\n(A) Yes.\n(B) No.\n(C) Maybe.\n"
        "Assistant:The correct answer is (B).<|endoftext|>\n"
        "User:You are a medical doctor answering real-world medical exam questions.\nContext: Adults walked daily. "
        "\nQuestion: Does walking lower blood pressure?\nOptions:\n(A) Yes.\n(B) No.\n(C) Maybe.\nAssistant:")
    assert by_id["cmb-single:4"].prompt == (
        "User:您是一名医生，正在回答现实世界的医学考试问题。请从A到E中选择一个正确答案。\n问题: 人体最大的器官是什么？\n选项:\n(A) 皮肤\n(B) 心脏\n"
        "Assistant:正确答案是(A).<|endoftext|>\n"
        "User:您是一名医生，正在回答现实世界的医学考试问题。请从A到E中选择一个正确答案。\n问题: 胰岛素由哪个器官分泌？\n选项:\n(A) 肝脏\n(B) 胰腺\nAssistant:")
    # Arabic: the letter before the words of the answer line
    assert by_id["mmlu-medical-ar:7"].prompt == (
        "User:أنت طبيب يجيب على أسئلة الفحص الطبي في العالم الحقيقي. الرجاء اختيار الإجابة الصحيحة من أ إلى د.\n"
        "سؤال: ما العضو الذي ينتج الأنسولين؟\nخيارات:\n(A) الكبد\n(B) البنكرياس\n"
        "Assistant:(B)الإجابة الصحيحة هي.<|endoftext|>\n"
        "User:أنت طبيب يجيب على أسئلة الفحص الطبي في العالم الحقيقي. الرجاء اختيار الإجابة الصحيحة من أ إلى د.\n"
        "سؤال: كم عدد حجرات القلب؟\nخيارات:\n(A) أربع\n(B) اثنتان\nAssistant:")
    # Russian: a Cyrillic А in "от А и B", no space before the letter
    assert by_id["RuMedDaNet:8"].prompt == (
        "User:Вы врач, отвечающий на реальные вопросы медицинского осмотра. Пожалуйста, выберите правильный ответ "
        "от \u0410 и B.\nвопрос: Сколько камер в сердце?\nПараметры:\n(A) Четыре\n(B) Две\n"
        "Assistant:Правильный ответ(A).<|endoftext|>\n"
        "User:Вы врач, отвечающий на реальные вопросы медицинского осмотра. Пожалуйста, выберите правильный ответ "
        "от \u0410 и B.\nвопрос: Какой орган вырабатывает инсулин?\nПараметры:\n(A) Печень\n"
        "(B) Поджелудочная железа\nAssistant:")
    # a minor-language source: outside the release's table, so its PubMedQA template, in English
    assert by_id["medexam-sw:11"].prompt == (
        "User:You are a medical doctor answering real-world medical exam questions. \nContext: Kisukari. \n"
        "Question: Kiungo gani hutoa insulini?\nOptions:\n(A) Ini\n(B) Kongosho\n"
        "Assistant:The correct answer is (B).<|endoftext|>\n"
        "User:You are a medical doctor answering real-world medical exam questions.\nContext: Moyo. \n"
        "Question: Moyo una vyumba vingapi?\nOptions:\n(A) Vinne\n(B) Viwili\nAssistant:")
    assert [(p.lang, p.tier) for p in prompts.prompts][-1] == ("sw", "minor")
    assert [p.qid for p in prompts.prompts] == [f"{s}:{i}" for s, i in zip(
        ["medqa-usmle"] * 2 + ["pubmedqa"] * 2 + ["cmb-single"] * 2 + ["mmlu-medical-ar"] * 2 + ["RuMedDaNet"] * 2
        + ["medexam-sw"] * 2, range(12))]
    assert prompts.dropped == [] and prompts.short_sources == []


def test_three_shots_are_the_other_questions_in_a_seeded_order(tmp_path):
    texts = [("Which organ produces insulin?", ["Liver", "Pancreas"], "B"),
             ("Which vitamin prevents scurvy?", ["Vitamin C", "Vitamin D"], "A"),
             ("Which cells carry oxygen?", ["Red blood cells", "Platelets"], "A"),
             ("How many heart chambers?", ["Two", "Four"], "B")]
    questions = read_questions([write_array(tmp_path / "b.json", [released(*t, "medqa-usmle") for t in texts])])
    head = ("User:You are a medical doctor answering real-world medical exam questions. Select one correct answer "
            "from A to D.\n")

    def by_hand(q, example: bool) -> str:
        options = "\n".join(f"({letter}) {text}" for letter, text in zip("AB", q[1]))
        end = f"The correct answer is ({q[2]}).<|endoftext|>\n" if example else ""
        return f"{head}Question: {q[0]}\nOptions:\n{options}\nAssistant:{end}"

    built = build_release_prompts(questions, seed=0)
    for i, p in enumerate(built.prompts):
        others = [t for j, t in enumerate(texts) if j != i]
        expected = {"".join(by_hand(t, True) for t in order) + by_hand(texts[i], False)
                    for order in itertools.permutations(others)}
        assert p.prompt in expected  # the three others, in some order, then the question
    assert build_release_prompts(questions, seed=0) == built  # seeded: the same prompts every run
    assert any(build_release_prompts(questions, seed=s).prompts != built.prompts for s in range(1, 6))
    small = build_release_prompts(questions[:3], seed=0)  # the release stops with an error; we give all others
    assert small.short_sources == ["medqa-usmle"] and all(p.prompt.count("<|endoftext|>") == 2 for p in small.prompts)


def test_the_budget_skips_examples_and_drops_long_questions_counting_them(tmp_path):
    budget = template_table().budget_chars
    items = [released("Short question one?", ["a", "b"], "A", "medqa-usmle"),
             released("Long " * 720 + "?", ["a", "b"], "A", "medqa-usmle"),  # an example of ~3,800 characters
             released("Short question two?", ["a", "b"], "B", "medqa-usmle"),
             released("Too long " * 460 + "?", ["a", "b"], "A", "medqa-usmle")]  # over the budget on its own
    questions = read_questions([write_array(tmp_path / "b.json", items)])
    built = build_release_prompts(questions, shots=2, seed=3)
    assert [d.qid for d in built.dropped] == ["medqa-usmle:3"] and built.dropped[0].chars > budget
    by_id = {p.qid: p.prompt for p in built.prompts}
    assert set(by_id) == {"medqa-usmle:0", "medqa-usmle:1", "medqa-usmle:2"}
    assert all(len(prompt) < budget for prompt in by_id.values())
    # the long example and a short one do not both fit: exactly one example, whichever was drawn first
    assert by_id["medqa-usmle:0"].count("<|endoftext|>") == 1 and by_id["medqa-usmle:2"].count("<|endoftext|>") == 1
    scores = score_release(built, {qid: "A" for qid in by_id})
    assert scores.per_source["medqa-usmle"].dropped == 1 and scores.per_source["medqa-usmle"].questions == 3
    assert scores.to_dict()["dropped"] == {"budget_chars": 4096, "questions": 1, "per_source": {"medqa-usmle": 1},
                                           "ids": ["medqa-usmle:3"]}
    assert ("left out over the release's 4,096-character prompt budget, as the release leaves them out: "
            "1 question (medqa-usmle 1)") in scores.table()


def test_a_source_outside_the_release_table_needs_a_context(tmp_path):
    items = [released("Kiungo gani hutoa insulini?", ["Ini", "Kongosho"], "B", "medexam-sw", "minor")] * 2
    questions = read_questions([write_array(tmp_path / "b.json", items)])
    with pytest.raises(PromptError, match=r"b\.json: item 0: source 'medexam-sw' is formatted with the release's "
                                          "en_pubmed template.*KeyError: 'context'"):
        build_release_prompts(questions)


def test_prompt_files_round_trip_byte_for_byte(tmp_path):
    built = build_release_prompts(read_questions([str(SAMPLE)]), seed=5)
    write_prompt_file(str(tmp_path / "prompts.json"), built)
    text = (tmp_path / "prompts.json").read_text(encoding="utf-8")
    assert text == json.dumps([p.release_record() for p in built.prompts], ensure_ascii=False, indent=2)
    again = read_prompt_file(str(tmp_path / "prompts.json"))
    assert [(p.source, p.lang, p.tier, p.prompt, p.answer, p.letters) for p in again.prompts] == [
        (p.source, p.lang, p.tier, p.prompt, p.answer, p.letters) for p in built.prompts]


# --- the release's extraction and averaging ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The correct answer is (B).", "B"),
    ("the answer is (b)", "B"),
    ("(A) or (B)? Surely (B).", "B"),  # two votes against one
    ("(A)(B)", "A"),  # a tie: the first letter
    ("\n\nThe correct answer is (C).\n(A)", "C"),  # the first non-empty line only
    ("  \n(D)", None),  # a line of spaces is not empty
    ("Based on this, (C) is right", "C"),  # a parenthesised letter beats the loose ones
    ("Based on this, C", "B"),  # loose: every uppercase A-F votes, "Based" first
    ("Answer: A", "A"),
    ("Die richtige Antwort ist C", "D"),  # D, A and C one vote each: D came first
    ("(E)", "E"),  # not necessarily an option of the question
    ("Yes.", "A"), ("No.", "B"), ("yes.", None), ("Maybe.", None),
    ("الإجابة الصحيحة هي (ب)", "B"),
    ("(س)", "C"), ("ك)", "C"), ("(ج)", None),  # the release reads C off س or ك, never ج
    ("الإجابة هي ب", None),  # an Arabic letter counts only next to a parenthesis
    ("答案是（Ｂ）", None),  # a full-width letter is no A-F (ours: B, after NFKC)
    ("答案是（B）", "B"),
    ("", None),
])
def test_release_extraction(text, expected):
    assert extract_release_answer(text) == expected


def test_the_release_decoding_generates_at_least_two_tokens():
    """eval_qwen2.py's min_new_tokens=2: the end-of-text token cannot end the answer before two tokens, as
    transformers masks it; our greedy loop does the same when asked."""
    import types

    import torch

    from megatron_medmoe.evaluation.protocol import DECODING
    from megatron_medmoe.inference.generate import greedy_generate
    from megatron_medmoe.runtime.cpu_compat import import_megatron_core_deferring_compile

    import_megatron_core_deferring_compile()

    class EndOfTextFirst:  # a model for which the end-of-text token (0) is always the most likely, then token 3
        cfg = types.SimpleNamespace(model=types.SimpleNamespace(max_position_embeddings=64))

        def logits(self, tokens, family_ids=None, inference_context=None):
            out = torch.zeros(tokens.shape[0], tokens.shape[1], 8)
            out[..., 0], out[..., 3] = 5.0, 4.0
            return out

    assert (DECODING["apollomoe"].min_new_tokens, DECODING["apollomoe"].max_new_tokens) == (2, 256)
    assert greedy_generate(EndOfTextFirst(), [1, 2], 5, (0,)) == []
    assert greedy_generate(EndOfTextFirst(), [1, 2], 5, (0,), min_new_tokens=DECODING["apollomoe"].min_new_tokens) \
        == [3, 3]


def prebuilt(source, answer, cls=None):
    item = {"source_question": "q", "source_option": "(A) a\n(B) b\n(C) c\n(D) d", "question": f"User:{source}",
            "answer": answer, "source": source}
    if cls:
        item["class"] = cls
    return item


def test_scores_on_prebuilt_prompts_by_hand(tmp_path):
    """Prompts as the release's preprocessing writes them and generated texts: the release's extraction, per-source
    accuracy and table columns, computed here by hand."""
    rows = [  # (source, answer, generated text, class)
        ("medqa-usmle", "A", "The correct answer is (A).", None),  # A right
        ("medqa-usmle", "B", "(C)", None),  # wrong
        ("medqa-usmle", "C", "Based on this, (C) is right", None),  # right
        ("medqa-usmle", "D", "\n(D) because", None),  # right: 3/4
        ("pubmedqa", "A", "Yes.", None),  # right
        ("pubmedqa", "B", "Maybe.", None),  # unanswered: 1/2
        ("MMLU_anatomy_de", "A", "(A)", None), ("MMLU_anatomy_de", "A", "(B)", None),
        ("MMLU_anatomy_de", "A", "Die richtige Antwort ist C", None),  # D: 1/3
        ("MMLU_college_biology_de", "B", "(b)", None),  # 1/1
        ("MMLU_college_medicine_pt", "A", "(A)", None), ("MMLU_college_medicine_pt", "B", "(B)", None),  # 2/2
        ("MMLU_anatomy_pt", "C", "(A)", None), ("MMLU_anatomy_pt", "D", "E", None),  # 0/2
        ("mmlu-medical-ar", "B", "الإجابة الصحيحة هي (ب)", None), ("mmlu-medical-ar", "D", "(س)", None),  # 1/2
        ("medExam_en", "A", "(A)", "major"),  # a major source the release's tables do not list
        ("exam-ha", "A", "(C)", None),  # exam-ha 1/2, its first right answer after quiz-ha's
        ("quiz-ha", "A", "(A)", None), ("quiz-ha", "B", "(B)", None),  # quiz-ha 2/2
        ("exam-ha", "B", "(B)", None),
        ("test-sw", "A", "(B)", None), ("test-sw", "A", "no idea", None),  # 0/2: absent from the release's score.json
        ("medExam_sw", "A", "(A)", None),  # minor, but its name ends in no "-xx": no column
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps([prebuilt(s, a, c) for s, a, _, c in rows], ensure_ascii=False), encoding="utf-8")
    prepared = prepare_from_prompt_file(str(path))
    assert [p.qid for p in prepared.prompts][:2] == ["medqa-usmle:0", "medqa-usmle:1"]
    predictions = {p.qid: extract_release_answer(text) for p, (_, _, text, _) in zip(prepared.prompts, rows)}
    result = score_release(prepared.release, predictions).to_dict()
    per_source = {name: (s["questions"], s["correct"], s["unanswered"]) for name, s in result["per_source"].items()}
    assert per_source == {
        "medqa-usmle": (4, 3, 0), "pubmedqa": (2, 1, 1), "MMLU_anatomy_de": (3, 1, 0),
        "MMLU_college_biology_de": (1, 1, 0), "MMLU_college_medicine_pt": (2, 2, 0), "MMLU_anatomy_pt": (2, 0, 0),
        "mmlu-medical-ar": (2, 1, 0), "medExam_en": (1, 1, 0), "exam-ha": (2, 1, 0), "quiz-ha": (2, 2, 0),
        "test-sw": (2, 0, 1), "medExam_sw": (1, 1, 0)}
    major = {code: (lang["column"], lang["accuracy"]) for code, lang in result["major"].items()}
    assert major == {
        "ar": ("mmlu-medical-ar", 0.5),
        "de": ("weighted-average-de", 2 / 4),  # pooled: (1 + 1) / (3 + 1), not the mean of 1/3 and 1
        "en": ("average-en", (3 / 4 + 1 / 2) / 2),  # the mean of the sources, not 4 of 6
        "pt": ("weighted-average-pt", 0 / 2)}  # college_medicine_pt is not counted by the release
    assert result["major"]["pt"]["not_counted"] == ["MMLU_college_medicine_pt"]
    assert result["major"]["en"]["missing"] == ["mmlu-medical", "medmcqa"]
    assert list(result["major"]) == ["ar", "de", "en", "pt"]  # the release's column order
    assert result["major_average"] == pytest.approx((0.5 + 0.5 + 0.625 + 0.0) / 4)
    minor = {code: (lang["column"], lang["accuracy"], lang["sources"]) for code, lang in result["minor"].items()}
    # ha: the release's table keeps the last source of its score.json, ordered by first right answer: exam-ha
    assert minor == {"sw": ("test-sw", 0.0, ["test-sw"]), "ha": ("exam-ha", 0.5, ["exam-ha", "quiz-ha"])}
    assert result["minor_average"] == pytest.approx(0.25)
    assert result["not_averaged"] == ["medExam_en", "medExam_sw"]
    assert (result["questions"], result["correct"], result["unanswered"]) == (24, 14, 2)
    table = score_release(prepared.release, predictions).table()
    de = next(line for line in table.splitlines() if line.startswith("weighted-average-de"))
    assert de.split()[:6] == ["weighted-average-de", "de", "German", "50.0", "weighted:", "MMLU_anatomy_de,"]
    assert "major average over 4 languages (unweighted mean of the columns): 40.6" in table
    assert "(the release's table shows exam-ha only)" in table
    assert "prompts read from a file" in table


def test_prompt_files_refuse_what_the_release_does_not_write(tmp_path):
    for content, message in [("[{\"question\": \"p\", \"source\": \"medqa-usmle\", \"answer\": \"G\"}]",
                              '"answer" must be one of the option letters'),
                             ("[{\"question\": \"\", \"source\": \"medqa-usmle\", \"answer\": \"A\"}]",
                              'missing or empty "question"'),
                             ("[{\"question\": \"p\", \"answer\": \"A\"}]", '"source" must be')]:
        path = tmp_path / "p.json"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(QuestionFileError, match=f"^{path}: item 0: " + message.replace("(", r"\(")):
            read_prompt_file(str(path))


# --- end to end: the real CLI on a tiny random checkpoint --------------------------------------------------------

@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("random")
    run_medmoe(["train", str(REPO / "examples" / "tiny.yaml"), "--stage", "cpt", "parallel.expert=1",
                "moe.expert_slots=null", "stages.cpt.training.train_steps=0", f"checkpoint.save={root / 'ckpt'}",
                f"logging.output_dir={root}"])
    return root / "ckpt" / "cpt"


def test_released_bench_evaluates_end_to_end(random_checkpoint, tmp_path):
    items = ([released(f"Question {i} about insulin?", ["Liver", "Pancreas", "Spleen", "Kidney"], "ABCD"[i],
                       "medqa-usmle") for i in range(4)]
             + [released("Far too long " * 330 + "?", ["a", "b"], "A", "medqa-usmle")]  # over the budget
             + [released(f"Does walking help {i}?", ["Yes.", "No.", "Maybe."], "ABC"[i % 3], "pubmedqa",
                         context=f"A trial of {i + 10} adults.") for i in range(4)]
             + [released("ما العضو الذي ينتج الأنسولين؟", ["الكبد", "البنكرياس"], "B", "mmlu-medical-ar")] * 2
             + [released(f"Swali {i}?", ["Ini", "Kongosho"], "AB"[i % 2], "medexam-sw", "minor", f"Kisa {i}.")
                for i in range(4)])
    bench = write_array(tmp_path / "ApolloMoEBench.json", items)
    out = tmp_path / "release"
    proc = run_medmoe(["eval", "mcq", "--ckpt", str(random_checkpoint), "--data", bench, "--protocol", "apollomoe",
                       "--limit", "1", "--max-new-tokens", "6", "--output", str(out)])
    assert "major: the columns of the release's Major_Test table" in proc.stdout
    assert "average-en" in proc.stdout and "medexam-sw  sw Swahili" in proc.stdout
    assert "note: sources with 3 questions or fewer get fewer shots: mmlu-medical-ar" in proc.stdout
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert scores["protocol"] == "apollomoe" and scores["min_new_tokens"] == 2 and scores["max_new_tokens"] == 6
    assert scores["dropped"]["questions"] == 1 and scores["dropped"]["ids"] == ["medqa-usmle:4"]
    assert scores["questions"] == 4 and set(scores["per_source"]) == {"medqa-usmle", "pubmedqa", "mmlu-medical-ar",
                                                                       "medexam-sw"}
    expected = build_release_prompts(read_questions([bench]), seed=0).limited(1)
    assert json.loads((out / "prompts.json").read_text(encoding="utf-8")) == [
        p.release_record() for p in expected.prompts]
    ours = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in ours] == [p.qid for p in expected.prompts]
    for record in ours:
        assert record["predicted"] == extract_release_answer(record["output"])
    # the prompts written, read back with --prompts: the same prompts, so the same answers
    again = run_medmoe(["eval", "mcq", "--ckpt", str(random_checkpoint), "--prompts", str(out / "prompts.json"),
                        "--protocol", "apollomoe", "--max-new-tokens", "6", "--output", str(tmp_path / "again")])
    assert "prompts read from a file" in again.stdout
    repeated = [json.loads(line) for line in (tmp_path / "again" / "predictions.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert [r["output"] for r in repeated] == [r["output"] for r in ours]
    # our protocol reads the same file as it is; nothing is dropped
    mine = run_medmoe(["eval", "mcq", "--ckpt", str(random_checkpoint), "--data", bench, "--mode", "loglik"])
    assert "15 questions" in mine.stdout and "major average over 2 languages" in mine.stdout


@pytest.mark.parametrize("content, where, message", [
    ('{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)"}', "", "expected a JSON array"),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)"}, {"question": "r", "answer": "(B)"}]',
     " item 1:", 'missing "options"'),
    ('[{"question": "q", "options": "A) a\\nB) b", "answer": "(A)"}]', " item 0:", '"options" must be lettered'),
    ('[{"question": "q", "options": "(A) a\\n(B) b", "answer": "(A)"}, '
     '{"question": "r", "options": "(A) a\\n(B) b", "answer": "(E)"}]', " item 1:",
     '"answer" must be one of the option letters A, B'),
])
def test_malformed_bench_files_exit_3_naming_file_and_item(random_checkpoint, tmp_path, content, where, message):
    path = tmp_path / "medqa-usmle.json"
    path.write_text(content, encoding="utf-8")
    proc = run_medmoe(["eval", "mcq", "--ckpt", str(random_checkpoint), "--data", str(path), "--protocol",
                       "apollomoe"], check=False)
    assert proc.returncode == EXIT_INPUT and "Traceback" not in proc.stderr, proc.stderr
    assert f"medmoe eval mcq: {path}:{where} {message}" in proc.stderr, proc.stderr
