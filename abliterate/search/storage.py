"""The study's database: Optuna's SQLite storage with a trial's writes grouped.

Optuna commits every parameter a trial draws and every attribute it is given on its own: with the
default space's 22 parameters and 7 attributes that is 29 transactions a trial, about 0.1 s of the
0.15 s of a trial's bookkeeping on the 2-core machine (`benchmarks/bench_search.py`). `StudyStorage`
holds them and commits them together: a trial's parameters as soon as they are drawn (`write_pending`,
called by the search before the trial is scored, so the parameters of a trial a killed run left
running are there to be tried again), its attributes with its state and values when it is told.
What is read is what was written: every held write is committed before a trial is created or its
state changes, and a trial in this process reads its own parameters from Optuna's copy of it.
"""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna import distributions
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy.dialects.sqlite import insert as sqlite_insert


class StudyStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose trial parameters and user attributes are committed together."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[tuple[Any, ...]] = []

    def _set_trial_param(self, *args: Any) -> None:  # where Optuna's cached storage writes a parameter
        self._pending.append(("param", *args))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._pending.append(("attr", trial_id, key, value))

    def write_pending(self) -> None:
        """Commit the writes held so far, in one transaction: each trial looked up and checked once
        (still running), each parameter's distribution checked against the study's (as Optuna does),
        the rows inserted together."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        with _create_scoped_session(self.scoped_session, True) as session:
            checked: set[int] = set()
            params, attrs = [], []
            for kind, trial_id, *args in pending:
                if trial_id not in checked:
                    trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
                    self.check_trial_is_updatable(trial_id, trial.state)
                    checked.add(trial_id)
                if kind == "attr":
                    attrs.append({"trial_id": trial_id, "key": args[0], "value_json": json.dumps(args[1])})
                    continue
                name, value, distribution, previous = args
                if previous is None:  # the study's first trial with this parameter: Optuna's own check
                    self._set_trial_param_without_commit(session, trial_id, name, value, distribution)
                    continue
                distributions.check_distribution_compatibility(previous, distribution)
                params.append(
                    models.TrialParamModel(
                        trial_id=trial_id,
                        param_name=name,
                        param_value=value,
                        distribution_json=distributions.distribution_to_json(distribution),
                    )
                )
            session.add_all(params)
            self._upsert_user_attrs(session, attrs)

    def _upsert_user_attrs(self, session: Any, rows: list[dict[str, Any]]) -> None:
        """Trial user attributes, each replacing the one of the same key: one statement on SQLite."""
        model = models.TrialUserAttributeModel
        if rows and self.engine.name == "sqlite":
            insert = sqlite_insert(model).values(rows)
            update = {"value_json": insert.excluded.value_json}
            session.execute(
                insert.on_conflict_do_update(index_elements=[model.trial_id, model.key], set_=update)
            )
            return
        for row in rows:  # another database: Optuna's own write
            value = json.loads(row["value_json"])
            self._set_trial_attr_without_commit(session, model, row["trial_id"], row["key"], value)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        self.write_pending()
        return super().set_trial_state_values(trial_id, state, values)

    def _create_new_trial(self, *args: Any, **kwargs: Any) -> Any:
        self.write_pending()
        return super()._create_new_trial(*args, **kwargs)


def write_pending(study: optuna.Study) -> None:
    """Commit the study's held writes now (a study on another storage has none)."""
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps an RDBStorage in a cache
    if isinstance(storage, StudyStorage):
        storage.write_pending()
