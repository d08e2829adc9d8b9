"""One module per measured system, all behind :class:`bench.systems.base.System`."""
