"""Radiology report text: split free-text reports into sections and clean them into training captions.

Section headers follow the conventions of MIT-LCP's MIMIC-CXR ``txt/section_parser.py`` (Johnson et al.,
Sci Data 2019): a header starts a line (a known one may also follow the end of a sentence) and ends in a
colon; its spelling is normalised to a canonical lower-case name, so "CONCLUSION:" and "Findings and
impression:" both become ``impression``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["SECTION_ALIASES", "augment_report", "clean_report", "extract_sections", "report_text", "split_sentences"]

# Header spellings seen in MIMIC-CXR (the frequent ones from section_parser.py) -> canonical section name.
SECTION_ALIASES: dict[str, str] = {
    "findings": "findings",
    "finding": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "impression and findings": "impression",
    "indication": "indication",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "technique": "technique",
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "notification": "notification",
    "addendum": "addendum",
    "wet read": "wet read",
    "wetread": "wet read",
    "final report": "preamble",
}

# An unknown ALL-CAPS header containing one of these words is that section ("IMPRESSION AND PLAN:"),
# checked in this order as section_parser.py does, so "FINDINGS/IMPRESSION:" is an impression.
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "indication", "technique", "addendum")
# An unknown ALL-CAPS header naming the study ("PA AND LATERAL VIEWS OF THE CHEST:") introduces findings.
_STUDY_TITLE = re.compile(
    r"\b(chest|portable|frontal|pa and lat|ap and lat|lateral and (pa|ap)"
    r"|(one|two) views?|(pa|ap|lateral) view)"
)

# A section header is "<name>:" at the start of a line, or a known name after the end of a sentence on the
# same line, as in one-line reports ("No effusion. IMPRESSION: Normal."). Every header ends in a colon
# followed by whitespace, so the search starts from those colons (a fast literal scan), which also keeps
# times ("9:14") and URLs from starting a section.
_HEADER_COLON = re.compile(r":(?=\s|$)")
_LINE_HEADER = re.compile(r"[ \t]*([A-Za-z][A-Za-z ()/,&'-]{0,59}?)[ \t]*")
_INLINE_HEADER = re.compile(
    r"(?<=[.!?])[ \t]+("
    + "|".join(
        re.escape(name).replace(r"\ ", r"[ \t]+")
        for name in sorted(SECTION_ALIASES, key=len, reverse=True)
        if name != "final report"
    )
    + r")[ \t]*\Z",
    re.IGNORECASE,
)
_BANNER_LINE = re.compile(r"^[ \t]*final report[ \t]*:?[ \t]*$", re.MULTILINE | re.IGNORECASE)
_RULE_LINE = re.compile(r"^[ \t]*_{4,}[ \t]*$", re.MULTILINE)  # longer than the "___" placeholder
# De-identification placeholders: "___" in MIMIC-CXR, "XXXX" in the Indiana University (Open-I) reports
# (Demner-Fushman et al., JAMIA 2016: "XXXX-XXXX", "XXXXXXXX" too), "[**Hospital1 18**]" in MIMIC-II/III
# notes. IU's is upper case only and may touch digits or a unit ("4XXXX", "XXXXPM"), never a letter before it
# or lower case after it, so "xxxx" in prose and "MAXXXXed" survive.
_MIMIC_III_PLACEHOLDER = re.compile(r"\[\*\*[^\]\n]*\*\*\]")
_ONE_PLACEHOLDER = r"(?:__+|(?<![A-Za-z])XXXX+(?:[-/]XXXX+)*(?![a-z]))"
_PLACEHOLDER_BEFORE_PUNCT = re.compile(rf"(?: |(?<=\d)){_ONE_PLACEHOLDER}(?: {_ONE_PLACEHOLDER})* ?(?=[.,;:!?)])")
_PLACEHOLDER_IN_PARENS = re.compile(rf"\({_ONE_PLACEHOLDER}(?: {_ONE_PLACEHOLDER})* ?(?=[.,;:!?)])")
_PLACEHOLDER = re.compile(_ONE_PLACEHOLDER)


def _section_name(header: str) -> str | None:
    """Canonical name for a header, or None when the text before the colon is not a section header."""
    name = " ".join(header.lower().split())
    if name in SECTION_ALIASES:
        return SECTION_ALIASES[name]
    # Mixed-case text such as "Lungs: clear." is a sentence inside a section, not a header of its own.
    if header != header.upper() or len(name) < 3:
        return None
    for main in _MAIN_SECTIONS:
        if main in name:
            return main
    if _STUDY_TITLE.search(name):
        return "findings"
    return name


def _boundaries(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, section name)`` of every header and "FINAL REPORT" banner, in text order."""
    found = []
    if "final report" in text.lower():
        found += [(match.start(), match.end(), "preamble") for match in _BANNER_LINE.finditer(text)]
    for colon in _HEADER_COLON.finditer(text):
        line_start = text.rfind("\n", 0, colon.start()) + 1
        before = text[line_start : colon.start()]
        match = _LINE_HEADER.fullmatch(before)
        if match is None:
            match = _INLINE_HEADER.search(before)
        if match is None:
            continue
        name = _section_name(match.group(1))
        if name is not None:
            found.append((line_start + match.start(), colon.end(), name))
    return sorted(found)


def extract_sections(text: str) -> dict[str, str]:
    """Split a report into ``{section name: body}`` in order of first appearance.

    Headers start a line; known ones (``SECTION_ALIASES``) are recognised in any case, and also after the
    end of a sentence within a line; other ALL-CAPS headers keep their own lower-case name. Text before
    the first header, and after a "FINAL REPORT" banner up to the next header, is ``preamble``. Bodies are
    stripped and lose separator lines of underscores, but keep their line breaks and placeholders (see
    ``clean_report``); a section that appears twice has its bodies joined by a newline, and sections with
    an empty body are left out.
    """
    if "____" in text:
        text = _RULE_LINE.sub("", text)  # separators (after a wet read) are never content
    bodies: dict[str, list[str]] = {}
    name, body_start = "preamble", 0
    for start, end, next_name in _boundaries(text):
        bodies.setdefault(name, []).append(text[body_start:start])
        name, body_start = next_name, end
    bodies.setdefault(name, []).append(text[body_start:])

    sections: dict[str, str] = {}
    for section, parts in bodies.items():
        body = "\n".join(part.strip() for part in parts if part.strip())
        if body:
            sections[section] = body
    return sections


def clean_report(text: str) -> str:
    """Report text on one line: no "FINAL REPORT" banner, separator lines or de-identification placeholders
    (MIMIC's ``___``, IU's ``XXXX``, MIMIC-III's ``[**...**]``).

    Whitespace runs collapse to one space; case and punctuation are kept. A placeholder directly before
    punctuation takes its leading space with it ("compared to ___." -> "compared to."; "Clear lung XXXX
    bilaterally." -> "Clear lung bilaterally.").
    """
    if "final report" in text.lower():
        text = _BANNER_LINE.sub(" ", text)
    if "____" in text:
        text = _RULE_LINE.sub(" ", text)
    text = " ".join(text.split())
    if "[**" in text:
        text = _MIMIC_III_PLACEHOLDER.sub("___", text)
    if "__" in text or "XXXX" in text:
        text = _PLACEHOLDER_BEFORE_PUNCT.sub("", f" {text}")
        text = _PLACEHOLDER_IN_PARENS.sub("(", text)
        text = " ".join(_PLACEHOLDER.sub(" ", text).split())
    return text


def report_text(text: str, sections: Sequence[str] = ("findings", "impression")) -> str:
    """The cleaned bodies of ``sections`` joined by a space, in the order asked for.

    Section names may be any alias ("conclusion" is ``impression``). When none of them is present, or all
    are empty after cleaning, the whole cleaned report is returned instead; a blank report gives "".
    """
    return " ".join(report_parts(text, sections))


def report_parts(text: str, sections: Sequence[str] = ("findings", "impression")) -> list[str]:
    """What :func:`report_text` joins: the non-empty cleaned bodies of ``sections`` in order, or ``[whole
    cleaned report]`` when none is found (``[]`` for a blank report). A tokenizer that must cut a long report
    can then keep its last section (the impression) whole (:class:`mmvl.data.loader.Collate`)."""
    if isinstance(sections, str):  # a bare "impression" would otherwise be read letter by letter
        sections = (sections,)
    names = (" ".join(name.lower().split()) for name in sections)
    wanted = dict.fromkeys(SECTION_ALIASES.get(name, name) for name in names)  # ordered, without repeats
    found = extract_sections(text)
    parts = [clean_report(found[name]) for name in wanted if name in found]
    parts = [part for part in parts if part]
    if parts:
        return parts
    whole = clean_report(text)
    return [whole] if whole else []


# A sentence ends at . ! or ? followed by whitespace (a clause after ";" stays with its sentence): "2.5 cm" stays
# whole (a decimal point is followed by a digit). Written by hand: reports are short and regular, and a sentence
# model (spaCy, nltk punkt) would be a heavy dependency for an augmentation that tolerates the odd wrong split.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_LIST_NUMBER = re.compile(r"\(?\d{1,2}[.)]")


def split_sentences(text: str) -> list[str]:
    """The sentences of one cleaned section body, in order (``[]`` for a blank one); a list number ("1.", "2)")
    stays with the sentence it numbers."""
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(text.strip()):
        if sentences and _LIST_NUMBER.fullmatch(sentences[-1]):
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return sentences


def augment_report(parts: Sequence[str], rng, shuffle: bool = True, drop: float = 0.0) -> list[str]:
    """Sentence-level augmentation of a report's sections (``report_parts``), as CXR-CLIP and MedCLIP sample and
    shuffle report sentences: within each section the sentences are put in random order (``shuffle``) and each is
    left out with probability ``drop``, keeping at least one; the sections keep their order (the impression stays
    last, which ``report_truncation="keep_last"`` relies on). ``rng``: a ``numpy.random.Generator``.

    A model that reads the findings as a bag of statements, rather than as one fixed sequence per study, embeds a
    one-sentence prompt ("Pulmonary nodule.") nearer the reports that state it."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop!r}")
    out = []
    for part in parts:
        sentences = split_sentences(part)
        if len(sentences) > 1:
            if drop:
                kept = [s for s in sentences if rng.random() >= drop]
                sentences = kept or [sentences[int(rng.integers(len(sentences)))]]
            if shuffle:
                sentences = [sentences[i] for i in rng.permutation(len(sentences))]
            # a last sentence without its full stop ("No acute findings") gets one where another now follows it
            sentences = [s if s[-1] in ".!?" or k == len(sentences) - 1 else s + "." for k, s in enumerate(sentences)]
        if sentences:
            out.append(" ".join(sentences))
    return out
