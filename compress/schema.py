"""The one base class of every configuration schema Squeeze reads (recipes, stage configs, the
eval section, gate criteria): unknown fields refused, types strict, values frozen, so a typo in
a recipe is an error naming the field instead of a silently ignored key."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base of every schema: extra fields forbidden, strict types, frozen instances."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
