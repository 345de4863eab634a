"""How an ``imgscore`` command runs Prefect: start-up and teardown, the temporary API server,
task runners (threads, Dask), progress, and the adapters to other libraries' private parts."""
