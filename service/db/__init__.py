"""Persistence: tables, sessions, migrations and guarded trial transitions."""
