"""``python -m loopwatch``: the same as the ``loopwatch`` command."""

from loopwatch._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
