import io

from maskloom._progress import Progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    """A stream that says it is a terminal (tqdm draws its bar there)."""

    def isatty(self) -> bool:
        return True


def test_in_a_log_a_line_every_interval_and_one_at_the_end():
    out, clock = io.StringIO(), Clock()  # StringIO is no terminal
    with Progress(10, desc="preprocess", unit="shard", initial=2, stream=out, interval=30, clock=clock) as p:
        for _ in range(3):
            clock.t += 10
            p.set_postfix(errors=1)
            p.update(1)  # at +10 s, +20 s: nothing yet; +30 s: a line
        clock.t += 5
        p.update(2)
    assert out.getvalue().splitlines() == [
        "preprocess: 5/10 shards (50%), 0.1 shards/s, errors=1",  # 3 new shards in 30 s
        "preprocess: 7/10 shards (70%), 0.143 shards/s, errors=1",  # on close: 5 in 35 s
    ]
    assert "\r" not in out.getvalue()


def test_disabled_writes_nothing_and_a_terminal_gets_tqdms_bar():
    out = io.StringIO()
    with Progress(4, desc="x", unit="step", enabled=False, stream=out) as p:
        p.update(4)
    assert out.getvalue() == ""

    tty = Tty()
    with Progress(4, desc="train", unit="step", stream=tty) as p:
        p.update(4)
    assert "\r" in tty.getvalue() and "train: 100%" in tty.getvalue() and "4/4" in tty.getvalue()


def test_moveto_sets_the_count_forward_and_back():
    """moveto: forward counts as an update (a line when due); back (a shard in flight redone) sets it."""
    out, clock = io.StringIO(), Clock()
    with Progress(10, desc="preprocess", unit="input", stream=out, interval=0, clock=clock) as p:
        clock.t += 1
        p.moveto(4)
        p.moveto(3)
        assert p.n == 3
        clock.t += 1
        p.moveto(6)

    tty = Tty()
    with Progress(10, desc="x", unit="input", stream=tty) as p:
        p.moveto(5)
        p.moveto(2)
        assert p._bar.n == 2
    assert out.getvalue().splitlines() == [
        "preprocess: 4/10 inputs (40%), 4 inputs/s",
        "preprocess: 6/10 inputs (60%), 3 inputs/s",
        "preprocess: 6/10 inputs (60%), 3 inputs/s",  # on close
    ]
