"""The Prefect tasks the flows submit: ``plan``, ``score_shard``, ``prepare_rerun`` and
``rescore_shard``. Each is a thin wrapper over the library (:mod:`imgscore`), which is testable
without Prefect."""
