"""Configuration records that checkpoints store as plain dicts: a dataclass built back from its dict, with unknown
keys refused by name."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class Record:
    """Base of a dataclass stored as a dict. ``what`` names it in errors; ``validate`` checks the values."""

    what = "config"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown {cls.what} key(s) {unknown}; valid keys: {sorted(valid)}")
        record = cls(**values)
        record.validate()
        return record

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        pass
