"""Why an input was quarantined, as one code of a small set beside the free text.

The text (``reason``) says exactly what was wrong, often naming the image; the code
(``reason_code``) is what to count and group by (``GROUP BY reason_code``). A reason is
coded by the first pattern it matches, in the order below; ``other`` is what none match.
"""

from __future__ import annotations

import re

# code -> what it means (README, "Manifest schema", lists the same).
CODES: dict[str, str] = {
    "empty-file": "the file has no bytes",
    "not-dicom": "not a DICOM file (no DICM prefix, no readable header, no transfer syntax)",
    "truncated": "the file or its image is cut off",
    "no-pixels": "a DICOM without usable pixel data (none, bad size, bit depths unsupported)",
    "undecodable": "the image data cannot be decoded (corrupt frame, unsupported codec)",
    "bad-png": "an NIH file that is not a readable PNG",
    "bad-name": "a file name that does not name its image (no NIH image index)",
    "no-labels": "an NIH image without its Data_Entry row",
    "bad-label": "a label row that cannot be used (malformed RLE or row, mask off the image)",
    "key-clash": "its sample key is already used by another image",
    "bad-seg": "a DICOM SEG label that cannot be used (unreadable, no pneumothorax segment)",
    "seg-no-image": "a DICOM SEG label that references no image of the batch or the dataset",
    "other": "none of the above",
}

_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (code, re.compile(pattern))
    for code, pattern in [
        ("empty-file", r"^file is empty"),
        # Anywhere: an image quarantined for its SEG says "bad label (x.dcm): bad SEG: ...".
        ("bad-seg", r"bad SEG"),
        ("seg-no-image", r"^SEG references no image"),
        ("no-pixels", r"^no pixel data|^bad image size|^unsupported Bits"),
        ("truncated", r"^truncated|cut off"),
        ("not-dicom", r"^not a DICOM file|^no transfer syntax"),
        ("undecodable", r"^corrupt encapsulated|^cannot decode (JPEG|transfer)|^decoded \("),
        ("bad-png", r"PNG"),
        ("bad-name", r"^file name has no NIH image index"),
        ("no-labels", r"^no row for .* in Data_Entry"),
        ("key-clash", r"sample key .* is already used"),
        ("bad-label", r"^bad label|RLE|expected (at least )?\d+ columns|empty ImageId|Image Index"),
    ]
]


def reason_code(reason: str) -> str:
    """The code of a quarantine reason (see :data:`CODES`)."""
    for code, pattern in _PATTERNS:
        if pattern.search(reason):
            return code
    return "other"
