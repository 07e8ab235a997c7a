"""PANDA (Kaggle competition prostate-cancer-grade-assessment) through Kaggle's API.

    sheet = panda_sheet()   # needs the user's Kaggle credentials and the accepted competition rules

train.csv (image_id, data_provider, isup_grade, gleason_score) becomes the sheet: slide_id =
image_id, label = isup{grade} (classes isup0..isup5, ordinal), source
kaggle:prostate-cancer-grade-assessment/train_images/{image_id}.tiff; data_provider (karolinska,
radboud) and gleason_score are kept as columns. PANDA gives no patient ids: each biopsy is its own
patient_id, as in the challenge and Song et al.'s split. Kaggle gives no md5: downloads are checked
for completeness (Content-Length), not content.
"""

from __future__ import annotations

import io
import zipfile

import pandas as pd

from slidetrain.data.download import KAGGLE_API, kaggle_credentials, kaggle_rules_hint, kaggle_url
from slidetrain.errors import DownloadError, SheetError

COMPETITION = "prostate-cancer-grade-assessment"
TRAIN_COLUMNS = ("image_id", "data_provider", "isup_grade", "gleason_score")


def kaggle_file(competition: str, file_path: str, api: str = KAGGLE_API, session=None) -> bytes:
    """One competition file's bytes (unzipped when Kaggle wraps it in a zip)."""
    import requests

    session = session or requests.Session()
    url = kaggle_url(competition, file_path, api)
    try:
        r = session.get(url, auth=kaggle_credentials(), timeout=120)
    except requests.RequestException as err:
        raise DownloadError(f"kaggle:{competition}/{file_path}", f"{url}: {err}") from err
    if r.status_code == 403:
        raise DownloadError(f"kaggle:{competition}/{file_path}", f"403 Forbidden. {kaggle_rules_hint(competition)}")
    if r.status_code == 401:
        raise DownloadError(
            f"kaggle:{competition}/{file_path}",
            "401 Unauthorized: the Kaggle username/key were refused; create a new API token",
        )
    if r.status_code != 200:
        raise DownloadError(f"kaggle:{competition}/{file_path}", f"{url} answered {r.status_code}")
    data = r.content
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            data = z.read(z.namelist()[0])
    return data


def panda_sheet(api: str = KAGGLE_API, session=None, competition: str = COMPETITION) -> pd.DataFrame:
    table = pd.read_csv(
        io.BytesIO(kaggle_file(competition, "train.csv", api, session)), dtype=str, keep_default_na=False
    )
    missing = [c for c in TRAIN_COLUMNS if c not in table.columns]
    if missing:
        raise SheetError(f"kaggle:{competition}/train.csv lacks column(s) {missing}; got {list(table.columns)}")
    bad = table.index[~table.isup_grade.isin([str(i) for i in range(6)])].tolist()
    if bad:
        raise SheetError(f"kaggle:{competition}/train.csv: isup_grade not 0-5 in row(s) {[i + 2 for i in bad[:10]]}")
    return pd.DataFrame(
        {
            "slide_id": table.image_id,
            "patient_id": table.image_id,
            "label": "isup" + table.isup_grade,
            "source": f"kaggle:{competition}/train_images/" + table.image_id + ".tiff",
            "md5": "",
            "size": "",
            "data_provider": table.data_provider,
            "gleason_score": table.gleason_score,
        }
    )
