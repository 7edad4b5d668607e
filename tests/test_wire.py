"""The trap wire: msgpack messages over SOCK_SEQPACKET with fds by SCM_RIGHTS."""
import os

import pytest

from vmsim.machine.wire import MAX_FDS, Channel, ChannelClosed


def _fds(n: int) -> list[int]:
    out = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        out.append(r)
    return out


@pytest.mark.parametrize("n", [0, 1, MAX_FDS, MAX_FDS + 1, 3 * MAX_FDS + 7])
def test_any_number_of_fds_arrives_with_its_message(n):
    """More fds than one message may carry (SCM_MAX_FD) go ahead in messages of their own
    and arrive together with the message they belong to, in order."""
    a, b = Channel.pair()
    sent = _fds(n)
    try:
        a.send({"boot": n}, sent)
        a.send(["next"])
        obj, got = b.recv(timeout=5)
        assert obj == {"boot": n} and len(got) == n
        # the same files, in the same order
        assert [os.fstat(f).st_ino for f in got] == [os.fstat(f).st_ino for f in sent]
        assert b.recv_obj(timeout=5) == ["next"]
    finally:
        for f in sent + (got if n else []):
            os.close(f)
        a.close()
        b.close()


def test_fds_sent_ahead_are_closed_if_the_peer_goes():
    a, b = Channel.pair()
    sent = _fds(MAX_FDS)
    a._send(b"\xc1fds", sent)            # fds ahead of a message that never comes
    a.close()
    with pytest.raises(ChannelClosed):
        b.recv(timeout=5)
    for f in sent:
        os.close(f)
    b.close()
