import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


class Hung(BaseException):
    """Raised by hang_guard; a BaseException, so no ``except Exception`` swallows it."""


@pytest.fixture
def hang_guard():
    """A test that blocks (a FIFO opened, an alias walked forever) fails after 60 s instead
    of hanging the suite. A guard, not a timing assertion; modules take it with
    ``pytestmark = pytest.mark.usefixtures("hang_guard")``."""
    import signal

    def stuck(signum, frame):
        raise Hung("hung for 60 s")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
