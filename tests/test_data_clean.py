"""Cleaning: each rule on hand-made documents, normalisation, HTML, PII, blocklist, language."""

from __future__ import annotations

import dataclasses

import pytest

from lmforge.common import LmforgeError
from lmforge.config import CleanConfig
from lmforge.data.clean import Cleaner, normalize, quality_reason, scrub_pii

GOOD = (
    "The committee met on Tuesday to discuss the new library. Several members argued that the "
    "building should open earlier in the morning, because students often arrive before eight. "
    "Others worried about the cost of extra staff. After a long debate, they agreed to run a "
    "trial for three months and to publish the results in the spring newsletter. The chair "
    "thanked everyone for their patience and closed the meeting shortly after noon."
)
OFF = CleanConfig(
    min_words=0,
    max_words=0,
    min_mean_word_length=0,
    max_mean_word_length=0,
    max_symbol_word_ratio=0,
    min_alpha_word_fraction=0,
    max_dup_line_fraction=1,
    max_top_ngram_fraction={},
    max_dup_ngram_fraction={},
)  # every rule off: each test switches on one


def only(**rule) -> CleanConfig:
    return dataclasses.replace(OFF, **rule)


def test_good_prose_passes_the_default_rules():
    assert quality_reason(GOOD, CleanConfig(min_words=50)) is None


@pytest.mark.parametrize(
    "text, rule, reason",
    [
        ("too short to keep", {"min_words": 5}, "too_few_words"),
        (" ".join(["word"] * 300), {"max_words": 200}, "too_many_words"),
        ("a b c d e f g h", {"min_mean_word_length": 3}, "mean_word_length"),
        (
            "supercalifragilisticexpialidocious " * 3,
            {"max_mean_word_length": 10},
            "mean_word_length",
        ),
        ("#tag #more #hash text ... and …", {"max_symbol_word_ratio": 0.1}, "symbol_word_ratio"),
        ("12 34 56 78 ,,, ok", {"min_alpha_word_fraction": 0.8}, "alpha_fraction"),
        ("no ending here\nnor here\nfine.", {"min_punct_line_fraction": 0.5}, "punct_lines"),
        ("same line\nsame line\nsame line\nother", {"max_dup_line_fraction": 0.3}, "dup_lines"),
        ("buy now " * 20 + GOOD, {"max_top_ngram_fraction": {2: 0.2}}, "top_2gram"),
        (GOOD + " " + GOOD, {"max_dup_ngram_fraction": {5: 0.15}}, "dup_5gram"),
    ],
)
def test_each_quality_rule_drops_what_it_targets_and_only_that(text, rule, reason):
    assert quality_reason(text, only(**rule)) == reason
    assert quality_reason(GOOD, only(**rule)) is None


def test_normalize_nfc_controls_spaces_and_blank_lines():
    raw = "Cafe\u0301\r\nnon\u00a0breaking\u200b zero\x07bell   \n\n\n\n\tindented  \n"
    assert normalize(raw) == "Caf\u00e9\nnon breaking zerobell\n\n\tindented"


def test_html_main_text_is_extracted_and_boilerplate_dropped():
    html = (
        "<html><head><script>var x = 1;</script></head><body><nav>Home | About | Login</nav>"
        f"<article><h1>Library hours</h1><p>{GOOD}</p></article><footer>Cookie settings</footer></body></html>"
    )
    res = Cleaner(CleanConfig()).clean(html, kind="html")
    assert res.reason is None and "committee met on Tuesday" in res.text
    assert "var x" not in res.text and "Login" not in res.text
    assert (
        Cleaner(CleanConfig())
        .clean("<html><body><script>var y;</script></body></html>", "html")
        .reason
        == "html_no_text"
    )


def test_pii_is_replaced_with_placeholders():
    text, n = scrub_pii(
        "Mail jane.doe@example.org or call +1 415-555-0132, server 192.168.1.20; year 2024, v1.2.3."
    )
    assert text == "Mail <EMAIL> or call <PHONE>, server <IP>; year 2024, v1.2.3."
    assert n == 3
    res = Cleaner(CleanConfig(pii=True)).clean(GOOD + " Contact admin@lib.example.com for details.")
    assert res.text.endswith("Contact <EMAIL> for details.") and res.pii == 1


def test_blocklist_words_and_file(tmp_path):
    blocked = tmp_path / "block.txt"
    blocked.write_text("# comment\nspring newsletter\n", encoding="utf-8")
    assert Cleaner(CleanConfig(blocklist=["Committee"])).clean(GOOD).reason == "blocklist"
    assert Cleaner(CleanConfig(blocklist_file=str(blocked))).clean(GOOD).reason == "blocklist"
    assert Cleaner(CleanConfig(blocklist=["commit"])).clean(GOOD).reason is None  # whole words only
    with pytest.raises(LmforgeError, match="blocklist_file not found"):
        CleanConfig(blocklist_file=str(tmp_path / "missing.txt"))


def test_language_filter_keeps_only_listed_languages():
    french = (
        "Le comité s'est réuni mardi pour discuter de la nouvelle bibliothèque. Plusieurs membres "
        "ont estimé que le bâtiment devrait ouvrir plus tôt le matin, parce que les étudiants "
        "arrivent souvent avant huit heures. D'autres s'inquiétaient du coût du personnel."
    )
    cleaner = Cleaner(CleanConfig(min_words=10, languages=["en"]))
    assert cleaner.clean(GOOD).reason is None
    assert cleaner.clean(french).reason == "language"


def test_empty_document_is_counted_not_crashing():
    assert Cleaner(CleanConfig()).clean(" \n\t\x00 ").reason == "empty"
