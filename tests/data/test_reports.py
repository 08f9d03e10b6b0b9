"""Section extraction and cleaning of MIMIC-CXR style radiology reports (mmvl/data/reports.py)."""

from __future__ import annotations

import pytest

from mmvl.data.reports import clean_report, extract_sections, report_text

# Written for these tests in the layout of MIMIC-CXR report files (leading space on each line,
# centred banner, "___" where de-identification removed a name, date or age); no real report text.
STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with cough and fever  // ? pneumonia
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  ___
 
 FINDINGS:  
 
 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax is seen.  The cardiomediastinal silhouette is within normal
 limits.
 
 IMPRESSION:  
 
 No acute cardiopulmonary process.
"""  # noqa: W291, W293

WET_READ_NO_FINDINGS = """ WET READ: ___ ___ ___ 9:14 PM
  Mild pulmonary edema.
 ______________________________________________________________________________
                                 FINAL REPORT
 PORTABLE CHEST RADIOGRAPH
 
 HISTORY:  Dyspnea.
 
 COMPARISON:  Radiograph from ___.
 
 CONCLUSION:  
 Mild interstitial pulmonary edema, slightly worse than on ___.  Small
 bilateral pleural effusions.  Dr. ___ was notified by telephone at 9:10 p.m.
"""  # noqa: W291, W293

LOWER_CASE = """Indication: Evaluate line placement.
Comparison: Radiograph of [**2150-3-2**] at [**Hospital1 18**].
findings and impression:
Right internal jugular catheter terminates in the mid SVC.
Lungs: clear, no pneumothorax.
"""

NO_HEADERS = """ Heart size is normal.  Lungs are clear.
 No pleural effusion.
"""

FINDINGS_ONLY = """ INDICATION:  ___-year-old man with chest pain.
 FINDINGS:
 Stable mild cardiomegaly.
 Small left pleural effusion, unchanged from ___.
"""

TWO_FINDINGS = """ CHEST, PA AND LATERAL:
 
 INDICATION:  Fever.
 
 FINDINGS:  Normal heart size.
 
 FINDINGS:  Clear lungs.
 
 IMPRESSION:  Normal chest.
"""  # noqa: W293


def test_extract_sections_standard_report() -> None:
    sections = extract_sections(STANDARD)
    assert sections == {
        "examination": "CHEST (PA AND LAT)",
        "indication": "___F with cough and fever  // ? pneumonia",
        "technique": "Chest PA and lateral",
        "comparison": "___",
        "findings": (
            "The lungs are clear without focal consolidation.  No pleural effusion or\n"
            " pneumothorax is seen.  The cardiomediastinal silhouette is within normal\n"
            " limits."
        ),
        "impression": "No acute cardiopulmonary process.",
    }
    order = ["examination", "indication", "technique", "comparison", "findings", "impression"]
    assert list(sections) == order


def test_report_text_standard_report() -> None:
    assert report_text(STANDARD) == (
        "The lungs are clear without focal consolidation. No pleural effusion or pneumothorax is seen. "
        "The cardiomediastinal silhouette is within normal limits. No acute cardiopulmonary process."
    )
    assert report_text(STANDARD, ["impression", "findings"]) == (
        "No acute cardiopulmonary process. The lungs are clear without focal consolidation. "
        "No pleural effusion or pneumothorax is seen. "
        "The cardiomediastinal silhouette is within normal limits."
    )
    assert report_text(STANDARD, ("indication",)) == "F with cough and fever // ? pneumonia"
    assert report_text(STANDARD, "impression") == "No acute cardiopulmonary process."


def test_wet_read_banner_and_conclusion() -> None:
    sections = extract_sections(WET_READ_NO_FINDINGS)
    assert sections == {
        "wet read": "___ ___ ___ 9:14 PM\n  Mild pulmonary edema.",
        "preamble": "PORTABLE CHEST RADIOGRAPH",
        "history": "Dyspnea.",
        "comparison": "Radiograph from ___.",
        "impression": (
            "Mild interstitial pulmonary edema, slightly worse than on ___.  Small\n"
            " bilateral pleural effusions.  Dr. ___ was notified by telephone at 9:10 p.m."
        ),
    }
    # No findings section: the impression alone, de-identification gaps removed.
    assert report_text(WET_READ_NO_FINDINGS) == (
        "Mild interstitial pulmonary edema, slightly worse than on. Small bilateral pleural effusions. "
        "Dr. was notified by telephone at 9:10 p.m."
    )
    assert report_text(WET_READ_NO_FINDINGS, ("conclusion",)) == report_text(WET_READ_NO_FINDINGS)


def test_lower_case_headers_and_mimic_iii_placeholders() -> None:
    assert extract_sections(LOWER_CASE) == {
        "indication": "Evaluate line placement.",
        "comparison": "Radiograph of [**2150-3-2**] at [**Hospital1 18**].",
        # "Lungs:" is mixed-case prose, not a header, so it stays inside the section.
        "impression": (
            "Right internal jugular catheter terminates in the mid SVC.\nLungs: clear, no pneumothorax."
        ),
    }
    assert report_text(LOWER_CASE) == (
        "Right internal jugular catheter terminates in the mid SVC. Lungs: clear, no pneumothorax."
    )
    assert report_text(LOWER_CASE, ("comparison",)) == "Radiograph of at."


def test_no_headers_is_preamble_and_falls_back_to_whole_report() -> None:
    assert extract_sections(NO_HEADERS) == {
        "preamble": "Heart size is normal.  Lungs are clear.\n No pleural effusion."
    }
    assert report_text(NO_HEADERS) == "Heart size is normal. Lungs are clear. No pleural effusion."


def test_missing_requested_section_falls_back_to_whole_cleaned_report() -> None:
    assert report_text(FINDINGS_ONLY) == (
        "Stable mild cardiomegaly. Small left pleural effusion, unchanged from."
    )
    assert report_text(FINDINGS_ONLY, ("impression",)) == (
        "INDICATION: -year-old man with chest pain. FINDINGS: Stable mild cardiomegaly. "
        "Small left pleural effusion, unchanged from."
    )
    # Without a findings or impression section the whole report stands in, banner and separators removed.
    assert report_text(WET_READ_NO_FINDINGS, ("findings",)) == (
        "WET READ: 9:14 PM Mild pulmonary edema. PORTABLE CHEST RADIOGRAPH HISTORY: Dyspnea. "
        "COMPARISON: Radiograph from. CONCLUSION: Mild interstitial pulmonary edema, slightly worse than on. "
        "Small bilateral pleural effusions. Dr. was notified by telephone at 9:10 p.m."
    )


def test_repeated_and_empty_sections() -> None:
    # The study title "CHEST, PA AND LATERAL:" is a findings header with an empty body, so it is dropped,
    # and the two FINDINGS blocks are joined.
    assert extract_sections(TWO_FINDINGS) == {
        "indication": "Fever.",
        "findings": "Normal heart size.\nClear lungs.",
        "impression": "Normal chest.",
    }
    assert report_text(TWO_FINDINGS) == "Normal heart size. Clear lungs. Normal chest."
    # A header whose body is only a placeholder counts as empty.
    assert report_text(" FINDINGS: ___\n IMPRESSION: Normal.\n") == "Normal."


@pytest.mark.parametrize("text", ["", "   \n \n", " FINAL REPORT\n", " FINAL REPORT\n ___\n ________\n"])
def test_blank_reports_give_empty_text(text: str) -> None:
    assert report_text(text) == ""
    assert clean_report(text) == ""


def test_extract_sections_of_empty_text() -> None:
    assert extract_sections("") == {}
    assert extract_sections(" FINDINGS:\n\n IMPRESSION:  \n") == {}


def test_clean_report_keeps_case_and_punctuation() -> None:
    assert clean_report(STANDARD) == (
        "EXAMINATION: CHEST (PA AND LAT) INDICATION: F with cough and fever // ? pneumonia "
        "TECHNIQUE: Chest PA and lateral COMPARISON: "
        "FINDINGS: The lungs are clear without focal consolidation. "
        "No pleural effusion or pneumothorax is seen. "
        "The cardiomediastinal silhouette is within normal limits. "
        "IMPRESSION: No acute cardiopulmonary process."
    )
    assert clean_report("Compared to ___ , ___ and [**2101-1-1**]; tube  in\tplace (___).") == (
        "Compared to, and; tube in place ()."
    )


def test_times_and_prose_are_not_headers() -> None:
    text = " IMPRESSION:\n No change since 10:30 today.\n Note: see http://example.org for details.\n"
    assert extract_sections(text) == {
        "impression": "No change since 10:30 today.\n Note: see http://example.org for details."
    }


@pytest.mark.parametrize(
    "report", [STANDARD, WET_READ_NO_FINDINGS, LOWER_CASE, NO_HEADERS, FINDINGS_ONLY, TWO_FINDINGS]
)
@pytest.mark.parametrize("sections", [("findings", "impression"), ("impression",), ("findings",)])
def test_report_text_is_idempotent(report: str, sections: tuple[str, ...]) -> None:
    # Converters store report_text() in the manifest and ManifestDataset applies it again (same sections).
    once = report_text(report, sections)
    assert report_text(once, sections) == once


def test_one_line_reports_split_at_known_headers_after_a_sentence() -> None:
    assert extract_sections("FINDINGS: No effusion. IMPRESSION: Normal chest.") == {
        "findings": "No effusion.",
        "impression": "Normal chest.",
    }
    assert report_text("Heart is normal.  Impression: no acute process.") == "no acute process."
    # Mid-line, only a known header right after the end of a sentence starts a section.
    for prose in ("Seen at 9:10. Findings were discussed.", "Heart size and impression: stable."):
        assert extract_sections(prose) == {"preamble": prose}
    # The converters' one-line output of a report without findings/impression stays as it is.
    fallback = report_text(FINDINGS_ONLY, ("impression",))
    assert extract_sections(fallback) == {
        "indication": "-year-old man with chest pain.",
        "findings": "Stable mild cardiomegaly. Small left pleural effusion, unchanged from.",
    }


def test_iu_xray_placeholders_are_removed_like_mimic_ones() -> None:
    # Open-I (Indiana University) reports replace de-identified words with "XXXX".
    assert clean_report("Clear lung XXXX bilaterally. Midline sternotomy XXXX.") == (
        "Clear lung bilaterally. Midline sternotomy."
    )
    assert clean_report("Compared to XXXX-XXXX, stable (XXXX). XXXX XXXX are normal.") == (
        "Compared to, stable (). are normal."
    )
    assert clean_report("Broken 4XXXX, notified at XXXXPM.") == "Broken 4, notified at PM."
    # Only upper case, and not inside a word.
    assert clean_report("Sizes xxxx, XXX and MAXXXXed kept.") == "Sizes xxxx, XXX and MAXXXXed kept."
    assert report_text(" FINDINGS: XXXX\n IMPRESSION: Normal.\n") == "Normal."
