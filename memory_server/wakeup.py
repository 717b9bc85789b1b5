"""A self-pipe that wakes an I/O thread blocked in ``zmq.Poller.poll`` (client and server)."""

from __future__ import annotations

import os


class Wakeup:
    """Other threads (and signal handlers, via ``write_fd``) call ``wake``; the poller watches
    ``read_fd`` and calls ``drain`` when it is readable."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except BlockingIOError:  # the pipe is full of wakeups already
            pass

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
