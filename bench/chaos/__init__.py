"""``python -m bench chaos``: the reliability issue's chaos run, against a real fleet on loopback.

A fleet of its own (an AOF redis-server, ``fleet api`` with keys on, ``fleet worker`` processes of one engine)
takes N predict jobs over HTTP while faults happen in turn: pool processes SIGKILLed, a whole worker SIGKILLed
and replaced, a poison job, a malformed message, Redis SIGKILLed and restarted. At the end every accepted job is
accounted for (succeeded, failed by type, lost, run twice) per fault window, with the time each fault took to
recover from.

Modules: :mod:`bench.chaos.plan` (the modes and the fault timeline), :mod:`bench.chaos.fleet` (the processes),
:mod:`bench.chaos.probes` (load generator, event listener, monitor, poison killer), :mod:`bench.chaos.tally`
(the pure accounting), :mod:`bench.chaos.report` (Markdown and JSON), :mod:`bench.chaos.run` (the run itself).
"""
