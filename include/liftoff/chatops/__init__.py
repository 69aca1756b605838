"""ChatOps: the ``liftoff`` command release managers type, over Airflow's REST API v2 only.

``api`` is the HTTP client (token from ``/auth/token``, errors mapped to exit codes); ``cli``
builds each DAG's conf from validated arguments and prints short results (``--json`` for
machines).
"""
