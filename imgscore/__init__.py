"""imgscore: nightly batch scoring of image folders with torchvision models, orchestrated by
Prefect 3, results in Parquet.

The library is here, one sub-package per concern (config, io, images, inference, runstate,
report, runtime). The Prefect flows and the ``imgscore`` CLI live in ``flows/`` at the repository
root, installed as :mod:`imgscore.flows`; the Prefect tasks they submit in ``tasks/``, installed
as :mod:`imgscore.tasks`. ``docs/architecture.md`` draws the map.
"""
