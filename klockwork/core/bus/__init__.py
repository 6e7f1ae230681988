"""The event bus (the third pillar): channels, consumer groups, await, broadcast.

Empty until the bus lands (see ``../shared/DESIGN.md`` "Event bus"); its
place is kept here so the house shows all three pillars. It will hold the
pure delivery decisions (visibility, redelivery, dead letters) apart from
the stores' atomic primitives, as :mod:`klockwork.core.leases` does.

May import: the ground floor and :mod:`klockwork.core.stores`.
"""
