"""``python -m acctattr`` (what ``torchrun ... -m acctattr run MANIFEST`` starts on each rank),
and the ``acctattr`` console command."""

from acctattr import signals


def main() -> None:
    signals.install()  # before the heavy imports: a Ctrl-C in the first moments is handled
    try:
        from acctattr.cli import main as cli_main
    except (KeyboardInterrupt, signals.Terminated):
        signals.say_and_exit()
    cli_main()


if __name__ == "__main__":
    main()
