"""Prefect flows: one per stage and one for the whole pipeline. They orchestrate; the library
(``clipshift``) computes."""
