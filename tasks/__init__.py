"""imgscore's work: plain functions (scan, plan, load model, decode, score, write) that the
Prefect flows in ``flows/`` call in order. Each is testable without Prefect."""
