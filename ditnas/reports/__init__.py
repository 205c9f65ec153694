"""Stage 5: the report a release engineer reads (report.py: one self-contained HTML per run)."""
