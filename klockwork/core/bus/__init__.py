"""The event bus (the third pillar): channels, consumer groups, await, broadcast.

* :mod:`.model` — messages, deliveries, await results, channel names and
  payload encoding (ground floor: the stores use it);
* :mod:`.rules` — the pure decisions a store applies inside its atomic
  section: redeliver, dead-letter, hand out new messages; await modes;
* :mod:`.channels` — ``kw.bus``: checks arguments, calls the store's bus
  primitives (:mod:`klockwork.core.stores.bus_base`), wakes waiters;
* :mod:`.waiting` — the long-poll loop shared by subscribe and await (sync
  and async drivers only sleep); :mod:`.awaiting` — ``await_channels``;
* :mod:`.listeners` — ``on()`` listeners and the pump that publishes
  governance events on ``klockwork.events`` while someone follows them.

May import: the ground floor, :mod:`klockwork.core.stores` and the audit
trail's JSON conversion (:func:`klockwork.core.audit.chain.to_json_value`).
"""
