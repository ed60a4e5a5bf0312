"""ReplayWindow edge cases (the situations of the kernel's counter selftest)."""

from fzpoll.wireguard.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE
from fzpoll.wireguard.session import ReplayWindow


def accept(w: ReplayWindow, n: int) -> bool:
    return w.may_accept(n) and w.accept(n)


def test_in_order_and_duplicates():
    w = ReplayWindow()
    assert accept(w, 0)
    assert not accept(w, 0)
    assert accept(w, 1)
    assert not accept(w, 1)
    assert not w.may_accept(0)


def test_out_of_order_inside_window_accepted_once():
    w = ReplayWindow()
    assert accept(w, 10)
    for n in (9, 3, 7, 0):
        assert accept(w, n)
        assert not accept(w, n)


def test_window_edge():
    w = ReplayWindow()
    assert accept(w, REPLAY_WINDOW_SIZE + 10)
    newest = REPLAY_WINDOW_SIZE + 10
    assert accept(w, newest - REPLAY_WINDOW_SIZE + 1)  # the oldest still inside
    assert not accept(w, newest - REPLAY_WINDOW_SIZE)  # just outside
    assert not accept(w, 0)


def test_big_jump_forgets_old_bits():
    w = ReplayWindow()
    for n in range(50):
        assert accept(w, n)
    assert accept(w, 50 + 3 * REPLAY_WINDOW_SIZE)
    assert not accept(w, 49)
    assert accept(w, 50 + 3 * REPLAY_WINDOW_SIZE - 1)


def test_reject_after_messages_limit():
    w = ReplayWindow()
    assert not accept(w, REJECT_AFTER_MESSAGES)
    assert not accept(w, 2**64 - 1)
    assert accept(w, REJECT_AFTER_MESSAGES - 1)
    assert not accept(w, REJECT_AFTER_MESSAGES - 1)


def test_may_accept_does_not_mark():
    w = ReplayWindow()
    assert w.may_accept(5) and w.may_accept(5)
    assert w.accept(5)
    assert not w.may_accept(5)


def test_window_is_at_least_2048():
    assert REPLAY_WINDOW_SIZE >= 2048
    w = ReplayWindow()
    assert accept(w, 3000)
    assert accept(w, 3000 - 2048)
