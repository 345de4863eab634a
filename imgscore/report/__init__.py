"""What people read after a run.

A run's report is one typed value (``model``), built once from its manifest and Parquet
(``build``, with the numbers of ``stats``, the accuracy against folder labels of ``evaluate`` and
the night-over-night comparison of ``drift``), and rendered three ways: on the terminal
(``terminal``), as report.html (``html``: the Jinja2 template in ``templates/``, with ``plots``
and ``thumbnails``) and as the Prefect artifacts' content (``markdown``). ``text`` holds what the
renderers share.
"""
