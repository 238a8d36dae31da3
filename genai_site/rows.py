"""Rows written and read on every request, without the ORM compiling each statement anew.

On a small CPU the ORM takes 0.3 to 0.5 ms to build and run one statement whose round trip to
PostgreSQL takes under 0.1 ms, and admitting, claiming and settling one API request took about
thirty of them. The statements on that path are plain SQL; the rows they write and read go
through the models' own fields (`get_db_prep_save`, `from_db_value`), so they hold exactly what
`save()` and a queryset would. No model signals are sent: the models written here have none.
"""

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from django.db import DEFAULT_DB_ALIAS, connection, models

M = TypeVar("M", bound=models.Model)


def quote(name: str) -> str:
    return connection.ops.quote_name(name)


@functools.cache
def row_insert_sql(model: type[models.Model]) -> tuple[str, list[models.Field]]:  # type: ignore[type-arg]
    """The INSERT of a new row of `model` (returning its id) and the fields its values are for
    (`row_values`)."""
    pk = model._meta.pk
    assert pk is not None and isinstance(pk, models.AutoField), model
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    sql = (
        f"INSERT INTO {quote(model._meta.db_table)} "
        f"({', '.join(quote(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {quote(pk.column)}"
    )
    return sql, fields


def row_values(obj: models.Model, fields: Sequence[models.Field]) -> list[Any]:  # type: ignore[type-arg]
    """The values of a new instance's `fields` as an INSERT of `save()` would send them."""
    return [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]


def row_insert(obj: M) -> M:
    """Insert a new instance, as `obj.save(force_insert=True)` does, and set its primary key."""
    sql, fields = row_insert_sql(type(obj))
    values = row_values(obj, fields)
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        obj.pk = cursor.fetchone()[0]
    return row_stored(obj)


def row_stored(obj: M) -> M:
    """Mark an instance as the row the database now holds (its INSERT was written here)."""
    obj._state.adding = False
    obj._state.db = DEFAULT_DB_ALIAS
    return obj


def row_update(model: type[models.Model], values: dict[str, Any], **where: Any) -> int:
    """`model.objects.filter(**where).update(**values)` as one statement, for equality filters
    on the model's own fields (by attribute name); returns how many rows it changed."""
    meta = model._meta

    def field(name: str) -> models.Field:  # type: ignore[type-arg]
        return next(f for f in meta.concrete_fields if f.attname == name or f.name == name)

    sets = [(field(name), value) for name, value in values.items()]
    conditions = [(field(name), value) for name, value in where.items()]
    sql = (
        f"UPDATE {quote(meta.db_table)} SET "
        + ", ".join(f"{quote(f.column)} = %s" for f, _ in sets)
        + " WHERE "
        + " AND ".join(f"{quote(f.column)} = %s" for f, _ in conditions)
    )
    params = [f.get_db_prep_save(v, connection) for f, v in sets]
    params += [f.get_db_prep_value(v, connection) for f, v in conditions]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


@functools.cache
def row_columns(model: type[models.Model]) -> str:
    """Every column of the model's table, in field order and named with the table, for a
    SELECT or a RETURNING list."""
    table = quote(model._meta.db_table)
    return ", ".join(f"{table}.{quote(f.column)}" for f in model._meta.concrete_fields)


def row_load(model: type[M], values: Sequence[Any]) -> M:
    """The instance a queryset would give for `values`, read in `row_columns(model)` order."""
    fields = model._meta.concrete_fields
    converted = []
    for field, value in zip(fields, values, strict=True):
        if value is not None:
            for converter in field.get_db_converters(connection):  # type: ignore[attr-defined]
                value = converter(value, field, connection)
        converted.append(value)
    return model.from_db(DEFAULT_DB_ALIAS, [f.attname for f in fields], converted)
