"""What people read after a run: the report (terminal, HTML, Prefect markdown), night-over-night drift, evaluation against folder labels."""
