"""fzpoll: a userspace WireGuard-compatible tunnel daemon built on one fair epoll loop."""

__version__ = "0.1.0"
