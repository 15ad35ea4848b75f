"""The ``bklit`` commands, one module per group.

Each is ``async def command(args, config)`` (``bklit.command`` says what
they share): ``tokens`` manages API keys, ``queue`` shows the event stream
and moves dead letters back, ``sessions`` lists and ends live sessions,
``stats`` counts a project's traffic, and ``server`` migrates the schema,
probes a running server, plays the demo and checks the daemon's settings.
``bklit.arguments`` parses the command line and ``bklit.cli`` calls them.
"""
