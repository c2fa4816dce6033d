"""bench/procs.py's connection count from /proc/net/tcp's lines (pure code: lines in, a count out)."""

from __future__ import annotations

from bench.procs import established_to

# /proc/net/tcp rows as the kernel writes them: sl, local, remote, state, ..., inode (field 9).
# Port 11211 is 2BCB; state 01 is ESTABLISHED, 06 TIME_WAIT, 0A LISTEN.
ROW = "{sl}: 0100007F:{lport} 0100007F:{rport} {st} 00000000:00000000 00:00000000 00000000 0 0 {inode} 1 0 20 4 30 10 -1"


def _row(inode: int, rport: str = "2BCB", st: str = "01", lport: str = "9C40") -> str:
    return ROW.format(sl=inode % 100, lport=lport, rport=rport, st=st, inode=inode)


def test_each_socket_counts_once_though_the_kernel_lists_it_twice() -> None:
    # Read in pieces while other sockets come and go, /proc/net/tcp can list a socket again.
    ours = {"101", "102", "103"}
    lines = [_row(101), _row(102), _row(101), _row(103), _row(102)]
    assert established_to(lines, [11211], ours) == 3


def test_only_our_established_sockets_to_the_ports_count() -> None:
    ours = {"101", "102", "103", "104", "105"}
    lines = [
        _row(101),                 # ours, established, to 11211: counts
        _row(102, st="06"),        # ours, TIME_WAIT
        _row(103, rport="2BCC"),   # ours, to another port
        _row(104, st="0A", rport="0000"),  # ours, listening
        _row(201),                 # established to 11211, but another process's
        _row(105, rport="2BCC"),   # ours, to the second port asked for below
    ]
    assert established_to(lines, [11211], ours) == 1
    assert established_to(lines, [11211, 11212], ours) == 3
    assert established_to([], [11211], ours) == 0
