"""How tokengine-tiny is trained, one stage per module (the CLI is :mod:`tokengine.train`):
:mod:`.vision` (a), :mod:`.cache` (b), :mod:`.stage_c` (c), then :mod:`.scoring` and
:mod:`.card`; :mod:`.common` holds what they share."""
