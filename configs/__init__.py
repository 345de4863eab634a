"""The YAML configs shipped with imgscore, installed as the package ``imgscore.configs`` so that a
wheel (or ``pip install .``) finds them from any working directory: ``demo.yaml`` (``imgscore
demo``) and ``nightly.yaml`` (a production template). Read them through
``imgscore.config.loading.shipped_config``."""
