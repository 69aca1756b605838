"""liftoff's Airflow pieces: deferrable triggers (imported by the triggerer) and the thin
operators that defer to them. The engine they call lives in ``include/liftoff``."""
