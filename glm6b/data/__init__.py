"""Data formats and ADGEN rows."""
