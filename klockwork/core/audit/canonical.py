"""Formatting an audit entry's ``data`` as canonical JSON text directly.

The audit writer thread turns each recorded object into the canonical JSON
of its data (:mod:`klockwork.core.audit.chain`). The generic way,
``canonical_json(to_json_value(obj.__audit_data__()))``, builds a dict and
runs the JSON encoder; for klockwork's own records (a granted ``Lease``, an
ended ``LeaseRecord``, a refused verdict) that is most of the writer's cost
per entry, paid under the GIL by the threads that take leases.

So the writer formats the same text directly for them: inline for a
lease's record (:func:`~klockwork.core.audit.encode.encode_batch`), and
through ``__audit_json__()`` for any object whose class defines it (such as
:class:`~klockwork.core.audit.records.Denied`). The contract of both,
checked by the tests with generated odd values:

* The text is exactly ``canonical_json(to_json_value(obj.__audit_data__()))``
  decoded, whenever that text is valid UTF-8.
* Formatting raises (any exception, typically ``TypeError``) when a value is not of
  the exact type it formats: only exact ``str``, exact ``int`` within
  :data:`INT_LIMIT`, ``None`` and the class's own enum members are
  formatted. The writer then takes the generic way, so an odd value changes
  the cost, never the bytes.
* Strings holding lone surrogates come out as raw surrogates, which fail to
  encode as UTF-8; the writer catches that and takes the generic way too
  (which writes them as ``\\udXXX`` text).

This module only holds the shared helpers; it imports nothing from
klockwork, so any record class can use it.
"""

from __future__ import annotations

import json.encoder
from collections.abc import Callable

__all__ = ["INT_LIMIT", "json_str"]

#: The canonical JSON of an exact ``str`` (``json.dumps(s, ensure_ascii=False)``).
#: Check the type first: it also takes ``str`` subclasses, whose conversion
#: may differ (``to_json_value`` uses ``str(value)``).
json_str: Callable[[str], str] = json.encoder.encode_basestring

#: ``__audit_json__`` formats an ``int`` only when ``-INT_LIMIT < value < INT_LIMIT``
#: (far below the size at which ``to_json_value`` writes an int as hex).
INT_LIMIT = 1 << 63
