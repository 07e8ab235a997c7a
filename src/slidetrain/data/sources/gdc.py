"""TCGA diagnostic slides from the GDC API files endpoint; the files come from its data endpoint.

    sheet = gdc_sheet("tcga_nsclc")   # one row per open diagnostic SVS of TCGA-LUAD and TCGA-LUSC

slide_id is the file name without `.svs` (TCGA-05-4244-01Z-00-DX1.<uuid>, as CLAM names them),
patient_id the first three fields of its barcode (TCGA-05-4244), label the project's class, source
`gdc:{file_id}`, md5 and size from the API.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from slidetrain.data.download import GDC_API
from slidetrain.errors import DownloadError, SheetError

log = logging.getLogger(__name__)

# dataset -> project id -> class name (the config's `classes`, in this order)
PROJECTS = {
    "tcga_nsclc": {"TCGA-LUAD": "LUAD", "TCGA-LUSC": "LUSC"},
    "tcga_rcc": {"TCGA-KICH": "KICH", "TCGA-KIRC": "KIRC", "TCGA-KIRP": "KIRP"},
    "tcga_prad": {"TCGA-PRAD": None},  # labels: ISUP grade from the Gleason grades (isup_from_gleason)
}
FIELDS = ["file_id", "file_name", "md5sum", "file_size", "cases.submitter_id", "cases.project.project_id"]
GLEASON_FIELDS = ["cases.diagnoses.primary_gleason_grade", "cases.diagnoses.secondary_gleason_grade"]


def slide_filters(project_ids: list[str]) -> dict:
    """The GDC filter for open diagnostic whole-slide images of the given projects."""

    def eq(field, value):
        return {"op": "=", "content": {"field": field, "value": value}}

    return {
        "op": "and",
        "content": [
            {"op": "in", "content": {"field": "cases.project.project_id", "value": list(project_ids)}},
            eq("data_format", "SVS"),
            eq("data_type", "Slide Image"),
            eq("experimental_strategy", "Diagnostic Slide"),
            eq("access", "open"),
        ],
    }


def query_files(filters: dict, fields: list[str], api: str = GDC_API, session=None, page_size: int = 500) -> list[dict]:
    """Every hit of the files endpoint, page by page."""
    import requests

    session = session or requests.Session()
    hits: list[dict] = []
    while True:
        params = {
            "filters": json.dumps(filters),
            "fields": ",".join(fields),
            "format": "JSON",
            "size": page_size,
            "from": len(hits),
        }
        url = f"{api.rstrip('/')}/files"
        try:
            r = session.get(url, params=params, timeout=60)
        except requests.RequestException as err:
            raise DownloadError("GDC files endpoint", f"{url}: {err}") from err
        if r.status_code != 200:
            raise DownloadError("GDC files endpoint", f"{url} answered {r.status_code}: {r.text[:300]}")
        data = r.json()["data"]
        hits += data["hits"]
        total = data["pagination"]["total"]
        if len(hits) >= total or not data["hits"]:
            return hits


def patient_of(barcode: str) -> str:
    """TCGA-05-4244-01Z-00-DX1 -> TCGA-05-4244 (project, tissue source site, participant)."""
    parts = barcode.split("-")
    if len(parts) < 3 or parts[0] != "TCGA":
        raise SheetError(f"file name {barcode!r} does not start with a TCGA barcode (TCGA-XX-XXXX-...)")
    return "-".join(parts[:3])


def isup_from_gleason(primary: int, secondary: int) -> int:
    """ISUP grade group from the Gleason patterns (Epstein et al. 2016): 3+3 -> 1, 3+4 -> 2,
    4+3 -> 3, sum 8 -> 4, sum 9-10 -> 5; sums below 6 -> 1 (graded as 3+3 today)."""
    total = primary + secondary
    if total <= 6:
        return 1
    if total == 7:
        return 2 if primary == 3 else 3
    return 4 if total == 8 else 5


def _gleason(hit: dict) -> tuple[int, int] | None:
    for case in hit.get("cases", []):
        for d in case.get("diagnoses", []) or []:
            p, s = d.get("primary_gleason_grade"), d.get("secondary_gleason_grade")
            try:  # GDC values read "Pattern 4"
                return int(str(p).split()[-1]), int(str(s).split()[-1])
            except (ValueError, IndexError):
                continue
    return None


def gdc_sheet(dataset: str, api: str = GDC_API, session=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sheet, left_out): the dataset's sheet, and the slides left out with the reason (written beside it)."""
    if dataset not in PROJECTS:
        raise SheetError(f"dataset {dataset!r} is not a GDC dataset; expected one of {sorted(PROJECTS)}")
    projects = PROJECTS[dataset]
    prad = dataset == "tcga_prad"
    hits = query_files(slide_filters(list(projects)), FIELDS + (GLEASON_FIELDS if prad else []), api, session)
    rows, left_out = [], []
    for hit in hits:
        name = hit["file_name"]
        slide_id = name.removesuffix(".svs")
        patient = patient_of(slide_id.split(".")[0])
        cases = hit.get("cases") or [{}]
        if cases[0].get("submitter_id") not in (None, patient):
            raise SheetError(
                f"GDC file {hit['file_id']} ({name}): case {cases[0]['submitter_id']!r} does not"
                f" match the barcode's patient {patient!r}"
            )
        project = (cases[0].get("project") or {}).get("project_id")
        if prad:
            grades = _gleason(hit)
            if grades is None:
                left_out.append({"slide_id": slide_id, "reason": "no Gleason grades in GDC"})
                continue
            label = f"isup{isup_from_gleason(*grades)}"
        else:
            label = projects.get(project)
            if label is None:
                raise SheetError(f"GDC file {hit['file_id']} ({name}): project {project!r} not in {list(projects)}")
        rows.append(
            {
                "slide_id": slide_id,
                "patient_id": patient,
                "label": label,
                "source": f"gdc:{hit['file_id']}",
                "md5": hit.get("md5sum", ""),
                "size": str(hit.get("file_size", "")),
                "project_id": project,
            }
        )
    if left_out:
        log.warning(
            "%s: %d slide(s) left out (listed beside the sheet), e.g. %s",
            dataset,
            len(left_out),
            [r["slide_id"] for r in left_out[:5]],
        )
    sheet = pd.DataFrame(rows).sort_values("slide_id").reset_index(drop=True)
    return sheet, pd.DataFrame(left_out, columns=["slide_id", "reason"])
