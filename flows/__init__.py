"""Prefect flows (score_images, rerun_failed) and the ``imgscore`` CLI."""
