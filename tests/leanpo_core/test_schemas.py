"""leanpo_core.schemas: conform and check_version reject bad data with a message that names the column."""

import dataclasses

import pyarrow as pa
import pytest

from leanpo_core import schemas
from leanpo_core.schemas import EVALUATION, SchemaMismatch, check_version, conform


def row(**changes):
    base = dict(run_id="r1", model="m", split="test", metric="acc", value=0.5, n=10, ci_low=0.2, ci_high=0.8,
                details=None)
    return {**base, **changes}


def test_rows_conform_to_exact_schema_with_version():
    table = conform([row(), row(n=11, details="{}")], EVALUATION)
    assert table.schema.equals(EVALUATION.schema)
    assert table.schema.metadata == {schemas.TABLE_KEY: b"evaluation", schemas.VERSION_KEY: str(EVALUATION.version).encode()}
    assert table.column("n").to_pylist() == [10, 11]


def test_nullable_columns_may_be_omitted_from_rows():
    rows = [{k: v for k, v in row().items() if k != "details"}]
    assert conform(rows, EVALUATION).column("details").to_pylist() == [None]


def test_empty_rows_give_an_empty_table():
    assert conform([], EVALUATION).num_rows == 0


@pytest.mark.parametrize("position", [0, 1], ids=["first-row", "later-row"])
def test_missing_required_column_is_named(position):
    rows = [row(), row()]
    del rows[position]["metric"]
    with pytest.raises(SchemaMismatch, match=r"lack required column\(s\) \['metric'\]"):
        conform(rows, EVALUATION)


def test_missing_column_in_table_is_named():
    table = pa.Table.from_pylist([row()]).drop_columns(["value"])
    with pytest.raises(SchemaMismatch, match=r"missing columns \['value'\]"):
        conform(table, EVALUATION)


def test_extra_column_is_named_for_rows_and_tables():
    with pytest.raises(SchemaMismatch, match=r"unexpected column\(s\) \['oops'\]"):
        conform([row(), row(oops=1)], EVALUATION)
    with pytest.raises(SchemaMismatch, match=r"unexpected columns \['oops'\]"):
        conform(pa.Table.from_pylist([row(oops=1)]), EVALUATION)


def test_wrong_type_is_named_for_rows_and_tables():
    with pytest.raises(SchemaMismatch, match="column 'n'"):
        conform([row(n="ten")], EVALUATION)
    table = pa.table({**{k: [v] for k, v in row().items()}, "value": [[1.0]]})
    with pytest.raises(SchemaMismatch, match=r"column 'value' is list<item: double>, expected double"):
        conform(table, EVALUATION)


def test_compatible_table_types_are_cast():
    table = pa.table({k: pa.array([v], type=pa.string() if k == "details" else None) for k, v in row().items()})
    table = table.set_column(5, "n", pa.array([10], pa.int32()))
    assert conform(table, EVALUATION).schema.field("n").type == pa.int64()


def test_null_in_non_nullable_column_is_named():
    with pytest.raises(SchemaMismatch, match="column 'model' has 1 null"):
        conform([row(), row(model=None)], EVALUATION)


def test_check_version_accepts_own_and_rejects_other_versions():
    table = conform([row()], EVALUATION)
    assert check_version(table, EVALUATION).equals(table)
    v = EVALUATION.version
    with pytest.raises(SchemaMismatch, match=rf"expected table 'evaluation' v{v + 1}, found 'evaluation' v{v}"):
        check_version(table, dataclasses.replace(EVALUATION, version=v + 1))
    with pytest.raises(SchemaMismatch, match=rf"expected table 'pairs' v{schemas.PAIRS.version}, found 'evaluation' v{v}"):
        check_version(table, schemas.PAIRS)
    with pytest.raises(SchemaMismatch, match=r"found '\?' v\?"):
        check_version(pa.Table.from_pylist([row()]), EVALUATION)
