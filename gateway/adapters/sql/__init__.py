"""The only package that imports sqlmodel / SQLAlchemy."""

from gateway.adapters.sql.database import Database
from gateway.adapters.sql.read_models import ReadModelStore
from gateway.adapters.sql.sagas import SagaStore
from gateway.adapters.sql.stream_index import StreamIndex

__all__ = ["Database", "ReadModelStore", "SagaStore", "StreamIndex"]
