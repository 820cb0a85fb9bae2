"""The JSON columns' serializer: orjson's speed, json's values."""

import json

import pytest

from gateway.adapters.sql.database import json_text


@pytest.mark.parametrize(
    "value",
    [
        {"order": "o-1", "total": 39.5, "items": [{"sku": "A1", "qty": 2}], "paid": True, "note": None},
        {"big": 123456789012345678901234567890},  # beyond 64 bits: json writes it
        {1: "a", "2": "b"},  # a key that is not a string: json writes it as one
        {"text": "é ü 日本 \u2028"},
        [1e16, 0.1, -0.0, 2**63 - 1],
    ],
)
def test_stored_text_reads_back_as_json_would_have_written_it(value: object) -> None:
    assert json.loads(json_text(value)) == json.loads(json.dumps(value))
