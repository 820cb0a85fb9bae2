"""The only package that imports sqlmodel / SQLAlchemy."""

from gateway.adapters.sql.database import Database

__all__ = ["Database"]
