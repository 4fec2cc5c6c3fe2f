"""A catalog update's price changes: the fingerprint of two compiled catalogs (the bundled one and
the same after a re-price from a date and a model added) tells which models differ, over which
periods, and nothing else."""

from __future__ import annotations

from fixtures.catalog_variants import ADDED, REPRICED, REPRICED_FROM, updated_catalog

from spendstream.pricing import default_catalog
from spendstream.repricing.catalog_changes import Change, changes, fingerprint


def test_changes_name_the_models_and_periods_that_differ() -> None:
    old, new = fingerprint(default_catalog()), fingerprint(updated_catalog())
    assert changes(old, old) == []
    assert changes(old, new) == [
        Change("/".join(REPRICED), REPRICED_FROM.isoformat(), None, "repriced"),
        Change("/".join(ADDED), None, None, "added"),
    ]
    assert changes(new, old) == [
        Change("/".join(REPRICED), REPRICED_FROM.isoformat(), None, "repriced"),
        Change("/".join(ADDED), None, None, "removed"),
    ]
    # every other model's fingerprint is the same, and it is JSON-sized (stored in reprice_jobs)
    assert {k for k in old["models"] if old["models"][k] != new["models"].get(k)} == {"/".join(REPRICED)}
    assert len(str(old)) < 200 * len(old["models"])
