"""Errors a user can fix, shared by every layer (no imports: any module may raise them)."""


class ConfigError(ValueError):
    """One or more settings are out of their valid range (all of them are listed)."""
