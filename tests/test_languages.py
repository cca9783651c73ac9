"""The language registry matches the spec's table exactly, and bad tables or codes fail clearly."""
import pytest

from megatron_medmoe.languages import LanguageTableError, load_registry

# ../shared/spec/model-and-routing.md, "The 50 languages and 7 families", written out independently
SPEC_FAMILIES = [
    ("Sino-Tibetan", "zh"),
    ("Altaic", "ko ja ne"),
    ("Australasian", "th vi lo"),
    ("Austronesian", "mg ceb su ilo doi"),
    ("Indo-European", "en de pt es fr ru hi it hr gl cs co lb la uk bs bg eo mai sr sq sk da sa no gn gd"),
    ("Afro-Asian", "ar ckb mt he"),
    ("Kongolese", "ln bm sw nso ig rw ha"),
]
SPEC_MAJOR = set("en zh fr hi es ar ru ja ko de it pt".split())
SPEC_PER_LANGUAGE = "ar de en es fr hi it ja ko pt ru zh".split()


def test_family_table_is_the_spec_table():
    reg = load_registry("families")
    assert reg.experts == tuple(name for name, _ in SPEC_FAMILIES)
    assert len(reg.codes) == 50
    for expert_id, (family, codes) in enumerate(SPEC_FAMILIES):
        for code in codes.split():
            assert reg.expert_id(code) == expert_id, code
            assert reg.language(code).family == family
    assert {lang.code for lang in reg.languages if lang.is_major} == SPEC_MAJOR


def test_per_language_table_orders_experts_alphabetically():
    reg = load_registry("languages12")
    assert list(reg.experts) == SPEC_PER_LANGUAGE
    assert [reg.expert_id(code) for code in SPEC_PER_LANGUAGE] == list(range(12))
    assert all(lang.is_major for lang in reg.languages)


def test_unknown_code_lists_the_known_ones():
    with pytest.raises(LanguageTableError) as err:
        load_registry("families").expert_id("xx")
    message = str(err.value)
    assert "'xx'" in message and "sw" in message and "zh" in message


def test_codes_in_other_case_or_with_a_region_resolve_to_the_tables():
    reg = load_registry("families")
    for written, code in [("EN", "en"), ("zh-CN", "zh"), ("pt_BR", "pt"), ("zh-Hans-CN", "zh"), ("Ceb_PH", "ceb"),
                          ("en", "en")]:
        assert reg.canonical_code(written) == code, written
        assert reg.language(written).code == code and reg.expert_id(written) == reg.expert_id(code)
    with pytest.raises(LanguageTableError, match=r"unknown language code 'xx-YY'.*known codes: .*sw"):
        reg.canonical_code("xx-YY")


def test_a_code_matching_two_table_codes_is_ambiguous(tmp_path):
    table = tmp_path / "two.yaml"
    table.write_text("experts: [a]\nlanguages:\n"
                     "  - {code: pt, name: Portuguese, family: Indo-European, expert: a, tier: major}\n"
                     "  - {code: PT, name: Portuguese (old), family: Indo-European, expert: a, tier: minor}\n")
    reg = load_registry(str(table))
    assert reg.canonical_code("PT") == "PT"  # written as the table writes it: no question
    for written in ("Pt", "pt_BR"):
        with pytest.raises(LanguageTableError, match=f"'{written}' is ambiguous.*'PT' or 'pt'.*known codes"):
            reg.language(written)


def test_norwegian_code_survives_yaml():
    # YAML 1.1 reads a bare `no` as false; the shipped table must quote it
    assert load_registry("families").language("no").name == "Norwegian"


def test_user_table_by_path(tmp_path):
    table = tmp_path / "mine.yaml"
    table.write_text("experts: [north, south]\nlanguages:\n"
                     "  - {code: en, name: English, family: Indo-European, expert: north, tier: major}\n"
                     "  - {code: sw, name: Swahili, family: Kongolese, expert: south, tier: minor}\n")
    reg = load_registry(str(table))
    assert reg.num_experts == 2 and reg.expert_id("sw") == 1 and reg.languages_of_expert(0) == ["en"]


@pytest.mark.parametrize("body, fragment", [
    ("experts: [a]\nlanguages:\n  - {code: en, name: E, family: F, expert: b, tier: major}\n", "not in `experts`"),
    ("experts: [a]\nlanguages:\n  - {code: en, name: E, family: F, expert: a, tier: huge}\n", "tier must be one of"),
    ("experts: [a, b]\nlanguages:\n  - {code: en, name: E, family: F, expert: a, tier: major}\n", "experts with no language"),
    ("experts: [a]\nlanguages:\n  - {code: en, name: E, family: F, expert: a, tier: major}\n"
     "  - {code: en, name: E2, family: F, expert: a, tier: minor}\n", "appears twice"),
    ("experts: [a]\nlanguages:\n  - {code: no, name: N, family: F, expert: a, tier: minor}\n", "quote codes"),
    ("experts: [a]\n", "exactly two top-level keys"),
    ("experts: [a\n", "not valid YAML"),
])
def test_bad_tables_name_the_problem(tmp_path, body, fragment):
    table = tmp_path / "bad.yaml"
    table.write_text(body)
    with pytest.raises(LanguageTableError) as err:
        load_registry(str(table))
    assert fragment in str(err.value) and str(table) in str(err.value)


def test_missing_table_names_the_builtins():
    with pytest.raises(LanguageTableError, match="families"):
        load_registry("/nonexistent/table.yaml")
