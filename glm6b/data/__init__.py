"""Data formats and ADGEN rows: reading prompt/response files, building training and evaluation rows, offline caches."""
