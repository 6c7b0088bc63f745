"""sparsetrain's benchmark suites: ``python -m bench SUITE [options]`` (see README.md here).

Each suite is a module with ``run(args) -> list[Result]``; ``__main__`` parses
the shared options (:mod:`bench.options`), runs the suite and writes one JSON
in the schema of :mod:`bench.results`. A delegating suite (``race``) has no
``SHARED_DEFAULTS``: its arguments pass through, its ``run`` returns the
exit code, and the tool it runs writes its own results.
"""
