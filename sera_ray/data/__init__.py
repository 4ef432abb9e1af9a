"""Preference data: formats, validation and tokenization (pyarrow tables in and out, no Ray)."""
