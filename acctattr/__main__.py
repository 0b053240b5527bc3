"""``python -m acctattr`` (what ``torchrun ... -m acctattr run MANIFEST`` starts on each rank),
and the ``acctattr`` console command."""

from acctattr.signals import install


def main() -> None:
    install()  # before the heavy imports: a Ctrl-C in the first moments is handled too
    from acctattr.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
