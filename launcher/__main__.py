"""`python -m launcher ...` and the `launcher` console script.

Nothing heavy is imported before the Ctrl-C handler is in place: torch and Hydra take a second or more
to import, and Ctrl-C then must give one line, not a traceback. Shell completion is answered from
here without importing them at all (launcher/config/completion.py).
"""
import sys


def main(argv: list) -> int:
    try:
        from launcher.config import completion  # the standard library only

        asked = completion.asked(argv)
        if asked and asked[0] == "query":  # a TAB: answered without torch or Hydra
            return completion.query(asked[1])
        from launcher import cli  # torch, Hydra: seconds

        return cli.main(argv)
    except KeyboardInterrupt:  # while importing or composing: nothing was created yet
        print("launcher: interrupted", file=sys.stderr)
        return 130


def console() -> None:
    """The `launcher` console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    console()
