"""Schemathesis hooks for batch-outbox: how the writer's NDJSON and CSV
bodies go on the wire.

The OpenAPI document describes both by their logical content (NDJSON: the
request objects; CSV: rows of string cells), so schemathesis generates that
content and these serializers write it in the media type's syntax. A body
that violates that content (a number instead of the rows, a cell that is not
a string) has no NDJSON or CSV form: negative cases with such a body are
left out; negative cases that break something else (a header) still run.
"""
import csv
import io
import json

import schemathesis


def _utf8(text):
    # Generated strings may hold lone surrogates, which UTF-8 cannot carry.
    return text.encode("utf-8", "replace")


def _raw(value):
    """A value that is not of the described shape (negative tests): sent as
    its JSON text, or as it is when it is text already."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return _utf8(value)
    return _utf8(json.dumps(value, ensure_ascii=False))


def _objects(value):
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _rows(value):
    return _objects(value) and all(isinstance(c, str) for row in value for c in row.values())


@schemathesis.hook
def filter_case(ctx, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_negative:
        return True
    if case.media_type == "application/x-ndjson":
        return _objects(case.body)
    if case.media_type == "text/csv":
        return _rows(case.body)
    return True


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if not isinstance(value, list):
        return _raw(value)
    lines = (json.dumps(item, ensure_ascii=False) for item in value)
    return _utf8("\n".join(lines) + "\n")


def _cell(value):
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@schemathesis.serializer("text/csv")
def text_csv(ctx, value):
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        return _raw(value)
    header = []
    for row in value:
        header.extend(key for key in row if key not in header)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in value:
        writer.writerow([_cell(row.get(key, "")) for key in header])
    return _utf8(out.getvalue())
