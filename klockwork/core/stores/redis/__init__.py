"""The Redis store: leases, records, the audit trail and the bus on one Redis server.

Agents on several machines share one engine through it. See
:mod:`.connection` for URLs, keys and failure handling.
"""
