"""The one rule the service, `replay` and `check-expiry` share: refuse a database older than this code."""

from __future__ import annotations

import pytest

from hlf_actors import db
from hlf_actors.errors import MigrationError


def test_a_fully_migrated_database_passes() -> None:
    db.require_migrated({m.version for m in db.migrations()})


def test_every_missing_migration_is_named_with_the_fix() -> None:
    migrations = db.migrations()
    first, last = migrations[0], migrations[-1]
    with pytest.raises(MigrationError) as caught:
        db.require_migrated({m.version for m in migrations[1:-1]})
    assert str(caught.value) == (
        f"the database lacks migrations {first.version:03d}_{first.name}, {last.version:03d}_{last.name}: "
        "run `hlf-actors migrate` first"
    )
