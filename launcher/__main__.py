"""`python -m launcher ...` and the `launcher` console script.

Nothing heavy is imported before the Ctrl-C handler is in place: torch and Hydra take a second or more
to import, and Ctrl-C then must give one line, not a traceback. SIGINT is held back while they import
(a KeyboardInterrupt inside an import can leave a module half-made, which some libraries' own
`try: import ...` then hide) and arrives right after. Shell completion is answered from here without
importing them at all (launcher/config/completion.py).
"""
import contextlib
import signal
import sys


@contextlib.contextmanager
def _ctrl_c_after():
    """SIGINT blocked inside the block; one that came meanwhile is delivered as it ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def main(argv: list) -> int:
    try:
        from launcher.config import completion  # the standard library only

        asked = completion.asked(argv)
        if asked and asked[0] == "query":  # a TAB: answered without torch or Hydra
            return completion.query(asked[1])
        with _ctrl_c_after():
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
