"""imgscore: nightly batch scoring of image folders with torchvision models, orchestrated by
Prefect 3, results in Parquet.

The code lives in two folders at the repository root, installed under this package's name:
``flows/`` as :mod:`imgscore.flows` (the Prefect flows and the ``imgscore`` CLI) and ``tasks/``
as :mod:`imgscore.tasks` (plain functions the flows call). ``docs/architecture.md`` maps them.
"""
