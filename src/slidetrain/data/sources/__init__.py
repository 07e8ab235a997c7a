"""Sheet builders: one module per source, each returning a sheet (slide_id, patient_id, label, source,
and md5/size where the source gives them, plus source-specific columns) for `slidetrain sheet`.

| dataset     | source                          | module    |
|-------------|---------------------------------|-----------|
| tcga_nsclc  | GDC API (TCGA-LUAD, TCGA-LUSC)  | gdc       |
| tcga_rcc    | GDC API (TCGA-KICH/KIRC/KIRP)   | gdc       |
| tcga_prad   | GDC API (TCGA-PRAD, ISUP from the Gleason grades) | gdc |
| camelyon16  | public S3 bucket                | camelyon  |
| camelyon17  | public S3 bucket                | camelyon  |
| panda       | Kaggle competition API          | panda     |
| lks         | none: a sheet placed by hand    | (format in docs/datasets.md, read_sheet checks it) |
"""

DATASETS = ("tcga_nsclc", "tcga_rcc", "tcga_prad", "camelyon16", "camelyon17", "panda")
