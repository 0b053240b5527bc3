"""``python -m acctattr`` (what ``torchrun ... -m acctattr run MANIFEST`` starts on each rank)."""

from acctattr.cli import main

main()
